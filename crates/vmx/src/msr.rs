//! MSRs a guest reaches: the MSR bitmap (which accesses exit) and what the hypervisor answers for
//! the ones that do.
//!
//! Policy (for the Linux guest, and any other): the MSRs whose state the VMCS switches or that
//! the hypervisor itself never uses are passed through (no exit); IA32_EFER and IA32_APIC_BASE
//! writes are checked; IA32_MISC_ENABLE reads the processor's value; every other MSR exits and
//! gets #GP(0), as the SDM says for an MSR that does not exist (Vol. 2B "RDMSR", "WRMSR").

/// IA32_APIC_BASE (Intel SDM Vol. 4 Table 2-2).
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_BIOS_SIGN_ID: the microcode revision (written 0, then read after CPUID).
pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
/// IA32_TSC_ADJUST.
pub const IA32_TSC_ADJUST: u32 = 0x3b;
/// IA32_XSS: the supervisor state components XSAVES manages.
pub const IA32_XSS: u32 = 0xda0;
/// IA32_SYSENTER_CS.
pub const IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_PAT.
pub const IA32_PAT: u32 = 0x277;
/// IA32_STAR.
pub const IA32_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR.
pub const IA32_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR.
pub const IA32_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK (SFMASK).
pub const IA32_FMASK: u32 = 0xc000_0084;
/// IA32_FS_BASE.
pub const IA32_FS_BASE: u32 = 0xc000_0100;
/// IA32_GS_BASE.
pub const IA32_GS_BASE: u32 = 0xc000_0101;
/// IA32_KERNEL_GS_BASE.
pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_TSC_DEADLINE: the local APIC timer's deadline in TSC-deadline mode (Intel SDM Vol. 3A
/// 12.5.4.1).
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_TSC_AUX.
pub const IA32_TSC_AUX: u32 = 0xc000_0103;
/// IA32_THERM_INTERRUPT: which thermal events raise the local APIC's thermal interrupt (Intel
/// SDM Vol. 4 Table 2-2, present when bit 22 (ACPI) of CPUID.01H:EDX is 1).
pub const IA32_THERM_INTERRUPT: u32 = 0x19b;
/// IA32_PACKAGE_THERM_INTERRUPT: the same for the package's thermal events (Intel SDM Vol. 4
/// Table 2-2, present when bit 6 (PTM) of CPUID.06H:EAX is 1).
pub const IA32_PACKAGE_THERM_INTERRUPT: u32 = 0x1b2;

/// MSRs passed through in both directions, and why that is safe:
/// - FS/GS base and SYSENTER_CS/ESP/EIP: the VMCS guest-state area holds them, loaded at every
///   entry and saved at every exit (Intel SDM Vol. 3C 25.4.1, 27.3.2.1, 28.3.2);
/// - IA32_PAT: loaded and saved through the VMCS PAT fields (entry control "load IA32_PAT",
///   exit controls "save/load IA32_PAT", Vol. 3C 25.7.1, 25.8.1); the host's comes back on exit;
/// - STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE, TSC_AUX, XSS: the hypervisor never executes
///   SYSCALL, SWAPGS, RDTSCP or XSAVES, so the guest's values can stay in the processor (one guest per CPU);
/// - TSC_DEADLINE: part of the local APIC timer, which the guest owns with the APIC page; the
///   hypervisor never arms that timer;
/// - THERM_INTERRUPT, PACKAGE_THERM_INTERRUPT: the sources of the local APIC's thermal interrupt
///   (its thermal LVT entry is the guest's, with the APIC page); the hypervisor takes no thermal
///   interrupts.
///
/// IA32_APIC_BASE is read through (the local APIC is the processor's own) and its writes exit.
pub const PASSED_THROUGH: [u32; 16] = [
    IA32_FS_BASE,
    IA32_GS_BASE,
    IA32_KERNEL_GS_BASE,
    IA32_SYSENTER_CS,
    IA32_SYSENTER_ESP,
    IA32_SYSENTER_EIP,
    IA32_PAT,
    IA32_STAR,
    IA32_LSTAR,
    IA32_CSTAR,
    IA32_FMASK,
    IA32_TSC_AUX,
    IA32_XSS,
    IA32_TSC_DEADLINE,
    IA32_THERM_INTERRUPT,
    IA32_PACKAGE_THERM_INTERRUPT,
];

/// Where an MSR's read bit lives in the 4 KiB MSR bitmap (Intel SDM Vol. 3C 25.6.9): bits for
/// 0..=0x1fff at byte 0, for 0xc0000000..=0xc0001fff at byte 1024; the write bits 2048 bytes
/// further. Other MSRs have no bit: they always exit.
pub const fn bitmap_bit(msr: u32) -> Option<(usize, u8)> {
    let (base, n) = match msr {
        0..=0x1fff => (0, msr),
        0xc000_0000..=0xc000_1fff => (1024, msr - 0xc000_0000),
        _ => return None,
    };
    Some((base + (n / 8) as usize, 1 << (n % 8)))
}

/// Sets whether reads and writes of `msr` exit in `bitmap`; false for an MSR the bitmap does not
/// cover (it always exits).
pub fn set_intercept(bitmap: &mut [u8; 4096], msr: u32, read_exits: bool, write_exits: bool) -> bool {
    let Some((byte, bit)) = bitmap_bit(msr) else { return false };
    for (at, exits) in [(byte, read_exits), (byte + 2048, write_exits)] {
        if exits {
            bitmap[at] |= bit;
        } else {
            bitmap[at] &= !bit;
        }
    }
    true
}

/// What the hypervisor does with an RDMSR or WRMSR that exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrAction {
    /// IA32_EFER, kept in the VMCS guest field (writes checked by `emulate::efer_write`).
    Efer,
    /// Read: the processor's value. Write: accepted only when it changes nothing (the local APIC
    /// is the processor's own, passed through: moving or disabling it is not offered), else #GP.
    ApicBase,
    /// Read: the processor's value; a write is ignored (the guest cannot change how the shared
    /// processor behaves).
    ReadHostIgnoreWrite,
    /// #GP(0): an MSR this hypervisor does not offer.
    Gp,
}

/// The action for an exit on `msr`.
pub const fn action(msr: u32) -> MsrAction {
    match msr {
        crate::caps::IA32_EFER => MsrAction::Efer,
        IA32_APIC_BASE => MsrAction::ApicBase,
        IA32_MISC_ENABLE | IA32_BIOS_SIGN_ID | IA32_TSC_ADJUST => MsrAction::ReadHostIgnoreWrite,
        _ => MsrAction::Gp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_follow_the_sdm_layout() {
        assert_eq!(bitmap_bit(0), Some((0, 1)));
        assert_eq!(bitmap_bit(IA32_PAT), Some((0x277 / 8, 1 << 7)));
        assert_eq!(bitmap_bit(IA32_LSTAR), Some((1024 + 16, 1 << 2)));
        assert_eq!(bitmap_bit(0x2000), None);
        assert_eq!(bitmap_bit(0xc000_2000), None);
        let mut b = [0xffu8; 4096];
        assert!(set_intercept(&mut b, IA32_FS_BASE, false, false));
        assert_eq!((b[1024 + 32], b[3072 + 32]), (0xfe, 0xfe));
        assert!(set_intercept(&mut b, IA32_APIC_BASE, false, true));
        assert_eq!((b[3] & 8, b[2048 + 3] & 8), (0, 8));
        assert!(!set_intercept(&mut b, 0x4000_0000, false, false));
    }

    #[test]
    fn unknown_msrs_get_gp() {
        assert_eq!(action(crate::caps::IA32_EFER), MsrAction::Efer);
        assert_eq!(action(IA32_APIC_BASE), MsrAction::ApicBase);
        assert_eq!(action(0x10a), MsrAction::Gp);
        assert_eq!(action(0x4b56_4d00), MsrAction::Gp);
    }
}
