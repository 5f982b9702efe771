//! VMX capability MSRs: parsing, control-value computation, and the checks done before VMXON.

use crate::hw::VmxHardware;
use core::fmt;
pub use twostage_npt::EptCapabilities;

/// IA32_FEATURE_CONTROL (Intel SDM Vol. 3C 24.7; Vol. 4 Table 2-2, MSR 3AH).
pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
/// IA32_FEATURE_CONTROL bit 0: lock; once set, WRMSR to it faults until reset.
pub const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
/// IA32_FEATURE_CONTROL bit 2: VMXON allowed outside SMX operation.
pub const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
/// IA32_EFER (Vol. 4 Table 2-2, MSR C0000080H).
pub const IA32_EFER: u32 = 0xC000_0080;
/// IA32_VMX_BASIC (Intel SDM Vol. 3D Appendix A.1).
pub const IA32_VMX_BASIC: u32 = 0x480;
/// IA32_VMX_PINBASED_CTLS (A.3.1).
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
/// IA32_VMX_PROCBASED_CTLS (A.3.2).
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
/// IA32_VMX_EXIT_CTLS (A.4.1).
pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
/// IA32_VMX_ENTRY_CTLS (A.5).
pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
/// IA32_VMX_CR0_FIXED0 (A.7).
pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
/// IA32_VMX_MISC: bits 4:0 give the VMX-preemption timer rate, the timer counts down by 1
/// each time TSC bit X changes (Intel SDM Vol. 3D Appendix A.6).
pub const IA32_VMX_MISC: u32 = 0x485;
/// IA32_VMX_CR0_FIXED1 (A.7).
pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
/// IA32_VMX_CR4_FIXED0 (A.8).
pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
/// IA32_VMX_CR4_FIXED1 (A.8).
pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
/// IA32_VMX_PROCBASED_CTLS2 (A.3.3); exists only if primary allowed-1 bit 31 is set.
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
/// IA32_VMX_EPT_VPID_CAP (Intel SDM Vol. 3D Appendix A.10); exists only if secondary allowed-1
/// has EPT or VPID. Its bits are decoded by [`EptCapabilities`], the one type for them.
pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
/// IA32_VMX_TRUE_PINBASED_CTLS (A.3.1); exists only if IA32_VMX_BASIC bit 55 is set.
pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
/// IA32_VMX_TRUE_PROCBASED_CTLS (A.3.2).
pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
/// IA32_VMX_TRUE_EXIT_CTLS (A.4.1).
pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
/// IA32_VMX_TRUE_ENTRY_CTLS (A.5).
pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

/// CPUID.1:ECX bit 5: VMX (Intel SDM Vol. 3C 24.6 "Discovering Support for VMX").
pub const CPUID_1_ECX_VMX: u32 = 1 << 5;
/// CR4 bit 13: VMXE (Intel SDM Vol. 3A 2.5).
pub const CR4_VMXE: u64 = 1 << 13;

/// IA32_VMX_BASIC, decoded (Intel SDM Vol. 3D Appendix A.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxBasic {
    /// Bits 30:0: the VMCS revision identifier to write into VMXON and VMCS regions.
    pub revision: u32,
    /// Bits 44:32: bytes to allocate for a VMXON region or VMCS (at most 4096).
    pub region_size: u32,
    /// Bit 48: physical addresses of VMX regions are limited to 32 bits.
    pub addresses_32bit: bool,
    /// Bits 53:50: memory type of VMCS accesses (6 = write-back, 0 = uncacheable).
    pub memory_type: u8,
    /// Bit 54: INS/OUTS exits report instruction information.
    pub ins_outs_info: bool,
    /// Bit 55: the TRUE_* control MSRs exist and default-1 controls may be cleared.
    pub true_controls: bool,
}

impl VmxBasic {
    /// Decodes the MSR value.
    pub const fn from_msr(v: u64) -> Self {
        Self {
            revision: (v & 0x7fff_ffff) as u32,
            region_size: ((v >> 32) & 0x1fff) as u32,
            addresses_32bit: v & (1 << 48) != 0,
            memory_type: ((v >> 50) & 0xf) as u8,
            ins_outs_info: v & (1 << 54) != 0,
            true_controls: v & (1 << 55) != 0,
        }
    }
}

/// One VMX control capability MSR: which bits may be 0 and which may be 1 (Intel SDM Vol. 3D
/// Appendix A.3.1: bits 31:0 are the allowed-0 settings — a 1 there means the control must be 1 — and
/// bits 63:32 the allowed-1 settings — a 0 there means the control must be 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedBits {
    /// Controls that must be 1.
    pub allowed0: u32,
    /// Controls that may be 1.
    pub allowed1: u32,
}

/// Controls wanted that the CPU does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlUnsupported {
    /// Which control field.
    pub field: ControlField,
    /// The wanted bits the allowed-1 settings refuse.
    pub missing: u32,
}

impl fmt::Display for ControlUnsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} controls {:#x} are not allowed to be 1 on this CPU", self.field, self.missing)
    }
}

/// The VMX control fields with capability MSRs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlField {
    /// Pin-based VM-execution controls.
    PinBased,
    /// Primary processor-based VM-execution controls.
    PrimaryProcBased,
    /// Secondary processor-based VM-execution controls.
    SecondaryProcBased,
    /// VM-exit controls.
    Exit,
    /// VM-entry controls.
    Entry,
}

impl AllowedBits {
    /// Decodes a capability MSR.
    pub const fn from_msr(v: u64) -> Self {
        Self { allowed0: v as u32, allowed1: (v >> 32) as u32 }
    }

    /// Whether every bit of `bits` may be 1.
    pub const fn allows(&self, bits: u32) -> bool {
        bits & !self.allowed1 == 0
    }

    /// The value to write: `(wanted | allowed0) & allowed1` (Intel SDM Vol. 3D Appendix A.3.1), or an
    /// error naming the wanted bits the CPU refuses.
    pub fn compute(&self, field: ControlField, wanted: u32) -> Result<u32, ControlUnsupported> {
        let missing = wanted & !self.allowed1;
        if missing != 0 {
            return Err(ControlUnsupported { field, missing });
        }
        Ok((wanted | self.allowed0) & self.allowed1)
    }
}

/// A fixed-bits pair for CR0 or CR4 in VMX operation (Intel SDM Vol. 3D Appendix A.7, A.8): bits set in
/// FIXED0 must be 1, bits clear in FIXED1 must be 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixedBits {
    /// IA32_VMX_CRx_FIXED0.
    pub fixed0: u64,
    /// IA32_VMX_CRx_FIXED1.
    pub fixed1: u64,
}

impl FixedBits {
    /// `value` adjusted to the fixed bits.
    pub const fn apply(&self, value: u64) -> u64 {
        (value | self.fixed0) & self.fixed1
    }
}

/// A one-line summary of the EPT and VPID capabilities (IA32_VMX_EPT_VPID_CAP, Intel SDM Vol. 3D
/// Appendix A.10) for logs: `println!("{}", EptCapsSummary(&caps))`.
#[derive(Clone, Copy, Debug)]
pub struct EptCapsSummary<'a>(pub &'a EptCapabilities);

impl fmt::Display for EptCapsSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let yn = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "raw {:#x}, MAXPHYADDR {}: walk4 {} walk5 {} wb {} 2M {} 1G {} exec-only {} A/D {} invept {} \
             (single {} all {}) invvpid {} (addr {} single {} all {})",
            c.raw,
            c.max_phys_bits,
            yn(c.walk_length_4()),
            yn(c.walk_length_5()),
            yn(c.memtype_wb()),
            yn(c.pages_2m()),
            yn(c.pages_1g()),
            yn(c.execute_only()),
            yn(c.accessed_dirty()),
            yn(c.invept()),
            yn(c.invept_single_context()),
            yn(c.invept_all_context()),
            yn(c.invvpid()),
            yn(c.invvpid_individual_address()),
            yn(c.invvpid_single_context()),
            yn(c.invvpid_all_context()),
        )
    }
}

/// Everything VMX-related the CPU reported, read without touching an MSR it lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxCapabilities {
    /// IA32_VMX_BASIC.
    pub basic: VmxBasic,
    /// Pin-based controls (TRUE_ MSR when available).
    pub pin: AllowedBits,
    /// Primary processor-based controls (TRUE_ MSR when available).
    pub proc1: AllowedBits,
    /// Secondary processor-based controls; all zero when the CPU has none.
    pub proc2: AllowedBits,
    /// VM-exit controls (TRUE_ MSR when available).
    pub exit: AllowedBits,
    /// VM-entry controls (TRUE_ MSR when available).
    pub entry: AllowedBits,
    /// CR0 fixed bits.
    pub cr0: FixedBits,
    /// CR4 fixed bits.
    pub cr4: FixedBits,
    /// EPT/VPID capabilities (IA32_VMX_EPT_VPID_CAP with MAXPHYADDR), when the secondary
    /// controls allow EPT or VPID.
    pub ept_vpid: Option<EptCapabilities>,
}

/// Why VMX cannot be used on this CPU. Every case is found before anything could fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxUnsupported {
    /// CPUID.1:ECX.VMX[bit 5] = 0.
    NoVmx,
    /// IA32_FEATURE_CONTROL is locked with VMX outside SMX disabled (firmware turned it off).
    DisabledByFirmware {
        /// The MSR value.
        feature_control: u64,
    },
    /// VMCS regions must be write-back (IA32_VMX_BASIC bits 53:50); this CPU wants another type.
    VmcsMemoryType(u8),
    /// IA32_VMX_BASIC bits 44:32 asks for a region larger than one frame.
    RegionTooLarge(u32),
    /// The primary controls do not allow activating the secondary controls (bit 31).
    NoSecondaryControls,
    /// The secondary controls do not allow EPT (bit 1).
    NoEpt,
}

impl core::error::Error for ControlUnsupported {}

impl core::error::Error for VmxUnsupported {}

impl fmt::Display for VmxUnsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoVmx => f.write_str("CPUID.1:ECX.VMX is 0: no VMX"),
            Self::DisabledByFirmware { feature_control } => {
                write!(f, "IA32_FEATURE_CONTROL {feature_control:#x} is locked with VMX disabled")
            }
            Self::VmcsMemoryType(t) => write!(f, "VMCS memory type {t} is not write-back"),
            Self::RegionTooLarge(n) => write!(f, "VMX regions of {n} bytes do not fit a frame"),
            Self::NoSecondaryControls => f.write_str("no secondary processor-based controls"),
            Self::NoEpt => f.write_str("the secondary controls do not allow EPT"),
        }
    }
}

/// Secondary control bit 1, enable EPT (Intel SDM Vol. 3C 25.6.2, Table 25-7).
const PROC2_EPT: u32 = 1 << 1;
/// Secondary control bit 5, enable VPID (Table 25-7).
const PROC2_VPID: u32 = 1 << 5;
/// Primary control bit 31, activate secondary controls (Table 25-6).
const PROC1_SECONDARY: u32 = 1 << 31;

impl VmxCapabilities {
    /// Reads the capability MSRs in the order that guarantees each one exists: CPUID first, then
    /// IA32_VMX_BASIC, the TRUE_* MSRs only if BASIC bit 55 says so, PROCBASED_CTLS2 only if the
    /// primary allowed-1 bit 31 is set, EPT_VPID_CAP only if EPT or VPID may be enabled
    /// (Intel SDM Vol. 3D Appendix A.3.3, A.10).
    pub fn probe(hw: &impl VmxHardware) -> Result<Self, VmxUnsupported> {
        if hw.cpuid(1, 0).ecx & CPUID_1_ECX_VMX == 0 {
            return Err(VmxUnsupported::NoVmx);
        }
        let basic = VmxBasic::from_msr(hw.read_msr(IA32_VMX_BASIC));
        if basic.memory_type != 6 {
            return Err(VmxUnsupported::VmcsMemoryType(basic.memory_type));
        }
        if basic.region_size > 4096 {
            return Err(VmxUnsupported::RegionTooLarge(basic.region_size));
        }
        let read = |plain: u32, true_: u32| {
            AllowedBits::from_msr(hw.read_msr(if basic.true_controls { true_ } else { plain }))
        };
        let pin = read(IA32_VMX_PINBASED_CTLS, IA32_VMX_TRUE_PINBASED_CTLS);
        let proc1 = read(IA32_VMX_PROCBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS);
        let exit = read(IA32_VMX_EXIT_CTLS, IA32_VMX_TRUE_EXIT_CTLS);
        let entry = read(IA32_VMX_ENTRY_CTLS, IA32_VMX_TRUE_ENTRY_CTLS);
        let proc2 = if proc1.allows(PROC1_SECONDARY) {
            AllowedBits::from_msr(hw.read_msr(IA32_VMX_PROCBASED_CTLS2))
        } else {
            AllowedBits::default()
        };
        let ept_vpid = if proc2.allowed1 & (PROC2_EPT | PROC2_VPID) != 0 {
            Some(EptCapabilities::new(hw.read_msr(IA32_VMX_EPT_VPID_CAP), max_phys_bits(hw)))
        } else {
            None
        };
        let cr0 = FixedBits { fixed0: hw.read_msr(IA32_VMX_CR0_FIXED0), fixed1: hw.read_msr(IA32_VMX_CR0_FIXED1) };
        let cr4 = FixedBits { fixed0: hw.read_msr(IA32_VMX_CR4_FIXED0), fixed1: hw.read_msr(IA32_VMX_CR4_FIXED1) };
        Ok(Self { basic, pin, proc1, proc2, exit, entry, cr0, cr4, ept_vpid })
    }

    /// Whether EPT can be enabled; the image refuses to run without it.
    pub fn require_ept(&self) -> Result<EptCapabilities, VmxUnsupported> {
        if !self.proc1.allows(PROC1_SECONDARY) {
            return Err(VmxUnsupported::NoSecondaryControls);
        }
        match self.ept_vpid {
            Some(c) if self.proc2.allows(PROC2_EPT) => Ok(c),
            _ => Err(VmxUnsupported::NoEpt),
        }
    }

    /// Whether the secondary controls allow VPIDs.
    pub fn has_vpid(&self) -> bool {
        self.proc2.allows(PROC2_VPID) && self.ept_vpid.is_some_and(|c| c.invvpid())
    }

    /// Whether the pin-based controls allow the VMX-preemption timer (bit 6, Intel SDM Vol. 3C
    /// 25.6.1, Table 25-5; allowed-1 settings in A.3.1).
    pub fn has_preemption_timer(&self) -> bool {
        self.pin.allows(crate::controls::PIN_PREEMPTION_TIMER)
    }

    /// Whether the secondary controls allow unrestricted guest (bit 7, Table 25-7).
    pub fn has_unrestricted_guest(&self) -> bool {
        self.proc2.allows(1 << 7)
    }
}

/// MAXPHYADDR: CPUID.80000008H:EAX\[7:0\] where the leaf exists, 36 otherwise (Intel SDM Vol. 3A
/// 4.1.4).
pub fn max_phys_bits(hw: &impl VmxHardware) -> u8 {
    if hw.cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        hw.cpuid(0x8000_0008, 0).eax as u8
    } else {
        36
    }
}

/// Makes IA32_FEATURE_CONTROL allow VMXON outside SMX: sets bits 2 and 0 if the MSR is unlocked,
/// fails if firmware locked it with VMX off (Intel SDM Vol. 3C 24.7).
pub fn enable_feature_control(hw: &mut impl VmxHardware) -> Result<(), VmxUnsupported> {
    let v = hw.read_msr(IA32_FEATURE_CONTROL);
    if v & FEATURE_CONTROL_LOCK == 0 {
        hw.write_msr(IA32_FEATURE_CONTROL, v | FEATURE_CONTROL_VMX_OUTSIDE_SMX | FEATURE_CONTROL_LOCK);
        return Ok(());
    }
    if v & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(VmxUnsupported::DisabledByFirmware { feature_control: v });
    }
    Ok(())
}
