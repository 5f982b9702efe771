//! kvm-unit-tests x86/vmx_tests.c, the EPT "paddr" cases (guest paging-structure accesses) and the
//! paging-structure stages of "EPT A/D disabled" / "EPT A/D enabled", reproduced on the spec model:
//! a guest x86-64 4-level walk whose table reads and A/D updates go through EPT.
//!
//! The setup follows kvm-unit-tests: the guest linear address is the first of a 1 GiB-aligned
//! region, so the guest PTE that maps it is entry 0 of its page table page; only the EPT leaf
//! that maps that page-table page is changed. Expected qualifications are kvm-unit-tests' own
//! (bits 0-5, 7, 8 of Intel SDM Vol. 3C Table 28-7; kvm-unit-tests masks bits 9-11).
//! See docs/conformance.md for the table.

mod common;

use common::*;
use twostage_spec_model::ept::{qual, EptCaps, EptExit, ACCESSED, DIRTY};
use twostage_spec_model::stage1::x86::{self, error_code as ec, X86Error, X86Regs};
use twostage_spec_model::stage1::{EptStage2, Privilege};
use twostage_spec_model::{Access, Gpa, Gva, Hpa};

/// Bochs corei7_skylake_x IA32_VMX_EPT_VPID_CAP (README "Platform notes").
const SKYLAKE_X: u64 = 0xf0106334141;
/// kvm-unit-tests' data->gpa: 1 << 39, so the test data has a PML4E of its own.
const DATA_GPA: u64 = 1 << 39;
/// Host page behind DATA_GPA (never read by the model: only table entries are).
const DATA_HPA: u64 = 0x1_4000_0000;
/// The guest linear address: the first of a 1 GiB-aligned region.
const GVA: u64 = 0x0000_1000_0000_0000;

const EPT_R: u64 = 1;
const EPT_W: u64 = 2;
const EPT_X: u64 = 4;
const EPT_PRESENT: u64 = EPT_R | EPT_W | EPT_X;

// Guest x86 paging-entry bits (Intel SDM Vol. 3A 4.5).
const PT_P: u64 = 1;
const PT_RW: u64 = 1 << 1;
const PT_US: u64 = 1 << 2;
const PT_A: u64 = 1 << 5;
const PT_D: u64 = 1 << 6;
const PT_AD: u64 = PT_A | PT_D;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// kvm-unit-tests' `enum ept_access_op` (the guest's access to `data->gva`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Exec,
    ExecUser,
}
const OPS: [Op; 4] = [Op::Read, Op::Write, Op::Exec, Op::ExecUser];

impl Op {
    /// (linear address, access, privilege): fetches execute `data->gva[1]`, 8 bytes in.
    fn access(self) -> (u64, Access, Privilege) {
        match self {
            Op::Read => (GVA, Access::Read, Privilege::Supervisor),
            Op::Write => (GVA, Access::Write, Privilege::Supervisor),
            Op::Exec => (GVA + 8, Access::Fetch, Privilege::Supervisor),
            Op::ExecUser => (GVA + 8, Access::Fetch, Privilege::User),
        }
    }
}

/// The guest's 4-level tables for GVA -> DATA_GPA and an EPT that maps every guest table page
/// (identity, 4 KiB, RWX) and DATA_GPA.
struct Guest {
    t: Tables,
    cr3: u64,
    ept_root: u64,
    /// Guest-physical address of the guest PTE that maps GVA (entry 0 of its page).
    pte_gpa: u64,
}

impl Guest {
    fn new(pte_ad: u64) -> Self {
        let mut t = Tables::new();
        let cr3 = t.frame(4096);
        let mut table = cr3;
        for level in (1..4u32).rev() {
            let pa = Hpa(table + ((GVA >> (12 + 9 * level)) & 511) * 8);
            // The page-table page gets a 2 MiB region of its own, so that an EPT PDE can be
            // taken away from it alone (stage 4 of "EPT A/D disabled").
            let next = if level == 1 { t.frame(2 << 20) } else { t.frame(4096) };
            t.mem.poke(pa, next | PT_P | PT_RW | PT_US | PT_A);
            table = next;
        }
        let pte_gpa = table + ((GVA >> 12) & 511) * 8;
        assert_eq!(pte_gpa & 0xfff, 0, "the PTE is entry 0 of its page, as in kvm-unit-tests");
        t.mem.poke(Hpa(pte_gpa), DATA_GPA | PT_P | PT_RW | PT_US | pte_ad);
        let guest_end = t.next_free();
        let ept_root = t.frame(4096);
        let mut page = cr3;
        while page < guest_end {
            t.ept_map(ept_root, 4, page, 0, page | EPT_PRESENT);
            page += 4096;
        }
        t.ept_map(ept_root, 4, DATA_GPA, 0, DATA_HPA | EPT_PRESENT);
        Self { t, cr3, ept_root, pte_gpa }
    }

    /// kvm-unit-tests' `ept_twiddle(gpa, false, 1, EPT_PRESENT, ept_access)` on the EPT PTE that
    /// maps the guest page-table page.
    fn set_pt_page_access(&mut self, ept_access: u64) {
        let e = self.t.ept_entry(self.ept_root, 4, self.pte_gpa, 0);
        let v = self.t.mem.peek(e).unwrap();
        self.t.mem.poke(e, (v & !EPT_PRESENT) | ept_access);
    }

    fn run(&mut self, op: Op, ad: bool) -> Result<x86::X86Walk, X86Error<EptExit>> {
        let regs = X86Regs {
            cr3: self.cr3,
            cr0_wp: true,
            cr4_smep: false,
            cr4_smap: false,
            rflags_ac: false,
            efer_nxe: true,
            maxphyaddr: 46,
            page_1g: true,
        };
        let eptp = self.ept_root | 3 << 3 | (ad as u64) << 6 | 6;
        let mut s2 = EptStage2 { eptp, caps: EptCaps::from_msr(SKYLAKE_X, 46) };
        let (va, access, privilege) = op.access();
        x86::walk(&mut self.t.mem, &mut s2, &regs, Gva(va), access, privilege)
    }

    fn guest_pte(&self) -> u64 {
        self.t.mem.peek(Hpa(self.pte_gpa)).unwrap()
    }
}

/// kvm-unit-tests' `ept_access_violation_paddr`: the access exits with an EPT violation on the
/// guest PTE's guest-physical address, bit 7 set and bit 8 clear (not the translation).
#[track_caller]
fn violation_paddr(ept_access: u64, pte_ad: u64, op: Op, ad: bool, expected: u64) {
    let mut g = Guest::new(pte_ad);
    g.set_pt_page_access(ept_access);
    match g.run(op, ad) {
        Err(X86Error::Stage2 { fault: EptExit::Violation { gpa, qualification }, during_walk: true }) => {
            assert_eq!(gpa, Gpa(g.pte_gpa), "{op:?}: the violation names the guest PTE's address");
            assert_eq!(
                qualification,
                expected | qual::GLA_VALID,
                "{op:?} ept_access {ept_access:#x} pte_ad {pte_ad:#x} EPT A/D {ad}: qualification"
            );
        }
        other => panic!("{op:?} ept_access {ept_access:#x} pte_ad {pte_ad:#x} EPT A/D {ad}: {other:?}"),
    }
}

/// kvm-unit-tests' `ept_access_allowed_paddr`: the access completes; the guest PTE then has A
/// (and D after a write or when it already had it); with EPT A/D, the EPT entries used to reach
/// the page-table page have A and its leaf has D (guest paging-structure accesses are writes).
#[track_caller]
fn allowed_paddr(ept_access: u64, pte_ad: u64, op: Op, ad: bool) {
    let mut g = Guest::new(pte_ad);
    g.set_pt_page_access(ept_access);
    let r = g.run(op, ad);
    assert!(r.is_ok(), "{op:?} ept_access {ept_access:#x} pte_ad {pte_ad:#x} EPT A/D {ad}: {r:?}");
    let pte = g.guest_pte();
    assert_ne!(pte & PT_A, 0, "{op:?}: guest PTE accessed");
    if pte_ad & PT_D != 0 || op == Op::Write {
        assert_ne!(pte & PT_D, 0, "{op:?}: guest PTE dirty");
    }
    if ad {
        for level in (0..4).rev() {
            let e = g.t.mem.peek(g.t.ept_entry(g.ept_root, 4, g.pte_gpa, level)).unwrap();
            assert_ne!(e & ACCESSED, 0, "{op:?}: EPT level {level} accessed");
            assert_eq!(e & DIRTY != 0, level == 0, "{op:?}: EPT dirty only on the leaf (level {level})");
        }
    }
}

#[test]
fn ept_access_test_paddr_not_present_ad_disabled() {
    for op in OPS {
        violation_paddr(0, PT_AD, op, false, qual::READ);
    }
}

#[test]
fn ept_access_test_paddr_not_present_ad_enabled() {
    for op in OPS {
        violation_paddr(0, PT_AD, op, true, qual::READ | qual::WRITE);
    }
}

/// EPT A/D off: the guest's read of its PTE passes (readable); setting A or D in it is a locked
/// read-modify-write, reported with bits 0 and 1 (see `stage1::ept_request`).
#[test]
fn ept_access_test_paddr_read_only_ad_disabled() {
    let q = qual::READ | qual::WRITE | qual::READABLE;
    for op in OPS {
        // Can't update A: every access fails.
        violation_paddr(EPT_R, 0, op, false, q);
        // A already set: only a write needs D.
        if op == Op::Write {
            violation_paddr(EPT_R, PT_A, op, false, q);
        } else {
            allowed_paddr(EPT_R, PT_A, op, false);
        }
        // A and D set: read-only is enough.
        allowed_paddr(EPT_R, PT_AD, op, false);
    }
}

#[test]
fn ept_access_test_paddr_read_only_ad_enabled() {
    let q = qual::READ | qual::WRITE | qual::READABLE;
    for op in OPS {
        for pte_ad in [0, PT_A, PT_AD] {
            violation_paddr(EPT_R, pte_ad, op, true, q);
        }
    }
}

#[test]
fn ept_access_test_paddr_read_write() {
    for op in OPS {
        allowed_paddr(EPT_R | EPT_W, 0, op, false);
        // Not in kvm-unit-tests (it runs this case with A/D off): the same with EPT A/D on.
        allowed_paddr(EPT_R | EPT_W, 0, op, true);
    }
}

#[test]
fn ept_access_test_paddr_read_write_execute() {
    for op in OPS {
        allowed_paddr(EPT_PRESENT, 0, op, false);
        allowed_paddr(EPT_PRESENT, 0, op, true);
    }
}

#[test]
fn ept_access_test_paddr_read_execute_ad_disabled() {
    let q = qual::READ | qual::WRITE | qual::READABLE | qual::EXECUTABLE;
    for op in OPS {
        violation_paddr(EPT_R | EPT_X, 0, op, false, q);
        if op == Op::Write {
            violation_paddr(EPT_R | EPT_X, PT_A, op, false, q);
        } else {
            allowed_paddr(EPT_R | EPT_X, PT_A, op, false);
        }
        allowed_paddr(EPT_R | EPT_X, PT_AD, op, false);
    }
}

#[test]
fn ept_access_test_paddr_read_execute_ad_enabled() {
    let q = qual::READ | qual::WRITE | qual::READABLE | qual::EXECUTABLE;
    for op in OPS {
        for pte_ad in [0, PT_A, PT_AD] {
            violation_paddr(EPT_R | EPT_X, pte_ad, op, true, q);
        }
    }
}

/// kvm-unit-tests leaves this case as a TODO: "no EPT violation as long as guest PF occurs",
/// e.g. the page-table page is read-only in EPT and the guest PTE is read-only too, so a guest
/// write takes a guest #PF before the processor would set A in the PTE. The model checks the
/// guest's rights before any A/D update (Intel SDM Vol. 3A 4.8; the model's documented choice).
#[test]
fn ept_access_test_paddr_not_present_page_fault() {
    for ad in [false, true] {
        let mut g = Guest::new(0);
        let pte = g.guest_pte();
        g.t.mem.poke(Hpa(g.pte_gpa), pte & !PT_RW);
        g.set_pt_page_access(EPT_R);
        match g.run(Op::Write, ad) {
            // EPT A/D on: the PTE read itself is a write to EPT and faults first.
            Err(X86Error::Stage2 { fault: EptExit::Violation { .. }, .. }) if ad => {}
            Err(X86Error::PageFault(pf)) if !ad => {
                assert_eq!(pf.error_code, ec::P | ec::W);
                assert_eq!(g.guest_pte() & PT_A, 0, "no A update was attempted");
            }
            other => panic!("EPT A/D {ad}: {other:?}"),
        }
    }
}

/// "EPT A/D disabled" / "EPT A/D enabled", stage 4 ("EPT violation - paging structure"): the EPT
/// PDE covering the guest page-table page is made not present; the guest's read of its PTE
/// exits with RD | LADDR_VLD, plus WR when EPT A/D is on.
#[test]
fn ept_violation_paging_structure_ad_disabled_and_enabled() {
    for ad in [false, true] {
        let mut g = Guest::new(PT_AD);
        let pde = g.t.ept_entry(g.ept_root, 4, g.pte_gpa, 1);
        let v = g.t.mem.peek(pde).unwrap();
        g.t.mem.poke(pde, v & !EPT_PRESENT);
        let expected = qual::READ | if ad { qual::WRITE } else { 0 } | qual::GLA_VALID;
        match g.run(Op::Read, ad) {
            Err(X86Error::Stage2 { fault: EptExit::Violation { qualification, gpa }, during_walk: true }) => {
                assert_eq!((qualification, gpa), (expected, Gpa(g.pte_gpa)), "EPT A/D {ad}");
            }
            other => panic!("EPT A/D {ad}: {other:?}"),
        }
    }
}

/// "EPT A/D disabled" / "EPT A/D enabled", stage 3 ("EPT violation - page permission"): the data
/// page's EPT PTE is made not present; a guest write exits with WR | LADDR_VLD | PADDR (bits 3-5
/// zero: the AND includes the not-present entry).
#[test]
fn ept_violation_page_permission_ad_disabled_and_enabled() {
    for ad in [false, true] {
        let mut g = Guest::new(PT_AD);
        let leaf = g.t.ept_entry(g.ept_root, 4, DATA_GPA, 0);
        let v = g.t.mem.peek(leaf).unwrap();
        g.t.mem.poke(leaf, v & !EPT_PRESENT);
        match g.run(Op::Write, ad) {
            Err(X86Error::Stage2 { fault: EptExit::Violation { qualification, gpa }, during_walk: false }) => {
                assert_eq!(qualification, qual::WRITE | qual::GLA_VALID | qual::GLA_TRANSLATION, "EPT A/D {ad}");
                assert_eq!(gpa, Gpa(DATA_GPA));
            }
            other => panic!("EPT A/D {ad}: {other:?}"),
        }
        // kvm-unit-tests' check_ept_ad after the exit: with EPT A/D, every guest page-table page
        // has A and D in its EPT leaf (walked as writes); the data page's leaf has neither.
        if ad {
            for level in (0..4u32).rev() {
                let mut table = g.cr3;
                for l in (level + 1..4).rev() {
                    table = g.t.mem.peek(Hpa(table + ((GVA >> (12 + 9 * l)) & 511) * 8)).unwrap() & ADDR;
                }
                let e = g.t.mem.peek(g.t.ept_entry(g.ept_root, 4, table, 0)).unwrap();
                assert_eq!(e & (ACCESSED | DIRTY), ACCESSED | DIRTY, "guest level {level} table page");
            }
            assert_eq!(g.t.mem.peek(leaf).unwrap() & (ACCESSED | DIRTY), 0);
        }
    }
}
