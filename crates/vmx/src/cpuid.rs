//! CPUID as the guest sees it: the host's answer, filtered to what the guest really has.

use crate::hw::CpuidResult;
use twostage_npt::EptPointer;

/// CPUID.1:ECX bit 5: VMX (Intel SDM Vol. 2A "CPUID", Table 3-10). The guest has no VMX.
pub const LEAF1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX bit 31: unused by processors (Table 3-10, always 0 on them), set by hypervisors to
/// say that the software runs in a virtual machine. Set unless [`CpuidOptions::hypervisor`] is
/// off.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// The guest CPUID choices a user makes, beyond what the execution controls decide. Spelled as
/// QEMU's `-cpu` properties (`hypervisor=off`), comma-separated, on the hypervisor's command line
/// (`cpu=hypervisor=off`) and in `cargo xtask run --cpu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidOptions {
    /// CPUID.1:ECX bit 31 ([`LEAF1_ECX_HYPERVISOR`]): on (the default) tells the guest the truth,
    /// that it runs under a hypervisor; off leaves the bit clear as on a bare processor, so a
    /// guest takes its bare-metal paths (Linux then checks the microcode revision against its
    /// errata list and probes the PMU's MSRs, which this vCPU answers as the processor would:
    /// `crate::msr`).
    pub hypervisor: bool,
}

impl Default for CpuidOptions {
    fn default() -> Self {
        Self { hypervisor: true }
    }
}

/// Why a CPUID option list was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidOptionError<'a> {
    /// A property this vCPU does not have (only `hypervisor` exists).
    UnknownProperty(&'a [u8]),
    /// A known property with a value other than `on` or `off`.
    BadValue(&'a [u8]),
}

impl core::fmt::Display for CpuidOptionError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        fn text(b: &[u8]) -> &str {
            core::str::from_utf8(b).unwrap_or("(not UTF-8)")
        }
        match self {
            Self::UnknownProperty(p) => {
                write!(f, "unknown CPU property {:?}: only hypervisor=on|off is offered", text(p))
            }
            Self::BadValue(p) => write!(f, "CPU property {:?}: the value must be on or off", text(p)),
        }
    }
}

impl core::error::Error for CpuidOptionError<'_> {}

impl CpuidOptions {
    /// Parses a comma-separated list of `NAME=on|off` properties (empty: the defaults); the last
    /// of a repeated property wins, as in QEMU.
    pub fn parse(list: &[u8]) -> Result<Self, CpuidOptionError<'_>> {
        let mut o = Self::default();
        for prop in list.split(|&b| b == b',').filter(|p| !p.is_empty()) {
            let (name, value) = match prop.iter().position(|&b| b == b'=') {
                Some(i) => (&prop[..i], &prop[i + 1..]),
                None => (prop, &b""[..]),
            };
            if name != b"hypervisor" {
                return Err(CpuidOptionError::UnknownProperty(prop));
            }
            o.hypervisor = match value {
                b"on" => true,
                b"off" => false,
                _ => return Err(CpuidOptionError::BadValue(prop)),
            };
        }
        Ok(o)
    }
}
/// CPUID.1:ECX bit 3: MONITOR/MWAIT (Table 3-10). Shown when neither "MWAIT exiting" nor "MONITOR
/// exiting" is set (Intel SDM Vol. 3C 26.1.3: the instructions then run in the guest, MWAIT
/// waiting in the processor for the guest's own interrupts, which reach it without an exit);
/// hidden when the CPU forces either exit, which this hypervisor does not emulate.
pub const LEAF1_ECX_MONITOR: u32 = 1 << 3;
/// CPUID.1:ECX bit 21: x2APIC (Table 3-10). Hidden: the guest reaches the local APIC through its
/// page (xAPIC mode), not through MSRs 800H-8FFH, which this hypervisor does not pass through.
pub const LEAF1_ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX bit 24: TSC-deadline mode of the local APIC timer (Table 3-10). Shown as the host
/// has it: the guest owns the local APIC (its page is passed through), and the timer's deadline
/// MSR, IA32_TSC_DEADLINE (6E0H), is passed through with it (`crate::msr::PASSED_THROUGH`).
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit 15: PDCM, the IA32_PERF_CAPABILITIES MSR (345H) (Table 3-10). Hidden: the
/// performance-monitoring MSRs are not offered to the guest.
pub const LEAF1_ECX_PDCM: u32 = 1 << 15;
/// CPUID.06H:ECX bit 0: the IA32_MPERF (E7H) and IA32_APERF (E8H) counters (Table 3-8). Hidden:
/// this hypervisor does not pass those MSRs through.
pub const LEAF6_ECX_APERFMPERF: u32 = 1 << 0;
/// CPUID.(EAX=07H,ECX=0):EBX bit 10: INVPCID (Table 3-11).
pub const LEAF7_EBX_INVPCID: u32 = 1 << 10;
/// CPUID.80000001H:EDX bit 27: RDTSCP.
pub const EXT1_EDX_RDTSCP: u32 = 1 << 27;
/// CPUID.(EAX=0DH,ECX=1):EAX bit 3: XSAVES/XRSTORS and IA32_XSS.
pub const LEAFD1_EAX_XSAVES: u32 = 1 << 3;

/// Instructions that raise #UD in VMX non-root operation unless a secondary control enables them
/// (Intel SDM Vol. 3C 25.6.2, Table 25-7): which ones this vCPU enabled. CPUID hides the others,
/// so the guest never sees a feature that would fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnabledInstructions {
    /// "Enable INVPCID" (bit 12).
    pub invpcid: bool,
    /// "Enable RDTSCP" (bit 3).
    pub rdtscp: bool,
    /// "Enable XSAVES/XRSTORS" (bit 20).
    pub xsaves: bool,
    /// MONITOR and MWAIT run in the guest: neither "MONITOR exiting" (primary bit 29) nor "MWAIT
    /// exiting" (bit 10) is set.
    pub mwait: bool,
}

impl EnabledInstructions {
    /// From the primary and secondary processor-based controls written to the VMCS.
    pub const fn from_controls(proc1: u32, proc2: u32) -> Self {
        use crate::controls as c;
        Self {
            invpcid: proc2 & c::PROC2_ENABLE_INVPCID != 0,
            rdtscp: proc2 & c::PROC2_ENABLE_RDTSCP != 0,
            xsaves: proc2 & c::PROC2_ENABLE_XSAVES != 0,
            mwait: proc1 & (c::PROC_MWAIT_EXITING | c::PROC_MONITOR_EXITING) == 0,
        }
    }
}

/// [`filter`] for `subleaf`, with the features hidden that the execution controls leave
/// disabled or make exit (`enabled`: INVPCID, RDTSCP, XSAVES, MONITOR/MWAIT), x2APIC, PDCM
/// and APERF/MPERF hidden (see the constants), and the hypervisor bit as `options` say.
pub fn filter_guest(
    leaf: u32,
    subleaf: u32,
    raw: CpuidResult,
    walk_length: u8,
    enabled: EnabledInstructions,
    options: CpuidOptions,
) -> CpuidResult {
    let mut r = filter_for_walk(leaf, raw, walk_length);
    match (leaf, subleaf) {
        (1, _) => {
            r.ecx &= !(LEAF1_ECX_X2APIC | LEAF1_ECX_PDCM);
            if !enabled.mwait {
                r.ecx &= !LEAF1_ECX_MONITOR;
            }
            if !options.hypervisor {
                r.ecx &= !LEAF1_ECX_HYPERVISOR;
            }
        }
        (6, _) => r.ecx &= !LEAF6_ECX_APERFMPERF,
        (7, 0) if !enabled.invpcid => r.ebx &= !LEAF7_EBX_INVPCID,
        (0x8000_0001, _) if !enabled.rdtscp => r.edx &= !EXT1_EDX_RDTSCP,
        (0xd, 1) if !enabled.xsaves => r.eax &= !LEAFD1_EAX_XSAVES,
        _ => {}
    }
    r
}

/// CPUID.1:ECX bit 27: OSXSAVE, a copy of CR4.OSXSAVE (Table 3-10).
pub const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;

/// CPUID.1:ECX with OSXSAVE set to the guest's CR4.OSXSAVE (`osxsave`).
pub const fn with_osxsave(ecx: u32, osxsave: bool) -> u32 {
    if osxsave {
        ecx | LEAF1_ECX_OSXSAVE
    } else {
        ecx & !LEAF1_ECX_OSXSAVE
    }
}

/// The extended leaf whose EAX bits 7:0 is MAXPHYADDR (physical-address bits) and EAX bits 15:8 the
/// linear-address bits (Intel SDM Vol. 2A "CPUID", Table 3-8; Vol. 3A 4.1.4).
pub const LEAF_ADDRESS_SIZES: u32 = 0x8000_0008;

/// The guest-physical address bits an EPT walk of `walk_length` levels translates: 12 bits of
/// page offset and 9 per level, 48 for a 4-level walk and 57 for a 5-level one (Intel SDM
/// Vol. 3C 29.3.2). Bits above them are not translated, so a guest that used them would alias
/// lower addresses.
pub const fn ept_gpa_bits(walk_length: u8) -> u8 {
    12 + 9 * walk_length
}

/// The CPUID result the guest gets for `leaf` (any subleaf) when the host's CPUID returned `raw`
/// and the guest runs on the EPT `eptp`:
/// - leaf 1: VMX hidden (ECX bit 5 clear: VMX instructions in the guest would only exit), and
///   the hypervisor bit (ECX bit 31) set ([`filter_guest`] clears it when asked);
/// - leaf 80000008H: MAXPHYADDR (EAX bits 7:0) lowered to what the EPT walk covers
///   ([`ept_gpa_bits`]), so a guest never places memory or page tables at guest-physical bits
///   the walk ignores;
/// - every other leaf as the host answered.
pub fn filter(leaf: u32, raw: CpuidResult, eptp: &EptPointer) -> CpuidResult {
    filter_for_walk(leaf, raw, eptp.walk_length())
}

/// [`filter`] for an EPT walk of `walk_length` levels (before an EPT pointer exists).
pub(crate) fn filter_for_walk(leaf: u32, raw: CpuidResult, walk_length: u8) -> CpuidResult {
    let mut r = raw;
    match leaf {
        1 => r.ecx = (r.ecx & !LEAF1_ECX_VMX) | LEAF1_ECX_HYPERVISOR,
        LEAF_ADDRESS_SIZES => {
            let phys = (r.eax & 0xff).min(u32::from(ept_gpa_bits(walk_length)));
            r.eax = (r.eax & !0xff) | phys;
        }
        _ => {}
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use twostage_npt::EptCapabilities;
    use twostage_npt::HostPhysAddr;

    fn eptp(walk: u8) -> EptPointer {
        // 4- and 5-level walks, write-back (Intel SDM Vol. 3D Appendix A.10 bits 6, 7, 14).
        let caps = EptCapabilities::new((1 << 6) | (1 << 7) | (1 << 14), 52);
        EptPointer::new(HostPhysAddr::new(0x5000), walk, false, &caps).unwrap()
    }

    #[test]
    fn maxphyaddr_is_clamped_to_the_ept_walk() {
        // 52 physical and 57 linear address bits on the host.
        let raw = CpuidResult { eax: (57 << 8) | 52, ebx: 7, ecx: 8, edx: 9 };
        let four = filter(LEAF_ADDRESS_SIZES, raw, &eptp(4));
        assert_eq!(four, CpuidResult { eax: (57 << 8) | 48, ..raw }, "a 4-level walk covers 48 bits");
        assert_eq!(filter(LEAF_ADDRESS_SIZES, raw, &eptp(5)), raw, "52 bits fit a 5-level walk");
        // A host with fewer bits than the walk keeps its own.
        let small = CpuidResult { eax: (48 << 8) | 40, ..raw };
        assert_eq!(filter(LEAF_ADDRESS_SIZES, small, &eptp(4)), small);
    }

    #[test]
    fn features_follow_the_execution_controls() {
        let all = CpuidResult { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX };
        let none = EnabledInstructions::default();
        let d = CpuidOptions::default();
        let on = EnabledInstructions::from_controls(
            0,
            crate::controls::PROC2_ENABLE_INVPCID
                | crate::controls::PROC2_ENABLE_RDTSCP
                | crate::controls::PROC2_ENABLE_XSAVES,
        );
        assert_eq!(filter_guest(7, 0, all, 4, none, d).ebx, !LEAF7_EBX_INVPCID);
        assert_eq!(filter_guest(7, 0, all, 4, on, d).ebx, u32::MAX);
        assert_eq!(filter_guest(7, 1, all, 4, none, d).ebx, u32::MAX, "only subleaf 0 holds INVPCID");
        assert_eq!(filter_guest(0x8000_0001, 0, all, 4, none, d).edx, !EXT1_EDX_RDTSCP);
        assert_eq!(filter_guest(0x8000_0001, 0, all, 4, on, d).edx, u32::MAX);
        assert_eq!(filter_guest(0xd, 1, all, 4, none, d).eax, !LEAFD1_EAX_XSAVES);
        assert_eq!(filter_guest(0xd, 1, all, 4, on, d).eax, u32::MAX);
        assert_eq!(with_osxsave(u32::MAX, false), !LEAF1_ECX_OSXSAVE);
        assert_eq!(with_osxsave(0, true), LEAF1_ECX_OSXSAVE);
        let l1 = filter_guest(1, 0, all, 4, on, d).ecx;
        let hidden = LEAF1_ECX_X2APIC | LEAF1_ECX_VMX | LEAF1_ECX_PDCM;
        assert_eq!(l1 & hidden, 0);
        assert_eq!(l1 & (LEAF1_ECX_MONITOR | LEAF1_ECX_TSC_DEADLINE), LEAF1_ECX_MONITOR | LEAF1_ECX_TSC_DEADLINE);
        // MONITOR/MWAIT are hidden when either instruction exits (the hypervisor does not emulate them).
        for exiting in [crate::controls::PROC_MWAIT_EXITING, crate::controls::PROC_MONITOR_EXITING] {
            let e = EnabledInstructions::from_controls(exiting, 0);
            assert!(!e.mwait);
            assert_eq!(filter_guest(1, 0, all, 4, e, d).ecx & LEAF1_ECX_MONITOR, 0);
        }
        assert_eq!(filter_guest(6, 0, all, 4, on, d).ecx, !LEAF6_ECX_APERFMPERF);
        assert_eq!(filter_guest(6, 0, all, 4, on, d).eax, u32::MAX, "only ECX bit 0 of leaf 6 is hidden");
    }

    #[test]
    fn the_hypervisor_bit_is_cleared_only_when_asked() {
        let all = CpuidResult { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX };
        // A bare processor's leaf 1 has bit 31 clear (Table 3-10): the filter sets it by default.
        let bare = CpuidResult { ecx: !LEAF1_ECX_HYPERVISOR, ..all };
        let enabled = EnabledInstructions::default();
        let on = filter_guest(1, 0, bare, 4, enabled, CpuidOptions::default());
        assert_eq!(on.ecx & LEAF1_ECX_HYPERVISOR, LEAF1_ECX_HYPERVISOR);
        let off = CpuidOptions { hypervisor: false };
        for raw in [bare, all] {
            let r = filter_guest(1, 0, raw, 4, enabled, off);
            assert_eq!(r.ecx & LEAF1_ECX_HYPERVISOR, 0, "clear even where the host (a hypervisor) sets it");
            assert_eq!(r.ecx | LEAF1_ECX_HYPERVISOR, filter_guest(1, 0, raw, 4, enabled, CpuidOptions::default()).ecx);
            assert_eq!((r.eax, r.ebx, r.edx), (raw.eax, raw.ebx, raw.edx));
        }
        // Only leaf 1 changes.
        for leaf in [0, 6, 0xa, 0x4000_0000, 0x8000_0001] {
            assert_eq!(
                filter_guest(leaf, 0, all, 4, enabled, off),
                filter_guest(leaf, 0, all, 4, enabled, CpuidOptions::default())
            );
        }
    }

    #[test]
    fn cpu_properties_parse_as_qemu_spells_them() {
        assert_eq!(CpuidOptions::parse(b""), Ok(CpuidOptions::default()));
        assert_eq!(CpuidOptions::parse(b"hypervisor=off"), Ok(CpuidOptions { hypervisor: false }));
        assert_eq!(CpuidOptions::parse(b"hypervisor=on"), Ok(CpuidOptions { hypervisor: true }));
        assert_eq!(CpuidOptions::parse(b"hypervisor=on,hypervisor=off"), Ok(CpuidOptions { hypervisor: false }));
        assert_eq!(CpuidOptions::parse(b"hypervisor=no"), Err(CpuidOptionError::BadValue(b"hypervisor=no")));
        assert_eq!(CpuidOptions::parse(b"hypervisor"), Err(CpuidOptionError::BadValue(b"hypervisor")));
        assert_eq!(CpuidOptions::parse(b"vmx=on"), Err(CpuidOptionError::UnknownProperty(b"vmx=on")));
        let msg = CpuidOptionError::UnknownProperty(b"pmu=off").to_string();
        assert!(msg.contains("\"pmu=off\"") && msg.contains("hypervisor=on|off"), "{msg}");
        assert!(CpuidOptionError::BadValue(b"hypervisor=1").to_string().contains("on or off"));
    }

    #[test]
    fn vmx_is_hidden_and_the_hypervisor_bit_set() {
        let raw = CpuidResult { eax: 0x906ea, ebx: 0, ecx: 0x7ffa_f3bf, edx: 0xbfeb_fbff };
        let r = filter(1, raw, &eptp(4));
        assert_eq!(r.ecx, (raw.ecx & !LEAF1_ECX_VMX) | LEAF1_ECX_HYPERVISOR);
        assert_eq!((r.eax, r.ebx, r.edx), (raw.eax, raw.ebx, raw.edx));
        // Other leaves pass through.
        assert_eq!(filter(0x8000_0001, raw, &eptp(4)), raw);
        assert_eq!(filter(7, raw, &eptp(4)), raw);
    }
}
