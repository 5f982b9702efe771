//! kvm-unit-tests x86/vmx_tests.c, the `ept_access_test_*` permission, reserved-bit, ignored-bit
//! and `force_2m_page` cases, reproduced on the spec model's EPT walk.
//!
//! As in kvm-unit-tests: guest-physical 1 << 39 (a PML4E of its own) maps one page; each case
//! changes the EPT entry at level 1 (PTE), 2 (PDE), 3 (PDPTE) or 4 (PML4E) of that mapping, and
//! at levels 2 and 3 also turns it into a 2 MiB / 1 GiB page when the capabilities allow
//! ("mkhuge"); then the guest reads `gva[0]`, writes it, or calls `gva[1]` (8 bytes in) from
//! CPL 0 or CPL 3. Expected outcomes and qualifications are kvm-unit-tests' own (it masks bits
//! 9-11 of the qualification; the model never sets them). Mode-based execute control (MBEC) is
//! off, as on Bochs 2.7: "exec user" behaves as "exec". See docs/conformance.md.

mod common;

use common::*;
use twostage_spec_model::ept::{self, qual, EptAccess, EptCaps, EptExit, GuestLinear, MisconfigReason};
use twostage_spec_model::{Gpa, Hpa};

/// Bochs corei7_skylake_x IA32_VMX_EPT_VPID_CAP (README "Platform notes").
const SKYLAKE_X: u64 = 0xf0106334141;
/// Bochs corei7_sandy_bridge_2600k: no EPT A/D, no 1 GiB pages.
const SANDY_BRIDGE: u64 = 0xf0106114141;
const GPA: u64 = 1 << 39;
/// 1 GiB-aligned, below 2^36, so that it is a valid page address for every MAXPHYADDR tried.
const HPA: u64 = 0x1_4000_0000;

const EPT_RA: u64 = 1;
const EPT_WA: u64 = 2;
const EPT_EA: u64 = 4;
const EPT_PRESENT: u64 = EPT_RA | EPT_WA | EPT_EA;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The translation bits every kvm-unit-tests data-access violation carries: LADDR_VLD | PADDR.
const LA: u64 = qual::GLA_VALID | qual::GLA_TRANSLATION;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Exec,
    ExecUser,
}
const OPS: [Op; 4] = [Op::Read, Op::Write, Op::Exec, Op::ExecUser];

impl Op {
    fn gpa_and_access(self) -> (u64, EptAccess) {
        match self {
            Op::Read => (GPA, EptAccess::READ),
            Op::Write => (GPA, EptAccess::WRITE),
            // Without MBEC, EPT bit 2 controls every fetch, user or supervisor.
            Op::Exec | Op::ExecUser => (GPA + 8, EptAccess::FETCH),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Allowed,
    Violation(u64),
    Misconfig,
}

struct Ctx {
    caps: EptCaps,
    /// EPTP bit 6 (kvm-unit-tests runs these cases with it clear; the model is also run with
    /// it set where the capability exists: A/D bits must not change any outcome).
    ad: bool,
}

impl Ctx {
    fn new(cap: u64, maxphyaddr: u8, ad: bool) -> Self {
        Self { caps: EptCaps::from_msr(cap, maxphyaddr), ad }
    }

    /// kvm-unit-tests' `ept_huge_pages_supported(level)`.
    fn huge_ok(&self, level: u8) -> bool {
        (level == 2 && self.caps.page_2m) || (level == 3 && self.caps.page_1g)
    }

    /// One access after `ept_twiddle(gpa, mkhuge, level, clear, set)` on a fresh mapping.
    fn run(&self, mkhuge: bool, level: u8, clear: u64, set: u64, op: Op) -> Result<ept::EptWalk, EptExit> {
        let mut t = Tables::new();
        let root = t.frame(4096);
        // kvm-unit-tests' install_ept: the leaf is the address and the permissions (type 0, UC).
        t.ept_map(root, 4, GPA, 0, HPA | EPT_PRESENT);
        let at = t.ept_entry(root, 4, GPA, level - 1);
        let orig = t.mem.peek(at).unwrap();
        let mut pte = orig;
        if mkhuge {
            pte = (orig & !ADDR) | HPA | EPT_LARGE;
        }
        t.mem.poke(at, (pte & !clear) | set);
        let eptp = root | 3 << 3 | (self.ad as u64) << 6 | 6;
        let (gpa, access) = op.gpa_and_access();
        ept::walk(&mut t.mem, eptp, &self.caps, Gpa(gpa), access, GuestLinear::TRANSLATION)
    }

    #[track_caller]
    fn check(&self, mkhuge: bool, level: u8, clear: u64, set: u64, op: Op, want: Expect) {
        let r = self.run(mkhuge, level, clear, set, op);
        let what = format!("level {level} huge {mkhuge} clear {clear:#x} set {set:#x} {op:?} A/D {}", self.ad);
        match (want, r) {
            (Expect::Allowed, Ok(w)) => {
                let (gpa, _) = op.gpa_and_access();
                let size = if mkhuge { 1u64 << (12 + 9 * (level - 1)) } else { 4096 };
                assert_eq!(w.hpa, Hpa(HPA + (gpa & (size - 1))), "{what}");
            }
            (Expect::Violation(q), Err(EptExit::Violation { gpa, qualification })) => {
                assert_eq!(qualification, q | LA, "{what}: qualification");
                // kvm-unit-tests: INFO_PHYS_ADDR is gva[0]'s address, or gva[1]'s for a fetch.
                assert_eq!(gpa, Gpa(op.gpa_and_access().0), "{what}: guest-physical address");
            }
            (Expect::Misconfig, Err(EptExit::Misconfig { gpa, level: l, .. })) => {
                assert_eq!(l, level - 1, "{what}: level");
                assert_eq!(gpa, Gpa(op.gpa_and_access().0), "{what}");
            }
            (want, got) => panic!("{what}: expected {want:?}, got {got:?}"),
        }
    }

    /// kvm-unit-tests' `ept_violation` / `ept_allowed` / `ept_misconfig`: levels 1-4, and huge
    /// pages at levels 2-3 where offered.
    fn every_level(&self, clear: u64, set: u64, op: Op, want: Expect) {
        for level in 1..=4 {
            self.check(false, level, clear, set, op, want);
            if self.huge_ok(level) {
                self.check(true, level, clear, set, op, want);
            }
        }
    }

    fn access(&self, access: u64, op: Op, want: Expect) {
        self.every_level(EPT_PRESENT, access, op, want);
    }

    /// kvm-unit-tests' `ept_access_misconfig` (the op "shouldn't matter": read, write, exec).
    fn misconfig(&self, access: u64) {
        for op in [Op::Read, Op::Write, Op::Exec] {
            self.access(access, op, Expect::Misconfig);
        }
    }
}

/// The processor models each case runs on: Bochs skylake_x (A/D off as in kvm-unit-tests, and
/// on), and sandy_bridge (no 1 GiB pages), with MAXPHYADDR 46.
fn cpus() -> Vec<Ctx> {
    vec![Ctx::new(SKYLAKE_X, 46, false), Ctx::new(SKYLAKE_X, 46, true), Ctx::new(SANDY_BRIDGE, 46, false)]
}

use Expect::{Allowed, Misconfig, Violation};

#[test]
fn ept_access_test_not_present() {
    for c in cpus() {
        c.access(0, Op::Read, Violation(qual::READ));
        c.access(0, Op::Write, Violation(qual::WRITE));
        c.access(0, Op::Exec, Violation(qual::FETCH));
        c.access(0, Op::ExecUser, Violation(qual::FETCH));
    }
}

#[test]
fn ept_access_test_read_only() {
    for c in cpus() {
        c.access(EPT_RA, Op::Read, Allowed);
        c.access(EPT_RA, Op::Write, Violation(qual::WRITE | qual::READABLE));
        c.access(EPT_RA, Op::Exec, Violation(qual::FETCH | qual::READABLE));
        c.access(EPT_RA, Op::ExecUser, Violation(qual::FETCH | qual::READABLE));
    }
}

#[test]
fn ept_access_test_write_only() {
    for c in cpus() {
        c.misconfig(EPT_WA);
    }
}

#[test]
fn ept_access_test_read_write() {
    for c in cpus() {
        c.access(EPT_RA | EPT_WA, Op::Read, Allowed);
        c.access(EPT_RA | EPT_WA, Op::Write, Allowed);
        let q = qual::FETCH | qual::READABLE | qual::WRITABLE;
        c.access(EPT_RA | EPT_WA, Op::Exec, Violation(q));
        c.access(EPT_RA | EPT_WA, Op::ExecUser, Violation(q));
    }
}

#[test]
fn ept_access_test_execute_only() {
    // Supported (IA32_VMX_EPT_VPID_CAP bit 0, as on both Bochs models).
    for c in cpus() {
        c.access(EPT_EA, Op::Read, Violation(qual::READ | qual::EXECUTABLE));
        c.access(EPT_EA, Op::Write, Violation(qual::WRITE | qual::EXECUTABLE));
        c.access(EPT_EA, Op::Exec, Allowed);
        // Without MBEC, user fetches are allowed too.
        c.access(EPT_EA, Op::ExecUser, Allowed);
    }
    // Not supported: every level is a misconfiguration.
    Ctx::new(SKYLAKE_X & !1, 46, false).misconfig(EPT_EA);
}

#[test]
fn ept_access_test_read_execute() {
    for c in cpus() {
        c.access(EPT_RA | EPT_EA, Op::Read, Allowed);
        c.access(EPT_RA | EPT_EA, Op::Write, Violation(qual::WRITE | qual::READABLE | qual::EXECUTABLE));
        c.access(EPT_RA | EPT_EA, Op::Exec, Allowed);
        c.access(EPT_RA | EPT_EA, Op::ExecUser, Allowed);
    }
}

#[test]
fn ept_access_test_write_execute() {
    for c in cpus() {
        c.misconfig(EPT_WA | EPT_EA);
    }
}

#[test]
fn ept_access_test_read_write_execute() {
    for c in cpus() {
        for op in OPS {
            c.access(EPT_PRESENT, op, Allowed);
        }
    }
}

/// Reserved bits 51:MAXPHYADDR at every level (and in huge pages), for several MAXPHYADDR
/// values; the level-specific reserved bits; and kvm-unit-tests' second half of each: with bits
/// 2:0 clear the entry is not present and the reserved bit is ignored (a read violation).
#[test]
fn ept_access_test_reserved_bits() {
    let not_present = Violation(qual::READ);
    for maxphyaddr in [36u8, 39, 40, 46, 48, 52] {
        for cap in [SKYLAKE_X, SANDY_BRIDGE] {
            let c = Ctx::new(cap, maxphyaddr, false);
            for bit in maxphyaddr..=51 {
                for level in 1..=4 {
                    for op in [Op::Read, Op::Write, Op::Exec] {
                        c.check(false, level, 0, 1 << bit, op, Misconfig);
                        if c.huge_ok(level) {
                            c.check(true, level, 0, 1 << bit, op, Misconfig);
                        }
                    }
                }
                c.every_level(EPT_PRESENT, 1 << bit, Op::Read, not_present);
            }
            // Above bit 51: ignored, at every MAXPHYADDR (52 has no reserved high bits at all).
            c.every_level(0, 1 << 52, Op::Read, Allowed);
        }
    }
    let c = Ctx::new(SKYLAKE_X, 46, false);
    let reserved = |level: u8, huge: bool, bit: u32| {
        for op in [Op::Read, Op::Write, Op::Exec] {
            c.check(huge, level, 0, 1 << bit, op, Misconfig);
        }
        c.check(false, level, EPT_PRESENT, 1 << bit, Op::Read, not_present);
        if c.huge_ok(level) {
            c.check(true, level, EPT_PRESENT, 1 << bit, Op::Read, not_present);
        }
    };
    // PDE and PDPTE referencing a table: bits 6:3. 2 MiB PDE: 20:12. 1 GiB PDPTE: 29:12.
    // PML4E: 7:3. (kvm-unit-tests stops at bits 19 and 28; the SDM tables go to 20 and 29.)
    for bit in 3..=6 {
        reserved(2, false, bit);
        reserved(3, false, bit);
    }
    for bit in 12..=20 {
        reserved(2, true, bit);
    }
    for bit in 12..=29 {
        reserved(3, true, bit);
    }
    for bit in 3..=7 {
        reserved(4, false, bit);
    }
    // And the reason the model gives for one of them.
    match c.run(false, 4, 0, 1 << 7, Op::Read) {
        Err(EptExit::Misconfig { reason: MisconfigReason::ReservedBits(b), .. }) => assert_eq!(b, 1 << 7),
        other => panic!("{other:?}"),
    }
}

/// Bits 8 and 9 (A and D: ignored for translation even with EPT A/D on), 10 (MBEC off), 11 and
/// 52-63 (63 is "suppress #VE", ignored while the EPT-violation #VE control is 0), set and
/// cleared at every level, for every op.
#[test]
fn ept_access_test_ignored_bits() {
    let bits = [8u32, 9, 10, 11, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63];
    for c in [Ctx::new(SKYLAKE_X, 46, false), Ctx::new(SKYLAKE_X, 46, true)] {
        for bit in bits {
            for op in OPS {
                c.every_level(0, 1 << bit, op, Allowed);
                c.every_level(1 << bit, 0, op, Allowed);
            }
        }
    }
}

#[test]
fn ept_access_test_force_2m_page() {
    for c in cpus() {
        assert!(c.caps.page_2m);
        c.check(true, 2, 0, 0, Op::Read, Allowed);
        c.check(true, 2, EPT_PRESENT, EPT_RA, Op::Write, Violation(qual::WRITE | qual::READABLE));
        for op in [Op::Read, Op::Write, Op::Exec] {
            c.check(true, 2, EPT_PRESENT, EPT_WA, op, Misconfig);
        }
    }
    // Without the 2 MiB capability, bit 7 in a PDE is refused (the model treats it as reserved).
    let c = Ctx::new(SKYLAKE_X & !(1 << 16), 46, false);
    c.check(true, 2, 0, 0, Op::Read, Misconfig);
}

/// "EPT A/D disabled" / "EPT A/D enabled", stages 1 and 2 ("EPT misconfigurations"): a write-only
/// leaf, then a leaf with memory type 2.
#[test]
fn ept_misconfigurations_write_only_and_memory_type_2() {
    for c in cpus() {
        for op in OPS {
            c.check(false, 1, EPT_PRESENT, EPT_WA, op, Misconfig);
            c.check(false, 1, 0, 2 << 3, op, Misconfig);
        }
    }
}
