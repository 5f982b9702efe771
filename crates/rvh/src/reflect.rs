//! Exceptions the hypervisor does not handle, handed to the guest: the trap the hart would have
//! taken into VS-mode had the exception been delegated (Privileged spec, H extension,
//! "Trap Entry" and "Hypervisor Exception Delegation Register (hedeleg)"; the VS CSRs act as
//! their supervisor counterparts, "Supervisor Status Register (sstatus)").
//!
//! Entry into VS-mode: vsepc = the trapping pc, vscause = the cause, vstval = the trap value;
//! vsstatus.SPP = the privilege the trap came from (1 = VS, 0 = VU), vsstatus.SPIE = vsstatus.SIE,
//! vsstatus.SIE = 0; execution continues in VS-mode at vstvec's BASE (exceptions go to BASE in
//! both direct and vectored mode: "Supervisor Trap Vector Base Address Register (stvec)").

use crate::csr::{cause, sstatus};

/// The exceptions delegated to the guest with hedeleg, so they never reach the hypervisor:
/// misaligned fetch/load/store, access faults, illegal instruction, breakpoint, ecall from
/// VU-mode and the guest's own page faults. hedeleg bits 9-11 (ecall from HS/VS/M) and 20-23
/// (guest-page faults, virtual instruction) are read-only zero ("Hypervisor Exception Delegation
/// Register (hedeleg)").
pub const HEDELEG: u64 = (1 << 0)
    | (1 << cause::INSN_ACCESS)
    | (1 << cause::ILLEGAL_INSN)
    | (1 << cause::BREAKPOINT)
    | (1 << cause::LOAD_MISALIGNED)
    | (1 << cause::LOAD_ACCESS)
    | (1 << cause::STORE_MISALIGNED)
    | (1 << cause::STORE_ACCESS)
    | (1 << 8)
    | (1 << cause::INSN_PAGE)
    | (1 << cause::LOAD_PAGE)
    | (1 << cause::STORE_PAGE);

/// The guest's trap state before the reflected trap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsState {
    /// vsstatus.
    pub vsstatus: u64,
    /// vstvec.
    pub vstvec: u64,
}

/// What reflecting one exception writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reflected {
    /// The new vsstatus.
    pub vsstatus: u64,
    /// vsepc: the trapping pc.
    pub vsepc: u64,
    /// vscause.
    pub vscause: u64,
    /// vstval.
    pub vstval: u64,
    /// Where the guest goes on: vstvec's BASE, in VS-mode.
    pub pc: u64,
}

/// The cause the guest sees for an exception that reached the hypervisor: a virtual-instruction
/// exception is an illegal instruction to the guest (it is what the instruction would raise
/// without the hypervisor's say: "Virtual Instruction Exceptions"); a guest-page fault the
/// hypervisor cannot resolve (no memory, no device at that GPA) is the matching access fault, as
/// on a machine with nothing at that address; any other cause is kept.
pub const fn guest_cause(scause: u64) -> u64 {
    match scause {
        cause::VIRTUAL_INSN => cause::ILLEGAL_INSN,
        cause::INSN_GUEST_PAGE => cause::INSN_ACCESS,
        cause::LOAD_GUEST_PAGE => cause::LOAD_ACCESS,
        cause::STORE_GUEST_PAGE => cause::STORE_ACCESS,
        c => c,
    }
}

/// The VS-mode trap for exception `vscause` with value `tval`, taken at `pc` from VS-mode
/// (`from_vs`) or VU-mode, given the guest's `state`.
pub const fn reflect(vscause: u64, tval: u64, pc: u64, from_vs: bool, state: VsState) -> Reflected {
    let mut s = state.vsstatus & !(sstatus::SPP | sstatus::SPIE | sstatus::SIE);
    if from_vs {
        s |= sstatus::SPP;
    }
    if state.vsstatus & sstatus::SIE != 0 {
        s |= sstatus::SPIE;
    }
    Reflected { vsstatus: s, vsepc: pc, vscause, vstval: tval, pc: state.vstvec & !3 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_from_vu_with_interrupts_on() {
        let st = VsState { vsstatus: sstatus::SIE | sstatus::SUM | sstatus::FS_INITIAL, vstvec: 0xffff_ffff_8000_1000 };
        let r = reflect(cause::ILLEGAL_INSN, 0x0000_0073, 0x1_0000, false, st);
        assert_eq!(r.vsepc, 0x1_0000);
        assert_eq!(r.vscause, cause::ILLEGAL_INSN);
        assert_eq!(r.vstval, 0x73);
        assert_eq!(r.pc, 0xffff_ffff_8000_1000);
        assert_eq!(r.vsstatus & sstatus::SPP, 0, "came from VU");
        assert_ne!(r.vsstatus & sstatus::SPIE, 0, "SPIE takes SIE");
        assert_eq!(r.vsstatus & sstatus::SIE, 0, "SIE cleared");
        assert_eq!(
            r.vsstatus & (sstatus::SUM | sstatus::FS_INITIAL),
            sstatus::SUM | sstatus::FS_INITIAL,
            "others kept"
        );
    }

    #[test]
    fn reflection_from_vs_in_vectored_mode_goes_to_base() {
        // Vectored mode (MODE = 1): exceptions still go to BASE.
        let st = VsState { vsstatus: sstatus::SPIE | sstatus::SPP, vstvec: 0x8020_0101 };
        let r = reflect(cause::BREAKPOINT, 0x8020_0040, 0x8020_0040, true, st);
        assert_eq!(r.pc, 0x8020_0100);
        assert_ne!(r.vsstatus & sstatus::SPP, 0, "came from VS");
        assert_eq!(r.vsstatus & (sstatus::SPIE | sstatus::SIE), 0, "SPIE takes SIE = 0");
    }

    #[test]
    fn causes_the_guest_sees() {
        assert_eq!(guest_cause(cause::VIRTUAL_INSN), cause::ILLEGAL_INSN);
        assert_eq!(guest_cause(cause::LOAD_GUEST_PAGE), cause::LOAD_ACCESS);
        assert_eq!(guest_cause(cause::STORE_GUEST_PAGE), cause::STORE_ACCESS);
        assert_eq!(guest_cause(cause::INSN_GUEST_PAGE), cause::INSN_ACCESS);
        assert_eq!(guest_cause(cause::LOAD_MISALIGNED), cause::LOAD_MISALIGNED);
        // An hlvx fetch fault becomes the instruction cause first (access::fetch_cause).
        assert_eq!(guest_cause(crate::access::fetch_cause(cause::LOAD_PAGE)), cause::INSN_PAGE);
    }

    #[test]
    fn hedeleg_leaves_out_the_read_only_bits() {
        for b in [9, 10, 11, 20, 21, 22, 23] {
            assert_eq!(HEDELEG & (1 << b), 0, "bit {b}");
        }
        assert_ne!(HEDELEG & (1 << 8), 0, "ecall from VU goes to the guest kernel");
    }
}
