//! Engine-level rows: map and unmap 1 GiB, query at random addresses, harvest dirty bits of 1 GiB.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use twostage_npt::{
    AdClear, Ept4, GuestPhysAddr, HostPhysAddr, MapSize, MappingFlags, PageSize, PageSizes, PageTable, TableOptions,
};

use crate::anchor::{ax_gpa, ax_pa, ax_space};
use crate::ram::BenchRam;
use crate::{cpu_write, ram, random_pages, GIB, MIB};

/// Guest-physical base of the benchmark regions (1 GiB-aligned).
pub const GPA_BASE: u64 = 0x4000_0000;
/// Host-physical base the linear maps point at (2 MiB-aligned; never dereferenced).
pub const HPA_LINEAR: u64 = 0x80_0000_0000;
/// Queries per iteration of the query rows.
pub const QUERIES: usize = 4096;

/// Table options: 2 MiB leaves at most (the skylake_x capabilities), or 4 KiB only.
pub fn ept_options(huge: bool) -> TableOptions {
    let sizes = if huge { PageSizes::from_sizes(&[PageSize::Size2M]) } else { PageSizes::SIZE_4K_ONLY };
    TableOptions { leaf_sizes: sizes, ..TableOptions::for_format::<Ept4>() }
}

fn ts_table(ram: &'static BenchRam, huge: bool) -> PageTable<Ept4, &'static BenchRam> {
    PageTable::new(ram, ept_options(huge)).expect("root frame")
}

fn ts_map(t: &mut PageTable<Ept4, &'static BenchRam>, len: u64) {
    let f = t
        .map(GuestPhysAddr::new(GPA_BASE), HostPhysAddr::new(HPA_LINEAR), len, MappingFlags::RWX, MapSize::Largest)
        .expect("map");
    t.flush(f, |_| {}).expect("token of this table");
}

fn big_group<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_secs(1));
    g.sampling_mode(SamplingMode::Flat);
    g
}

/// Map and unmap 1 GiB linearly, with 2 MiB pages and with 4 KiB pages only.
pub fn map_unmap(c: &mut Criterion) {
    let ram = ram();
    for huge in [true, false] {
        let tag = if huge { "2M" } else { "4K" };
        let mut g = big_group(c, &format!("map_1g_{tag}"));
        g.bench_function("twostage", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut t = ts_table(ram, huge);
                    let start = Instant::now();
                    ts_map(&mut t, GIB);
                    total += start.elapsed();
                    black_box(&t);
                }
                total
            })
        });
        g.bench_function("axaddrspace", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut s = ax_space(ram, huge, 4 * GIB as usize);
                    let start = Instant::now();
                    s.map_linear(
                        ax_gpa(GPA_BASE),
                        ax_pa(HPA_LINEAR),
                        GIB as usize,
                        axaddrspace::MappingFlags::READ
                            | axaddrspace::MappingFlags::WRITE
                            | axaddrspace::MappingFlags::EXECUTE,
                    )
                    .expect("map_linear");
                    total += start.elapsed();
                    black_box(&s);
                }
                total
            })
        });
        g.finish();

        let mut g = big_group(c, &format!("unmap_1g_{tag}"));
        g.bench_function("twostage", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut t = ts_table(ram, huge);
                    ts_map(&mut t, GIB);
                    let start = Instant::now();
                    let f = t.unmap(GuestPhysAddr::new(GPA_BASE), GIB).expect("unmap");
                    t.flush(f, |_| {}).expect("token of this table");
                    total += start.elapsed();
                }
                total
            })
        });
        g.bench_function("axaddrspace", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut s = ax_space(ram, huge, 4 * GIB as usize);
                    s.map_linear(ax_gpa(GPA_BASE), ax_pa(HPA_LINEAR), GIB as usize, axaddrspace::MappingFlags::READ)
                        .expect("map_linear");
                    let start = Instant::now();
                    s.unmap(ax_gpa(GPA_BASE), GIB as usize).expect("unmap");
                    total += start.elapsed();
                }
                total
            })
        });
        g.finish();
    }
}

/// Translate random guest-physical addresses in a populated 256 MiB region of 4 KiB pages
/// (twostage: a demand-zero region after `populate`; axaddrspace: `map_alloc` with populate).
pub fn query(c: &mut Criterion) {
    let ram = ram();
    let len = 256 * MIB;
    let gpas: Vec<u64> =
        random_pages(0x5eed, len / 4096, QUERIES).into_iter().map(|p| GPA_BASE + p * 4096 + 0x123).collect();
    let mut g = c.benchmark_group("query_256m");
    g.sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(QUERIES as u64));

    let space = crate::space::ts_populated(ram, len);
    let t = space.table();
    g.bench_function("twostage", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for &gpa in &gpas {
                let (hpa, _) = t.translate(GuestPhysAddr::new(gpa)).expect("mapped");
                acc ^= hpa.as_u64();
            }
            acc
        })
    });
    drop(space);

    let mut s = ax_space(ram, true, 4 * GIB as usize);
    let rw = axaddrspace::MappingFlags::READ | axaddrspace::MappingFlags::WRITE;
    s.map_alloc(ax_gpa(GPA_BASE), len as usize, rw, true).expect("map_alloc");
    g.bench_function("axaddrspace", |b| {
        b.iter(|| {
            let mut acc = 0usize;
            for &gpa in &gpas {
                acc ^= s.translate(ax_gpa(gpa)).expect("mapped").as_usize();
            }
            acc
        })
    });
    g.finish();
}

/// Harvest the dirty bits of 1 GiB of 4 KiB leaves of which 1% were written (engine level:
/// `take_accessed_dirty`, the walk under the address space's `harvest_dirty`).
pub fn harvest_engine(c: &mut Criterion) {
    let ram = ram();
    let pages = GIB / 4096;
    let dirty = random_pages(0xd1e7, pages, (pages / 100) as usize);
    let mut t = ts_table(ram, false);
    ts_map(&mut t, GIB);
    let mut g = big_group(c, "harvest_1g");
    g.bench_function("twostage-engine", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut bitmap = vec![0u64; pages as usize / 64];
            for _ in 0..iters {
                for &p in &dirty {
                    cpu_write(ram, t.root().as_u64(), GPA_BASE + p * 4096);
                }
                let start = Instant::now();
                let f = t.take_accessed_dirty(GuestPhysAddr::new(GPA_BASE), GIB, AdClear::Dirty, |leaf| {
                    if leaf.dirty {
                        let i = (leaf.gpa.as_u64() - GPA_BASE) / 4096;
                        bitmap[(i / 64) as usize] |= 1 << (i % 64);
                    }
                });
                t.flush(f, |_| {}).expect("token of this table");
                total += start.elapsed();
                black_box(&bitmap);
            }
            total
        })
    });
    g.finish();
}
