//! The space's pending list: a dropped token leaks nothing, a failed operation's partial change
//! is kept for the next flush.

mod common;
use common::*;
use twostage_aspace::*;
use twostage_npt::{AdMode, Ept4, MappingFlags, Sv39x4};

#[test]
fn a_dropped_token_leaks_no_frame() {
    let ram = ram(256);
    let mut s = AddressSpace::<Sv39x4, Ram>::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (id, f) = s.add_region("ram", range(0x8000_0000, 0x4000), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let f = s.populate(id).unwrap();
    s.flush_unloaded(f).unwrap();
    // In the same 2 MiB as "ram", populated now: the leaf table stays linked after "ram" goes, and
    // protecting "more" later is one HFENCE.GVMA by address (linking a new table would fence the
    // whole VMID, which covers everything).
    let (id2, f) = s.add_region("more", range(0x8000_8000, 0x1000), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let f = s.populate(id2).unwrap();
    s.flush_unloaded(f).unwrap();
    let in_use = ram.frames_in_use();
    // The caller drops the token of the removal: its 4 data frames must not be lost for good.
    drop(s.remove_region(id).unwrap());
    // An unrelated flush that does not cover those pages releases nothing...
    let f = s.protect_region(id2, MappingFlags::READ).unwrap();
    let mut asked = Vec::new();
    s.flush(f, |inv| asked.push(format!("{inv:?}"))).unwrap();
    assert!(asked[0].starts_with("Addresses"), "{asked:?}");
    assert_eq!(ram.frames_in_use(), in_use, "frames released before any flush covered them");
    // ...dropping the space releases them.
    drop(s);
    assert_eq!(ram.frames_in_use(), 0, "a dropped token leaked its frames");
}

#[test]
fn a_dropped_token_is_released_by_a_covering_flush() {
    let ram = ram(256);
    let mut s = AddressSpace::<Ept4, Ram>::new(ram.clone(), opts::<Ept4>(AdMode::Hardware)).unwrap();
    let (id, f) = s.add_region("ram", range(0x10_0000, 0x4000), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let f = s.populate(id).unwrap();
    s.flush_unloaded(f).unwrap();
    let (other, f) = s.add_region("other", range(0x20_0000, 0x1000), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let f = s.populate(other).unwrap();
    s.flush_unloaded(f).unwrap();
    let in_use = ram.frames_in_use();
    drop(s.remove_region(id).unwrap());
    // Any INVEPT single-context on this EPTP covers every page: the frames go with it.
    let f = s.protect_region(other, MappingFlags::READ).unwrap();
    s.flush(f, |_| {}).unwrap();
    assert!(ram.frames_in_use() <= in_use - 4, "a whole-context flush did not release the dropped token's frames");
}

#[test]
fn a_failed_operation_leaves_its_partial_flush_pending_and_question_mark_works() {
    fn populate_all(s: &mut AddressSpace<Sv39x4, Ram>, id: RegionId) -> Result<(), Box<dyn std::error::Error>> {
        let f = s.populate(id)?;
        s.flush(f, |_| {}).unwrap();
        Ok(())
    }
    let ram = ram(256);
    let mut s = AddressSpace::<Sv39x4, Ram>::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (id, f) = s.add_region("ram", range(0x8000_0000, 0x10000), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    assert!(!s.has_pending());
    ram.fail_after(5);
    let e = populate_all(&mut s, id).unwrap_err();
    assert!(e.to_string().starts_with("no frame to back the page at"), "{e}");
    assert!(s.has_pending(), "the pages mapped before the failure still need their invalidation");
    let mut asked = Vec::new();
    s.flush_pending(|inv| asked.push(format!("{inv:?}")));
    // The pages mapped before the failure linked a new leaf table: HFENCE.GVMA for the whole VMID,
    // on the hart that carries it out (only invalid entries became valid).
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0].starts_with("Local") && asked[0].contains("addrs: None"),
        "HFENCE.GVMA for the pages mapped: {asked:?}"
    );
    assert!(!s.has_pending());
    ram.heal();
    populate_all(&mut s, id).unwrap();
}

#[test]
fn errors_say_what_happened_and_keep_their_cause() {
    use std::error::Error;
    let e = ForkError::from(twostage_npt::CloneError::OutOfFrames(twostage_npt::OutOfFrames { needed: 3 }));
    assert_eq!(e, ForkError::OutOfFrames(twostage_npt::OutOfFrames { needed: 3 }));
    assert_eq!(e.to_string(), "no frames for the child's nested table");
    assert!(e.source().is_some());
    let e = ShareError::from(AddRegionError::Misaligned { range: range(0x1000, 0x1000) });
    assert_eq!(e.to_string(), "the shared region could not be added");
    assert!(e.source().unwrap().to_string().contains("not 4 KiB-aligned"), "{:?}", e.source());
    assert!(NewSpaceError::OutOfFrames(twostage_npt::OutOfFrames { needed: 1 }).source().is_some());
}

/// A token of one space handed to another is refused and given back whole: nothing invalidated,
/// nothing released, and the token still works on its own space.
#[test]
fn a_token_of_another_space_is_refused_and_handed_back() {
    let ram = ram(256);
    let mut a = AddressSpace::<Sv39x4, Ram>::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let mut b = AddressSpace::<Sv39x4, Ram>::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (id, f) = a.add_region("ram", range(0x8000_0000, 0x4000), MappingFlags::RW, Backend::DemandZero).unwrap();
    a.flush_unloaded(f).unwrap();
    let f = a.populate(id).unwrap();
    let mut ran = false;
    let e = b.flush(f, |_| ran = true).unwrap_err();
    assert!(!ran, "nothing is invalidated for a foreign token");
    assert_eq!(e.space_root(), b.root());
    assert!(e.to_string().contains("handed to the one rooted at"), "{e}");
    a.flush_unloaded(e.into_token()).unwrap();
    let mut buf = [0u8; 8];
    a.read(twostage_npt::GuestPhysAddr::new(0x8000_1000), &mut buf).unwrap();
}
