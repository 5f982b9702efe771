//! Regions, faults, fork, dirty logging and GPA copies on a small fake machine.

mod common;
use common::*;
use twostage_aspace::*;
use twostage_npt::{Access, AdMode, Ept4, HostPhysAddr, MappingFlags, NestedPageFaultInfo, Sv39x4};

type Space<F> = AddressSpace<F, Ram>;

#[test]
fn demand_zero_faults_allocate_zeroed_frames() {
    let ram = ram(256);
    let mut s: Space<Sv39x4> = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (id, f) = s.add_region("ram", range(0x8000_0000, 0x10000), RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let before = ram.frames_in_use();
    assert_eq!(guest_read(&mut s, &ram, 0x8000_1008), 0);
    assert_eq!(ram.frames_in_use(), before + 1 + 2, "one data frame and two tables (Sv39x4 levels 1 and 0)");
    guest_write(&mut s, &ram, 0x8000_1008, 0xdead_beef);
    assert_eq!(guest_read(&mut s, &ram, 0x8000_1008), 0xdead_beef);
    let mut buf = [0u8; 8];
    s.read(gpa(0x8000_1008), &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 0xdead_beef);
    assert_eq!(s.stats().frames_allocated, 1);
    // Removing frees the frame once flushed.
    let f = s.remove_region(id).unwrap();
    assert!(s.has_pending(), "the frame waits for the flush");
    s.flush_unloaded(f).unwrap();
    drop(s);
    assert_eq!(ram.frames_in_use(), 0, "every frame freed");
}

#[test]
fn overlap_is_refused_naming_both_regions() {
    let ram = ram(64);
    let mut s: Space<Ept4> = AddressSpace::new(ram.clone(), opts::<Ept4>(AdMode::Hardware)).unwrap();
    let (_, f) = s.add_region("low", range(0x0, 0x4000), RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let err = s.add_region("uart", range(0x3000, 0x1000), RW, Backend::Mmio).unwrap_err();
    match err {
        AddRegionError::Overlap { name, range: r, existing } => {
            assert_eq!(name, "uart");
            assert_eq!(r, range(0x3000, 0x1000));
            assert_eq!(existing.name, "low");
        }
        other => panic!("{other:?}"),
    }
    let text = format!("{err}");
    assert!(text.contains("uart") && text.contains("low"), "{text}");
    // Adjacent is fine.
    let (_, f) = s.add_region("uart", range(0x4000, 0x1000), RW, Backend::Mmio).unwrap();
    s.flush_unloaded(f).unwrap();
    assert!(matches!(
        s.add_region("x", range(0x1001, 0x1000), RW, Backend::Mmio),
        Err(AddRegionError::Misaligned { .. })
    ));
}

#[test]
fn outcomes_mmio_violation_unmapped() {
    let ram = ram(64);
    let mut s: Space<Sv39x4> = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (uart, f) = s.add_region("uart", range(0x1000_0000, 0x1000), RW, Backend::Mmio).unwrap();
    s.flush_unloaded(f).unwrap();
    let (rom, f) = s.add_region("rom", range(0x2000_0000, 0x1000), MappingFlags::RX, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    match s.handle_fault(NestedPageFaultInfo::new(gpa(0x1000_0004), Access::Write)) {
        FaultOutcome::Mmio { gpa: g, access, region } => {
            assert_eq!((g, access, region), (gpa(0x1000_0004), Access::Write, uart));
        }
        other => panic!("{other:?}"),
    }
    match s.handle_fault(NestedPageFaultInfo::new(gpa(0x2000_0010), Access::Write)) {
        FaultOutcome::Violation { gpa: g, access, rights, region } => {
            assert_eq!((g, access, rights, region), (gpa(0x2000_0010), Access::Write, MappingFlags::RX, rom));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.handle_fault(NestedPageFaultInfo::new(gpa(0x3000_0000), Access::Read)),
        FaultOutcome::Unmapped { .. }
    ));
    // Execute on the ROM works and maps it executable.
    guest_access(&mut s, &ram, gpa(0x2000_0000), Access::Execute, 0);
    assert_eq!(s.table().query(gpa(0x2000_0000)).unwrap().flags.rights(), MappingFlags::RX);
}

#[test]
fn linear_regions_use_huge_pages_and_copies_reach_host_memory() {
    let ram = ram(2048);
    let host = ram.allocate_frames_for_test(1024, 512);
    let mut s: Space<Ept4> = AddressSpace::new(ram.clone(), opts::<Ept4>(AdMode::Hardware)).unwrap();
    let (_, f) = s.add_region("pass", range(0x4000_0000, 4 << 20), RW, Backend::Linear { host }).unwrap();
    s.flush_unloaded(f).unwrap();
    let leaf = s.table().query(gpa(0x4000_0000)).unwrap();
    assert_eq!(leaf.size, twostage_npt::PageSize::Size2M);
    let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| i as u8).collect();
    s.write(gpa(0x401f_f000), &data).unwrap();
    s.flush_pending(|_| {});
    let mut back = vec![0u8; data.len()];
    ram.read_bytes(host.as_u64() + 0x1f_f000, &mut back);
    assert_eq!(back, data);
    let mut back2 = vec![0u8; data.len()];
    s.read(gpa(0x401f_f000), &mut back2).unwrap();
    assert_eq!(back2, data);
    let text = s.to_string();
    assert!(text.contains("linear") && text.contains("2x2M"), "{text}");
}

#[test]
fn copies_cross_regions_and_pages_and_name_the_failing_address() {
    let ram = ram(256);
    let mut s: Space<Sv39x4> = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    for (name, start) in [("a", 0x10_0000u64), ("b", 0x10_4000)] {
        let (_, f) = s.add_region(name, range(start, 0x4000), RW, Backend::DemandZero).unwrap();
        s.flush_unloaded(f).unwrap();
    }
    let data: Vec<u8> = (0..0x5000u32).map(|i| (i * 7) as u8).collect();
    s.write(gpa(0x10_1800), &data).unwrap();
    s.flush_pending(|_| {});
    let mut back = vec![0u8; data.len()];
    s.read(gpa(0x10_1800), &mut back).unwrap();
    assert_eq!(back, data);
    // The guest sees the same bytes.
    let w = guest_read(&mut s, &ram, 0x10_4000);
    assert_eq!(w.to_le_bytes(), data[0x2800..0x2808]);
    // Past the end: the error names the first unmapped address; nothing was written.
    let err = s.write(gpa(0x10_7000), &[1u8; 0x2000]).unwrap_err();
    assert_eq!(err, GuestMemError::Unmapped { gpa: gpa(0x10_8000), access: Access::Write });
    s.flush_pending(|_| {});
    let mut one = [9u8; 1];
    s.read(gpa(0x10_7000), &mut one).unwrap();
    assert_eq!(one, [0]);
    // Reads of untouched pages are zeros and do not populate.
    let before = ram.frames_in_use();
    let mut z = [1u8; 64];
    s.read(gpa(0x10_7000), &mut z).unwrap();
    assert_eq!(z, [0u8; 64]);
    assert_eq!(ram.frames_in_use(), before);
    let err = s.read(gpa(u64::MAX >> 5), &mut z).unwrap_err();
    assert!(matches!(err, GuestMemError::Overflow { .. }), "{err:?}");
}

#[test]
fn fork_isolates_writes_and_accounts_frames() {
    let ram = ram(512);
    let mut p: Space<Sv39x4> = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (_, f) = p.add_region("ram", range(0x8000_0000, 0x20000), RW, Backend::DemandZero).unwrap();
    p.flush_unloaded(f).unwrap();
    for i in 0..8 {
        guest_write(&mut p, &ram, 0x8000_0000 + i * 0x1000, 100 + i);
    }
    let frames_before = ram.frames_in_use();
    let (mut c, f) = p.fork().unwrap();
    p.flush(f, |_| {}).unwrap();
    // Only the child's tables were allocated: no data frame was copied.
    assert_eq!(
        ram.frames_in_use() - frames_before,
        4 + 2,
        "fork must allocate only the child's root (16 KiB) and two tables"
    );
    assert_eq!(p.frame_refs().count(p.table().query(gpa(0x8000_0000)).unwrap().hpa), 2);
    guest_write(&mut p, &ram, 0x8000_0000, 1);
    guest_write(&mut c, &ram, 0x8000_1000, 2);
    assert_eq!(guest_read(&mut p, &ram, 0x8000_0000), 1);
    assert_eq!(guest_read(&mut c, &ram, 0x8000_0000), 100);
    assert_eq!(guest_read(&mut p, &ram, 0x8000_1000), 101);
    assert_eq!(guest_read(&mut c, &ram, 0x8000_1000), 2);
    // A page untouched before the fork is private and zero on both sides.
    guest_write(&mut c, &ram, 0x8001_0000, 7);
    assert_eq!(guest_read(&mut p, &ram, 0x8001_0000), 0);
    // The last holder only regains the write right.
    let copies = c.stats().cow_copies;
    drop(p);
    guest_write(&mut c, &ram, 0x8000_2000, 3);
    assert_eq!(c.stats().cow_copies, copies, "last holder must not copy");
    assert_eq!(guest_read(&mut c, &ram, 0x8000_2000), 3);
    drop(c);
    assert_eq!(ram.frames_in_use(), 0);
}

fn dirty_log_reports_exactly_written_pages(ad: AdMode, want: DirtyMode) {
    let ram = ram(2048);
    let host = ram.allocate_frames_for_test(1024, 512);
    let mut s: Space<Ept4> = AddressSpace::new(ram.clone(), opts::<Ept4>(ad)).unwrap();
    let (_, f) = s.add_region("ram", range(0x0, 0x10000), RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let (_, f) = s.add_region("pass", range(0x20_0000, 2 << 20), RW, Backend::Linear { host }).unwrap();
    s.flush_unloaded(f).unwrap();
    guest_write(&mut s, &ram, 0x3000, 1);
    let (mode, f) = s.start_dirty_log(range(0, 8 << 20)).unwrap();
    assert_eq!(mode, want);
    s.flush(f, |_| {}).unwrap();
    // A linear region added while the log runs is logged too (2 MiB page split or protected).
    let (_, f) =
        s.add_region("late", range(0x40_0000, 2 << 20), RW, Backend::Linear { host: host + (2 << 20) }).unwrap();
    s.flush(f, |_| {}).unwrap();
    guest_write(&mut s, &ram, 0x41_0000, 9);
    guest_write(&mut s, &ram, 0x3000, 2);
    guest_write(&mut s, &ram, 0x5000, 2);
    guest_read(&mut s, &ram, 0x6000);
    guest_write(&mut s, &ram, 0x20_3000, 2);
    s.write(gpa(0x8ff8), &[1u8; 16]).unwrap();
    s.flush_pending(|_| {});
    let (bits, f) = s.harvest_dirty().unwrap();
    s.flush(f, |_| {}).unwrap();
    let got: Vec<u64> = bits.iter().map(|g| g.as_u64()).collect();
    assert_eq!(got, vec![0x3000, 0x5000, 0x8000, 0x9000, 0x20_3000, 0x41_0000]);
    // Re-armed: only new writes show.
    guest_write(&mut s, &ram, 0x5000, 3);
    guest_read(&mut s, &ram, 0x3000);
    let (bits, f) = s.harvest_dirty().unwrap();
    s.flush(f, |_| {}).unwrap();
    assert_eq!(bits.iter().map(|g| g.as_u64()).collect::<Vec<_>>(), vec![0x5000]);
    let f = s.stop_dirty_log().unwrap();
    s.flush(f, |_| {}).unwrap();
    assert!(s.table().query(gpa(0x3000)).unwrap().flags.contains(MappingFlags::WRITE));
    drop(s);
    // SAFETY: test-only frames from allocate_frames_for_test, no longer mapped.
    unsafe { twostage_npt::FrameAllocator::deallocate_frames(&*ram, host, 1024) };
    assert_eq!(ram.frames_in_use(), 0);
}

#[test]
fn dirty_log_with_hardware_dirty_bits() {
    dirty_log_reports_exactly_written_pages(AdMode::Hardware, DirtyMode::DirtyBits);
}

#[test]
fn dirty_log_with_write_protection() {
    dirty_log_reports_exactly_written_pages(AdMode::Preset, DirtyMode::WriteProtect);
}

#[test]
fn out_of_memory_is_reported_and_nothing_leaks() {
    let ram = ram(256);
    let mut s: Space<Sv39x4> = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (id, f) = s.add_region("ram", range(0x8000_0000, 0x40000), RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    ram.fail_after(0);
    assert!(matches!(
        s.handle_fault(NestedPageFaultInfo::new(gpa(0x8000_0000), Access::Write)),
        FaultOutcome::OutOfMemory { .. }
    ));
    ram.heal();
    ram.fail_after(10);
    let err = s.populate(id).unwrap_err();
    assert!(matches!(err, PopulateError::OutOfMemory { .. }));
    s.flush_pending(|_| {});
    ram.heal();
    let f = s.populate(id).unwrap();
    s.flush_unloaded(f).unwrap();
    assert_eq!(s.stats().frames_allocated, 64);
    drop(s);
    assert_eq!(ram.frames_in_use(), 0);
}

trait TestFrames {
    fn allocate_frames_for_test(&self, n: usize, align: usize) -> HostPhysAddr;
}
impl TestFrames for Ram {
    fn allocate_frames_for_test(&self, n: usize, align: usize) -> HostPhysAddr {
        twostage_npt::FrameAllocator::allocate_frames(&**self, n, align).unwrap()
    }
}

#[test]
fn dump_shows_regions_backends_and_page_sizes() {
    let ram = ram(2048);
    let host = ram.allocate_frames_for_test(1024, 512);
    let mut s: Space<Ept4> = AddressSpace::new(ram.clone(), opts::<Ept4>(AdMode::Hardware)).unwrap();
    let (_, f) = s.add_region("ram", range(0x0, 0x10000), RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let (_, f) =
        s.add_region("fw", range(0x20_0000, (2 << 20) + 0x3000), MappingFlags::RX, Backend::Linear { host }).unwrap();
    s.flush_unloaded(f).unwrap();
    let (_, f) = s.add_region("uart", range(0x1000_0000, 0x1000), RW, Backend::Mmio).unwrap();
    s.flush_unloaded(f).unwrap();
    guest_write(&mut s, &ram, 0x1000, 1);
    guest_write(&mut s, &ram, 0x2000, 1);
    let (c, f) = s.fork().unwrap();
    s.flush_unloaded(f).unwrap();
    let text = s.to_string();
    println!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("EPT") && lines[0].contains("3 region(s)"), "{text}");
    assert!(
        lines[1].contains("GPA[0x0..0x10000)")
            && lines[1].contains("copy-on-write")
            && lines[1].contains("2x4K")
            && lines[1].contains("2 shared"),
        "{text}"
    );
    assert!(lines[2].contains("linear") && lines[2].contains("1x2M 3x4K") && lines[2].contains("r-x"), "{text}");
    assert!(lines[3].contains("mmio") && lines[3].contains("uart"), "{text}");
    drop(c);
}

#[test]
fn share_from_gives_copy_on_write_frames_between_two_spaces() {
    let ram = ram(512);
    let mut tmpl: Space<Sv39x4> = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (img, f) = tmpl.add_region("image", range(0x8000_0000, 0x8000), RW, Backend::DemandZero).unwrap();
    tmpl.flush_unloaded(f).unwrap();
    for i in 0..4 {
        guest_write(&mut tmpl, &ram, 0x8000_0000 + i * 0x1000, 10 + i);
    }
    let mut vm: Space<Sv39x4> =
        AddressSpace::with_refs(ram.clone(), opts::<Sv39x4>(AdMode::Hardware), tmpl.frame_refs().clone()).unwrap();
    let before = ram.frames_in_use();
    let (id, f, g) = vm.share_from("image", gpa(0x4000_0000), &mut tmpl, img).unwrap();
    vm.flush_unloaded(f).unwrap();
    tmpl.flush_unloaded(g).unwrap();
    assert_eq!(vm.region(id).unwrap().backend(), Backend::CopyOnWrite);
    assert!(ram.frames_in_use() - before <= 2, "no data frame copied");
    assert_eq!(guest_read(&mut vm, &ram, 0x4000_2000), 12);
    guest_write(&mut vm, &ram, 0x4000_2000, 99);
    guest_write(&mut tmpl, &ram, 0x8000_3000, 77);
    assert_eq!(guest_read(&mut tmpl, &ram, 0x8000_2000), 12);
    assert_eq!(guest_read(&mut vm, &ram, 0x4000_3000), 13);
    // A space with its own FrameRefs cannot share.
    let mut other: Space<Sv39x4> = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let err = other.share_from("x", gpa(0), &mut tmpl, img).unwrap_err();
    assert_eq!(err, ShareError::DifferentFrameRefs);
    other.flush_pending(|_| {});
    drop((tmpl, vm, other));
    assert_eq!(ram.frames_in_use(), 0);
}

#[test]
fn accessed_bits_are_harvested_for_reclaim() {
    let ram = ram(512);
    let mut s: Space<Ept4> = AddressSpace::new(ram.clone(), opts::<Ept4>(AdMode::Hardware)).unwrap();
    let (_, f) = s.add_region("ram", range(0x0, 0x10000), RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    for p in [0x1000, 0x2000, 0x3000] {
        guest_write(&mut s, &ram, p, 1);
    }
    let (bits, f) = s.harvest_accessed(range(0, 0x10000)).unwrap();
    s.flush(f, |_| {}).unwrap();
    assert_eq!(bits.iter().map(|g| g.as_u64()).collect::<Vec<_>>(), vec![0x1000, 0x2000, 0x3000]);
    guest_read(&mut s, &ram, 0x2008);
    let (bits, f) = s.harvest_accessed(range(0, 0x10000)).unwrap();
    s.flush(f, |_| {}).unwrap();
    assert_eq!(bits.iter().map(|g| g.as_u64()).collect::<Vec<_>>(), vec![0x2000]);
}

#[test]
fn fork_under_a_write_protect_log_gives_the_child_full_rights_and_isolates_both() {
    use twostage_npt::FrameAllocator;
    let ram = ram(512);
    // EPT without A/D bits: the dirty log write-protects.
    let mut p: Space<Ept4> = AddressSpace::new(ram.clone(), opts::<Ept4>(AdMode::Preset)).unwrap();
    let host = ram.allocate_frames(4, 1).unwrap();
    let (_, f) = p.add_region("dev", range(0x10_0000, 0x4000), RW, Backend::Linear { host }).unwrap();
    p.flush_unloaded(f).unwrap();
    let (_, f) = p.add_region("ram", range(0x20_0000, 0x10000), RW, Backend::DemandZero).unwrap();
    p.flush_unloaded(f).unwrap();
    // Several pages in one copy (the multi-page host-run path), then one page (the fast path).
    p.write(gpa(0x20_0000), &[5u8; 0x3000]).unwrap();
    p.flush_pending(|_| {});
    let (mode, f) = p.start_dirty_log(range(0x10_0000, 0x20_0000)).unwrap();
    assert_eq!(mode, DirtyMode::WriteProtect);
    p.flush_unloaded(f).unwrap();
    assert!(!p.table().query(gpa(0x10_0000)).unwrap().flags.contains(MappingFlags::WRITE));
    let (mut c, f) = p.fork().unwrap();
    p.flush(f, |_| {}).unwrap();
    // The child has no log: its linear pages have the region's rights; its anonymous pages are
    // shared read-only, as the parent's are.
    assert_eq!(c.table().query(gpa(0x10_0000)).unwrap().flags, RW);
    for s in [&p, &c] {
        assert!(!s.table().query(gpa(0x20_1000)).unwrap().flags.contains(MappingFlags::WRITE));
    }
    // Hypervisor writes on each side copy the shared page; the other side keeps its bytes.
    c.write(gpa(0x20_1008), &7u64.to_le_bytes()).unwrap();
    c.flush_pending(|_| {});
    p.write(gpa(0x20_1000), &[9u8; 0x2000]).unwrap();
    p.flush_pending(|_| {});
    let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
    p.read(gpa(0x20_1000), &mut a).unwrap();
    c.read(gpa(0x20_1000), &mut b).unwrap();
    assert_eq!(a, [9u8; 16]);
    assert_eq!(b[..8], [5u8; 8]);
    assert_eq!(u64::from_le_bytes(b[8..].try_into().unwrap()), 7);
    let mut far = [0u8; 4];
    c.read(gpa(0x20_2ffe), &mut far).unwrap();
    assert_eq!(far, [5, 5, 0, 0], "the child still sees the bytes from before the fork, then zeros");
    // The parent's log saw its own writes only.
    let (bits, f) = p.harvest_dirty().unwrap();
    p.flush_unloaded(f).unwrap();
    assert_eq!(bits.iter().map(|g| g.as_u64()).collect::<Vec<_>>(), [0x20_1000, 0x20_2000]);
    drop(c);
    drop(p);
    // SAFETY: the linear host range came from this allocator and no space maps it any more.
    unsafe { ram.deallocate_frames(host, 4) };
    assert_eq!(ram.frames_in_use(), 0, "every frame freed");
}

/// A fault on a page whose leaf already allows the access comes from a stale cached entry. On
/// RISC-V a guest-page fault invalidates nothing, so resolving it must ask for a fence (else the
/// hart retries on the same cached entry forever); on EPT the violation itself invalidated it.
#[test]
fn a_stale_fault_is_resolved_with_the_fence_the_cpu_needs() {
    use twostage_npt::{EptInvalidation, GvmaInvalidation};
    let ram = ram(256);
    let mut s: Space<Sv39x4> = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (id, f) = s.add_region("ram", range(0x8000_0000, 0x4000), RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let f = s.populate(id).unwrap();
    s.flush_unloaded(f).unwrap();
    // Populated pages are accessed and dirty after a write: a write fault now is stale.
    guest_write(&mut s, &ram, 0x8000_1000, 1);
    match s.handle_fault(NestedPageFaultInfo::new(gpa(0x8000_1000), Access::Write)) {
        FaultOutcome::Resolved { flush } => {
            // The whole VMID (the stale entry may be a non-leaf one), on the faulting hart only.
            assert!(matches!(flush.invalidation(), GvmaInvalidation::Local { addrs: None, .. }), "{flush:?}");
            s.flush_unloaded(flush).unwrap();
        }
        other => panic!("{other:?}"),
    }
    let mut e: Space<Ept4> = AddressSpace::new(ram.clone(), opts::<Ept4>(AdMode::Hardware)).unwrap();
    let (id, f) = e.add_region("ram", range(0x10_0000, 0x4000), RW, Backend::DemandZero).unwrap();
    e.flush_unloaded(f).unwrap();
    let f = e.populate(id).unwrap();
    e.flush_unloaded(f).unwrap();
    guest_write(&mut e, &ram, 0x10_1000, 1);
    match e.handle_fault(NestedPageFaultInfo::new(gpa(0x10_1000), Access::Write)) {
        FaultOutcome::Resolved { flush } => assert_eq!(flush.invalidation(), EptInvalidation::None),
        other => panic!("{other:?}"),
    }
}
