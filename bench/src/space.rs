//! Address-space rows: demand faults, populate, fork of 1 GiB, dirty-log harvest of 1 GiB.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use twostage_aspace::{AddressSpace, Backend, FaultOutcome, HugePages, RegionId};
use twostage_npt::{Access, Ept4, GpaRange, GuestPhysAddr, MappingFlags, NestedPageFaultInfo};

use crate::anchor::{ax_gpa, ax_space, ax_space_unzeroed};
use crate::engine::{ept_options, GPA_BASE};
use crate::ram::BenchRam;
use crate::{cpu_write, ram, random_pages, GIB, MIB};

/// twostage's address space over the bench RAM.
pub type Space = AddressSpace<Ept4, &'static BenchRam>;

/// Bytes of the fault and populate rows.
pub const FAULT_BYTES: u64 = 256 * MIB;

fn ax_rwx() -> axaddrspace::MappingFlags {
    axaddrspace::MappingFlags::READ | axaddrspace::MappingFlags::WRITE | axaddrspace::MappingFlags::EXECUTE
}

/// An address space with one demand-zero RAM region of `len` bytes at [`GPA_BASE`], backed by
/// 4 KiB frames only (`HugePages::Never`): one frame per first touch, like the anchor's, and the
/// same table shape whatever runs of frames the bench RAM happens to offer.
pub fn ts_space(ram: &'static BenchRam, len: u64) -> (Space, RegionId) {
    let mut s = Space::new(ram, ept_options(true)).expect("space");
    s.set_huge_pages(HugePages::Never);
    let range = GpaRange::from_start_len(GuestPhysAddr::new(GPA_BASE), len).expect("range");
    let (id, f) = s.add_region("ram", range, MappingFlags::RWX, Backend::DemandZero).expect("region");
    s.flush_unloaded(f).expect("its own token");
    (s, id)
}

/// The same, with every page populated.
pub fn ts_populated(ram: &'static BenchRam, len: u64) -> Space {
    let (mut s, id) = ts_space(ram, len);
    let f = s.populate(id).expect("populate");
    s.flush_unloaded(f).expect("its own token");
    s
}

/// An address space whose RAM is one linear region at [`GPA_BASE`] over `len` contiguous bytes of
/// the bench RAM (host memory given by the caller, as a hypervisor gives its guest RAM, and like
/// vm-memory's one host mapping per region), and the host-physical address of its first byte.
pub fn ts_linear(ram: &'static BenchRam, len: u64) -> (Space, u64) {
    let host = ram.alloc_n((len / 4096) as usize, 512).expect("bench RAM for the linear region");
    let mut s = Space::new(ram, ept_options(true)).expect("space");
    let range = GpaRange::from_start_len(GuestPhysAddr::new(GPA_BASE), len).expect("range");
    let backend = Backend::Linear { host: twostage_npt::HostPhysAddr::new(host) };
    let (_, f) = s.add_region("ram", range, MappingFlags::RWX, backend).expect("region");
    s.flush_unloaded(f).expect("its own token");
    (s, host)
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    g.sampling_mode(SamplingMode::Flat);
    g
}

/// One demand fault per 4 KiB page over 256 MiB, and populating 256 MiB eagerly.
pub fn faults_populate(c: &mut Criterion) {
    let ram = ram();
    let pages = FAULT_BYTES / 4096;
    let mut g = group(c, "faults_256m");
    g.throughput(Throughput::Elements(pages));
    // `twostage`: the pool of zeroed frames is empty, each fault allocates and zeroes (as the
    // axaddrspace row does). `twostage-prepared`: the frames were zeroed ahead by
    // `prepare_zeroed`, off the timed fault path (its cost is the `prepare` row).
    // `prepare`: that preparation alone, per frame.
    for (name, prepared) in [("twostage", false), ("twostage-prepared", true)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut s, _) = ts_space(ram, FAULT_BYTES);
                    if prepared {
                        assert_eq!(s.prepare_zeroed(pages as usize), pages as usize, "bench RAM for the pool");
                    }
                    let start = Instant::now();
                    for p in 0..pages {
                        let info = NestedPageFaultInfo::new(GuestPhysAddr::new(GPA_BASE + p * 4096), Access::Write);
                        match s.handle_fault(info) {
                            FaultOutcome::Resolved { flush } => s.flush(flush, |_| {}).unwrap(),
                            other => panic!("fault not resolved: {other:?}"),
                        }
                    }
                    total += start.elapsed();
                    black_box(&s);
                }
                total
            })
        });
    }
    g.bench_function("prepare", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (mut s, _) = ts_space(ram, FAULT_BYTES);
                let start = Instant::now();
                s.prepare_zeroed(pages as usize);
                total += start.elapsed();
                black_box(&s);
            }
            total
        })
    });
    for (name, zero) in [("axaddrspace", true), ("axaddrspace-unzeroed", false)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut s = if zero {
                        ax_space(ram, true, 4 * GIB as usize)
                    } else {
                        ax_space_unzeroed(ram, 4 * GIB as usize)
                    };
                    s.map_alloc(ax_gpa(GPA_BASE), FAULT_BYTES as usize, ax_rwx(), false).expect("map_alloc");
                    let start = Instant::now();
                    for p in 0..pages {
                        assert!(s.handle_page_fault(ax_gpa(GPA_BASE + p * 4096), axaddrspace::MappingFlags::WRITE));
                    }
                    total += start.elapsed();
                    black_box(&s);
                }
                total
            })
        });
    }
    g.finish();

    let mut g = group(c, "populate_256m");
    g.bench_function("twostage", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let s = ts_populated(ram, FAULT_BYTES);
                total += start.elapsed();
                drop(s);
            }
            total
        })
    });
    g.bench_function("axaddrspace", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let mut s = ax_space(ram, true, 4 * GIB as usize);
                s.map_alloc(ax_gpa(GPA_BASE), FAULT_BYTES as usize, ax_rwx(), true).expect("map_alloc");
                total += start.elapsed();
                drop(s);
            }
            total
        })
    });
    g.finish();
}

/// Copy-on-write fork of a populated 1 GiB address space, against copying its bytes.
pub fn fork(c: &mut Criterion) {
    let ram = ram();
    let mut parent = ts_populated(ram, GIB);
    let mut g = group(c, "fork_1g");
    g.bench_function("twostage", |b| b.iter_custom(|iters| time_forks(&mut parent, iters)));
    drop(parent);
    // The same fork with the default 2 MiB backing (RAM of its own, whose aligned runs no other row
    // has used): 512 leaves instead of 262,144.
    let (mut parent, id) = ts_space(touch_ram(), GIB);
    parent.set_region_huge_pages(id, HugePages::Size2M).expect("the region");
    let f = parent.populate(id).expect("populate");
    parent.flush_unloaded(f).expect("its own token");
    let mut leaves = 0;
    parent.table().for_each_leaf(GuestPhysAddr::new(GPA_BASE), GIB, |_| leaves += 1);
    assert_eq!(leaves, 512, "1 GiB of 2 MiB pages");
    g.bench_function("twostage-2m", |b| b.iter_custom(|iters| time_forks(&mut parent, iters)));
    drop(parent);
    // The limit it is measured against: copying the same bytes (what a fork without
    // copy-on-write costs).
    let src = vec![1u8; GIB as usize];
    let mut dst = vec![2u8; GIB as usize];
    g.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
    g.finish();
}

/// `iters` forks of `parent` (each child dropped outside the timed part): their total time.
fn time_forks(parent: &mut Space, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        let (child, f) = parent.fork().expect("fork");
        parent.flush(f, |_| {}).expect("its own token");
        total += start.elapsed();
        drop(child);
    }
    total
}

/// Harvest the dirty log of 1 GiB of which 1% of pages were written since the last harvest.
pub fn harvest(c: &mut Criterion) {
    let ram = ram();
    let pages = GIB / 4096;
    let written = random_pages(0xd1e7, pages, (pages / 100) as usize);
    let mut s = ts_populated(ram, GIB);
    let range = GpaRange::from_start_len(GuestPhysAddr::new(GPA_BASE), GIB).expect("range");
    let (_mode, f) = s.start_dirty_log(range).expect("dirty log");
    s.flush(f, |_| {}).expect("its own token");
    let mut g = group(c, "harvest_1g");
    g.bench_function("twostage", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for &p in &written {
                    cpu_write(ram, s.root().as_u64(), GPA_BASE + p * 4096);
                }
                let start = Instant::now();
                let (bits, f) = s.harvest_dirty().expect("harvest");
                s.flush(f, |_| {}).expect("its own token");
                total += start.elapsed();
                assert_eq!(bits.count(), written.len() as u64, "the harvest saw every written page");
            }
            total
        })
    });
    g.finish();
}

/// Nested page faults a guest takes touching every 4 KiB page of 1 GiB of demand-zero RAM once,
/// in order, with `policy` (a page already mapped by an earlier fault's huge page takes none):
/// the figure behind "faults per GiB touched" (issue: 2 MiB backing), a count, not a time. `ram`
/// is RAM of its own ([`touch_ram`]): the shared bench RAM hands out aligned runs only from the
/// part no earlier row has used, so the count would depend on which rows ran before.
pub fn faults_per_gib(ram: &'static BenchRam, policy: HugePages) -> u64 {
    let (mut s, id) = ts_space(ram, GIB);
    s.set_region_huge_pages(id, policy).expect("the region");
    let mut faults = 0;
    for p in 0..GIB / 4096 {
        let gpa = GuestPhysAddr::new(GPA_BASE + p * 4096);
        if s.table().translate(gpa).is_some() {
            continue;
        }
        faults += 1;
        match s.handle_fault(NestedPageFaultInfo::new(gpa, Access::Write)) {
            FaultOutcome::Resolved { flush } => s.flush(flush, |_| {}).unwrap(),
            other => panic!("fault not resolved: {other:?}"),
        }
    }
    faults
}

/// RAM for [`faults_per_gib`]: 1 GiB and room for the tables.
pub fn touch_ram() -> &'static BenchRam {
    BenchRam::leak((GIB + 16 * MIB) as usize)
}
