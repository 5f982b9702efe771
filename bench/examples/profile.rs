//! One workload of the benchmark at a time, a fixed number of operations, for a profiler:
//! `valgrind --tool=callgrind target/release/examples/profile WORKLOAD`.
//!
//! Workloads: query-ts, query-ax, query-lean, map4k-ts, map4k-ax, unmap4k-ts, unmap4k-ax, fault-ts,
//! fault-ts-prepared (frames zeroed ahead, outside the counted part),
//! fault-ax, harvest-lean, read64k-ts, write4k-ts, write8-ts, gva-x86-4k, gva-sv39-4k, fork-ts, harvest-ts,
//! and the engine's range walks over a table of 4 KiB pages: protect4k-ts, ad4k-ts (take_accessed_dirty
//! of 1 GiB with 2621 dirty pages), leaves4k-ts (for_each_leaf of 1 GiB), clone256-ts (try_clone of
//! 256 MiB), drop4k-ts (dropping a table of 1 GiB).

use std::hint::black_box;

use twostage_aspace::guest::copy_from_guest_va;
use twostage_aspace::{FaultOutcome, GuestMemory};
use twostage_bench::anchor::{ax_gpa, ax_pa, ax_space};
use twostage_bench::engine::{ept_options, GPA_BASE, HPA_LINEAR};
use twostage_bench::ram::BenchRam;
use twostage_bench::space::{ts_populated, ts_space};
use twostage_bench::{cpu_write, random_offsets, random_pages, GIB, MIB};
use twostage_npt::{
    Access, AdClear, Ept4, GpaRange, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, MapSize, MappingFlags,
    NestedPageFaultInfo, PageTable,
};

fn ts_table(ram: &'static BenchRam, len: u64) -> PageTable<Ept4, &'static BenchRam> {
    let mut t = PageTable::new(ram, ept_options(false)).expect("root");
    let f = t
        .map(GuestPhysAddr::new(GPA_BASE), HostPhysAddr::new(HPA_LINEAR), len, MappingFlags::RWX, MapSize::Largest)
        .expect("map");
    t.flush(f, |_| {}).expect("token of this table");
    t
}

/// The measured part of a workload (profile with `--toggle-collect='profile::measured*'`).
#[inline(never)]
fn measured<R>(f: impl FnOnce() -> R) -> R {
    let start = std::time::Instant::now();
    let r = f();
    eprintln!("measured: {:?}", start.elapsed());
    r
}

fn main() {
    let what = std::env::args().nth(1).expect("workload name");
    let big = matches!(
        what.as_str(),
        "fork-ts" | "harvest-ts" | "harvest-lean" | "map4k-ts" | "map4k-ax" | "unmap4k-ts" | "unmap4k-ax"
    );
    let ram = BenchRam::leak(if big { (GIB + 256 * MIB) as usize } else { (320 * MIB) as usize });
    let n = 65536u64;
    match what.as_str() {
        "query-lean" => {
            // The same table as query-ts, walked by a minimal EPT walk over its memory: how much
            // of query-ts is the walk's memory traffic and how much the engine's code.
            let gpas: Vec<u64> = random_pages(1, n, n as usize).into_iter().map(|p| GPA_BASE + p * 4096).collect();
            let t = ts_table(ram, 256 * MIB);
            let root = t.root().as_u64();
            measured(|| {
                for &g in &gpas {
                    let mut table = root;
                    let mut hpa = 0;
                    for level in (0..4).rev() {
                        let idx = (g >> (12 + 9 * level)) & 511;
                        // SAFETY: an entry of a table frame of `t`, read only.
                        let e = unsafe { ram.ptr(table + idx * 8).cast::<u64>().read_volatile() };
                        if e & 7 == 0 {
                            break;
                        }
                        let addr = e & 0x000f_ffff_ffff_f000;
                        if level == 0 || e & (1 << 7) != 0 {
                            hpa = addr | (g & ((1 << (12 + 9 * level)) - 1));
                            break;
                        }
                        table = addr;
                    }
                    black_box(hpa);
                }
            });
        }
        "query-ts" | "query-ax" => {
            let gpas: Vec<u64> = random_pages(1, n, n as usize).into_iter().map(|p| GPA_BASE + p * 4096).collect();
            if what == "query-ts" {
                let t = ts_table(ram, 256 * MIB);
                measured(|| {
                    for &g in &gpas {
                        black_box(t.translate(GuestPhysAddr::new(g)));
                    }
                });
            } else {
                let mut s = ax_space(ram, false, 4 << 30);
                s.map_linear(
                    ax_gpa(GPA_BASE),
                    ax_pa(HPA_LINEAR),
                    (256 * MIB) as usize,
                    axaddrspace::MappingFlags::READ,
                )
                .expect("map");
                measured(|| {
                    for &g in &gpas {
                        black_box(s.translate(ax_gpa(g)));
                    }
                });
            }
        }
        "map4k-ts" => drop(black_box(measured(|| ts_table(ram, GIB)))),
        "map4k-ax" => {
            let mut s = ax_space(ram, false, 4 << 30);
            measured(|| {
                s.map_linear(ax_gpa(GPA_BASE), ax_pa(HPA_LINEAR), GIB as usize, axaddrspace::MappingFlags::READ)
                    .expect("map")
            });
            std::mem::forget(s);
        }
        "unmap4k-ts" => {
            let mut t = ts_table(ram, GIB);
            measured(|| {
                let f = t.unmap(GuestPhysAddr::new(GPA_BASE), GIB).expect("unmap");
                t.flush(f, |_| {}).expect("token of this table");
            });
        }
        "unmap4k-ax" => {
            let mut s = ax_space(ram, false, 4 << 30);
            s.map_linear(ax_gpa(GPA_BASE), ax_pa(HPA_LINEAR), GIB as usize, axaddrspace::MappingFlags::READ)
                .expect("map");
            measured(|| s.unmap(ax_gpa(GPA_BASE), GIB as usize).expect("unmap"));
        }
        "protect4k-ts" => {
            let mut t = ts_table(ram, GIB);
            measured(|| {
                let f = t.protect(GuestPhysAddr::new(GPA_BASE), GIB, MappingFlags::READ).expect("protect");
                t.flush(f, |_| {}).expect("token of this table");
            });
        }
        "ad4k-ts" => {
            let mut t = ts_table(ram, GIB);
            for p in random_pages(4, GIB / 4096, 2621) {
                cpu_write(ram, t.root().as_u64(), GPA_BASE + p * 4096);
            }
            let found = measured(|| {
                let mut found = 0u64;
                let f = t.take_accessed_dirty(GuestPhysAddr::new(GPA_BASE), GIB, AdClear::Dirty, |l| {
                    found += u64::from(l.dirty)
                });
                t.flush(f, |_| {}).expect("token of this table");
                found
            });
            assert_eq!(found, 2621);
        }
        "leaves4k-ts" => {
            let t = ts_table(ram, GIB);
            let n = measured(|| {
                let mut n = 0u64;
                t.for_each_leaf(GuestPhysAddr::new(GPA_BASE), GIB, |l| n += l.hpa.as_u64() & 1 ^ 1);
                n
            });
            assert_eq!(n, GIB / 4096);
        }
        "clone256-ts" => {
            let t = ts_table(ram, 256 * MIB);
            let copy = measured(|| t.try_clone().expect("clone"));
            assert_eq!(copy.table_frames(), t.table_frames());
        }
        "drop4k-ts" => {
            let t = ts_table(ram, GIB);
            measured(|| drop(t));
        }
        "fault-ts" | "fault-ts-prepared" => {
            let (mut s, _) = ts_space(ram, n * 4096);
            if what == "fault-ts-prepared" {
                let ready = s.prepare_zeroed(n as usize);
                eprintln!("zeroed frames ready: {ready}");
            }
            measured(|| {
                for p in 0..n {
                    match s
                        .handle_fault(NestedPageFaultInfo::new(GuestPhysAddr::new(GPA_BASE + p * 4096), Access::Write))
                    {
                        FaultOutcome::Resolved { flush } => s.flush(flush, |_| {}).unwrap(),
                        other => panic!("{other:?}"),
                    }
                }
            });
        }
        "fault-ax" => {
            let mut s = ax_space(ram, true, 4 << 30);
            let rwx = axaddrspace::MappingFlags::READ | axaddrspace::MappingFlags::WRITE;
            s.map_alloc(ax_gpa(GPA_BASE), (n * 4096) as usize, rwx, false).expect("map_alloc");
            measured(|| {
                for p in 0..n {
                    assert!(s.handle_page_fault(ax_gpa(GPA_BASE + p * 4096), axaddrspace::MappingFlags::WRITE));
                }
            });
            std::mem::forget(s);
        }
        "read64k-ts" | "write4k-ts" | "write8-ts" => {
            let mut s = ts_populated(ram, 256 * MIB);
            let size = match what.as_str() {
                "read64k-ts" => 65536,
                "write4k-ts" => 4096,
                _ => 8,
            };
            let mut buf = vec![7u8; size as usize];
            let offs = random_offsets(2, 256 * MIB, size, 4096);
            measured(|| {
                for off in offs {
                    let gpa = GuestPhysAddr::new(GPA_BASE + off);
                    if what == "read64k-ts" {
                        s.read(gpa, &mut buf).expect("read");
                    } else {
                        s.write(gpa, &buf).expect("write");
                        s.flush_pending(|_| {});
                    }
                }
            });
        }
        "gva-x86-4k" | "gva-sv39-4k" => {
            let mut s = ts_populated(ram, 256 * MIB + 2 * MIB);
            let paging = twostage_bench::gva::install(&mut s, what == "gva-x86-4k");
            let mut mem = &mut s;
            let mut buf = vec![0u8; 4096];
            let offs = random_offsets(3, 256 * MIB, 4096, 4096);
            measured(|| {
                for off in offs {
                    let gva = GuestVirtAddr::new(twostage_bench::gva::GVA_BASE + off);
                    copy_from_guest_va(&mut mem, &paging, gva, &mut buf).expect("read");
                }
            });
        }
        "harvest-lean" => {
            // The same populated 1 GiB table and writes as harvest-ts, harvested by a minimal
            // scan of its leaf entries (mask test, atomic clear of D only where set).
            let mut s = ts_populated(ram, GIB);
            let range = GpaRange::from_start_len(GuestPhysAddr::new(GPA_BASE), GIB).expect("range");
            let (_, f) = s.start_dirty_log(range).expect("log");
            s.flush(f, |_| {}).unwrap();
            for p in random_pages(4, GIB / 4096, 2621) {
                cpu_write(ram, s.root().as_u64(), GPA_BASE + p * 4096);
            }
            let mut leaf_tables = Vec::new();
            s.table().for_each_leaf(GuestPhysAddr::new(GPA_BASE), GIB, |l| {
                if l.gpa.as_u64() % (2 * MIB) == 0 {
                    leaf_tables.push(l.gpa.as_u64());
                }
            });
            // Find each leaf table's frame with the fake CPU's walk (PD entry, bits 51:12).
            let root = s.root().as_u64();
            let tables: Vec<u64> = leaf_tables
                .iter()
                .map(|&g| {
                    let mut t = root;
                    for level in (1..4).rev() {
                        let idx = (g >> (12 + 9 * level)) & 511;
                        // SAFETY: an entry of a table frame of the space, read only.
                        t = unsafe { ram.ptr(t + idx * 8).cast::<u64>().read() } & 0x000f_ffff_ffff_f000;
                    }
                    t
                })
                .collect();
            let found = measured(|| {
                let mut found = 0u64;
                for &t in &tables {
                    for i in 0..512u64 {
                        let p = ram.ptr(t + i * 8).cast::<u64>();
                        // SAFETY: an 8-byte-aligned entry of a leaf table of the space.
                        let e = unsafe { std::sync::atomic::AtomicU64::from_ptr(p) };
                        if e.load(std::sync::atomic::Ordering::Relaxed) & (1 << 9) != 0 {
                            e.fetch_and(!(1 << 9), std::sync::atomic::Ordering::AcqRel);
                            found += 1;
                        }
                    }
                }
                found
            });
            assert_eq!(found, 2621);
        }
        "fork-ts" => {
            let mut s = ts_populated(ram, GIB);
            let child = measured(|| {
                let (child, f) = s.fork().expect("fork");
                s.flush(f, |_| {}).unwrap();
                child
            });
            drop(child);
        }
        "harvest-ts" => {
            let mut s = ts_populated(ram, GIB);
            let range = GpaRange::from_start_len(GuestPhysAddr::new(GPA_BASE), GIB).expect("range");
            let (_, f) = s.start_dirty_log(range).expect("log");
            s.flush(f, |_| {}).unwrap();
            for p in random_pages(4, GIB / 4096, 2621) {
                cpu_write(ram, s.root().as_u64(), GPA_BASE + p * 4096);
            }
            let bits = measured(|| {
                let (bits, f) = s.harvest_dirty().expect("harvest");
                s.flush(f, |_| {}).unwrap();
                bits
            });
            assert_eq!(bits.count(), 2621);
        }
        other => panic!("unknown workload {other}"),
    }
}
