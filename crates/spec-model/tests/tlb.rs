//! The TLB models: they keep stale translations until the modelled invalidation says otherwise.
//! EPT: Intel SDM Vol. 3C 29.4. G-stage: RISC-V Privileged, SFENCE.VMA / HFENCE.GVMA and the
//! address-translation cache paragraphs of "Virtual Address Translation Process".

mod common;

use common::*;
use twostage_spec_model::ept::{self, qual, EptAccess, EptCaps, EptExit, GuestLinear};
use twostage_spec_model::gstage::{self, GstageConfig, GstageFault, Hgatp, HgatpMode, RvFaultKind};
use twostage_spec_model::tlb::{CachedG, EptTlb, GstageTlb};
use twostage_spec_model::{Access, Gpa, Hpa, PageSize};

const R_: EptAccess = EptAccess::READ;
const NO: GuestLinear = GuestLinear::NONE;

fn caps() -> EptCaps {
    EptCaps::all(46)
}

fn eptp(root: u64) -> u64 {
    root | 3 << 3 | 6
}

#[test]
fn ept_hit_reads_no_memory_and_stays_stale_until_invept() {
    let mut t = Tables::new();
    let root = t.frame(4096);
    let leaf = t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b111);
    let mut tlb = EptTlb::new();
    let e = eptp(root);
    assert_eq!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2010), R_, NO).unwrap().hpa, Hpa(0x9010));
    let reads = t.mem.reads;
    assert_eq!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2020), R_, NO).unwrap().hpa, Hpa(0x9020));
    assert_eq!(t.mem.reads, reads, "a leaf hit reads no table");
    // Remap the page without INVEPT: the TLB still gives the old frame; a fresh walk the new one.
    t.mem.poke(leaf, 0xa000 | EPT_WB | 0b111);
    assert_eq!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), R_, NO).unwrap().hpa, Hpa(0x9000));
    assert_eq!(tlb.cached(e, Gpa(0x2008)).unwrap().hpa, Hpa(0x9008));
    assert_eq!(ept::walk(&mut t.mem, e, &caps(), Gpa(0x2000), R_, NO).unwrap().hpa, Hpa(0xa000));
    // Unmap without INVEPT: still translated.
    t.mem.poke(leaf, 0);
    assert!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), R_, NO).is_ok());
    // INVEPT for another EP4TA changes nothing; single-context for this one does.
    tlb.invept_single_context(eptp(root + 0x1000));
    assert!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), R_, NO).is_ok());
    tlb.invept_single_context(e | 1 << 6); // only bits 51:12 matter
    assert!(matches!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), R_, NO), Err(EptExit::Violation { .. })));
    let s = tlb.stats();
    assert_eq!((s.lookups, s.leaf_hits, s.invept_single_context), (6, 4, 2));
}

#[test]
fn ept_not_present_is_never_cached() {
    // 29.4.2: no guest-physical mappings from entries that are not present: a new mapping needs
    // no INVEPT.
    let mut t = Tables::new();
    let root = t.frame(4096);
    t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b111);
    let mut tlb = EptTlb::new();
    let e = eptp(root);
    assert!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x3000), R_, NO).is_err());
    t.ept_map(root, 4, 0x3000, 0, 0xb000 | EPT_WB | 0b111);
    assert_eq!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x3000), R_, NO).unwrap().hpa, Hpa(0xb000));
    // Misconfigured entries are not cached either.
    let leaf = t.ept_map(root, 4, 0x4000, 0, 0xc000 | 2 << 3 | 0b111);
    assert!(matches!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x4000), R_, NO), Err(EptExit::Misconfig { .. })));
    t.mem.poke(leaf, 0xc000 | EPT_WB | 0b111);
    assert!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x4000), R_, NO).is_ok());
}

#[test]
fn ept_violation_from_cached_rights_then_invalidates() {
    // A cached read-only translation still refuses writes after the entry became writable
    // without INVEPT; the violation invalidates the mappings for that address (29.4.3.1).
    let mut t = Tables::new();
    let root = t.frame(4096);
    let leaf = t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b001);
    let mut tlb = EptTlb::new();
    let e = eptp(root);
    tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), R_, NO).unwrap();
    t.mem.poke(leaf, 0x9000 | EPT_WB | 0b011);
    match tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), EptAccess::WRITE, GuestLinear::TRANSLATION) {
        Err(EptExit::Violation { qualification, .. }) => {
            assert_eq!(qualification, qual::WRITE | qual::READABLE | qual::GLA_VALID | qual::GLA_TRANSLATION)
        }
        other => panic!("{other:?}"),
    }
    assert!(tlb.cached(e, Gpa(0x2000)).is_none());
    assert!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), EptAccess::WRITE, NO).unwrap().write);
}

#[test]
fn ept_stale_paging_structure_pointer_is_followed() {
    // A cached PDE keeps pointing at the old page table after software replaced it: lookups of
    // other addresses under that PDE read the old table until INVEPT.
    let mut t = Tables::new();
    let root = t.frame(4096);
    t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b111);
    let old_pt = t.ept_entry(root, 4, 0x2000, 0).0 & !0xfff;
    t.mem.set_entry(Hpa(old_pt), 5, 0x5000 | EPT_WB | 0b111); // old table maps 0x5000 -> 0x5000
    let mut tlb = EptTlb::new();
    let e = eptp(root);
    tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), R_, NO).unwrap();
    assert_eq!((tlb.cached_leaves(), tlb.cached_partials()), (1, 3));
    // Software installs a new page table (0x5000 -> 0xf5000) and "frees" the old one.
    let new_pt = t.frame(4096);
    t.mem.set_entry(Hpa(new_pt), 5, 0xf5000 | EPT_WB | 0b111);
    let pde = t.ept_entry(root, 4, 0x2000, 1);
    t.mem.poke(pde, new_pt | EPT_RWX);
    let before = tlb.stats().partial_hits;
    assert_eq!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x5000), R_, NO).unwrap().hpa, Hpa(0x5000), "stale PDE used");
    assert_eq!(tlb.stats().partial_hits, before + 1);
    assert_eq!(ept::walk(&mut t.mem, e, &caps(), Gpa(0x5000), R_, NO).unwrap().hpa, Hpa(0xf5000));
    tlb.invept_all_context();
    assert_eq!(tlb.translate(&mut t.mem, e, &caps(), Gpa(0x5000), R_, NO).unwrap().hpa, Hpa(0xf5000));
    assert_eq!(tlb.stats().invept_all_context, 1);
}

#[test]
fn ept_write_through_clean_cached_leaf_walks_to_set_dirty() {
    // 29.3.5: the dirty flag is set in memory, so a write cannot be satisfied by a cached
    // translation whose dirty flag was clear.
    let mut t = Tables::new();
    let root = t.frame(4096);
    let leaf = t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b111);
    let mut tlb = EptTlb::new();
    let e = eptp(root) | 1 << 6;
    tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), R_, NO).unwrap();
    assert_eq!(t.mem.peek(leaf).unwrap() & ept::DIRTY, 0);
    let w = tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), EptAccess::WRITE, NO).unwrap();
    assert!(w.dirty);
    assert_ne!(t.mem.peek(leaf).unwrap() & ept::DIRTY, 0);
    let hits = tlb.stats().leaf_hits;
    tlb.translate(&mut t.mem, e, &caps(), Gpa(0x2000), EptAccess::WRITE, NO).unwrap();
    assert_eq!(tlb.stats().leaf_hits, hits + 1, "now cached dirty: a hit");
}

#[test]
fn ept_large_page_cached_for_the_whole_page() {
    let mut t = Tables::new();
    let root = t.frame(4096);
    t.ept_map(root, 4, 0x20_0000, 1, 0x40_0000 | EPT_LARGE | EPT_WB | 0b111);
    let mut tlb = EptTlb::new();
    let e = eptp(root);
    tlb.translate(&mut t.mem, e, &caps(), Gpa(0x20_0000), R_, NO).unwrap();
    let w = tlb.cached(e, Gpa(0x3f_f123)).unwrap();
    assert_eq!((w.hpa, w.page_size), (Hpa(0x5f_f123), PageSize::Size2M));
}

const SVADE: GstageConfig = GstageConfig { hw_ad_update: false, svpbmt: false, mxr: false };
const LEAF: u64 = V | R | W | X | U | A | D;

fn g_setup(vmid: u16) -> (Tables, u64, u64) {
    let mut t = Tables::new();
    let root = t.frame(16384);
    let h = Hgatp { mode: HgatpMode::Sv39x4, vmid, root: Hpa(root) }.encode();
    (t, root, h)
}

fn g_reason(r: Result<gstage::GWalk, GstageFault>) -> RvFaultKind {
    match r {
        Err(GstageFault::GuestPage(f)) => f.reason,
        other => panic!("expected a guest-page fault, got {other:?}"),
    }
}

#[test]
fn gstage_caches_invalid_ptes_until_a_fence() {
    // "This specification permits the caching of PTEs whose V (Valid) bit is clear": a new
    // mapping needs HFENCE.GVMA by address.
    let (mut t, root, h) = g_setup(3);
    let mut tlb = GstageTlb::new();
    assert_eq!(g_reason(tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read)), RvFaultKind::NotValid);
    assert_eq!(tlb.cached(3, Gpa(0x5000)), Some(CachedG::Invalid { level: 2 }));
    t.rv_map(root, 3, 11, 0x5000, 0, rv_pte(0x9000, LEAF), 0);
    assert_eq!(g_reason(tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read)), RvFaultKind::NotValid);
    assert_eq!(tlb.stats().negative_hits, 1);
    tlb.hfence_gvma(Some(Gpa(0x5000)), Some(4)); // another VMID: no effect
    assert!(tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read).is_err());
    tlb.hfence_gvma(Some(Gpa(0x5abc)), Some(3));
    assert_eq!(tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read).unwrap().hpa, Hpa(0x9000));
}

#[test]
fn gstage_fence_by_address_removes_leaves_only() {
    // SFENCE.VMA (and so HFENCE.GVMA) with rs1 != x0 invalidates "entries that contain leaf page
    // table entries corresponding to the ... address"; cached non-leaf entries survive.
    let (mut t, root, h) = g_setup(1);
    let leaf_a = Hpa(t.rv_map(root, 3, 11, 0x2000, 0, rv_pte(0x9000, LEAF), 0));
    let old_pt = leaf_a.0 & !0xfff;
    t.mem.set_entry(Hpa(old_pt), 5, rv_pte(0x5000, LEAF)); // old table: 0x5000 -> 0x5000
    let mut tlb = GstageTlb::new();
    tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x2000), Access::Read).unwrap();
    assert_eq!((tlb.cached_leaves(), tlb.cached_partials()), (1, 2));
    // Replace the level-1 pointer with a new table mapping 0x5000 -> 0xf5000.
    let new_pt = t.frame(4096);
    t.mem.set_entry(Hpa(new_pt), 5, rv_pte(0xf5000, LEAF));
    let l1 = Hpa(t.rv_map(root, 3, 11, 0x2000, 1, rv_pte(new_pt, V), 0));
    assert_eq!(t.mem.peek(l1).unwrap(), rv_pte(new_pt, V));
    // A fence by address (the engine's leaf-change fence) leaves the stale pointer in place.
    tlb.hfence_gvma(Some(Gpa(0x5000)), Some(1));
    tlb.hfence_gvma(Some(Gpa(0x2000)), Some(1));
    assert_eq!(tlb.cached_leaves(), 0);
    assert_eq!(
        tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read).unwrap().hpa,
        Hpa(0x5000),
        "stale non-leaf PTE followed"
    );
    assert_eq!(gstage::walk(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read).unwrap().hpa, Hpa(0xf5000));
    // A fence by VMID removes non-leaf entries too.
    tlb.hfence_gvma(None, Some(1));
    assert_eq!(tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read).unwrap().hpa, Hpa(0xf5000));
    let s = tlb.stats();
    assert_eq!((s.hfence_gpa_vmid, s.hfence_vmid, s.partial_hits), (2, 1, 1));
}

#[test]
fn gstage_superpage_fenced_by_any_address_inside_and_vmids_are_separate() {
    let (mut t, root, h1) = g_setup(1);
    let h2 = Hgatp { mode: HgatpMode::Sv39x4, vmid: 2, root: Hpa(root) }.encode();
    let leaf = Hpa(t.rv_map(root, 3, 11, 0x20_0000, 1, rv_pte(0x40_0000, LEAF), 0));
    let mut tlb = GstageTlb::new();
    tlb.translate(&mut t.mem, h1, &SVADE, Gpa(0x20_0000), Access::Read).unwrap();
    tlb.translate(&mut t.mem, h2, &SVADE, Gpa(0x20_0000), Access::Read).unwrap();
    t.mem.poke(leaf, 0);
    // Stale for both VMIDs, for any address inside the megapage.
    assert_eq!(tlb.translate(&mut t.mem, h1, &SVADE, Gpa(0x3f_fff8), Access::Read).unwrap().hpa, Hpa(0x5f_fff8));
    tlb.hfence_gvma(Some(Gpa(0x2a_b000)), Some(1));
    assert_eq!(g_reason(tlb.translate(&mut t.mem, h1, &SVADE, Gpa(0x20_0000), Access::Read)), RvFaultKind::NotValid);
    assert!(tlb.translate(&mut t.mem, h2, &SVADE, Gpa(0x20_0000), Access::Read).is_ok(), "VMID 2 untouched");
    // rs2 = x0: every VMID.
    tlb.hfence_gvma(Some(Gpa(0x20_0000)), None);
    assert!(tlb.translate(&mut t.mem, h2, &SVADE, Gpa(0x20_0000), Access::Read).is_err());
    tlb.hfence_gvma(None, None);
    assert_eq!((tlb.cached_leaves(), tlb.cached_invalid(), tlb.cached_partials()), (0, 0, 0));
    let s = tlb.stats();
    assert_eq!((s.hfence_gpa_vmid, s.hfence_gpa, s.hfence_all), (1, 1, 1));
}

#[test]
fn gstage_cached_leaf_permissions_and_dirty() {
    let (mut t, root, h) = g_setup(0);
    let leaf = Hpa(t.rv_map(root, 3, 11, 0x2000, 0, rv_pte(0x9000, V | R | U | A), 0));
    let mut tlb = GstageTlb::new();
    tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x2000), Access::Read).unwrap();
    // Upgraded to writable without a fence: the cached leaf still refuses the store.
    t.mem.poke(leaf, rv_pte(0x9000, V | R | W | U | A | D));
    assert_eq!(g_reason(tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x2000), Access::Write)), RvFaultKind::Permission);
    tlb.hfence_gvma(Some(Gpa(0x2000)), None);
    assert!(tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x2000), Access::Write).unwrap().w);
    // A leaf cached with D = 0 is not used for a store: step 9 goes to memory.
    let leaf2 = Hpa(t.rv_map(root, 3, 11, 0x3000, 0, rv_pte(0x9000, V | R | W | U | A), 0));
    let hw = GstageConfig { hw_ad_update: true, ..SVADE };
    tlb.translate(&mut t.mem, h, &hw, Gpa(0x3000), Access::Read).unwrap();
    assert!(tlb.translate(&mut t.mem, h, &hw, Gpa(0x3000), Access::Write).unwrap().dirty);
    assert_ne!(t.mem.peek(leaf2).unwrap() & D, 0);
    // A permission fault on a valid leaf still caches the leaf (it was a valid translation).
    let (mut t, root, h) = g_setup(0);
    t.rv_map(root, 3, 11, 0x2000, 0, rv_pte(0x9000, V | R | U | A), 0);
    let mut tlb = GstageTlb::new();
    assert!(tlb.translate(&mut t.mem, h, &SVADE, Gpa(0x2000), Access::Write).is_err());
    assert!(matches!(tlb.cached(0, Gpa(0x2000)), Some(CachedG::Leaf(_))));
}
