//! Zeroed frames kept ready (`prepare_zeroed`): first touches take them and read as zeros even
//! when the allocator hands out dirty memory; the pool's frames are accounted (handed back by
//! `release_zeroed` and when the space drops); copies on write never take them; a fork starts
//! with an empty pool.

mod common;
use common::*;
use twostage_aspace::*;
use twostage_npt::{Access, AdMode, Ept4, FrameAllocator, MappingFlags, NestedPageFaultInfo};

type Space = AddressSpace<Ept4, Ram>;

const RAM_PAGES: u64 = 64;

/// Dirties every free frame of `ram` (allocates them all, fills them with 0xa5, frees them).
fn dirty_free_frames(ram: &Ram) {
    let mut all = Vec::new();
    while let Some(f) = ram.allocate_frame() {
        ram.write_bytes(f.as_u64(), &[0xa5; 4096]);
        all.push(f);
    }
    for f in all {
        // SAFETY: allocated just above, mapped nowhere.
        unsafe { ram.deallocate_frames(f, 1) };
    }
}

fn space(ram: &Ram) -> Space {
    let mut s: Space = AddressSpace::new(ram.clone(), opts::<Ept4>(AdMode::Hardware)).unwrap();
    s.set_huge_pages(HugePages::Never);
    let (_, f) = s.add_region("ram", range(0, RAM_PAGES * 4096), MappingFlags::RWX, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    s
}

fn fault(s: &mut Space, at: u64, access: Access) {
    match s.handle_fault(NestedPageFaultInfo::new(gpa(at), access)) {
        FaultOutcome::Resolved { flush } => s.flush(flush, |_| {}).unwrap(),
        other => panic!("fault at {at:#x}: {other:?}"),
    }
}

#[test]
fn first_touches_take_prepared_frames_which_read_as_zeros() {
    let ram = ram(512);
    let mut s = space(&ram);
    dirty_free_frames(&ram);
    let before = ram.frames_in_use();
    assert_eq!(s.prepare_zeroed(16), 16);
    assert_eq!(s.zeroed_ready(), 16);
    assert_eq!(ram.frames_in_use(), before + 16, "the pool's frames are allocated");
    let allocs = ram.allocations();
    // Ten first touches by fault (reads and writes) and two by guest-memory writes.
    for p in 0..10u64 {
        fault(&mut s, p * 4096, if p % 2 == 0 { Access::Read } else { Access::Write });
    }
    s.write(gpa(10 * 4096 + 8), &[1, 2, 3]).unwrap();
    s.write(gpa(11 * 4096), &[4]).unwrap();
    s.flush_pending(|_| {});
    assert_eq!(s.zeroed_ready(), 4);
    // Only table frames may have been allocated meanwhile, never a data frame.
    assert_eq!(ram.allocations() - allocs, (ram.frames_in_use() - before - 16) as u64);
    for p in 0..12u64 {
        let mut page = vec![0xffu8; 4096];
        s.read(gpa(p * 4096), &mut page).unwrap();
        let expect: Vec<u8> = match p {
            10 => (0..4096usize).map(|i| [1u8, 2, 3].get(i.wrapping_sub(8)).copied().unwrap_or(0)).collect(),
            11 => (0..4096).map(|i| u8::from(i == 0) * 4).collect(),
            _ => vec![0; 4096],
        };
        assert!(page == expect, "page {p} is not what a fresh demand-zero page holds");
    }
    // With the pool empty, first touches allocate and zero as before (the frames are dirty).
    s.release_zeroed(0);
    assert_eq!(s.zeroed_ready(), 0);
    for p in 12..20u64 {
        fault(&mut s, p * 4096, Access::Write);
        assert_eq!(s.read_obj::<u64>(gpa(p * 4096 + 0x800)).unwrap(), 0);
    }
    s.prepare_zeroed(8);
    drop(s);
    assert_eq!(ram.frames_in_use(), 0, "every frame (pool included) handed back");
}

#[test]
fn copies_on_write_and_forks_leave_the_pool_alone() {
    let ram = ram(512);
    let mut s = space(&ram);
    s.write(gpa(0), &[7; 64]).unwrap();
    s.flush_pending(|_| {});
    let (child, f) = s.fork().unwrap();
    s.flush_unloaded(f).unwrap();
    assert_eq!(child.zeroed_ready(), 0, "a fork starts with an empty pool");
    s.prepare_zeroed(4);
    // The parent's copy-on-write break copies into a new frame, never a pooled one.
    s.write(gpa(0), &[9; 8]).unwrap();
    s.flush_pending(|_| {});
    assert_eq!(s.zeroed_ready(), 4);
    let mut b = [0u8; 64];
    s.read(gpa(0), &mut b).unwrap();
    assert_eq!(&b[..8], &[9; 8]);
    assert_eq!(&b[8..], &[7; 56]);
    child.read(gpa(0), &mut b).unwrap();
    assert_eq!(b, [7; 64]);
    // Populate takes from the pool too.
    let id = s.regions().next().unwrap().id();
    let f = s.populate(id).unwrap();
    s.flush_unloaded(f).unwrap();
    assert_eq!(s.zeroed_ready(), 0);
    drop(child);
    drop(s);
    assert_eq!(ram.frames_in_use(), 0);
}
