//! Engine behaviour every format shares: sizes chosen, errors refused without change, splits,
//! collapses, flush tokens, and frame accounting (including allocation failing half way).

use twostage_npt::testing::{HostRam, HOST_RAM_BASE};
use twostage_npt::EptCapabilities;
use twostage_npt::*;

const G: u64 = 1 << 30;
const M2: u64 = 2 << 20;
const K4: u64 = 4096;

fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(a)
}
fn hpa(a: u64) -> HostPhysAddr {
    HostPhysAddr::new(a)
}

/// Host addresses used as mapping targets: the table never touches them, so any aligned value
/// works; keep them far from HostRam's own frames so mistakes are visible.
const TARGET: u64 = 0x80_0000_0000;

macro_rules! engine_tests {
    ($modname:ident, $fmt:ty) => {
        mod $modname {
            use super::*;
            type F = $fmt;

            fn table(ram: &HostRam) -> PageTable<F, &HostRam> {
                PageTable::new(ram, TableOptions::for_format::<F>()).unwrap()
            }

            #[test]
            fn largest_pages_follow_alignment() {
                let ram = HostRam::new(256);
                let mut t = table(&ram);
                // 4K head, 2M body, 1G in the middle where both sides are 1G-aligned.
                let start = G - M2 - K4;
                let len = K4 + M2 + G + M2;
                t.map(gpa(start), hpa(TARGET + start), len, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
                assert_eq!(t.query(gpa(start)).unwrap().size, PageSize::Size4K);
                assert_eq!(t.query(gpa(G - M2)).unwrap().size, PageSize::Size2M);
                assert_eq!(t.query(gpa(G + 12345)).unwrap().size, PageSize::Size1G);
                assert_eq!(t.query(gpa(2 * G)).unwrap().size, PageSize::Size2M);
                assert_eq!(t.query(gpa(2 * G + M2)), None);
                let (h, f) = t.translate(gpa(G + 12345)).unwrap();
                assert_eq!(h, hpa(TARGET + G + 12345));
                assert_eq!(f, MappingFlags::RW);
                // Misaligned host address: only 4K pages possible.
                t.map(gpa(8 * G), hpa(TARGET + K4), M2, MappingFlags::READ, MapSize::Largest).unwrap().ignore();
                assert_eq!(t.query(gpa(8 * G)).unwrap().size, PageSize::Size4K);
                assert_eq!(t.query(gpa(8 * G + M2 - K4)).unwrap().hpa, hpa(TARGET + M2));
            }

            #[test]
            fn cpu_without_huge_pages_gets_4k_only() {
                let ram = HostRam::new(64);
                let opts = TableOptions { leaf_sizes: PageSizes::SIZE_4K_ONLY, ..TableOptions::for_format::<F>() };
                let mut t = PageTable::<F, _>::new(&ram, opts).unwrap();
                t.map(gpa(0), hpa(TARGET), 2 * M2, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
                assert_eq!(t.query(gpa(M2)).unwrap().size, PageSize::Size4K);
                assert_eq!(
                    t.map(gpa(G), hpa(TARGET), M2, MappingFlags::RW, MapSize::Exactly(PageSize::Size2M)).unwrap_err(),
                    MapError::UnsupportedPageSize(PageSize::Size2M)
                );
            }

            #[test]
            fn bad_requests_change_nothing() {
                let ram = HostRam::new(64);
                let mut t = table(&ram);
                t.map(gpa(M2), hpa(TARGET), M2, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
                let frames = ram.frames_in_use();
                let before = t.dump().to_string();
                let r = MappingFlags::READ;
                assert!(matches!(
                    t.map(gpa(1), hpa(TARGET), K4, r, MapSize::Largest),
                    Err(MapError::BadGuestRange { problem: RangeProblem::Unaligned, .. })
                ));
                assert!(matches!(
                    t.map(gpa(0), hpa(TARGET), 0, r, MapSize::Largest),
                    Err(MapError::BadGuestRange { problem: RangeProblem::Empty, .. })
                ));
                assert!(matches!(
                    t.map(gpa(0), hpa(TARGET + 8), K4, r, MapSize::Largest),
                    Err(MapError::BadHostRange { problem: RangeProblem::Unaligned, .. })
                ));
                let top = 1u64 << <F as Format>::GPA_BITS;
                assert!(matches!(
                    t.map(gpa(top - K4), hpa(TARGET), 2 * K4, r, MapSize::Largest),
                    Err(MapError::BadGuestRange { problem: RangeProblem::OutOfRange, .. })
                ));
                assert!(matches!(
                    t.map(gpa(0), hpa(TARGET), K4, MappingFlags::WRITE, MapSize::Largest),
                    Err(MapError::BadFlags { .. })
                ));
                assert!(matches!(
                    t.map(gpa(0), hpa(TARGET), K4, MappingFlags::empty(), MapSize::Largest),
                    Err(MapError::BadFlags { .. })
                ));
                // Overlap at the far end of the request: the first part must not stay mapped.
                assert_eq!(
                    t.map(gpa(0), hpa(TARGET), M2 + K4, r, MapSize::Largest).unwrap_err(),
                    MapError::AlreadyMapped { gpa: gpa(M2) }
                );
                assert!(matches!(t.unmap(gpa(3), K4), Err(RangeError::BadRange { .. })));
                assert!(matches!(t.protect(gpa(0), K4, MappingFlags::WRITE), Err(RangeError::BadFlags { .. })));
                assert_eq!(t.dump().to_string(), before);
                assert_eq!(ram.frames_in_use(), frames);
                assert_eq!(t.query(gpa(0)), None);
            }

            #[test]
            fn allocation_failing_half_way_leaves_the_table_as_it_was() {
                let ram = HostRam::new(64);
                let mut t = table(&ram);
                let baseline = ram.frames_in_use();
                // Spread over two 1G areas so that several tables are needed.
                let mut needed = 0;
                for k in 0.. {
                    ram.fail_after(k);
                    match t.map(gpa(G - 2 * K4), hpa(TARGET), 4 * K4, MappingFlags::RW, MapSize::Largest) {
                        Err(MapError::OutOfFrames(e)) => {
                            needed = e.needed;
                            assert_eq!(ram.frames_in_use(), baseline, "frames leaked at failure point {k}");
                            assert_eq!(t.query(gpa(G - 2 * K4)), None);
                        }
                        Ok(f) => {
                            f.ignore();
                            assert_eq!(k as usize, needed, "succeeded once all needed frames were there");
                            break;
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
                ram.heal();
                assert_eq!(ram.frames_in_use(), baseline + needed);
                // A partial unmap of a huge page needs split frames: failing them changes nothing.
                t.map(gpa(4 * G), hpa(TARGET), G, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
                let before = t.dump().to_string();
                let used = ram.frames_in_use();
                ram.fail_after(0);
                assert!(matches!(t.unmap(gpa(4 * G + K4), K4), Err(RangeError::OutOfFrames(_))));
                assert!(matches!(t.protect(gpa(4 * G + M2), K4, MappingFlags::READ), Err(RangeError::OutOfFrames(_))));
                assert!(matches!(t.split(gpa(4 * G)), Err(SplitError::OutOfFrames(_))));
                ram.heal();
                assert_eq!(t.dump().to_string(), before);
                assert_eq!(ram.frames_in_use(), used);
                drop(t);
                assert_eq!(ram.frames_in_use(), 0, "drop frees every table frame");
            }

            #[test]
            fn partial_unmap_and_protect_split_huge_pages() {
                let ram = HostRam::new(64);
                let mut t = table(&ram);
                t.map(gpa(G), hpa(TARGET), G, MappingFlags::RWX, MapSize::Largest).unwrap().ignore();
                assert_eq!(t.query(gpa(G)).unwrap().size, PageSize::Size1G);
                let f = t.unmap(gpa(G + M2 + K4), K4).unwrap();
                assert!(!f.is_empty());
                t.flush(f, |_| {}).unwrap();
                assert_eq!(t.query(gpa(G + M2 + K4)), None);
                assert_eq!(t.query(gpa(G + M2)).unwrap().size, PageSize::Size4K);
                assert_eq!(t.query(gpa(G + M2 + 2 * K4)).unwrap().hpa, hpa(TARGET + M2 + 2 * K4));
                assert_eq!(t.query(gpa(G)).unwrap().size, PageSize::Size2M);
                assert_eq!(t.query(gpa(2 * G - 1)).unwrap().size, PageSize::Size2M);
                let f = t.protect(gpa(G + 4 * M2), M2 + K4, MappingFlags::READ).unwrap();
                t.flush(f, |_| {}).unwrap();
                assert_eq!(
                    t.query(gpa(G + 4 * M2)).unwrap(),
                    Leaf {
                        gpa: gpa(G + 4 * M2),
                        hpa: hpa(TARGET + 4 * M2),
                        size: PageSize::Size2M,
                        flags: MappingFlags::READ,
                        accessed: false,
                        dirty: false
                    }
                );
                assert_eq!(t.query(gpa(G + 5 * M2)).unwrap().flags, MappingFlags::READ);
                assert_eq!(t.query(gpa(G + 5 * M2)).unwrap().size, PageSize::Size4K);
                assert_eq!(t.query(gpa(G + 5 * M2 + K4)).unwrap().flags, MappingFlags::RWX);
                // Unmapping everything frees every table but the root, once flushed.
                let f = t.unmap(gpa(0), 4 * G).unwrap();
                t.flush(f, |_| {}).unwrap();
                assert_eq!(t.table_frames(), <F as Format>::ROOT_FRAMES);
                assert_eq!(ram.frames_in_use(), <F as Format>::ROOT_FRAMES);
            }

            #[test]
            fn split_then_collapse_round_trips() {
                let ram = HostRam::new(64);
                let mut t = table(&ram);
                t.map(gpa(M2 * 3), hpa(TARGET), M2, MappingFlags::RX, MapSize::Largest).unwrap().ignore();
                let big = t.query(gpa(M2 * 3)).unwrap();
                t.split(gpa(M2 * 3 + 5 * K4)).unwrap().ignore();
                assert_eq!(t.query(gpa(M2 * 3 + 5 * K4)).unwrap().size, PageSize::Size4K);
                assert_eq!(t.split(gpa(M2 * 3)), Err(SplitError::AlreadySmallest(gpa(M2 * 3))));
                assert_eq!(t.split(gpa(0)), Err(SplitError::NotMapped(gpa(0))));
                let f = t.collapse(gpa(M2 * 3 + K4), PageSize::Size2M).unwrap();
                t.flush(f, |_| {}).unwrap();
                assert_eq!(t.query(gpa(M2 * 3)).unwrap(), big);
                // Mixed rights cannot collapse.
                t.split(gpa(M2 * 3)).unwrap().ignore();
                t.protect(gpa(M2 * 3), K4, MappingFlags::READ).unwrap().ignore();
                assert_eq!(
                    t.collapse(gpa(M2 * 3), PageSize::Size2M),
                    Err(CollapseError::NotCollapsible { gpa: gpa(M2 * 3), reason: NotCollapsible::MixedFlags })
                );
                // Not contiguous cannot either.
                t.map(gpa(G), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
                assert_eq!(
                    t.collapse(gpa(G), PageSize::Size2M),
                    Err(CollapseError::NotCollapsible { gpa: gpa(G), reason: NotCollapsible::NotAllLeaves })
                );
            }

            #[test]
            fn accessed_dirty_are_reported_and_cleared() {
                let ram = HostRam::new(64);
                let opts = TableOptions { ad: AdMode::Software, ..TableOptions::for_format::<F>() };
                let mut t = PageTable::<F, _>::new(&ram, opts).unwrap();
                t.map(gpa(0), hpa(TARGET), 8 * K4, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
                t.set_accessed_dirty(gpa(K4), Access::Read).unwrap().ignore();
                t.set_accessed_dirty(gpa(3 * K4), Access::Write).unwrap().ignore();
                let mut seen = Vec::new();
                let f =
                    t.take_accessed_dirty(gpa(0), 8 * K4, AdClear::Dirty, |l| seen.push((l.gpa, l.accessed, l.dirty)));
                assert!(!f.is_empty());
                f.ignore();
                assert_eq!(seen, vec![(gpa(K4), true, false), (gpa(3 * K4), true, true)]);
                let q = t.query(gpa(3 * K4)).unwrap();
                assert!(q.accessed && !q.dirty);
                let mut again = Vec::new();
                t.take_accessed_dirty(gpa(0), 8 * K4, AdClear::Both, |l| again.push(l.gpa)).ignore();
                assert_eq!(again, vec![gpa(K4), gpa(3 * K4)]);
                let f = t.take_accessed_dirty(gpa(0), 8 * K4, AdClear::Both, |_| panic!("nothing is set any more"));
                assert!(f.is_empty(), "nothing cleared, nothing to flush");
                assert_eq!(t.set_accessed_dirty(gpa(G), Access::Read), Err(AdError::NotMapped(gpa(G))));
            }

            #[test]
            fn dump_lists_runs() {
                let ram = HostRam::new(64);
                let mut t = table(&ram);
                t.map(gpa(0x8000_0000), hpa(TARGET), 4 * M2 + 3 * K4, MappingFlags::RW, MapSize::Largest)
                    .unwrap()
                    .ignore();
                let text = t.dump().to_string();
                assert!(
                    text.contains("GPA 0x000080000000-0x000080800000 -> HPA 0x008000000000  2M x 4      rw-"),
                    "{text}"
                );
                assert!(
                    text.contains("GPA 0x000080800000-0x000080803000 -> HPA 0x008000800000  4K x 3      rw-"),
                    "{text}"
                );
            }

            #[test]
            fn root_has_the_formats_size_and_alignment() {
                let ram = HostRam::new(64);
                let t = table(&ram);
                let bytes = 4096 * <F as Format>::ROOT_FRAMES as u64;
                assert!(t.root().is_aligned(bytes));
                assert!(t.root().as_u64() >= HOST_RAM_BASE);
                assert_eq!(ram.frames_in_use(), <F as Format>::ROOT_FRAMES);
            }
        }
    };
}

engine_tests!(ept4, Ept4);
engine_tests!(ept5, Ept5);
engine_tests!(sv39x4, Sv39x4);
engine_tests!(sv48x4, Sv48x4);
engine_tests!(sv57x4, Sv57x4);

#[test]
fn ept_new_mappings_need_no_invept_but_changes_do() {
    let ram = HostRam::new(64);
    let mut t = PageTable::<Ept4, _>::new(&ram, TableOptions::for_format::<Ept4>()).unwrap();
    let f = t.map(gpa(0), hpa(TARGET), 3 * K4, MappingFlags::RW, MapSize::Largest).unwrap();
    assert_eq!(f.invalidation(), EptInvalidation::None);
    f.ignore();
    let root = t.root();
    let f = t.protect(gpa(K4), K4, MappingFlags::READ).unwrap();
    assert_eq!(f.invalidation(), EptInvalidation::SingleContext { root });
    t.flush(f, |_| {}).unwrap();
    // Protecting to the same rights changes nothing and asks for nothing.
    let f = t.protect(gpa(K4), K4, MappingFlags::READ).unwrap();
    assert_eq!(f.invalidation(), EptInvalidation::None);
    f.ignore();
    let f = t.unmap(gpa(0), K4).unwrap();
    assert_eq!(f.invalidation(), EptInvalidation::SingleContext { root });
    f.ignore();
}

#[test]
fn gstage_flushes_by_address_for_leaves_and_by_vmid_for_tables() {
    let ram = HostRam::new(64);
    let mut t = PageTable::<Sv39x4, _>::new(&ram, TableOptions::for_format::<Sv39x4>()).unwrap();
    let root = t.root();
    // The first mapping links new tables: a non-leaf change (see the tests below), from invalid
    // to valid, so only the hart that made it fences (`Local`).
    let f = t.map(gpa(0), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::Local { root, addrs: None });
    assert!(!f.needs_other_harts());
    f.ignore();
    let f = t.map(gpa(K4), hpa(TARGET + K4), K4, MappingFlags::RW, MapSize::Largest).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::Local { root, addrs: Some(&[gpa(K4)]) });
    f.ignore();
    let f = t.protect(gpa(K4), K4, MappingFlags::READ).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::Addresses { root, addrs: &[gpa(K4)] });
    assert!(f.needs_other_harts(), "a valid leaf lost a right: every hart fences");
    f.ignore();
    // Giving the right back only widens (same frame and attributes): the changing hart fences.
    let f = t.protect(gpa(K4), K4, MappingFlags::RWX).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::Local { root, addrs: Some(&[gpa(K4)]) });
    f.ignore();
    // A new memory type is no widening.
    let f = t.protect(gpa(K4), K4, MappingFlags::RWX | MappingFlags::UNCACHED).unwrap();
    assert!(f.is_empty() || f.needs_other_harts(), "{f:?}");
    f.ignore();
    let f = t.protect(gpa(K4), K4, MappingFlags::READ).unwrap();
    assert!(f.needs_other_harts());
    f.ignore();
    // Unmapping the last leaves frees the tables: a non-leaf change, flushed for the whole VMID.
    let frames = ram.frames_in_use();
    let f = t.unmap(gpa(0), 2 * K4).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::All { root });
    assert_eq!(ram.frames_in_use(), frames, "retired tables wait for the flush");
    let mut ran = false;
    t.flush(f, |inv| ran = matches!(inv, GvmaInvalidation::All { .. })).unwrap();
    assert!(ran);
    assert_eq!(ram.frames_in_use(), 4, "only the 16 KiB root is left");
    // Many leaves widen to the VMID (still new ones only: local).
    let f = t.map(gpa(0), hpa(TARGET), 64 * K4, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::Local { root, addrs: None });
    f.ignore();
}

#[test]
fn execute_only_needs_the_option() {
    let ram = HostRam::new(64);
    let opts = TableOptions { execute_only: false, ..TableOptions::for_format::<Ept4>() };
    let mut t = PageTable::<Ept4, _>::new(&ram, opts).unwrap();
    assert!(matches!(
        t.map(gpa(0), hpa(TARGET), K4, MappingFlags::EXECUTE, MapSize::Largest),
        Err(MapError::BadFlags { reason: FlagsError::ExecuteOnlyUnsupported, .. })
    ));
    let mut t = PageTable::<Ept4, _>::new(&ram, TableOptions::for_format::<Ept4>()).unwrap();
    t.map(gpa(0), hpa(TARGET), K4, MappingFlags::EXECUTE, MapSize::Largest).unwrap().ignore();
    assert_eq!(t.query(gpa(0)).unwrap().flags, MappingFlags::EXECUTE);
}

#[test]
fn remap_swaps_the_frame_in_place() {
    let ram = HostRam::new(64);
    let mut t = PageTable::<Sv39x4, _>::new(&ram, TableOptions::for_format::<Sv39x4>()).unwrap();
    t.map(gpa(0), hpa(TARGET), 2 * K4, MappingFlags::READ, MapSize::Largest).unwrap().ignore();
    let frames = ram.frames_in_use();
    ram.fail_after(0);
    let f = t.remap(gpa(K4), hpa(TARGET + 8 * K4), MappingFlags::RW).unwrap();
    ram.heal();
    assert_eq!(f.invalidation(), GvmaInvalidation::Addresses { root: t.root(), addrs: &[gpa(K4)] });
    f.ignore();
    assert_eq!(ram.frames_in_use(), frames);
    assert_eq!(t.translate(gpa(K4 + 5)), Some((hpa(TARGET + 8 * K4 + 5), MappingFlags::RW)));
    assert_eq!(t.remap(gpa(4 * K4), hpa(TARGET), MappingFlags::RW), Err(RemapError::NotMapped(gpa(4 * K4))));
    t.map(gpa(M2), hpa(TARGET), M2, MappingFlags::READ, MapSize::Largest).unwrap().ignore();
    assert_eq!(
        t.remap(gpa(M2 + K4), hpa(TARGET), MappingFlags::RW),
        Err(RemapError::NotLeafBase { gpa: gpa(M2 + K4), size: PageSize::Size2M })
    );
    assert_eq!(
        t.remap(gpa(M2), hpa(TARGET + K4), MappingFlags::RW),
        Err(RemapError::Unaligned { hpa: hpa(TARGET + K4), size: PageSize::Size2M })
    );
}

#[test]
fn preset_leaves_stay_dirty_when_they_become_writable() {
    // RISC-V without hardware A/D updating faults on a store to a D=0 leaf; under Preset nobody
    // would ever set it, so every writable leaf must carry D, also after protect or remap.
    let ram = HostRam::new(64);
    let opts = TableOptions { ad: AdMode::Preset, ..TableOptions::for_format::<Sv39x4>() };
    let mut t = PageTable::<Sv39x4, _>::new(&ram, opts).unwrap();
    t.map(gpa(0), hpa(TARGET), 2 * K4, MappingFlags::READ, MapSize::Largest).unwrap().ignore();
    let q = t.query(gpa(0)).unwrap();
    assert!(q.accessed && !q.dirty);
    t.protect(gpa(0), K4, MappingFlags::RW).unwrap().ignore();
    let q = t.query(gpa(0)).unwrap();
    assert!(q.accessed && q.dirty);
    t.remap(gpa(K4), hpa(TARGET + 4 * K4), MappingFlags::RW).unwrap().ignore();
    assert!(t.query(gpa(K4)).unwrap().dirty);
}

#[test]
fn try_clone_copies_every_mapping_into_new_tables() {
    let ram = HostRam::new(256);
    let mut t = PageTable::<Ept4, _>::new(&ram, TableOptions::for_format::<Ept4>()).unwrap();
    t.map(gpa(G - M2), hpa(TARGET), M2 + G + 3 * K4, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
    t.map(gpa(8 * G), hpa(TARGET), K4, MappingFlags::RX, MapSize::Largest).unwrap().ignore();
    let used = ram.frames_in_use();
    let c = t.try_clone().unwrap();
    assert_ne!(c.root(), t.root());
    assert_eq!(ram.frames_in_use(), 2 * used, "one new frame per table, nothing else");
    assert_eq!(
        c.dump().to_string().lines().skip(1).collect::<Vec<_>>(),
        t.dump().to_string().lines().skip(1).collect::<Vec<_>>()
    );
    // Independent: changing the copy leaves the original alone.
    let mut c = c;
    c.protect(gpa(G), G, MappingFlags::READ).unwrap().ignore();
    assert_eq!(t.query(gpa(G)).unwrap().flags, MappingFlags::RW);
    // Failing allocations give the frames back.
    ram.fail_after(2);
    assert!(t.try_clone().is_err());
    ram.heal();
    drop(c);
    assert_eq!(ram.frames_in_use(), used);
}

#[test]
fn try_clone_protected_copies_and_write_protects_in_one_pass() {
    let ram = HostRam::new(256);
    let mut t = PageTable::<Sv39x4, _>::new(&ram, TableOptions::for_format::<Sv39x4>()).unwrap();
    // An anonymous-like area of 4 KiB pages (as many as a token names one by one) and a "linear" 2 MiB page outside the ranges.
    t.map(gpa(G), hpa(TARGET + K4), 4 * K4, MappingFlags::RWX, MapSize::Largest).unwrap().ignore();
    t.map(gpa(2 * G), hpa(TARGET), M2, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
    let used = ram.frames_in_use();
    let range = GpaRange::from_start_len(gpa(G), 4 * K4).unwrap();
    // A range that cuts the 2 MiB page is refused, and nothing changes.
    let cut = GpaRange::from_start_len(gpa(2 * G), K4).unwrap();
    assert_eq!(
        t.try_clone_protected(&[(cut, MappingFlags::READ)], |_| {}).err(),
        Some(CloneError::CutsHugePage { gpa: gpa(2 * G), size: PageSize::Size2M })
    );
    ram.fail_after(1);
    assert!(matches!(t.try_clone_protected(&[(range, MappingFlags::RX)], |_| {}), Err(CloneError::OutOfFrames(_))));
    ram.heal();
    assert_eq!(ram.frames_in_use(), used);
    assert_eq!(t.query(gpa(G)).unwrap().flags, MappingFlags::RWX, "a refused clone leaves the parent alone");

    let mut seen = Vec::new();
    let (c, flush) = t.try_clone_protected(&[(range, MappingFlags::RX)], |l| seen.push((l.gpa, l.flags))).unwrap();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|&(_, f)| f == MappingFlags::RX));
    assert_eq!(
        flush.invalidation(),
        GvmaInvalidation::Addresses { root: t.root(), addrs: &seen.iter().map(|s| s.0).collect::<Vec<_>>() }
    );
    flush.ignore();
    for table in [&t, &c] {
        assert_eq!(table.translate(gpa(G + 3 * K4)), Some((hpa(TARGET + 4 * K4), MappingFlags::RX)));
        assert_eq!(table.translate(gpa(2 * G + K4)), Some((hpa(TARGET + K4), MappingFlags::RW)));
    }
    assert_eq!(ram.frames_in_use(), 2 * used);
    drop(c);
    assert_eq!(ram.frames_in_use(), used);
}

#[test]
fn host_addresses_above_maxphyaddr_are_refused() {
    // Intel SDM Vol. 3C §29.3.2, §29.3.3.1: address bits above MAXPHYADDR in an EPT entry are
    // reserved (an EPT misconfiguration at run time); bit 52 and up do not even fit the field.
    let ram = HostRam::new(64);
    let mut t = PageTable::<Ept4, _>::new(&ram, TableOptions::for_format::<Ept4>()).unwrap();
    let wide = (1 << 52) | 0x5000;
    let r = t.map(gpa(0), hpa(wide), K4, MappingFlags::RW, MapSize::Largest);
    assert_eq!(t.query(gpa(0)), None, "nothing was mapped (it used to map HPA 0x5000)");
    assert_eq!(r.unwrap_err(), MapError::BeyondMaxPhys(BeyondMaxPhys { hpa: hpa(wide), max_phys_bits: 52 }));

    // A CPU with MAXPHYADDR 39 (Skylake in Bochs): 2^40 is reserved, in map and in remap.
    let caps = EptCapabilities::new(0xf0106334141, 39);
    let mut t = PageTable::<Ept4, _>::new(&ram, caps.table_options(true)).unwrap();
    let limit = BeyondMaxPhys { hpa: hpa(1 << 40), max_phys_bits: 39 };
    assert_eq!(t.map(gpa(0), hpa(1 << 40), K4, MappingFlags::RW, MapSize::Largest).unwrap_err(), limit.into());
    let top = BeyondMaxPhys { hpa: hpa(1 << 39), max_phys_bits: 39 };
    let r = t.map(gpa(0), hpa((1 << 39) - K4), 2 * K4, MappingFlags::RW, MapSize::Largest);
    assert_eq!(r.unwrap_err(), top.into(), "the range's end counts too");
    assert_eq!(t.query(gpa(0)), None);
    t.map(gpa(0), hpa((1 << 39) - K4), K4, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
    assert_eq!(t.remap(gpa(0), hpa(1 << 40), MappingFlags::RW).unwrap_err(), limit.into());
    assert_eq!(t.query(gpa(0)).unwrap().hpa, hpa((1 << 39) - K4));

    // G-stage: the PPN is 44 bits (56-bit addresses), narrowed by the options.
    let opts = TableOptions { max_phys_bits: 40, ..TableOptions::for_format::<Sv39x4>() };
    let mut t = PageTable::<Sv39x4, _>::new(&ram, opts).unwrap();
    let r = t.map(gpa(0), hpa(1 << 40), K4, MappingFlags::RW, MapSize::Largest);
    assert_eq!(r.unwrap_err(), MapError::BeyondMaxPhys(BeyondMaxPhys { hpa: hpa(1 << 40), max_phys_bits: 40 }));
    assert_eq!(TableOptions::for_format::<Sv39x4>().max_phys_bits, 56);
    assert_eq!(TableOptions::for_format::<Ept5>().max_phys_bits, 52);
}

/// RISC-V: an HFENCE.GVMA with an address covers leaf entries only; after a change to a non-leaf
/// entry the fence must have rs1 = x0 (RISC-V Privileged spec, "Supervisor Memory-Management
/// Fence Instruction" commentary, followed by "Hypervisor Memory-Management Fence
/// Instructions"). Every path that links a new intermediate table must therefore ask for
/// `GvmaInvalidation::All`; EPT caches nothing from a not-present entry, so a new table linked
/// into one needs no INVEPT.
mod nonleaf_changes_fence_the_whole_vmid {
    use super::*;

    fn gstage(ram: &HostRam) -> PageTable<Sv39x4, &HostRam> {
        PageTable::new(ram, TableOptions::for_format::<Sv39x4>()).unwrap()
    }

    #[test]
    fn map_into_an_empty_region() {
        let ram = HostRam::new(64);
        let mut t = gstage(&ram);
        // 4 KiB page: a level-1 and a level-0 table are linked.
        // (Every entry here was invalid before: only the hart that maps fences, `Local`.)
        let f = t.map(gpa(G), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap();
        assert_eq!(f.invalidation(), GvmaInvalidation::Local { root: t.root(), addrs: None });
        f.ignore();
        // 2 MiB page in another 1 GiB block: one level-1 table is linked.
        let f = t.map(gpa(4 * G), hpa(TARGET), M2, MappingFlags::RW, MapSize::Largest).unwrap();
        assert_eq!(f.invalidation(), GvmaInvalidation::Local { root: t.root(), addrs: None });
        f.ignore();
        // A leaf table that exists already: leaves only, fenced by address.
        let f = t.map(gpa(G + K4), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap();
        assert_eq!(f.invalidation(), GvmaInvalidation::Local { root: t.root(), addrs: Some(&[gpa(G + K4)]) });
        f.ignore();
        // A 1 GiB page in the root needs no new table: by address.
        let f = t.map(gpa(8 * G), hpa(TARGET), G, MappingFlags::RW, MapSize::Largest).unwrap();
        assert_eq!(f.invalidation(), GvmaInvalidation::Local { root: t.root(), addrs: Some(&[gpa(8 * G)]) });
        f.ignore();
    }

    #[test]
    fn split() {
        let ram = HostRam::new(64);
        let mut t = gstage(&ram);
        t.map(gpa(8 * G), hpa(TARGET), G, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
        let f = t.split(gpa(8 * G)).unwrap();
        assert_eq!(f.invalidation(), GvmaInvalidation::All { root: t.root() });
        f.ignore();
    }

    #[test]
    fn protect_and_unmap_that_split_an_edge() {
        let ram = HostRam::new(64);
        let mut t = gstage(&ram);
        t.map(gpa(0), hpa(TARGET), M2, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
        let f = t.protect(gpa(0), K4, MappingFlags::READ).unwrap();
        assert_eq!(f.invalidation(), GvmaInvalidation::All { root: t.root() });
        f.ignore();
        t.map(gpa(4 * M2), hpa(TARGET), M2, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
        let f = t.unmap(gpa(4 * M2), K4).unwrap();
        assert_eq!(f.invalidation(), GvmaInvalidation::All { root: t.root() });
        f.ignore();
    }

    #[test]
    fn ept_links_new_tables_without_invept() {
        let ram = HostRam::new(64);
        let mut t = PageTable::<Ept4, _>::new(&ram, TableOptions::for_format::<Ept4>()).unwrap();
        let f = t.map(gpa(G), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap();
        assert_eq!(f.invalidation(), EptInvalidation::None);
        f.ignore();
        t.map(gpa(8 * G), hpa(TARGET), G, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
        let f = t.split(gpa(8 * G)).unwrap();
        assert_eq!(f.invalidation(), EptInvalidation::SingleContext { root: t.root() });
        f.ignore();
    }
}

#[test]
fn a_token_of_another_table_is_refused_and_handed_back() {
    let ram = HostRam::new(64);
    let mut a = PageTable::<Sv39x4, _>::new(&ram, TableOptions::for_format::<Sv39x4>()).unwrap();
    let mut b = PageTable::<Sv39x4, _>::new(&ram, TableOptions::for_format::<Sv39x4>()).unwrap();
    let f = a.map(gpa(0), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap();
    let mut ran = false;
    let err = b.flush(f, |_| ran = true).unwrap_err();
    assert!(!ran, "nothing is invalidated for a foreign token");
    assert_eq!(err.table_root(), b.root());
    assert!(err.to_string().contains("handed to the table rooted at"), "{err}");
    let f = err.into_token();
    assert_eq!(f.root(), a.root());
    a.flush(f, |_| ran = true).unwrap();
    assert!(ran);
    // `?` carries it into a caller's error type.
    fn run(b: &mut PageTable<Sv39x4, &HostRam>, f: Flush<Sv39x4>) -> Result<(), Box<dyn std::error::Error>> {
        b.flush(f, |_| {})?;
        Ok(())
    }
    let f = a.map(gpa(K4), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap();
    assert!(run(&mut b, f).is_err());
}

#[test]
fn errors_have_messages_and_travel_with_question_mark() {
    use std::error::Error;
    let ram = HostRam::new(16);
    let mut t = PageTable::<Sv39x4, _>::new(&ram, TableOptions::for_format::<Sv39x4>()).unwrap();

    // Into a Box<dyn Error>: the message names the address.
    fn boxed(t: &mut PageTable<Sv39x4, &HostRam>) -> Result<(), Box<dyn Error + Send + Sync>> {
        t.map(gpa(0), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest)?.ignore();
        t.map(gpa(0), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest)?.ignore();
        Ok(())
    }
    let e = boxed(&mut t).unwrap_err();
    assert_eq!(e.to_string(), "cannot map: guest address 0x0 is already mapped");

    // Into a caller's enum through From, and the wrapped cause stays reachable.
    #[derive(Debug)]
    enum Caller {
        Frames(OutOfFrames),
        Flags(FlagsError),
    }
    impl From<OutOfFrames> for Caller {
        fn from(e: OutOfFrames) -> Self {
            Caller::Frames(e)
        }
    }
    fn grow(ram: &HostRam) -> Result<PageTable<Ept4, &HostRam>, Caller> {
        Ok(PageTable::new(ram, TableOptions::for_format::<Ept4>())?)
    }
    ram.fail_after(0);
    assert!(matches!(grow(&ram), Err(Caller::Frames(OutOfFrames { needed: 1 }))));
    ram.heal();
    let e = t.protect(gpa(0), K4, MappingFlags::WRITE).unwrap_err();
    let RangeError::BadFlags { reason, .. } = e else { panic!("{e}") };
    assert!(matches!(Caller::Flags(reason), Caller::Flags(FlagsError::WriteWithoutRead)));
    assert_eq!(e.source().unwrap().to_string(), "write without read is a reserved encoding");
    assert_eq!(e.to_string(), "cannot protect to rights -w-: write without read is a reserved encoding");

    // OutOfFrames converts into every error that wraps it.
    let oof = OutOfFrames { needed: 2 };
    for e in [
        MapError::from(oof).to_string(),
        RangeError::from(oof).to_string(),
        SplitError::from(oof).to_string(),
        CloneError::from(oof).to_string(),
    ] {
        assert!(e.contains("needed 2 table frame(s)"), "{e}");
    }
    // Every error type has a real message, not its Debug form.
    let messages: Vec<String> = [
        Box::new(RemapError::NotMapped(gpa(K4))) as Box<dyn Error>,
        Box::new(SplitError::AlreadySmallest(gpa(0))),
        Box::new(CollapseError::NotCollapsible { gpa: gpa(0), reason: NotCollapsible::MixedFlags }),
        Box::new(AdError::NotTracked),
        Box::new(GuestPhysAddr::try_new(1 << 60).unwrap_err()),
        Box::new(CloneError::CutsHugePage { gpa: gpa(0), size: PageSize::Size2M }),
    ]
    .iter()
    .map(|e| e.to_string())
    .collect();
    for m in &messages {
        assert!(!m.contains('{') && !m.contains("NotMapped") && !m.contains("Size2M"), "{m}");
    }
}

/// A table frame retired by a change whose token was dropped must not be freed by a by-address
/// HFENCE.GVMA that does not cover it (the hart's paging-structure cache may still walk it);
/// the next whole-VMID fence frees it.
#[test]
fn retired_tables_wait_for_a_whole_table_invalidation() {
    let ram = HostRam::new(64);
    let mut t = PageTable::<Sv39x4, _>::new(&ram, TableOptions::for_format::<Sv39x4>()).unwrap();
    // Two leaf tables: one under 0, one under 2 MiB.
    t.map(gpa(0), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
    t.map(gpa(M2), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
    let tables = t.table_frames();
    // Unmapping the only page under 0 unlinks its leaf table: the token asks for the whole VMID,
    // and the caller drops it.
    let f = t.unmap(gpa(0), K4).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::All { root: t.root() });
    f.ignore();
    // A leaf-only change elsewhere: fenced by its address, which does not cover the retired table.
    let f = t.protect(gpa(M2), K4, MappingFlags::READ).unwrap();
    assert!(matches!(f.invalidation(), GvmaInvalidation::Addresses { .. }));
    t.flush(f, |_| {}).unwrap();
    assert_eq!(t.table_frames(), tables, "a retired table was freed by a fence that does not cover it");
    // A change that links a table asks for the whole VMID, but on the changing hart only: the
    // others' caches may still walk the retired table, which stays.
    let f = t.map(gpa(4 * M2), hpa(TARGET), K4, MappingFlags::RW, MapSize::Largest).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::Local { root: t.root(), addrs: None });
    assert!(!f.covers_whole_table());
    t.flush(f, |_| {}).unwrap();
    assert_eq!(t.table_frames(), tables + 1, "a local whole-VMID fence freed a retired table");
    // A whole-VMID invalidation on every hart (this unmap unlinks the new table) frees both.
    let f = t.unmap(gpa(4 * M2), K4).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::All { root: t.root() });
    t.flush(f, |_| {}).unwrap();
    assert_eq!(t.table_frames(), tables - 1, "both retired tables freed");
}
