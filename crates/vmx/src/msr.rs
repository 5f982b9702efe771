//! MSRs a guest reaches: the MSR bitmap (which accesses exit) and what the hypervisor answers for
//! the ones that do.
//!
//! Policy (for the Linux guest, and any other): the MSRs whose state the VMCS switches or that
//! the hypervisor itself never uses are passed through (no exit), among them the architectural
//! performance-monitoring MSRs the guest's CPUID.0AH enumerates ([`perfmon_msrs`]); IA32_EFER and
//! IA32_APIC_BASE writes are checked; IA32_MISC_ENABLE and IA32_BIOS_SIGN_ID read the
//! processor's value; every other MSR exits and gets #GP(0), as the SDM says for an MSR that does
//! not exist (Vol. 2B "RDMSR", "WRMSR").

/// IA32_APIC_BASE (Intel SDM Vol. 4 Table 2-2).
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_BIOS_SIGN_ID: the microcode update signature. Software writes 0 to it, executes CPUID
/// leaf 1, then reads the revision of the loaded update from bits 63:32 (Intel SDM Vol. 3A
/// "Microcode Update Facilities", "Determining the Signature"; Vol. 4 Table 2-2, 8BH). A guest's
/// CPUID exits and the hypervisor executes CPUID itself before it answers, so the processor's
/// value that the read exit returns is the revision the guest asked for; the write is ignored
/// (it only clears the register for that sequence). A Linux kernel that sees no hypervisor bit
/// checks this revision against its errata list (the TSC-deadline timer).
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

/// IA32_PMC0: general-purpose performance counter 0, counter i at C1H + i (Intel SDM Vol. 3B
/// "Architectural Performance Monitoring Version 1"; Vol. 4 Table 2-2).
pub const IA32_PMC0: u32 = 0xc1;
/// IA32_PERFEVTSEL0: the event select of counter 0, counter i's at 186H + i (same section).
pub const IA32_PERFEVTSEL0: u32 = 0x186;
/// IA32_FIXED_CTR0: fixed-function counter 0, counter i at 309H + i (Vol. 3B "Architectural
/// Performance Monitoring Version 2"; Vol. 4 Table 2-2).
pub const IA32_FIXED_CTR0: u32 = 0x309;
/// IA32_FIXED_CTR_CTRL: the fixed counters' controls (version 2).
pub const IA32_FIXED_CTR_CTRL: u32 = 0x38d;
/// IA32_PERF_GLOBAL_STATUS: the counters' overflow status (version 2).
pub const IA32_PERF_GLOBAL_STATUS: u32 = 0x38e;
/// IA32_PERF_GLOBAL_CTRL: the counters' global enables (version 2).
pub const IA32_PERF_GLOBAL_CTRL: u32 = 0x38f;
/// IA32_PERF_GLOBAL_OVF_CTRL: clears the overflow status (version 2).
pub const IA32_PERF_GLOBAL_OVF_CTRL: u32 = 0x390;
/// The CPUID leaf that enumerates architectural performance monitoring (Intel SDM Vol. 2A
/// "CPUID", leaf 0AH): EAX bits 7:0 the version, EAX bits 15:8 the general-purpose counters per
/// logical processor; EDX bits 4:0 the fixed-function counters (version 2 and later).
pub const LEAF_PERFMON: u32 = 0xa;
/// General-purpose counters with architectural addresses: IA32_PMC0-7 (C1H-C8H) and
/// IA32_PERFEVTSEL0-7 (186H-18DH) (Vol. 4 Table 2-2); a larger count in CPUID is not trusted.
pub const MAX_GP_COUNTERS: u32 = 8;
/// Fixed-function counters with architectural addresses: IA32_FIXED_CTR0-3 (309H-30CH).
pub const MAX_FIXED_COUNTERS: u32 = 4;

/// The architectural performance-monitoring MSRs that CPUID.0AH (`leaf_a`, the host's answer,
/// which the guest sees unchanged) says exist: for version 1 and later IA32_PMCi and
/// IA32_PERFEVTSELi for each general-purpose counter; for version 2 and later also
/// IA32_FIXED_CTRi for each fixed-function counter, IA32_FIXED_CTR_CTRL and the three global
/// MSRs. None for version 0 (no architectural PMU).
///
/// They are passed through in both directions: the guest owns the PMU as it owns the local APIC
/// that delivers its overflow interrupt (the LVT performance-counter entry is on the guest's APIC
/// page), and the hypervisor never programs a counter. An RDMSR of an MSR that CPUID enumerates
/// must not fault; a kernel that sees no hypervisor bit (Linux) probes these with RDMSR and WRMSR
/// and gets what the processor says. Counters the guest enables also count while the hypervisor
/// runs between exits (event selects filter by CPL, not by VMX operation; Vol. 3B "Architectural
/// Performance Monitoring Version 1"): the guest learns how busy its hypervisor is, nothing more.
pub fn perfmon_msrs(leaf_a: crate::hw::CpuidResult) -> impl Iterator<Item = u32> {
    let version = leaf_a.eax & 0xff;
    let gp = if version >= 1 { ((leaf_a.eax >> 8) & 0xff).min(MAX_GP_COUNTERS) } else { 0 };
    let fixed = if version >= 2 { (leaf_a.edx & 0x1f).min(MAX_FIXED_COUNTERS) } else { 0 };
    let global: &[u32] = if version >= 2 {
        &[IA32_FIXED_CTR_CTRL, IA32_PERF_GLOBAL_STATUS, IA32_PERF_GLOBAL_CTRL, IA32_PERF_GLOBAL_OVF_CTRL]
    } else {
        &[]
    };
    (0..gp)
        .flat_map(|i| [IA32_PMC0 + i, IA32_PERFEVTSEL0 + i])
        .chain((0..fixed).map(|i| IA32_FIXED_CTR0 + i))
        .chain(global.iter().copied())
}

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
    fn the_pmu_msrs_are_the_ones_cpuid_0ah_enumerates() {
        use crate::hw::CpuidResult;
        let leaf = |eax: u32, edx: u32| CpuidResult { eax, edx, ..Default::default() };
        // No architectural PMU (version 0): nothing, whatever the counts say.
        assert_eq!(perfmon_msrs(leaf(0x0830_0800, 3)).count(), 0);
        // Version 1, 2 counters: PMC0/1 and PERFEVTSEL0/1 only (no fixed counters before version 2).
        let v1: Vec<u32> = perfmon_msrs(leaf(0x0000_0201, 3)).collect();
        assert_eq!(v1, [0xc1, 0x186, 0xc2, 0x187]);
        // Version 2, 4 counters 48 bits wide, 3 fixed counters (a Skylake's counts).
        let v2: Vec<u32> = perfmon_msrs(leaf(0x0730_0402, 0x0603)).collect();
        assert_eq!(
            v2,
            [0xc1, 0x186, 0xc2, 0x187, 0xc3, 0x188, 0xc4, 0x189, 0x309, 0x30a, 0x30b, 0x38d, 0x38e, 0x38f, 0x390]
        );
        // Counts beyond the architectural addresses are capped (PMC7 = C8H, PERFEVTSEL7 = 18DH, FIXED_CTR3 = 30CH).
        let big: Vec<u32> = perfmon_msrs(leaf(0x0730_ff05, 0x1f)).collect();
        assert_eq!(big.iter().copied().filter(|m| (0xc1..=0xc8).contains(m)).count(), 8);
        assert!(!big.contains(&0xc9) && !big.contains(&0x18e) && !big.contains(&0x30d));
        assert!(big.contains(&0x18d) && big.contains(&0x30c));
        // None of them is an MSR the hypervisor keeps or checks.
        for m in big {
            assert_eq!(action(m), MsrAction::Gp, "{m:#x}");
            assert!(!PASSED_THROUGH.contains(&m) && bitmap_bit(m).is_some());
        }
    }

    #[test]
    fn unknown_msrs_get_gp() {
        assert_eq!(action(crate::caps::IA32_EFER), MsrAction::Efer);
        assert_eq!(action(IA32_APIC_BASE), MsrAction::ApicBase);
        assert_eq!(action(0x10a), MsrAction::Gp);
        assert_eq!(action(0x4b56_4d00), MsrAction::Gp);
    }
}
