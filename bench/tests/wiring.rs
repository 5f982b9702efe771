//! The benchmark's wiring does what the rows claim: the anchor really maps, unmaps and resolves
//! faults; the fake CPU's dirty write is seen by the engine; the allocator keeps its promises.

use axaddrspace::{MappingFlags as AxFlags, NestedPageTableOps, PageSize as AxSize};
use twostage_bench::anchor::{ax_gpa, ax_pa, ax_space};
use twostage_bench::engine::{ept_options, GPA_BASE};
use twostage_bench::ram::{BenchRam, RAM_BASE};
use twostage_bench::{cpu_write, MIB};
use twostage_npt::{AdClear, Ept4, GuestPhysAddr, HostPhysAddr, MapSize, MappingFlags, PageSize, PageTable};

const HPA: u64 = 0x80_0000_0000;

#[test]
fn anchor_maps_4k_only_and_unmaps_everything() {
    let ram = BenchRam::leak((8 * MIB) as usize);
    let mut s = ax_space(ram, false, 1 << 32);
    let base_frames = ram.frames_in_use();
    s.map_linear(ax_gpa(GPA_BASE), ax_pa(HPA), (16 * MIB) as usize, AxFlags::READ | AxFlags::WRITE).unwrap();
    let (pa, flags, size) = s.page_table().query(ax_gpa(GPA_BASE + 5 * MIB + 0x123)).unwrap();
    assert_eq!(pa.as_usize() as u64, HPA + 5 * MIB + 0x123);
    assert_eq!(size, AxSize::Size4K, "4 KiB-only wiring must not make blocks");
    assert!(flags.contains(AxFlags::WRITE));
    // 16 MiB of 4 KiB leaves: 8 page tables, a PD and a PDPT.
    assert_eq!(ram.frames_in_use() - base_frames, 10);
    s.unmap(ax_gpa(GPA_BASE), (16 * MIB) as usize).unwrap();
    assert!(s.translate(ax_gpa(GPA_BASE + 5 * MIB)).is_none());
    assert!(s.translate(ax_gpa(GPA_BASE + 16 * MIB - 4096)).is_none());
    assert!(ram.frames_in_use() - base_frames <= 2, "unmap freed the page tables");
}

#[test]
fn anchor_uses_2m_blocks_when_allowed() {
    let ram = BenchRam::leak((4 * MIB) as usize);
    let mut s = ax_space(ram, true, 1 << 32);
    s.map_linear(ax_gpa(GPA_BASE), ax_pa(HPA), (16 * MIB) as usize, AxFlags::READ).unwrap();
    let (pa, _, size) = s.page_table().query(ax_gpa(GPA_BASE + 3 * MIB)).unwrap();
    assert_eq!(size, AxSize::Size2M);
    assert_eq!(pa.as_usize() as u64, HPA + 3 * MIB);
}

#[test]
fn anchor_demand_fault_maps_a_zeroed_frame() {
    let ram = BenchRam::leak((4 * MIB) as usize);
    // Dirty the RAM so that a missing zeroing shows.
    for f in 0..ram.frames() {
        // SAFETY: inside the block, no frame allocated yet.
        unsafe { ram.ptr(RAM_BASE + (f * 4096) as u64).write(0xff) };
    }
    let mut s = ax_space(ram, true, 1 << 32);
    s.map_alloc(ax_gpa(GPA_BASE), MIB as usize, AxFlags::READ | AxFlags::WRITE, false).unwrap();
    assert!(s.translate(ax_gpa(GPA_BASE + 0x3000)).is_none());
    assert!(s.handle_page_fault(ax_gpa(GPA_BASE + 0x3008), AxFlags::WRITE));
    let pa = s.translate(ax_gpa(GPA_BASE + 0x3000)).unwrap();
    // SAFETY: the frame the fault mapped, inside the block.
    let first = unsafe { ram.ptr(pa.as_usize() as u64).read() };
    assert_eq!(first, 0);
    assert!(!s.handle_page_fault(ax_gpa(GPA_BASE + 2 * MIB), AxFlags::WRITE), "outside the area");
}

#[test]
fn twostage_maps_4k_only_and_the_fake_cpu_dirties_leaves() {
    let ram = BenchRam::leak((4 * MIB) as usize);
    let mut t: PageTable<Ept4, &BenchRam> = PageTable::new(ram, ept_options(false)).unwrap();
    let f = t
        .map(GuestPhysAddr::new(GPA_BASE), HostPhysAddr::new(HPA), 16 * MIB, MappingFlags::RW, MapSize::Largest)
        .unwrap();
    t.flush(f, |_| {}).unwrap();
    assert_eq!(t.query(GuestPhysAddr::new(GPA_BASE + 3 * MIB)).unwrap().size, PageSize::Size4K);
    cpu_write(ram, t.root().as_u64(), GPA_BASE + 3 * MIB + 0x10);
    let mut seen = Vec::new();
    let f = t.take_accessed_dirty(GuestPhysAddr::new(GPA_BASE), 16 * MIB, AdClear::Dirty, |l| {
        if l.dirty {
            seen.push(l.gpa.as_u64())
        }
    });
    t.flush(f, |_| {}).unwrap();
    assert_eq!(seen, vec![GPA_BASE + 3 * MIB]);
}

#[test]
fn allocator_reuses_freed_frames_and_aligns() {
    let ram = BenchRam::new(MIB as usize);
    let a = ram.alloc().unwrap();
    let b = ram.alloc_n(4, 4).unwrap();
    assert_eq!((b - RAM_BASE) % (4 * 4096), 0);
    assert_ne!(a, b);
    // SAFETY: `a` came from `alloc()` and is not used any more.
    unsafe { ram.free_n(a, 1) };
    assert_eq!(ram.alloc(), Some(a));
    assert_eq!(ram.frames_in_use(), 5);
    while ram.alloc().is_some() {}
    assert_eq!(ram.frames_in_use(), ram.frames());
}
