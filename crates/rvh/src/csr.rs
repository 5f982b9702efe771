//! CSR numbers' bit layouts used by the hypervisor, each with its spec citation.
//!
//! Citations are to "The RISC-V Instruction Set Manual, Volume II: Privileged Architecture",
//! version 1.12 (Hypervisor extension 1.0 is its chapter 8).

/// `sstatus` bits (Privileged 1.12 §4.1.1, Figure 4.2).
pub mod sstatus {
    /// Supervisor interrupt enable (§4.1.1.2).
    pub const SIE: u64 = 1 << 1;
    /// Previous SIE, restored by SRET (§4.1.1.2).
    pub const SPIE: u64 = 1 << 5;
    /// Previous privilege: 1 = S (VS when returning with hstatus.SPV = 1) (§4.1.1.2, §8.6.4).
    pub const SPP: u64 = 1 << 8;
    /// Permit supervisor access to user memory (§4.1.1.3).
    pub const SUM: u64 = 1 << 18;
    /// FS field, floating-point state (§3.1.6.6); set to Initial (1) so guests may use the FPU.
    pub const FS_INITIAL: u64 = 1 << 13;
    /// The FS field's mask (bits 14:13): Off 0, Initial 1, Clean 2, Dirty 3.
    pub const FS_MASK: u64 = 3 << 13;
    /// FS = Clean.
    pub const FS_CLEAN: u64 = 2 << 13;
    /// FS = Dirty.
    pub const FS_DIRTY: u64 = 3 << 13;
}

/// `hstatus` bits (Privileged 1.12 §8.2.1, Figure 8.2).
pub mod hstatus {
    /// stval holds a guest virtual address on a trap into HS-mode (§8.2.1).
    pub const GVA: u64 = 1 << 6;
    /// Supervisor previous virtualization mode: SRET returns to V=1 when set (§8.2.1).
    pub const SPV: u64 = 1 << 7;
    /// Privilege for HLV/HLVX/HSV: 1 = VS-mode (§8.2.1, §8.3.1).
    pub const SPVP: u64 = 1 << 8;
    /// Trap WFI in VS-mode (§8.2.1).
    pub const VTW: u64 = 1 << 21;
    /// VSXL field position (bits 33:32), 2 = 64-bit (§8.2.1).
    pub const VSXL_SHIFT: u32 = 32;
}

/// Interrupt numbers: bit positions in sip/sie/hvip/hideleg and scause codes with bit 63 set
/// (§4.1.3 Figure 4.6/4.7, §8.2.3 Figure 8.9).
pub mod irq {
    /// Supervisor timer interrupt.
    pub const STI: u64 = 5;
    /// Virtual-supervisor software interrupt (§8.2.3).
    pub const VSSI: u64 = 2;
    /// Virtual-supervisor timer interrupt (§8.2.3).
    pub const VSTI: u64 = 6;
    /// Virtual-supervisor external interrupt (§8.2.3).
    pub const VSEI: u64 = 10;
    /// Supervisor external interrupt: how a delegated VSEI reaches VS-mode (scause 9, §8.2.3).
    pub const SEI: u64 = 9;
}

/// henvcfg fields ("Hypervisor Environment Configuration Register (henvcfg)").
pub mod henvcfg {
    /// STCE: VS-mode may use the Sstc extension's vstimecmp (through the stimecmp name), whose
    /// timer interrupt shows in hip.VSTIP (Sstc extension, "Hypervisor Extension Considerations").
    /// Read-only zero unless the hart implements Sstc and menvcfg.STCE is set.
    pub const STCE: u64 = 1 << 63;
}

/// `scause` values (Privileged 1.12 §4.1.9 Table 4.2, with the H-extension codes of §8.6.1
/// Table 8.6).
pub mod cause {
    /// Set in scause for interrupts (§4.1.9).
    pub const INTERRUPT: u64 = 1 << 63;
    /// Instruction access fault.
    pub const INSN_ACCESS: u64 = 1;
    /// Illegal instruction.
    pub const ILLEGAL_INSN: u64 = 2;
    /// Breakpoint.
    pub const BREAKPOINT: u64 = 3;
    /// Load address misaligned.
    pub const LOAD_MISALIGNED: u64 = 4;
    /// Load access fault.
    pub const LOAD_ACCESS: u64 = 5;
    /// Store/AMO address misaligned.
    pub const STORE_MISALIGNED: u64 = 6;
    /// Store/AMO access fault.
    pub const STORE_ACCESS: u64 = 7;
    /// Environment call from VS-mode (§8.6.1).
    pub const ECALL_VS: u64 = 10;
    /// Instruction page fault (guest's own VS-stage table).
    pub const INSN_PAGE: u64 = 12;
    /// Load page fault (guest's own VS-stage table).
    pub const LOAD_PAGE: u64 = 13;
    /// Store/AMO page fault (guest's own VS-stage table).
    pub const STORE_PAGE: u64 = 15;
    /// Instruction guest-page fault (§8.6.1, §8.5.2).
    pub const INSN_GUEST_PAGE: u64 = 20;
    /// Load guest-page fault (§8.6.1, §8.5.2).
    pub const LOAD_GUEST_PAGE: u64 = 21;
    /// Virtual instruction (§8.6.1).
    pub const VIRTUAL_INSN: u64 = 22;
    /// Store/AMO guest-page fault (§8.6.1, §8.5.2).
    pub const STORE_GUEST_PAGE: u64 = 23;

    /// A short name for a cause, for logs and stats.
    pub fn name(scause: u64) -> &'static str {
        if scause & INTERRUPT != 0 {
            return match scause & !INTERRUPT {
                1 => "s-software-irq",
                5 => "s-timer-irq",
                9 => "s-external-irq",
                _ => "interrupt",
            };
        }
        match scause {
            0 => "insn-misaligned",
            INSN_ACCESS => "insn-access",
            ILLEGAL_INSN => "illegal-insn",
            BREAKPOINT => "breakpoint",
            LOAD_MISALIGNED => "load-misaligned",
            LOAD_ACCESS => "load-access",
            STORE_MISALIGNED => "store-misaligned",
            STORE_ACCESS => "store-access",
            8 => "ecall-u",
            9 => "ecall-hs",
            ECALL_VS => "ecall-vs",
            INSN_PAGE => "insn-page",
            LOAD_PAGE => "load-page",
            STORE_PAGE => "store-page",
            INSN_GUEST_PAGE => "insn-guest-page",
            LOAD_GUEST_PAGE => "load-guest-page",
            VIRTUAL_INSN => "virtual-insn",
            STORE_GUEST_PAGE => "store-guest-page",
            _ => "other-exception",
        }
    }
}

/// `hgatp` layout (Privileged 1.12 §8.2.10, Figure 8.21/Table 8.5).
pub mod hgatp {
    /// MODE field position (bits 63:60).
    pub const MODE_SHIFT: u32 = 60;
    /// VMID field position (bits 57:44).
    pub const VMID_SHIFT: u32 = 44;
    /// VMID field mask before shifting (VMIDLEN at most 14 on RV64).
    pub const VMID_MASK: u64 = (1 << 14) - 1;
    /// PPN field mask (bits 43:0).
    pub const PPN_MASK: u64 = (1 << 44) - 1;
    /// MODE = Bare: no G-stage translation.
    pub const MODE_BARE: u64 = 0;
    /// MODE = Sv39x4.
    pub const MODE_SV39X4: u64 = 8;
    /// MODE = Sv48x4.
    pub const MODE_SV48X4: u64 = 9;
    /// MODE = Sv57x4.
    pub const MODE_SV57X4: u64 = 10;
}

/// `satp`/`vsatp` layout for RV64 (Privileged 1.12 §4.1.11, Figure 4.14; §8.2.18).
pub mod satp {
    /// MODE field position (bits 63:60).
    pub const MODE_SHIFT: u32 = 60;
    /// MODE = Sv39.
    pub const MODE_SV39: u64 = 8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cause_names() {
        assert_eq!(cause::name(cause::STORE_GUEST_PAGE), "store-guest-page");
        assert_eq!(cause::name(cause::INTERRUPT | irq::STI), "s-timer-irq");
        assert_eq!(cause::name(99), "other-exception");
    }
}
