//! RISC-V VS-stage (Sv39/Sv48) alone and over the G-stage (RISC-V Privileged, hypervisor
//! chapter: "Two-Stage Address Translation", "Guest Physical Address Translation", htinst).

mod common;

use common::*;
use twostage_spec_model::gstage::{GstageConfig, GstageFault, Hgatp, HgatpMode, RvFaultKind};
use twostage_spec_model::stage1::riscv::{self, RvError, VsRegs};
use twostage_spec_model::stage1::{GstageStage2, NoStage2, Privilege};
use twostage_spec_model::{Access, Gpa, Gva, Hpa, PageSize};

const DATA: u64 = 0x0080_0000; // guest-physical (and, with identity stage 2, host-physical)
const SVADE: GstageConfig = GstageConfig { hw_ad_update: false, svpbmt: false, mxr: false };
const VS_GVA: u64 = 0x12_3456_7000; // < 2^38: canonical for Sv39

/// VS-stage Sv39 tables mapping VS_GVA -> DATA, G-stage Sv39x4 identity for every frame and DATA.
fn vs_over_gstage(vs_leaf_flags: u64) -> (Tables, VsRegs, u64, u64) {
    let mut t = Tables::new();
    let groot = t.frame(16384);
    let vs_root = t.frame(4096);
    t.rv_map(vs_root, 3, 9, VS_GVA, 0, rv_pte(DATA, vs_leaf_flags), 0);
    let end = t.next_free();
    let mut page = 0x10_0000;
    while page < end {
        t.rv_map(groot, 3, 11, page, 0, rv_pte(page, V | R | W | U | A | D), 0);
        page += 4096;
    }
    t.rv_map(groot, 3, 11, DATA, 0, rv_pte(DATA, V | R | W | X | U | A | D), 0);
    let regs = VsRegs { vsatp: 8 << 60 | vs_root >> 12, ..VsRegs::default() };
    let hgatp = Hgatp { mode: HgatpMode::Sv39x4, vmid: 1, root: Hpa(groot) }.encode();
    (t, regs, hgatp, vs_root)
}

/// The guest-physical address of the VS PTE at `level` for VS_GVA.
fn vs_pte_gpa(t: &Tables, vs_root: u64, level: u8) -> u64 {
    let mut table = vs_root;
    for l in (level + 1..3).rev() {
        let e = t.mem.peek(Hpa(table + ((VS_GVA >> (12 + 9 * l)) & 511) * 8)).unwrap();
        table = (e >> 10) << 12;
    }
    table + ((VS_GVA >> (12 + 9 * level)) & 511) * 8
}

fn g_fault(r: Result<riscv::RvWalk, RvError<GstageFault>>) -> (twostage_spec_model::gstage::GuestPageFault, bool) {
    match r {
        Err(RvError::Stage2 { fault: GstageFault::GuestPage(f), during_walk }) => (f, during_walk),
        other => panic!("expected a guest-page fault, got {other:?}"),
    }
}

#[test]
fn vs_stage_over_g_stage() {
    let (mut t, regs, hgatp, _) = vs_over_gstage(V | R | W | U | A | D);
    let mut s2 = GstageStage2 { hgatp, cfg: SVADE };
    let w = riscv::walk(&mut t.mem, &mut s2, &regs, Gva(VS_GVA | 0x44), Access::Write, Privilege::User).unwrap();
    assert_eq!((w.gpa, w.hpa, w.page_size), (Gpa(DATA | 0x44), Hpa(DATA | 0x44), PageSize::Size4K));
}

#[test]
fn g_stage_fault_on_an_implicit_vs_table_read_reports_the_original_access() {
    // "any exception is always reported for the original access type"; htval = the PTE's GPA
    // >> 2; htinst = 0x00003000 (64-bit read for VS-stage translation).
    let (mut t, regs, hgatp, vs_root) = vs_over_gstage(V | R | W | X | U | A | D);
    let pte_gpa = vs_pte_gpa(&t, vs_root, 1);
    let groot = Hgatp::decode(hgatp).unwrap().root.0;
    let gpte = t.rv_map(groot, 3, 11, pte_gpa, 0, 0, 0); // G-stage: that page is now invalid
    let mut s2 = GstageStage2 { hgatp, cfg: SVADE };
    for (a, cause) in [(Access::Read, 21), (Access::Write, 23), (Access::Fetch, 20)] {
        let (f, during_walk) = g_fault(riscv::walk(&mut t.mem, &mut s2, &regs, Gva(VS_GVA), a, Privilege::User));
        assert!(during_walk);
        assert_eq!((f.cause, f.htval, f.gpa, f.htinst), (cause, pte_gpa >> 2, Gpa(pte_gpa), 0x0000_3000));
        assert_eq!(f.reason, RvFaultKind::NotValid);
    }
    // A read-only G-stage page holding the VS leaf, and a VS leaf with A = 0 under hardware A/D:
    // the update is an implicit store (G-stage needs W), reported as the original load with the
    // write pseudoinstruction 0x00003020.
    t.mem.poke(Hpa(gpte), rv_pte(pte_gpa & !0xfff, V | R | W | U | A | D));
    let leaf_gpa = vs_pte_gpa(&t, vs_root, 0);
    let gleaf = t.rv_map(groot, 3, 11, leaf_gpa, 0, rv_pte(leaf_gpa & !0xfff, V | R | U | A | D), 0);
    t.mem.poke(Hpa(leaf_gpa), t.mem.peek(Hpa(leaf_gpa)).unwrap() & !A);
    let hw = VsRegs { hw_ad_update: true, ..regs };
    let (f, during_walk) = g_fault(riscv::walk(&mut t.mem, &mut s2, &hw, Gva(VS_GVA), Access::Read, Privilege::User));
    assert!(during_walk);
    assert_eq!((f.cause, f.gpa, f.htinst, f.reason), (21, Gpa(leaf_gpa), 0x0000_3020, RvFaultKind::Permission));
    // With G-stage W the update goes through, and G-stage hardware A/D marks the table page dirty.
    t.mem.poke(Hpa(gleaf), rv_pte(leaf_gpa & !0xfff, V | R | W | U));
    let mut s2hw = GstageStage2 { hgatp, cfg: GstageConfig { hw_ad_update: true, ..SVADE } };
    riscv::walk(&mut t.mem, &mut s2hw, &hw, Gva(VS_GVA), Access::Read, Privilege::User).unwrap();
    assert_ne!(t.mem.peek(Hpa(leaf_gpa)).unwrap() & A, 0, "VS A set");
    assert_eq!(t.mem.peek(Hpa(gleaf)).unwrap() & (A | D), A | D, "G-stage A and D set by the implicit store");
}

#[test]
fn g_stage_fault_on_the_final_access() {
    let (mut t, regs, hgatp, _) = vs_over_gstage(V | R | W | U | A | D);
    let groot = Hgatp::decode(hgatp).unwrap().root.0;
    t.rv_map(groot, 3, 11, DATA, 0, rv_pte(DATA, V | R | U | A | D), 0);
    let mut s2 = GstageStage2 { hgatp, cfg: SVADE };
    let (f, during_walk) =
        g_fault(riscv::walk(&mut t.mem, &mut s2, &regs, Gva(VS_GVA | 0x18), Access::Write, Privilege::User));
    assert!(!during_walk);
    assert_eq!((f.cause, f.gpa, f.htval, f.htinst), (23, Gpa(DATA | 0x18), (DATA | 0x18) >> 2, 0));
}

fn vs_pf(r: Result<riscv::RvWalk, RvError<core::convert::Infallible>>) -> (u64, RvFaultKind) {
    match r {
        Err(RvError::PageFault(p)) => (p.cause, p.reason),
        other => panic!("expected a page fault, got {other:?}"),
    }
}

#[test]
fn vs_stage_page_faults() {
    // Supervisor chapter: U/SUM (step 6), MXR (step 8), Svade (step 9), sign extension.
    let mut t = Tables::new();
    let vs_root = t.frame(4096);
    t.rv_map(vs_root, 3, 9, 0x1000, 0, rv_pte(0x9000, V | R | W | X | A | D), 0); // supervisor page
    t.rv_map(vs_root, 3, 9, 0x2000, 0, rv_pte(0x9000, V | R | W | X | U | A | D), 0); // user page
    t.rv_map(vs_root, 3, 9, 0x3000, 0, rv_pte(0x9000, V | X | A | D), 0); // execute-only
    t.rv_map(vs_root, 3, 9, 0x4000, 0, rv_pte(0x9000, V | R | W), 0); // A = D = 0
    let r = VsRegs { vsatp: 8 << 60 | vs_root >> 12, ..VsRegs::default() };
    let (u, s) = (Privilege::User, Privilege::Supervisor);
    let mut walk =
        |r: &VsRegs, va: u64, a: Access, p: Privilege| riscv::walk(&mut t.mem, &mut NoStage2, r, Gva(va), a, p);
    assert_eq!(vs_pf(walk(&r, 0x1000, Access::Read, u)), (13, RvFaultKind::UserBit));
    assert_eq!(vs_pf(walk(&r, 0x2000, Access::Write, s)), (15, RvFaultKind::UserBit));
    let sum = VsRegs { sum: true, ..r };
    assert!(walk(&sum, 0x2000, Access::Write, s).is_ok());
    assert_eq!(
        vs_pf(walk(&sum, 0x2000, Access::Fetch, s)),
        (12, RvFaultKind::UserBit),
        "S-mode never executes U pages"
    );
    assert_eq!(vs_pf(walk(&r, 0x3000, Access::Read, s)), (13, RvFaultKind::Permission));
    assert!(walk(&VsRegs { mxr: true, ..r }, 0x3000, Access::Read, s).is_ok());
    assert!(walk(&VsRegs { hs_mxr: true, ..r }, 0x3000, Access::Read, s).is_ok());
    assert_eq!(vs_pf(walk(&r, 0x4000, Access::Read, s)), (13, RvFaultKind::AccessedClear));
    let w = walk(&VsRegs { hw_ad_update: true, ..r }, 0x4000, Access::Write, s).unwrap();
    assert_eq!(w.gpa, Gpa(0x9000));
    // Sv39: bits 63:39 must equal bit 38.
    assert_eq!(vs_pf(walk(&r, 1 << 38, Access::Read, s)), (13, RvFaultKind::AddressTooWide));
    assert_eq!(vs_pf(walk(&r, 0xffff_ffc0_0000_0000, Access::Read, s)), (13, RvFaultKind::NotValid));
    assert!(matches!(
        walk(&VsRegs { vsatp: 5 << 60, ..r }, 0, Access::Read, s),
        Err(RvError::InvalidVsatp { mode: 5 })
    ));
}

#[test]
fn vs_stage_sv48_and_superpages() {
    let mut t = Tables::new();
    let vs_root = t.frame(4096);
    let va = 0x7f00_0020_0000u64; // Sv48: bits 63:48 equal bit 47 (0)
    t.rv_map(vs_root, 4, 9, va, 1, rv_pte(0x40_0000, V | R | U | A), 0);
    let r = VsRegs { vsatp: 9 << 60 | vs_root >> 12, ..VsRegs::default() };
    let w = riscv::walk(&mut t.mem, &mut NoStage2, &r, Gva(va | 0x1_2345), Access::Read, Privilege::User).unwrap();
    assert_eq!((w.gpa, w.page_size), (Gpa(0x41_2345), PageSize::Size2M));
}
