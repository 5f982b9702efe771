//! `VmxVcpu`: VMXON, the VMCS with EPT (and VPID, unrestricted guest), entering the guest,
//! decoding its exits, and carrying out the engine's invalidations.
//!
//! The flow: [`VmxVcpu::new`] (capability checks, VMXON, a fresh current VMCS) ->
//! [`VmxVcpu::setup`] (the EPT table and the entry state: host state, guest state, controls, then
//! the EPT pointer derived from the table) -> [`VmxVcpu::run`] (entry, exit decoded) ->
//! [`VmxVcpu::invalidate`] for each flush token of the table; [`VmxVcpu::load_ept`] moves the
//! vCPU to another table.

use crate::caps::{
    enable_feature_control, ControlField, ControlUnsupported, VmxCapabilities, VmxUnsupported, CR4_VMXE,
};
use crate::controls::{self as c, access_rights as ar};
use crate::exit::{decode_exit, restores_nmi_blocking, VmExit, VmInstructionError, INTERRUPTIBILITY_BLOCKING_BY_NMI};
use crate::hw::{GuestRegisters, InveptKind, InvvpidKind, VmFail, VmxHardware};
use crate::vmcs::VmcsField as F;
use core::fmt;
pub use handlers::{Handled, HandlerError};
use twostage_npt::{EptCapabilities, EptFormat, EptPointer, EptPointerError};
use twostage_npt::{
    EptInvalidation, FrameAllocator, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, NestedPageFaultInfo, PageTable,
};

mod handlers;

/// What the hypervisor wants from the vCPU, before the CPU's capabilities are applied. Whether
/// EPT accessed/dirty flags are on is not a wish here: it follows the table (its
/// [`twostage_npt::AdMode`]), so that the EPTP always matches the table it points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuConfig {
    /// Tag the guest's TLB entries with this VPID (non-zero) when the CPU offers VPIDs.
    pub vpid: Option<u16>,
    /// The user's choices for the guest's CPUID (the hypervisor bit).
    pub cpuid: crate::cpuid::CpuidOptions,
}

impl Default for VcpuConfig {
    fn default() -> Self {
        Self { vpid: Some(1), cpuid: crate::cpuid::CpuidOptions::default() }
    }
}

/// The state a guest starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEntry {
    /// 64-bit long mode, paging through the guest's own 4-level tables at `cr3`.
    LongMode {
        /// First instruction.
        rip: GuestVirtAddr,
        /// Initial stack pointer.
        rsp: GuestVirtAddr,
        /// The guest's PML4.
        cr3: GuestPhysAddr,
    },
    /// 64-bit long mode as the Linux 64-bit boot protocol wants it: CS = `__BOOT_CS` (0x10),
    /// DS = ES = SS = `__BOOT_DS` (0x18) from the guest's GDT at `gdt`, paging through `cr3`,
    /// interrupts off (Linux Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL").
    Linux64 {
        /// The 64-bit entry point.
        rip: GuestVirtAddr,
        /// The guest's PML4 (identity tables).
        cr3: GuestPhysAddr,
        /// The GDT's guest address (entries 2 and 3 are the boot segments).
        gdt: GuestPhysAddr,
        /// The GDT's limit.
        gdt_limit: u16,
    },
    /// 32-bit protected mode, paging off, flat 4 GiB segments: the multiboot entry state
    /// (Multiboot Specification 0.6.96, 3.2). Needs unrestricted guest.
    Protected32 {
        /// First instruction.
        eip: u32,
        /// Initial stack pointer (multiboot leaves it undefined; 0 is fine).
        esp: u32,
    },
}

/// A failed VMX instruction, with the VM-instruction error when the CPU gave one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VmxInstructionFailure {
    /// Which instruction.
    pub instruction: &'static str,
    /// VMfailInvalid (no error number) or VMfailValid with the error read from the VMCS.
    pub error: Option<VmInstructionError>,
}

impl fmt::Debug for VmxInstructionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error {
            Some(e) => write!(f, "{} failed: {e}", self.instruction),
            None => write!(f, "{} failed: VMfailInvalid", self.instruction),
        }
    }
}

impl fmt::Display for VmxInstructionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl core::error::Error for VmxInstructionFailure {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        self.error.as_ref().map(|e| e as _)
    }
}

/// Why VMX operation could not be entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxOnError {
    /// The CPU lacks something twostage needs.
    Unsupported(VmxUnsupported),
    /// No frame for the VMXON region or the VMCS.
    OutOfFrames,
    /// VMXON, VMCLEAR or VMPTRLD failed.
    Instruction(VmxInstructionFailure),
}

/// Why the VMCS could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// A control twostage needs is not allowed to be 1.
    Control(ControlUnsupported),
    /// The table's EPT pointer does not fit the CPU's capabilities (a walk length, A/D flags or
    /// a memory type it does not offer, or a root above MAXPHYADDR).
    EptPointer(EptPointerError),
    /// The entry state needs unrestricted guest, which the CPU lacks.
    NeedsUnrestrictedGuest,
    /// The INVEPT or INVVPID the setup needs cannot be issued, or failed.
    Invalidate(InvalidateError),
    /// A VMWRITE failed.
    Instruction(VmxInstructionFailure),
}

/// Why an invalidation could not be carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidateError {
    /// IA32_VMX_EPT_VPID_CAP offers no INVEPT type twostage can use: neither single-context
    /// (bits 20 and 25) nor all-context (bits 20 and 26) (Intel SDM Vol. 3D Appendix A.10). An
    /// INVEPT of a type not offered fails (Vol. 2A "INVEPT"), so none is issued.
    NoInveptType,
    /// VPIDs are in use and IA32_VMX_EPT_VPID_CAP offers no INVVPID type that covers a whole
    /// VPID: neither single-context (bits 32 and 41) nor all-context (bits 32 and 42) (Intel
    /// SDM Vol. 3D Appendix A.10).
    NoInvvpidType,
    /// INVEPT or INVVPID failed.
    Instruction(VmxInstructionFailure),
}

/// The INVEPT type that invalidates the mappings of one EPTP on this CPU: single-context where
/// offered, else all-context (which covers it too), else an error: a type the CPU does not
/// offer is never issued (Intel SDM Vol. 3D Appendix A.10, bits 20, 25, 26; Vol. 3C 29.4.3.1).
pub fn invept_kind(caps: &EptCapabilities) -> Result<InveptKind, InvalidateError> {
    if !caps.invept() {
        Err(InvalidateError::NoInveptType)
    } else if caps.invept_single_context() {
        Ok(InveptKind::SingleContext)
    } else if caps.invept_all_context() {
        Ok(InveptKind::AllContext)
    } else {
        Err(InvalidateError::NoInveptType)
    }
}

/// The INVVPID type that invalidates every mapping of one VPID on this CPU: single-context where
/// offered, else all-context, else an error (Intel SDM Vol. 3D Appendix A.10, bits 32, 41, 42;
/// Vol. 3C 29.4.3.3). Individual-address (bit 40) covers one linear address only, so it is not a
/// substitute.
pub fn invvpid_kind(caps: &EptCapabilities) -> Result<InvvpidKind, InvalidateError> {
    if !caps.invvpid() {
        Err(InvalidateError::NoInvvpidType)
    } else if caps.invvpid_single_context() {
        Ok(InvvpidKind::SingleContext)
    } else if caps.invvpid_all_context() {
        Ok(InvvpidKind::AllContext)
    } else {
        Err(InvalidateError::NoInvvpidType)
    }
}

/// Why the VMX-preemption timer could not be armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreemptionTimerError {
    /// The pin-based allowed-1 settings lack bit 6 (Intel SDM Vol. 3C A.3.1).
    NotOffered,
    /// [`VmxVcpu::setup`] has not succeeded (the controls are not written yet).
    NotSetUp,
    /// A VMREAD or VMWRITE failed.
    Instruction(VmxInstructionFailure),
}

/// Why an exception could not be queued for injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectError {
    /// Not a hardware-exception vector (0..=31, and not 2, which is NMI; Intel SDM Vol. 3C
    /// 27.2.1.3).
    BadVector(u8),
    /// An error code given for a vector that delivers none, or none for one that does
    /// (vectors 8, 10-14, 17, 21 deliver one; Intel SDM Vol. 3C 27.2.1.3).
    ErrorCodeMismatch {
        /// The vector.
        vector: u8,
    },
    /// Bits 31:16 of the error code must be 0 (Intel SDM Vol. 3C 27.2.1.3).
    BadErrorCode(u32),
    /// The VMWRITE failed.
    Instruction(VmxInstructionFailure),
}

/// Whether an exception vector pushes an error code (Intel SDM Vol. 3A 7.15, Table 7-1;
/// the VM-entry check in Vol. 3C 27.2.1.3 lists the same vectors).
pub const fn exception_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

/// Why entering the guest failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryError {
    /// [`VmxVcpu::setup`] has not succeeded.
    NotSetUp,
    /// VMLAUNCH/VMRESUME itself failed (its checks of controls and host state, Intel SDM
    /// Vol. 3C 27.1-27.2), with the VM-instruction error.
    Instruction(VmxInstructionFailure),
    /// A VMREAD of an exit field failed, or the VMWRITE of guest state that the exit calls
    /// for (blocking by NMI restored after an IRET, see [`crate::exit::restores_nmi_blocking`]).
    ExitFields(VmxInstructionFailure),
}

impl fmt::Display for VmxOnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported(e) => write!(f, "VMX cannot be used on this CPU: {e}"),
            Self::OutOfFrames => f.write_str("no free frame for the VMXON region or the VMCS"),
            Self::Instruction(e) => write!(f, "entering VMX operation: {e}"),
        }
    }
}

impl core::error::Error for VmxOnError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Unsupported(e) => Some(e),
            Self::OutOfFrames => None,
            Self::Instruction(e) => Some(e),
        }
    }
}

impl From<VmxUnsupported> for VmxOnError {
    fn from(e: VmxUnsupported) -> Self {
        Self::Unsupported(e)
    }
}

impl From<VmxInstructionFailure> for VmxOnError {
    fn from(e: VmxInstructionFailure) -> Self {
        Self::Instruction(e)
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Control(e) => write!(f, "VMCS setup: {e}"),
            Self::EptPointer(e) => write!(f, "VMCS setup: the table's EPT pointer does not fit this CPU: {e}"),
            Self::NeedsUnrestrictedGuest => {
                f.write_str("VMCS setup: the guest starts with paging off and the CPU lacks unrestricted guest")
            }
            Self::Invalidate(e) => write!(f, "VMCS setup: {e}"),
            Self::Instruction(e) => write!(f, "VMCS setup: {e}"),
        }
    }
}

impl core::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Control(e) => Some(e),
            Self::EptPointer(e) => Some(e),
            Self::NeedsUnrestrictedGuest => None,
            Self::Invalidate(e) => Some(e),
            Self::Instruction(e) => Some(e),
        }
    }
}

impl From<ControlUnsupported> for SetupError {
    fn from(e: ControlUnsupported) -> Self {
        Self::Control(e)
    }
}

impl From<EptPointerError> for SetupError {
    fn from(e: EptPointerError) -> Self {
        Self::EptPointer(e)
    }
}

impl From<InvalidateError> for SetupError {
    fn from(e: InvalidateError) -> Self {
        Self::Invalidate(e)
    }
}

impl From<VmxInstructionFailure> for SetupError {
    fn from(e: VmxInstructionFailure) -> Self {
        Self::Instruction(e)
    }
}

impl fmt::Display for InvalidateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoInveptType => f.write_str(
                "the CPU offers no usable INVEPT type (IA32_VMX_EPT_VPID_CAP bits 20, 25, 26): \
                 cached EPT translations cannot be invalidated",
            ),
            Self::NoInvvpidType => f.write_str(
                "VPIDs are in use and the CPU offers no single- or all-context INVVPID \
                 (IA32_VMX_EPT_VPID_CAP bits 32, 41, 42)",
            ),
            Self::Instruction(e) => write!(f, "invalidation: {e}"),
        }
    }
}

impl core::error::Error for InvalidateError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Instruction(e) => Some(e),
            _ => None,
        }
    }
}

impl From<VmxInstructionFailure> for InvalidateError {
    fn from(e: VmxInstructionFailure) -> Self {
        Self::Instruction(e)
    }
}

impl fmt::Display for PreemptionTimerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotOffered => f.write_str("the CPU does not offer the VMX-preemption timer (pin-based bit 6)"),
            Self::NotSetUp => f.write_str("the preemption timer needs a VMCS set up first"),
            Self::Instruction(e) => write!(f, "preemption timer: {e}"),
        }
    }
}

impl core::error::Error for PreemptionTimerError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Instruction(e) => Some(e),
            _ => None,
        }
    }
}

impl From<VmxInstructionFailure> for PreemptionTimerError {
    fn from(e: VmxInstructionFailure) -> Self {
        Self::Instruction(e)
    }
}

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadVector(v) => write!(f, "vector {v} is not a hardware exception that can be injected"),
            Self::ErrorCodeMismatch { vector } if exception_has_error_code(*vector) => {
                write!(f, "exception {vector} delivers an error code and none was given")
            }
            Self::ErrorCodeMismatch { vector } => {
                write!(f, "exception {vector} delivers no error code and one was given")
            }
            Self::BadErrorCode(c) => write!(f, "error code {c:#x} does not fit in 16 bits"),
            Self::Instruction(e) => write!(f, "exception injection: {e}"),
        }
    }
}

impl core::error::Error for InjectError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Instruction(e) => Some(e),
            _ => None,
        }
    }
}

impl From<VmxInstructionFailure> for InjectError {
    fn from(e: VmxInstructionFailure) -> Self {
        Self::Instruction(e)
    }
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSetUp => f.write_str("VM entry before the VMCS was set up"),
            Self::Instruction(e) => write!(f, "VM entry: {e}"),
            Self::ExitFields(e) => write!(f, "after the VM exit: {e}"),
        }
    }
}

impl core::error::Error for EntryError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::NotSetUp => None,
            Self::Instruction(e) | Self::ExitFields(e) => Some(e),
        }
    }
}

impl From<VmxInstructionFailure> for EntryError {
    fn from(e: VmxInstructionFailure) -> Self {
        Self::Instruction(e)
    }
}

/// One virtual CPU in VMX operation, owning its VMXON region and VMCS.
pub struct VmxVcpu<H: VmxHardware, A: FrameAllocator> {
    hw: H,
    alloc: A,
    caps: VmxCapabilities,
    ept_caps: EptCapabilities,
    config: VcpuConfig,
    vmxon_region: HostPhysAddr,
    vmcs: HostPhysAddr,
    eptp: Option<EptPointer>,
    vpid: Option<u16>,
    unrestricted: bool,
    launched: bool,
    ready: bool,
    last_exit: Option<VmExit>,
    /// The MSR bitmap, then I/O bitmaps A and B (one frame each): a set bit makes the access exit.
    bitmaps: [HostPhysAddr; 3],
    /// The secondary controls written by [`VmxVcpu::setup`].
    proc2: u32,
    /// The primary processor-based controls written at setup.
    proc1: u32,
    /// IA32_VMX_MISC bit 6: entry in the HLT activity state is supported (Intel SDM Vol. 3D A.6).
    activity_hlt: bool,
    /// The guest's general-purpose registers (RSP and RIP live in the VMCS).
    pub regs: GuestRegisters,
}

fn fail<H: VmxHardware>(hw: &H, instruction: &'static str, f: VmFail) -> VmxInstructionFailure {
    let error = match f {
        VmFail::Invalid => None,
        VmFail::Valid => hw.vmread(F::VM_INSTRUCTION_ERROR).ok().map(|e| VmInstructionError(e as u32)),
    };
    VmxInstructionFailure { instruction, error }
}

impl<H: VmxHardware, A: FrameAllocator> VmxVcpu<H, A> {
    /// Checks the capabilities, enables VMX (IA32_FEATURE_CONTROL, CR0/CR4 fixed bits, CR4.VMXE),
    /// executes VMXON, and makes a fresh VMCS current (Intel SDM Vol. 3C 24.7, 25.11.3).
    pub fn new(mut hw: H, alloc: A, config: VcpuConfig) -> Result<Self, VmxOnError> {
        let caps = VmxCapabilities::probe(&hw).map_err(VmxOnError::Unsupported)?;
        let ept_caps = caps.require_ept().map_err(VmxOnError::Unsupported)?;
        enable_feature_control(&mut hw).map_err(VmxOnError::Unsupported)?;
        let cr0 = hw.read_cr0();
        hw.write_cr0(caps.cr0.apply(cr0));
        let cr4 = hw.read_cr4();
        hw.write_cr4(caps.cr4.apply(cr4 | CR4_VMXE));
        let vmxon_region = alloc.allocate_frame().ok_or(VmxOnError::OutOfFrames)?;
        let mut frames = [HostPhysAddr::new(0); 4];
        for i in 0..frames.len() {
            match alloc.allocate_frame() {
                Some(f) => frames[i] = f,
                None => {
                    // SAFETY: allocated just above and not yet given to hardware.
                    unsafe { alloc.deallocate_frames(vmxon_region, 1) };
                    for f in &frames[..i] {
                        // SAFETY: as above.
                        unsafe { alloc.deallocate_frames(*f, 1) };
                    }
                    return Err(VmxOnError::OutOfFrames);
                }
            }
        }
        let [vmcs, bitmaps @ ..] = frames;
        for frame in bitmaps {
            // SAFETY: the allocator gave us this whole frame and `phys_to_virt` reaches it. All
            // ones: every MSR and port access exits until the hypervisor passes one through.
            unsafe { core::ptr::write_bytes(alloc.phys_to_virt(frame).as_ptr(), 0xff, twostage_npt::FRAME_SIZE) };
        }
        let activity_hlt = hw.read_msr(crate::caps::IA32_VMX_MISC) & (1 << 6) != 0;
        for frame in [vmxon_region, vmcs] {
            let p = alloc.phys_to_virt(frame).as_ptr();
            // SAFETY: the allocator gave us this whole frame and `phys_to_virt` reaches it.
            // The first 4 bytes hold the revision identifier, bit 31 clear (Intel SDM Vol. 3C 25.2).
            unsafe {
                core::ptr::write_bytes(p, 0, twostage_npt::FRAME_SIZE);
                (p as *mut u32).write_volatile(caps.basic.revision);
            }
        }
        let mut me = Self {
            hw,
            alloc,
            caps,
            ept_caps,
            config,
            vmxon_region,
            vmcs,
            eptp: None,
            vpid: None,
            unrestricted: false,
            launched: false,
            ready: false,
            last_exit: None,
            bitmaps,
            proc2: 0,
            proc1: 0,
            activity_hlt,
            regs: GuestRegisters::default(),
        };
        // The PMU's architectural MSRs, as far as CPUID.0AH enumerates them (the guest sees that
        // leaf as the host answers it); none when the leaf is beyond the highest basic leaf.
        let leaf_a = if me.hw.cpuid(0, 0).eax >= crate::msr::LEAF_PERFMON {
            me.hw.cpuid(crate::msr::LEAF_PERFMON, 0)
        } else {
            crate::hw::CpuidResult::default()
        };
        for msr in crate::msr::PASSED_THROUGH.into_iter().chain(crate::msr::perfmon_msrs(leaf_a)) {
            me.msr_bitmap(|b| crate::msr::set_intercept(b, msr, false, false));
        }
        me.msr_bitmap(|b| crate::msr::set_intercept(b, crate::msr::IA32_APIC_BASE, false, true));
        if let Err(f) = me.hw.vmxon(vmxon_region) {
            let e = VmxOnError::Instruction(fail(&me.hw, "VMXON", f));
            me.vmxon_region = HostPhysAddr::new(0);
            // SAFETY: VMXON failed, so the hardware never took the regions.
            unsafe {
                me.alloc.deallocate_frames(vmxon_region, 1);
                me.alloc.deallocate_frames(vmcs, 1);
            }
            me.free_bitmaps();
            me.vmcs = HostPhysAddr::new(0);
            return Err(e);
        }
        me.hw.vmclear(vmcs).map_err(|f| VmxOnError::Instruction(fail(&me.hw, "VMCLEAR", f)))?;
        me.hw.vmptrld(vmcs).map_err(|f| VmxOnError::Instruction(fail(&me.hw, "VMPTRLD", f)))?;
        Ok(me)
    }

    /// The capabilities read at VMXON.
    pub fn capabilities(&self) -> &VmxCapabilities {
        &self.caps
    }

    /// The EPT capabilities the EPT pointer is checked against.
    pub fn ept_capabilities(&self) -> &EptCapabilities {
        &self.ept_caps
    }

    /// Whether the EPTP in use enables accessed/dirty flags.
    pub fn ept_ad_enabled(&self) -> bool {
        self.eptp.is_some_and(|p| p.accessed_dirty())
    }

    /// The EPT pointer in use.
    pub fn ept_pointer(&self) -> Option<EptPointer> {
        self.eptp
    }

    /// The VPID in use, if VPIDs are enabled.
    pub fn vpid(&self) -> Option<u16> {
        self.vpid
    }

    /// Sets up the VMCS for a guest starting at `entry` on the EPT `ept`: host state, guest
    /// state, controls, then the EPT pointer derived from the table (as [`VmxVcpu::load_ept`]).
    /// What the CPU cannot do (the table's walk length or A/D flags, unrestricted guest, an
    /// INVEPT or INVVPID type) is refused before the VMCS is touched.
    pub fn setup<F: EptFormat, B: FrameAllocator>(
        &mut self,
        ept: &PageTable<F, B>,
        entry: GuestEntry,
    ) -> Result<(), SetupError> {
        self.ready = false;
        let eptp = EptPointer::for_table(ept, &self.ept_caps)?;
        invept_kind(&self.ept_caps)?;
        let unrestricted = matches!(entry, GuestEntry::Protected32 { .. });
        let long_mode = !unrestricted;
        if unrestricted && !self.caps.has_unrestricted_guest() {
            return Err(SetupError::NeedsUnrestrictedGuest);
        }
        let vpid = match self.config.vpid {
            Some(v) if v != 0 && self.caps.has_vpid() => Some((v, invvpid_kind(&self.ept_caps)?)),
            _ => None,
        };
        self.unrestricted = unrestricted;
        self.setup_vmcs_host()?;
        self.setup_vmcs_guest(entry)?;
        self.setup_controls(long_mode, vpid)?;
        self.load_eptp(eptp)?;
        // The launch state is left alone: only VMCLEAR makes a VMCS clear again
        // (Intel SDM Vol. 3C 25.11.3), so a VMCS set up again is still resumed.
        self.ready = true;
        Ok(())
    }

    /// Moves the vCPU to the EPT `ept` (another address space, or back to its own): the EPT
    /// pointer is derived from the table — walk length from its format ([`EptFormat`]), A/D flags
    /// exactly when the table's A/D bits are hardware-managed, write-back paging structures —
    /// checked against the capabilities ([`EptPointer::for_table`]), written into the VMCS, and
    /// followed by INVEPT for it, so nothing cached from an earlier use of that EPTP survives.
    pub fn load_ept<F: EptFormat, B: FrameAllocator>(
        &mut self,
        ept: &PageTable<F, B>,
    ) -> Result<EptPointer, SetupError> {
        let eptp = EptPointer::for_table(ept, &self.ept_caps)?;
        self.load_eptp(eptp)?;
        Ok(eptp)
    }

    fn write(&mut self, field: F, value: u64) -> Result<(), SetupError> {
        Ok(self.vmwrite(field, value)?)
    }

    fn load_eptp(&mut self, eptp: EptPointer) -> Result<(), SetupError> {
        let kind = invept_kind(&self.ept_caps)?;
        self.write(F::EPT_POINTER, eptp.bits())?;
        self.eptp = Some(eptp);
        self.hw.invept(kind, eptp.bits()).map_err(|f| InvalidateError::Instruction(fail(&self.hw, "INVEPT", f)))?;
        Ok(())
    }

    /// Host-state area (Intel SDM Vol. 3C 25.5; checks in 27.2.2-27.2.4).
    fn setup_vmcs_host(&mut self) -> Result<(), SetupError> {
        let h = self.hw.host_state();
        self.write(F::HOST_CR0, h.cr0)?;
        self.write(F::HOST_CR3, h.cr3)?;
        self.write(F::HOST_CR4, h.cr4)?;
        // Selectors with RPL and TI clear (27.2.3).
        self.write(F::HOST_CS_SELECTOR, u64::from(h.cs & !7))?;
        for f in [F::HOST_SS_SELECTOR, F::HOST_DS_SELECTOR, F::HOST_ES_SELECTOR] {
            self.write(f, u64::from(h.ds & !7))?;
        }
        self.write(F::HOST_FS_SELECTOR, 0)?;
        self.write(F::HOST_GS_SELECTOR, 0)?;
        self.write(F::HOST_TR_SELECTOR, u64::from(h.tr & !7))?;
        self.write(F::HOST_FS_BASE, 0)?;
        self.write(F::HOST_GS_BASE, 0)?;
        self.write(F::HOST_TR_BASE, h.tr_base)?;
        self.write(F::HOST_GDTR_BASE, h.gdtr_base)?;
        self.write(F::HOST_IDTR_BASE, h.idtr_base)?;
        self.write(F::HOST_SYSENTER_CS, 0)?;
        self.write(F::HOST_SYSENTER_ESP, 0)?;
        self.write(F::HOST_SYSENTER_EIP, 0)?;
        self.write(F::HOST_IA32_EFER, h.efer)?;
        Ok(())
    }

    /// Guest-state area (Intel SDM Vol. 3C 25.4; checks in 27.3.1).
    fn setup_vmcs_guest(&mut self, entry: GuestEntry) -> Result<(), SetupError> {
        let (cs, ds, gdt) = match entry {
            GuestEntry::Linux64 { gdt, gdt_limit, .. } => (0x10, 0x18, (gdt.as_u64(), u64::from(gdt_limit))),
            _ => (0x08, 0x10, (0, 0)),
        };
        let (cr0_want, cr4_want, efer, code_ar, rip, rsp, cr3) = match entry {
            GuestEntry::Linux64 { rip, cr3, .. } => (
                c::CR0_PE | c::CR0_ET | c::CR0_NE | c::CR0_WP | c::CR0_PG,
                c::CR4_PAE,
                c::EFER_LME | c::EFER_LMA,
                ar::CODE64,
                rip.as_u64(),
                0,
                cr3.as_u64(),
            ),
            GuestEntry::LongMode { rip, rsp, cr3 } => (
                c::CR0_PE | c::CR0_ET | c::CR0_NE | c::CR0_WP | c::CR0_PG,
                c::CR4_PAE,
                c::EFER_LME | c::EFER_LMA,
                ar::CODE64,
                rip.as_u64(),
                rsp.as_u64(),
                cr3.as_u64(),
            ),
            GuestEntry::Protected32 { eip, esp } => {
                (c::CR0_PE | c::CR0_ET | c::CR0_NE, 0, 0, ar::CODE32, u64::from(eip), u64::from(esp), 0)
            }
        };
        // Fixed bits (A.7, A.8); unrestricted guest exempts CR0.PE and CR0.PG (27.3.1.1).
        let mut cr0_fixed = self.caps.cr0;
        if self.unrestricted {
            cr0_fixed.fixed0 &= !(c::CR0_PE | c::CR0_PG);
        }
        let cr0 = cr0_fixed.apply(cr0_want);
        let cr4 = self.caps.cr4.apply(cr4_want | CR4_VMXE);
        // Bits the CPU forces are owned by the host; the guest reads its own values (25.6.6).
        let cr0_mask = cr0_fixed.fixed0 | !cr0_fixed.fixed1;
        let cr4_mask = self.caps.cr4.fixed0 | !self.caps.cr4.fixed1;
        self.write(F::GUEST_CR0, cr0)?;
        self.write(F::GUEST_CR3, cr3)?;
        self.write(F::GUEST_CR4, cr4)?;
        self.write(F::CR0_GUEST_HOST_MASK, cr0_mask)?;
        self.write(F::CR0_READ_SHADOW, cr0_want)?;
        self.write(F::CR4_GUEST_HOST_MASK, cr4_mask)?;
        self.write(F::CR4_READ_SHADOW, cr4_want)?;
        self.write(F::GUEST_IA32_EFER, efer)?;
        self.write(F::GUEST_DR7, 0x400)?;
        self.write(F::GUEST_RSP, rsp)?;
        self.write(F::GUEST_RIP, rip)?;
        self.write(F::GUEST_RFLAGS, 0x2)?;
        self.write(F::GUEST_CS_SELECTOR, cs)?;
        self.write(F::GUEST_CS_BASE, 0)?;
        self.write(F::GUEST_CS_LIMIT, 0xffff_ffff)?;
        self.write(F::GUEST_CS_ACCESS_RIGHTS, u64::from(code_ar))?;
        let data = [
            (F::GUEST_SS_SELECTOR, F::GUEST_SS_BASE, F::GUEST_SS_LIMIT, F::GUEST_SS_ACCESS_RIGHTS),
            (F::GUEST_DS_SELECTOR, F::GUEST_DS_BASE, F::GUEST_DS_LIMIT, F::GUEST_DS_ACCESS_RIGHTS),
            (F::GUEST_ES_SELECTOR, F::GUEST_ES_BASE, F::GUEST_ES_LIMIT, F::GUEST_ES_ACCESS_RIGHTS),
            (F::GUEST_FS_SELECTOR, F::GUEST_FS_BASE, F::GUEST_FS_LIMIT, F::GUEST_FS_ACCESS_RIGHTS),
            (F::GUEST_GS_SELECTOR, F::GUEST_GS_BASE, F::GUEST_GS_LIMIT, F::GUEST_GS_ACCESS_RIGHTS),
        ];
        for (sel, base, limit, rights) in data {
            self.write(sel, ds)?;
            self.write(base, 0)?;
            self.write(limit, 0xffff_ffff)?;
            self.write(rights, u64::from(ar::DATA))?;
        }
        self.write(F::GUEST_LDTR_SELECTOR, 0)?;
        self.write(F::GUEST_LDTR_BASE, 0)?;
        self.write(F::GUEST_LDTR_LIMIT, 0)?;
        self.write(F::GUEST_LDTR_ACCESS_RIGHTS, u64::from(ar::UNUSABLE))?;
        self.write(F::GUEST_TR_SELECTOR, 0x18)?;
        self.write(F::GUEST_TR_BASE, 0)?;
        self.write(F::GUEST_TR_LIMIT, 0x67)?;
        self.write(F::GUEST_TR_ACCESS_RIGHTS, u64::from(ar::TSS_BUSY))?;
        self.write(F::GUEST_GDTR_BASE, gdt.0)?;
        self.write(F::GUEST_GDTR_LIMIT, gdt.1)?;
        self.write(F::GUEST_IDTR_BASE, 0)?;
        self.write(F::GUEST_IDTR_LIMIT, 0)?;
        self.write(F::GUEST_IA32_DEBUGCTL, 0)?;
        self.write(F::GUEST_SYSENTER_CS, 0)?;
        self.write(F::GUEST_SYSENTER_ESP, 0)?;
        self.write(F::GUEST_SYSENTER_EIP, 0)?;
        self.write(F::GUEST_ACTIVITY_STATE, 0)?;
        self.write(F::GUEST_INTERRUPTIBILITY, 0)?;
        self.write(F::GUEST_PENDING_DEBUG, 0)?;
        // No shadow VMCS: the link pointer must be all ones (27.3.1.5).
        self.write(F::VMCS_LINK_POINTER, u64::MAX)?;
        Ok(())
    }

    /// The VM-execution, exit and entry controls: HLT and every I/O instruction exit, EPT on,
    /// VPID (with the INVVPID type to flush it) and unrestricted guest when wanted and offered;
    /// 64-bit host; EFER saved and loaded.
    fn setup_controls(&mut self, long_mode_guest: bool, vpid: Option<(u16, InvvpidKind)>) -> Result<(), SetupError> {
        let caps = self.caps;
        let pin = caps.pin.compute(ControlField::PinBased, 0).map_err(SetupError::Control)?;
        let proc1 = caps
            .proc1
            .compute(
                ControlField::PrimaryProcBased,
                c::PROC_HLT_EXITING | c::PROC_USE_IO_BITMAPS | c::PROC_USE_MSR_BITMAPS | c::PROC_ACTIVATE_SECONDARY,
            )
            .map_err(SetupError::Control)?;
        let mut want2 = c::PROC2_ENABLE_EPT;
        self.vpid = vpid.map(|(v, _)| v);
        if vpid.is_some() {
            want2 |= c::PROC2_ENABLE_VPID;
        }
        if self.unrestricted {
            want2 |= c::PROC2_UNRESTRICTED_GUEST;
        }
        // Instructions that are #UD in the guest unless enabled: enabled where the CPU allows,
        // otherwise CPUID hides them (`crate::cpuid::filter_guest`).
        want2 |= (c::PROC2_ENABLE_INVPCID | c::PROC2_ENABLE_RDTSCP | c::PROC2_ENABLE_XSAVES) & caps.proc2.allowed1;
        let proc2 = caps.proc2.compute(ControlField::SecondaryProcBased, want2).map_err(SetupError::Control)?;
        self.proc2 = proc2;
        self.proc1 = proc1;
        // IA32_PAT switched through the VMCS where the CPU allows (25.7.1, 25.8.1).
        let pat = caps.exit.allows(c::EXIT_SAVE_PAT | c::EXIT_LOAD_PAT) && caps.entry.allows(c::ENTRY_LOAD_PAT);
        let want_exit = c::EXIT_HOST_ADDRESS_SPACE_SIZE
            | c::EXIT_SAVE_EFER
            | c::EXIT_LOAD_EFER
            | if pat { c::EXIT_SAVE_PAT | c::EXIT_LOAD_PAT } else { 0 };
        let exit = caps.exit.compute(ControlField::Exit, want_exit).map_err(SetupError::Control)?;
        let mut want_entry = c::ENTRY_LOAD_EFER | if pat { c::ENTRY_LOAD_PAT } else { 0 };
        if long_mode_guest {
            want_entry |= c::ENTRY_IA32E_MODE_GUEST;
        }
        let entry = caps.entry.compute(ControlField::Entry, want_entry).map_err(SetupError::Control)?;
        self.write(F::PIN_BASED_CONTROLS, u64::from(pin))?;
        self.write(F::PRIMARY_PROCBASED_CONTROLS, u64::from(proc1))?;
        self.write(F::SECONDARY_PROCBASED_CONTROLS, u64::from(proc2))?;
        self.write(F::EXIT_CONTROLS, u64::from(exit))?;
        self.write(F::ENTRY_CONTROLS, u64::from(entry))?;
        self.write(F::MSR_BITMAPS, self.bitmaps[0].as_u64())?;
        self.write(F::IO_BITMAP_A, self.bitmaps[1].as_u64())?;
        self.write(F::IO_BITMAP_B, self.bitmaps[2].as_u64())?;
        if pat {
            // The power-on PAT (Intel SDM Vol. 3A 13.12.4, Table 13-12) for the guest.
            self.write(F::GUEST_IA32_PAT, 0x0007_0406_0007_0406)?;
            let host_pat = self.hw.read_msr(crate::msr::IA32_PAT);
            self.write(F::HOST_IA32_PAT, host_pat)?;
        }
        if proc2 & c::PROC2_ENABLE_XSAVES != 0 {
            self.write(F::XSS_EXITING_BITMAP, 0)?;
        }
        self.write(F::EXCEPTION_BITMAP, 0)?;
        self.write(F::PAGE_FAULT_ERROR_CODE_MASK, 0)?;
        self.write(F::PAGE_FAULT_ERROR_CODE_MATCH, 0)?;
        self.write(F::CR3_TARGET_COUNT, 0)?;
        self.write(F::EXIT_MSR_STORE_COUNT, 0)?;
        self.write(F::EXIT_MSR_LOAD_COUNT, 0)?;
        self.write(F::ENTRY_MSR_LOAD_COUNT, 0)?;
        self.write(F::ENTRY_INTERRUPTION_INFO, 0)?;
        if let Some((v, kind)) = vpid {
            self.write(F::VPID, u64::from(v))?;
            // Drop anything cached under this VPID before first use (Intel SDM Vol. 3C 29.4.3.3).
            self.hw.invvpid(kind, v, 0).map_err(|f| InvalidateError::Instruction(fail(&self.hw, "INVVPID", f)))?;
        }
        Ok(())
    }

    /// Carries out an engine invalidation: INVEPT of the type [`invept_kind`] picks. Returns the
    /// type used, or `None` when nothing was needed (or the table is not the one this vCPU has
    /// loaded).
    pub fn invalidate(&mut self, inv: &EptInvalidation) -> Result<Option<InveptKind>, InvalidateError> {
        match *inv {
            EptInvalidation::None => Ok(None),
            EptInvalidation::SingleContext { root } => match self.eptp {
                Some(eptp) if eptp.root() == root => {
                    let kind = invept_kind(&self.ept_caps)?;
                    self.hw.invept(kind, eptp.bits()).map_err(|f| fail(&self.hw, "INVEPT", f))?;
                    Ok(Some(kind))
                }
                // Not loaded here: [`VmxVcpu::load_ept`] runs INVEPT when it is loaded again.
                _ => Ok(None),
            },
        }
    }

    /// Enters the guest (VMLAUNCH the first time, VMRESUME after) and decodes the exit.
    pub fn run(&mut self) -> Result<VmExit, EntryError> {
        if !self.ready {
            return Err(EntryError::NotSetUp);
        }
        self.sync_ia32e_mode().map_err(EntryError::Instruction)?;
        let mut regs = self.regs;
        let mut r = self.hw.vm_enter(&mut regs, self.launched);
        if !self.launched && r == Err(VmFail::Valid) && self.vm_instruction_error() == Some(VmInstructionError(4)) {
            // "VMLAUNCH with non-clear VMCS": an earlier entry launched it after all; resume.
            self.launched = true;
            regs = self.regs;
            r = self.hw.vm_enter(&mut regs, true);
        }
        self.regs = regs;
        if let Err(f) = r {
            return Err(EntryError::Instruction(fail(
                &self.hw,
                if self.launched { "VMRESUME" } else { "VMLAUNCH" },
                f,
            )));
        }
        let read = |field| self.hw.vmread(field).map_err(|f| EntryError::ExitFields(fail(&self.hw, "VMREAD", f)));
        let reason = read(F::EXIT_REASON)? as u32;
        let exit = decode_exit(
            reason,
            read(F::EXIT_QUALIFICATION)?,
            read(F::GUEST_PHYSICAL_ADDRESS)?,
            read(F::GUEST_LINEAR_ADDRESS)?,
            read(F::EXIT_INTERRUPTION_INFO)? as u32,
        );
        if let VmExit::EptViolation(v) = exit {
            // An IRET stopped by this EPT violation had already unblocked NMIs: block them again
            // so that the IRET, executed again on resume, starts as it did (Intel SDM Vol. 3C
            // 28.2.3; see `restores_nmi_blocking`).
            let idt = read(F::IDT_VECTORING_INFO)? as u32;
            let pin = read(F::PIN_BASED_CONTROLS)? as u32;
            if restores_nmi_blocking(v.qualification, idt, pin) {
                let state = read(F::GUEST_INTERRUPTIBILITY)?;
                self.hw
                    .vmwrite(F::GUEST_INTERRUPTIBILITY, state | INTERRUPTIBILITY_BLOCKING_BY_NMI)
                    .map_err(|f| EntryError::ExitFields(fail(&self.hw, "VMWRITE", f)))?;
            }
        }
        // A successful VMLAUNCH makes the VMCS launched (Intel SDM Vol. 3C 31.3, VMLAUNCH/VMRESUME);
        // after a failed entry (27.8) the state is kept as it was, and the fallback above covers
        // a processor that launched it anyway.
        if !matches!(exit, VmExit::EntryFailed(_)) {
            self.launched = true;
        }
        self.last_exit = Some(exit);
        Ok(exit)
    }

    /// Keeps the "IA-32e mode guest" entry control equal to the guest's EFER.LMA, which a guest
    /// with unrestricted guest may change itself (Intel SDM Vol. 3C 27.3.1.1 checks that they
    /// agree; 25.8.1, Table 25-15 bit 9).
    fn sync_ia32e_mode(&mut self) -> Result<(), VmxInstructionFailure> {
        if !self.unrestricted {
            return Ok(());
        }
        let lma = self.vmread(F::GUEST_IA32_EFER)? & c::EFER_LMA != 0;
        let entry = self.vmread(F::ENTRY_CONTROLS)?;
        let want = if lma {
            entry | u64::from(c::ENTRY_IA32E_MODE_GUEST)
        } else {
            entry & !u64::from(c::ENTRY_IA32E_MODE_GUEST)
        };
        if want != entry {
            self.vmwrite(F::ENTRY_CONTROLS, want)?;
        }
        Ok(())
    }

    /// Arms the VMX-preemption timer with `ticks` (each tick is 2^X TSC cycles, X from
    /// IA32_VMX_MISC bits 4:0), or disarms it with `None`. The value is reloaded at every VM entry
    /// (the "save" exit control stays off), so it bounds the time between two exits; expiry
    /// exits with reason 52 (Intel SDM Vol. 3C 26.5.1, 25.6.1 Table 25-5). Call it after
    /// [`VmxVcpu::setup`], which rewrites the pin-based controls.
    pub fn set_preemption_timer(&mut self, ticks: Option<u32>) -> Result<(), PreemptionTimerError> {
        if !self.ready {
            return Err(PreemptionTimerError::NotSetUp);
        }
        if ticks.is_some() && !self.caps.has_preemption_timer() {
            return Err(PreemptionTimerError::NotOffered);
        }
        let pin = self.vmread(F::PIN_BASED_CONTROLS).map_err(PreemptionTimerError::Instruction)?;
        let bit = u64::from(c::PIN_PREEMPTION_TIMER);
        // Clearing the bit is allowed only when allowed-0 does not force it; the timer is
        // never a default-1 control (A.3.1), so this is always the case.
        let pin = if ticks.is_some() { pin | bit } else { pin & !bit };
        if let Some(t) = ticks {
            self.vmwrite(F::PREEMPTION_TIMER_VALUE, u64::from(t)).map_err(PreemptionTimerError::Instruction)?;
        }
        self.vmwrite(F::PIN_BASED_CONTROLS, pin).map_err(PreemptionTimerError::Instruction)
    }

    /// Queues a hardware exception for the next VM entry: interruption type 3, with the error
    /// code when the vector has one (Intel SDM Vol. 3C 25.8.3, Table 25-17; checks in
    /// 27.2.1.3, which this mirrors so that a bad request is an error here, not a failed entry).
    pub fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), InjectError> {
        if vector > 31 || vector == 2 {
            return Err(InjectError::BadVector(vector));
        }
        if error_code.is_some() != exception_has_error_code(vector) {
            return Err(InjectError::ErrorCodeMismatch { vector });
        }
        // Bit 31 valid, bits 10:8 type 3 (hardware exception), bit 11 deliver error code.
        let mut info = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(code) = error_code {
            if code > 0xffff {
                return Err(InjectError::BadErrorCode(code));
            }
            info |= 1 << 11;
            self.vmwrite(F::ENTRY_EXCEPTION_ERROR_CODE, u64::from(code)).map_err(InjectError::Instruction)?;
        }
        self.vmwrite(F::ENTRY_INTERRUPTION_INFO, info).map_err(InjectError::Instruction)
    }

    /// After an exit that interrupted the delivery of an event (an EPT violation on the guest's
    /// IDT or stack, say), queues that event again so that resuming the guest does not lose it
    /// (Intel SDM Vol. 3C 28.2.4, 29.2.3). Call it before resuming at the same instruction;
    /// returns whether an event was queued.
    pub fn reinject_interrupted_event(&mut self) -> Result<bool, VmxInstructionFailure> {
        let info = self.vmread(F::IDT_VECTORING_INFO)? as u32;
        let Some(r) = crate::exit::reinjection(info, 0, 0) else { return Ok(false) };
        let r = crate::exit::reinjection(
            info,
            if r.error_code.is_some() { self.vmread(F::IDT_VECTORING_ERROR_CODE)? as u32 } else { 0 },
            if r.instruction_length.is_some() { self.vmread(F::EXIT_INSTRUCTION_LENGTH)? as u32 } else { 0 },
        )
        .unwrap_or(r);
        if let Some(e) = r.error_code {
            self.vmwrite(F::ENTRY_EXCEPTION_ERROR_CODE, u64::from(e))?;
        }
        if let Some(l) = r.instruction_length {
            self.vmwrite(F::ENTRY_INSTRUCTION_LENGTH, u64::from(l))?;
        }
        self.vmwrite(F::ENTRY_INTERRUPTION_INFO, u64::from(r.info))?;
        Ok(true)
    }

    /// The last exit, if it was an EPT violation, as the address space's `NestedPageFaultInfo`.
    pub fn nested_page_fault_info(&self) -> Option<NestedPageFaultInfo> {
        match self.last_exit {
            Some(VmExit::EptViolation(v)) => Some(v.nested_page_fault_info()),
            _ => None,
        }
    }

    /// What the guest's CPUID of `leaf`/`subleaf` returns: the host's answer filtered by
    /// [`crate::cpuid::filter_guest`] for the EPT in use (a 4-level walk is assumed before one is
    /// loaded, the smaller of the two), the execution controls and the configuration's
    /// [`crate::cpuid::CpuidOptions`]. Handlers of CPUID exits (reason 10) use this.
    pub fn guest_cpuid(&self, leaf: u32, subleaf: u32) -> crate::hw::CpuidResult {
        let walk_length = self.eptp.map_or(4, |p| p.walk_length());
        let enabled = crate::cpuid::EnabledInstructions::from_controls(self.proc1, self.proc2);
        let raw = self.hw.cpuid(leaf, subleaf);
        let mut r = crate::cpuid::filter_guest(leaf, subleaf, raw, walk_length, enabled, self.config.cpuid);
        if leaf == 1 {
            // CPUID.1:ECX.OSXSAVE mirrors CR4.OSXSAVE (Intel SDM Vol. 2A "CPUID", Table 3-10): the
            // guest's CR4, not the host's.
            let guest_cr4 = self.vmread(F::GUEST_CR4).unwrap_or(0);
            r.ecx = crate::cpuid::with_osxsave(r.ecx, guest_cr4 & c::CR4_OSXSAVE != 0);
        }
        r
    }

    /// The VM-instruction error of the last failed VMX instruction (Intel SDM Vol. 3C 31.4).
    pub fn vm_instruction_error(&self) -> Option<VmInstructionError> {
        self.hw.vmread(F::VM_INSTRUCTION_ERROR).ok().map(|e| VmInstructionError(e as u32))
    }

    /// Reads a VMCS field of this vCPU.
    pub fn vmread(&self, field: F) -> Result<u64, VmxInstructionFailure> {
        self.hw.vmread(field).map_err(|f| fail(&self.hw, "VMREAD", f))
    }

    /// Writes a VMCS field of this vCPU.
    pub fn vmwrite(&mut self, field: F, value: u64) -> Result<(), VmxInstructionFailure> {
        self.hw.vmwrite(field, value).map_err(|f| fail(&self.hw, "VMWRITE", f))
    }

    /// Moves the guest past the instruction that exited (VM-exit instruction length, 28.2.4).
    pub fn advance_rip(&mut self) -> Result<(), VmxInstructionFailure> {
        let len = self.vmread(F::EXIT_INSTRUCTION_LENGTH)?;
        let rip = self.vmread(F::GUEST_RIP)?;
        self.vmwrite(F::GUEST_RIP, rip.wrapping_add(len))
    }

    /// Runs `f` on the MSR bitmap.
    fn msr_bitmap<R>(&mut self, f: impl FnOnce(&mut [u8; 4096]) -> R) -> R {
        // SAFETY: the bitmap frame was allocated by `new` for this vCPU and is only reached here
        // (the processor reads it during guest execution, never while this runs).
        f(unsafe { &mut *self.alloc.phys_to_virt(self.bitmaps[0]).as_ptr().cast::<[u8; 4096]>() })
    }

    /// Lets the guest access the I/O ports `ports` without exits (Intel SDM Vol. 3C 25.6.4: bitmap
    /// A covers 0000H-7FFFH, B 8000H-FFFFH; a clear bit lets the access run).
    pub fn pass_through_io(&mut self, ports: core::ops::Range<u16>) {
        for port in ports {
            let (map, n) = if port < 0x8000 { (self.bitmaps[1], port) } else { (self.bitmaps[2], port - 0x8000) };
            // SAFETY: an I/O bitmap frame of this vCPU (see `msr_bitmap`).
            let b = unsafe { &mut *self.alloc.phys_to_virt(map).as_ptr().cast::<[u8; 4096]>() };
            b[usize::from(n / 8)] &= !(1 << (n % 8));
        }
    }

    /// Whether a guest access to `port` exits (the I/O bitmap bit).
    pub fn io_exits(&self, port: u16) -> bool {
        let (map, n) = if port < 0x8000 { (self.bitmaps[1], port) } else { (self.bitmaps[2], port - 0x8000) };
        // SAFETY: an I/O bitmap frame of this vCPU, only read here.
        let b = unsafe { &*self.alloc.phys_to_virt(map).as_ptr().cast::<[u8; 4096]>() };
        b[usize::from(n / 8)] & (1 << (n % 8)) != 0
    }

    /// Whether an RDMSR (`write` false) or WRMSR of `msr` exits (the MSR bitmap bit).
    pub fn msr_exits(&mut self, msr: u32, write: bool) -> bool {
        match crate::msr::bitmap_bit(msr) {
            Some((byte, bit)) => self.msr_bitmap(|b| b[byte + if write { 2048 } else { 0 }] & bit != 0),
            None => true,
        }
    }

    fn free_bitmaps(&mut self) {
        for f in core::mem::replace(&mut self.bitmaps, [HostPhysAddr::new(0); 3]) {
            if f.as_u64() != 0 {
                // SAFETY: allocated by `new`; the VMCS that named it is cleared (Drop) or was
                // never launched (VMXON failed).
                unsafe { self.alloc.deallocate_frames(f, 1) };
            }
        }
    }

    /// The injected hardware (tests inspect their fake through it).
    pub fn hardware(&self) -> &H {
        &self.hw
    }

    /// The injected hardware, mutably (tests script their fake through it).
    pub fn hardware_mut(&mut self) -> &mut H {
        &mut self.hw
    }
}

impl<H: VmxHardware, A: FrameAllocator> Drop for VmxVcpu<H, A> {
    fn drop(&mut self) {
        if self.vmcs.as_u64() != 0 && self.hw.vmclear(self.vmcs).is_ok() {
            // SAFETY: VMCLEAR succeeded, so the processor no longer caches or uses the VMCS.
            unsafe { self.alloc.deallocate_frames(self.vmcs, 1) };
        }
        self.free_bitmaps();
        // The VMXON region stays in use until VMXOFF; VMX operation lasts as long as the image,
        // so the region is deliberately kept.
    }
}
