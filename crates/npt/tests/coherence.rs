//! Coherence: a flush token that is dropped leaves a stale translation that the spec model's TLB
//! still serves; carrying it out removes it. This is what makes the tokens worth their types.

use twostage_npt::testing::HostRam;
use twostage_npt::*;
use twostage_npt::{EptCapabilities, EptPointer};
use twostage_npt::{Hgatp, HgatpCapabilities};
use twostage_spec_model as model;
use twostage_spec_model::{Gpa, Hpa};

mod common;
use common::Ram;

const CAP: u64 = 0xf0106334141;
const PAGE: u64 = 0x8000_0000;
const FRAME: u64 = 0x10_0000_0000;

#[test]
fn ept_unmap_without_invept_leaves_a_stale_translation() {
    let ram = HostRam::new(64);
    let caps = EptCapabilities::new(CAP, 46);
    let mut t = PageTable::<Ept4, _>::new(&ram, caps.table_options(true)).unwrap();
    let eptp = EptPointer::for_table(&t, &caps).unwrap().bits();
    let mcaps = model::ept::EptCaps::from_msr(CAP, 46);
    let mut tlb = model::tlb::EptTlb::new();
    let gla = model::ept::GuestLinear::NONE;
    let read = model::ept::EptAccess::READ;

    t.map(GuestPhysAddr::new(PAGE), HostPhysAddr::new(FRAME), 4096, MappingFlags::RW, MapSize::Largest)
        .unwrap()
        .ignore();
    assert_eq!(tlb.translate(&mut Ram(&ram), eptp, &mcaps, Gpa(PAGE), read, gla).unwrap().hpa, Hpa(FRAME));

    let flush = t.unmap(GuestPhysAddr::new(PAGE), 4096).unwrap();
    assert_eq!(flush.invalidation(), EptInvalidation::SingleContext { root: t.root() });
    // Dropped: the tables say "not present", the TLB still translates.
    flush.ignore();
    assert!(model::ept::walk(&mut Ram(&ram), eptp, &mcaps, Gpa(PAGE), read, gla).is_err());
    assert_eq!(
        tlb.translate(&mut Ram(&ram), eptp, &mcaps, Gpa(PAGE), read, gla).unwrap().hpa,
        Hpa(FRAME),
        "the model must catch a missing INVEPT"
    );

    // Done right this time.
    t.map(GuestPhysAddr::new(PAGE), HostPhysAddr::new(FRAME), 4096, MappingFlags::RW, MapSize::Largest)
        .unwrap()
        .ignore();
    let flush = t.unmap(GuestPhysAddr::new(PAGE), 4096).unwrap();
    let our_root = t.root();
    t.flush(flush, |inv| match inv {
        EptInvalidation::SingleContext { root } => {
            // The token names the table by its root: the EPTP to invalidate is this one.
            assert_eq!(*root, our_root);
            tlb.invept_single_context(eptp)
        }
        other => panic!("{other:?}"),
    })
    .unwrap();
    assert!(tlb.translate(&mut Ram(&ram), eptp, &mcaps, Gpa(PAGE), read, gla).is_err());
}

fn gstage_setup(ram: &HostRam) -> (PageTable<Sv39x4, &HostRam>, u64) {
    let t = PageTable::<Sv39x4, _>::new(ram, TableOptions::for_format::<Sv39x4>()).unwrap();
    let caps = HgatpCapabilities { sv39x4: true, sv48x4: false, sv57x4: false, vmid_bits: 7 };
    let hgatp = Hgatp::for_table(&t, 3, &caps).unwrap().bits();
    (t, hgatp)
}

#[test]
fn gstage_protect_without_hfence_still_allows_the_write() {
    let ram = HostRam::new(64);
    let (mut t, hgatp) = gstage_setup(&ram);
    let cfg = model::gstage::GstageConfig { hw_ad_update: true, ..Default::default() };
    let mut tlb = model::tlb::GstageTlb::new();
    let w = model::Access::Write;
    t.map(GuestPhysAddr::new(PAGE), HostPhysAddr::new(FRAME), 4096, MappingFlags::RW, MapSize::Largest)
        .unwrap()
        .ignore();
    tlb.hfence_gvma(None, Some(3));
    assert!(tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(PAGE), w).is_ok());

    let flush = t.protect(GuestPhysAddr::new(PAGE), 4096, MappingFlags::READ).unwrap();
    let GvmaInvalidation::Addresses { addrs, .. } = flush.invalidation() else {
        panic!("a leaf change is fenced by address")
    };
    assert_eq!(addrs, &[GuestPhysAddr::new(PAGE)]);
    flush.ignore();
    assert!(model::gstage::walk(&mut Ram(&ram), hgatp, &cfg, Gpa(PAGE), w).is_err());
    assert!(
        tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(PAGE), w).is_ok(),
        "the model must catch a missing HFENCE.GVMA"
    );

    // READ -> RX only adds a right: fenced on this (the only) hart.
    let flush = t.protect(GuestPhysAddr::new(PAGE), 4096, MappingFlags::RX).unwrap();
    t.flush(flush, |inv| {
        if let GvmaInvalidation::Local { addrs: Some(addrs), .. } = inv {
            addrs.iter().for_each(|a| tlb.hfence_gvma(Some(Gpa(a.as_u64())), Some(3)));
        }
    })
    .unwrap();
    assert!(tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(PAGE), w).is_err());
}

#[test]
fn gstage_new_mapping_needs_its_fence_because_invalid_entries_may_be_cached() {
    let ram = HostRam::new(64);
    let (mut t, hgatp) = gstage_setup(&ram);
    let cfg = model::gstage::GstageConfig { hw_ad_update: true, ..Default::default() };
    let mut tlb = model::tlb::GstageTlb::new();
    let r = model::Access::Read;
    // The guest touches an unmapped page: the TLB may remember the invalid entry.
    assert!(tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(PAGE), r).is_err());
    let flush =
        t.map(GuestPhysAddr::new(PAGE), HostPhysAddr::new(FRAME), 4096, MappingFlags::READ, MapSize::Largest).unwrap();
    assert!(!flush.is_empty(), "RISC-V needs a fence even for a new mapping");
    flush.ignore();
    assert!(tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(PAGE), r).is_err(), "stale invalid entry served");
    let flush = t.protect(GuestPhysAddr::new(PAGE), 4096, MappingFlags::READ).unwrap();
    assert!(flush.is_empty(), "same rights: nothing changed, nothing to fence");
    flush.ignore();
    t.unmap(GuestPhysAddr::new(PAGE), 4096).unwrap().ignore();
    let flush =
        t.map(GuestPhysAddr::new(PAGE), HostPhysAddr::new(FRAME), 4096, MappingFlags::READ, MapSize::Largest).unwrap();
    t.flush(flush, |inv| match inv {
        // A new mapping is fenced on the hart that made it (no other can be harmed).
        GvmaInvalidation::Local { addrs: Some(addrs), .. } => {
            addrs.iter().for_each(|a| tlb.hfence_gvma(Some(Gpa(a.as_u64())), Some(3)))
        }
        GvmaInvalidation::Local { addrs: None, .. } => tlb.hfence_gvma(None, Some(3)),
        other => panic!("a new mapping asks for a local fence, not {other:?}"),
    })
    .unwrap();
    assert_eq!(tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(PAGE + 8), r).unwrap().hpa, Hpa(FRAME + 8));
}

#[test]
fn freed_tables_wait_for_the_flush() {
    // Unmapping the last page under a table unlinks the table; the hardware's paging-structure
    // cache may still point at it, so the frame must not be reused before the flush.
    let ram = HostRam::new(64);
    let (mut t, _) = gstage_setup(&ram);
    t.map(GuestPhysAddr::new(PAGE), HostPhysAddr::new(FRAME), 4096, MappingFlags::READ, MapSize::Largest)
        .unwrap()
        .ignore();
    let with_tables = ram.frames_in_use();
    let flush = t.unmap(GuestPhysAddr::new(PAGE), 4096).unwrap();
    assert_eq!(ram.frames_in_use(), with_tables, "retired, not freed");
    assert_eq!(flush.invalidation(), GvmaInvalidation::All { root: t.root() });
    t.flush(flush, |_| {}).unwrap();
    assert_eq!(ram.frames_in_use(), 4);
}
