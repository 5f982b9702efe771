//! The G-stage walk against the RISC-V Privileged spec (hypervisor chapter, "Guest Physical
//! Address Translation"; supervisor chapter, "Virtual Address Translation Process", Sv39 PTEs).

mod common;

use common::*;
use twostage_spec_model::gstage::{
    self, cause, GWalk, GstageConfig, GstageFault, GuestPageFault, Hgatp, HgatpError, HgatpMode, RvFaultKind,
};
use twostage_spec_model::{Access, Gpa, Hpa, PageSize};

const SVADE: GstageConfig = GstageConfig { hw_ad_update: false, svpbmt: false, mxr: false };
const SVADU: GstageConfig = GstageConfig { hw_ad_update: true, svpbmt: false, mxr: false };
const LEAF: u64 = V | R | W | X | U | A | D;

fn hgatp(mode: HgatpMode, vmid: u16, root: u64) -> u64 {
    Hgatp { mode, vmid, root: Hpa(root) }.encode()
}

/// A 16 KiB-aligned root (2048 entries) and the Tables.
fn setup() -> (Tables, u64) {
    let mut t = Tables::new();
    let root = t.frame(16384);
    (t, root)
}

fn gpf(r: Result<GWalk, GstageFault>) -> GuestPageFault {
    match r {
        Err(GstageFault::GuestPage(f)) => f,
        other => panic!("expected a guest-page fault, got {other:?}"),
    }
}

#[test]
fn hgatp_decode() {
    // hgatp: MODE 63:60 (0, 8, 9, 10), VMID 57:44, PPN 43:0.
    let h = Hgatp::decode(8 << 60 | 0x3abc << 44 | 0x8_0004).unwrap();
    assert_eq!((h.mode, h.vmid, h.root), (HgatpMode::Sv39x4, 0x3abc, Hpa(0x8000_4000)));
    // "the lowest two bits of the physical page number (PPN) in hgatp always read as zeros".
    assert_eq!(Hgatp::decode(9 << 60 | 0x8_0007).unwrap().root, Hpa(0x8000_4000));
    assert_eq!(Hgatp::decode(10 << 60).unwrap().mode, HgatpMode::Sv57x4);
    assert_eq!(Hgatp::decode(0).unwrap().mode, HgatpMode::Bare);
    for m in [1u64, 7, 11, 15] {
        assert_eq!(Hgatp::decode(m << 60), Err(HgatpError::ReservedMode(m as u8)));
    }
    assert_eq!(HgatpMode::Sv39x4.gpa_bits(), 41);
    assert_eq!(HgatpMode::Sv48x4.gpa_bits(), 50);
    assert_eq!(HgatpMode::Sv57x4.gpa_bits(), 59);
    let raw = hgatp(HgatpMode::Sv48x4, 7, 0x8000_4000);
    assert_eq!(raw, 9 << 60 | 7 << 44 | 0x8_0004);
}

#[test]
fn sv39x4_root_index_is_widened_by_two_bits() {
    // "the root page table (only) is expanded by a factor of 4 to be 16 KiB".
    let (mut t, root) = setup();
    let gpa = 0x180_0000_1234u64; // bits 40:39 set: root index 0x600
    t.rv_map(root, 3, 11, gpa, 0, rv_pte(0x7_7000, LEAF), 0);
    assert_ne!(t.mem.entry(Hpa(root), 0x600), 0, "entry 1536 of the 16 KiB root is used");
    let w = gstage::walk(&mut t.mem, hgatp(HgatpMode::Sv39x4, 0, root), &SVADE, Gpa(gpa), Access::Read).unwrap();
    assert_eq!((w.hpa, w.page_size), (Hpa(0x7_7234), PageSize::Size4K));
    assert!(w.r && w.w && w.x && w.u && w.accessed && w.dirty);
    // The same low 39 bits with bits 40:39 clear reach a different (empty) root entry.
    let f = gpf(gstage::walk(
        &mut t.mem,
        hgatp(HgatpMode::Sv39x4, 0, root),
        &SVADE,
        Gpa(gpa & ((1 << 39) - 1)),
        Access::Read,
    ));
    assert_eq!((f.reason, f.level), (RvFaultKind::NotValid, Some(2)));
}

#[test]
fn gpa_bits_above_the_width_fault() {
    // "Address bits 63:41 [63:50, 63:59] must all be zeros, or else a guest-page-fault".
    for (mode, bit) in [(HgatpMode::Sv39x4, 41), (HgatpMode::Sv48x4, 50), (HgatpMode::Sv57x4, 59)] {
        let (mut t, root) = setup();
        let gpa = 1u64 << bit | 0x1004;
        for (access, c) in [(Access::Read, 21), (Access::Write, 23), (Access::Fetch, 20)] {
            let f = gpf(gstage::walk(&mut t.mem, hgatp(mode, 0, root), &SVADE, Gpa(gpa), access));
            assert_eq!((f.cause, f.htval, f.gpa, f.reason), (c, gpa >> 2, Gpa(gpa), RvFaultKind::AddressTooWide));
            assert_eq!(f.htinst, 0);
        }
    }
}

#[test]
fn superpages_at_every_level() {
    let (mut t, root) = setup();
    t.rv_map(root, 4, 11, 0x4020_0000, 1, rv_pte(0x60_0000, LEAF), 0);
    t.rv_map(root, 4, 11, 0x8000_0000, 2, rv_pte(0x4000_0000, LEAF), 0);
    t.rv_map(root, 4, 11, 0x380_0000_0000, 3, rv_pte(0x80_0000_0000, LEAF), 0);
    let h = hgatp(HgatpMode::Sv48x4, 1, root);
    let w = gstage::walk(&mut t.mem, h, &SVADE, Gpa(0x403f_fff0), Access::Read).unwrap();
    assert_eq!((w.hpa, w.page_size), (Hpa(0x7f_fff0), PageSize::Size2M));
    let w = gstage::walk(&mut t.mem, h, &SVADE, Gpa(0x8765_4321), Access::Write).unwrap();
    assert_eq!((w.hpa, w.page_size), (Hpa(0x4765_4321), PageSize::Size1G));
    let w = gstage::walk(&mut t.mem, h, &SVADE, Gpa(0x380_1234_5678), Access::Fetch).unwrap();
    assert_eq!((w.hpa, w.page_size), (Hpa(0x80_1234_5678), PageSize::Size512G));
}

#[test]
fn invalid_and_reserved_ptes_fault() {
    // Step 3: V = 0; R = 0 and W = 1; reserved bits 60:54, PBMT without Svpbmt, N without Svnapot.
    let cases: [(u64, RvFaultKind); 6] = [
        (LEAF & !V, RvFaultKind::NotValid),
        (V | W | U | A | D, RvFaultKind::WriteWithoutRead),
        (LEAF | W | X, RvFaultKind::WriteWithoutRead),
        (LEAF | 1 << 54, RvFaultKind::Reserved(1 << 54)),
        (LEAF | 1 << 61, RvFaultKind::Reserved(1 << 61)),
        (LEAF | 1 << 63, RvFaultKind::Reserved(1 << 63)),
    ];
    for (flags, reason) in cases {
        let flags = if reason == RvFaultKind::WriteWithoutRead { flags & !R } else { flags };
        let (mut t, root) = setup();
        t.rv_map(root, 3, 11, 0x5000, 0, rv_pte(0x9000, flags), 0);
        let f = gpf(gstage::walk(&mut t.mem, hgatp(HgatpMode::Sv39x4, 0, root), &SVADE, Gpa(0x5008), Access::Read));
        assert_eq!((f.reason, f.level, f.cause, f.htval), (reason, Some(0), cause::LOAD_GUEST_PAGE_FAULT, 0x5008 >> 2));
    }
}

#[test]
fn svpbmt_allows_pbmt_1_and_2_on_leaves_only() {
    let cfg = GstageConfig { svpbmt: true, ..SVADE };
    let (mut t, root) = setup();
    t.rv_map(root, 3, 11, 0x5000, 0, rv_pte(0x9000, LEAF | 1 << 61), 0);
    t.rv_map(root, 3, 11, 0x6000, 0, rv_pte(0x9000, LEAF | 3 << 61), 0);
    let h = hgatp(HgatpMode::Sv39x4, 0, root);
    assert_eq!(gstage::walk(&mut t.mem, h, &cfg, Gpa(0x5000), Access::Read).unwrap().pbmt, 1);
    assert_eq!(
        gpf(gstage::walk(&mut t.mem, h, &cfg, Gpa(0x6000), Access::Read)).reason,
        RvFaultKind::Reserved(3 << 61)
    );
    // PBMT in a non-leaf PTE is reserved.
    let l1 = Hpa(root); // root entry 0 covers GPA 0x5000
    t.mem.poke(l1, t.mem.peek(l1).unwrap() | 1 << 62);
    let f = gpf(gstage::walk(&mut t.mem, h, &cfg, Gpa(0x5000), Access::Read));
    assert_eq!((f.reason, f.level), (RvFaultKind::NonLeafReserved(1 << 62), Some(2)));
}

#[test]
fn non_leaf_d_a_u_are_reserved() {
    // Sv32: "For non-leaf PTEs, the D, A, and U bits are reserved for future standard use".
    for bit in [A, D, U] {
        let (mut t, root) = setup();
        t.rv_map(root, 3, 11, 0x5000, 0, rv_pte(0x9000, LEAF), 0);
        let l1 = Hpa(root);
        t.mem.poke(l1, t.mem.peek(l1).unwrap() | bit);
        let f = gpf(gstage::walk(&mut t.mem, hgatp(HgatpMode::Sv39x4, 0, root), &SVADE, Gpa(0x5000), Access::Read));
        assert_eq!((f.reason, f.level), (RvFaultKind::NonLeafReserved(bit), Some(2)));
    }
}

#[test]
fn leaf_needs_u_because_g_stage_accesses_are_user_accesses() {
    let (mut t, root) = setup();
    t.rv_map(root, 3, 11, 0x5000, 0, rv_pte(0x9000, LEAF & !U), 0);
    for (access, c) in [(Access::Read, 21), (Access::Write, 23), (Access::Fetch, 20)] {
        let f = gpf(gstage::walk(&mut t.mem, hgatp(HgatpMode::Sv39x4, 0, root), &SVADE, Gpa(0x5000), access));
        assert_eq!((f.cause, f.reason), (c, RvFaultKind::UserBit));
    }
}

#[test]
fn misaligned_superpage_and_pointer_at_last_level() {
    // Step 5: "If i > 0 and pte.ppn[i-1:0] != 0, this is a misaligned superpage".
    let (mut t, root) = setup();
    t.rv_map(root, 3, 11, 0x20_0000, 1, rv_pte(0x40_1000, LEAF), 0);
    // Step 4: a pointer at i = 0.
    t.rv_map(root, 3, 11, 0x5000, 0, rv_pte(0x9000, V), 0);
    let h = hgatp(HgatpMode::Sv39x4, 0, root);
    let f = gpf(gstage::walk(&mut t.mem, h, &SVADE, Gpa(0x20_0000), Access::Read));
    assert_eq!((f.reason, f.level), (RvFaultKind::MisalignedSuperpage, Some(1)));
    let f = gpf(gstage::walk(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read));
    assert_eq!((f.reason, f.level), (RvFaultKind::NoLeaf, Some(0)));
}

#[test]
fn permissions_per_access_type_and_mxr() {
    let (mut t, root) = setup();
    t.rv_map(root, 3, 11, 0x1000, 0, rv_pte(0x9000, V | R | X | U | A | D), 0);
    t.rv_map(root, 3, 11, 0x2000, 0, rv_pte(0x9000, V | R | W | U | A | D), 0);
    t.rv_map(root, 3, 11, 0x3000, 0, rv_pte(0x9000, V | X | U | A | D), 0);
    let h = hgatp(HgatpMode::Sv39x4, 0, root);
    let perm =
        |t: &mut Tables, cfg: &GstageConfig, gpa: u64, a: Access| match gstage::walk(&mut t.mem, h, cfg, Gpa(gpa), a) {
            Ok(_) => None,
            Err(GstageFault::GuestPage(f)) => {
                assert_eq!(f.reason, RvFaultKind::Permission);
                Some(f.cause)
            }
            Err(e) => panic!("{e:?}"),
        };
    assert_eq!(perm(&mut t, &SVADE, 0x1000, Access::Write), Some(23));
    assert_eq!(perm(&mut t, &SVADE, 0x1000, Access::Fetch), None);
    assert_eq!(perm(&mut t, &SVADE, 0x2000, Access::Fetch), Some(20));
    assert_eq!(perm(&mut t, &SVADE, 0x3000, Access::Read), Some(21));
    // "Setting MXR at HS-level, however, overrides both VS-stage and G-stage execute-only".
    let mxr = GstageConfig { mxr: true, ..SVADE };
    assert_eq!(perm(&mut t, &mxr, 0x3000, Access::Read), None);
}

#[test]
fn accessed_dirty_fault_or_hardware_update() {
    // Step 9: Svade faults; otherwise the PTE is updated (A, and D for a store).
    let (mut t, root) = setup();
    let pte = Hpa(t.rv_map(root, 3, 11, 0x5000, 0, rv_pte(0x9000, V | R | W | U), 0));
    let h = hgatp(HgatpMode::Sv39x4, 0, root);
    assert_eq!(gpf(gstage::walk(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read)).reason, RvFaultKind::AccessedClear);
    assert_eq!(t.mem.writes, 0);
    t.mem.poke(pte, t.mem.peek(pte).unwrap() | A);
    assert!(gstage::walk(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Read).is_ok(), "a load needs no D");
    let f = gpf(gstage::walk(&mut t.mem, h, &SVADE, Gpa(0x5000), Access::Write));
    assert_eq!((f.reason, f.cause), (RvFaultKind::DirtyClear, 23));

    t.mem.poke(pte, t.mem.peek(pte).unwrap() & !A);
    let w = gstage::walk(&mut t.mem, h, &SVADU, Gpa(0x5000), Access::Read).unwrap();
    assert!(w.accessed && !w.dirty);
    assert_eq!(t.mem.peek(pte).unwrap() & (A | D), A);
    let w = gstage::walk(&mut t.mem, h, &SVADU, Gpa(0x5000), Access::Write).unwrap();
    assert!(w.dirty);
    assert_eq!(t.mem.peek(pte).unwrap() & (A | D), A | D);
    assert_eq!(t.mem.writes, 2);
    gstage::walk(&mut t.mem, h, &SVADU, Gpa(0x5000), Access::Write).unwrap();
    assert_eq!(t.mem.writes, 2, "already set: nothing written");
    // A permission fault does not set A.
    let pte2 = Hpa(t.rv_map(root, 3, 11, 0x6000, 0, rv_pte(0x9000, V | R | U), 0));
    gpf(gstage::walk(&mut t.mem, h, &SVADU, Gpa(0x6000), Access::Write));
    assert_eq!(t.mem.peek(pte2).unwrap() & A, 0);
}

#[test]
fn absent_table_memory_is_an_access_fault_for_the_original_access() {
    // Step 2: "If accessing pte violates a PMA or PMP check, raise an access-fault exception".
    let mut t = Tables::new();
    let h = hgatp(HgatpMode::Sv39x4, 0, MEM);
    for (a, c) in [(Access::Read, 5), (Access::Write, 7), (Access::Fetch, 1)] {
        match gstage::walk(&mut t.mem, h, &SVADE, Gpa(0), a) {
            Err(GstageFault::Access { cause: got, pa }) => assert_eq!((got, pa), (c, Hpa(MEM))),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        gstage::walk(&mut t.mem, 3 << 60, &SVADE, Gpa(0), Access::Read),
        Err(GstageFault::InvalidHgatp(HgatpError::ReservedMode(3)))
    );
}

#[test]
fn htinst_pseudoinstructions_match_the_spec_table() {
    // Hypervisor chapter, "Special pseudoinstruction values for guest-page faults".
    use twostage_spec_model::gstage::htinst;
    assert_eq!((htinst::READ_32, htinst::WRITE_32), (0x0000_2000, 0x0000_2020));
    assert_eq!((htinst::READ_64, htinst::WRITE_64), (0x0000_3000, 0x0000_3020));
    let r = gstage::GRequest::vs_table_read(Access::Write);
    assert_eq!((r.check, r.report, r.htinst), (Access::Read, Access::Write, 0x3000));
    let u = gstage::GRequest::vs_table_update(Access::Fetch);
    assert_eq!((u.check, u.report, u.htinst), (Access::Write, Access::Fetch, 0x3020));
}

#[test]
fn bare_is_identity() {
    let mut t = Tables::new();
    let w = gstage::walk(&mut t.mem, 0, &SVADE, Gpa(0x1234_5678_9abc), Access::Write).unwrap();
    assert_eq!(w.hpa, Hpa(0x1234_5678_9abc));
    assert_eq!(t.mem.reads, 0);
    assert_eq!(cause::guest_page_fault(Access::Fetch), cause::INSTRUCTION_GUEST_PAGE_FAULT);
}
