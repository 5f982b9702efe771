//! `VmxVcpu`: VMXON, the VMCS with EPT (and VPID, unrestricted guest), entering the guest,
//! decoding its exits, and carrying out the engine's invalidations.
//!
//! The flow and names are the seed design's: [`VmxVcpu::setup`] (ept_root, entry) ->
//! [`VmxVcpu::setup_vmcs`] -> [`VmxVcpu::setup_vmcs_control`] (EPT on in the secondary controls)
//! -> [`VmxVcpu::set_ept_pointer`] (EPTP checked against the capabilities, written, INVEPT).

use crate::caps::{
    enable_feature_control, ControlField, ControlUnsupported, VmxCapabilities, VmxUnsupported, CR4_VMXE,
};
use crate::controls::{self as c, access_rights as ar};
use crate::exit::{decode_exit, VmExit, VmInstructionError};
use crate::hw::{GuestRegisters, InveptKind, InvvpidKind, VmFail, VmxHardware};
use crate::vmcs::VmcsField as F;
use core::fmt;
use twostage_npt::{EptCapabilities, EptPointer, EptPointerError};
use twostage_npt::{EptInvalidation, FrameAllocator, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, NestedPageFaultInfo};

/// What the hypervisor wants from the vCPU, before the CPU's capabilities are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuConfig {
    /// Use EPT accessed/dirty flags when the CPU offers them (EPTP bit 6).
    pub want_ept_ad: bool,
    /// Tag the guest's TLB entries with this VPID (non-zero) when the CPU offers VPIDs.
    pub vpid: Option<u16>,
}

impl Default for VcpuConfig {
    fn default() -> Self {
        Self { want_ept_ad: true, vpid: Some(1) }
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
    /// [`VmxVcpu::set_ept_root`] was never called.
    NoEptRoot,
    /// The EPT pointer does not fit the CPU's capabilities.
    EptPointer(EptPointerError),
    /// The entry state needs unrestricted guest, which the CPU lacks.
    NeedsUnrestrictedGuest,
    /// A VMWRITE or an invalidation failed.
    Instruction(VmxInstructionFailure),
}

/// Why an invalidation could not be carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidateError {
    /// The CPU offers neither single- nor all-context INVEPT.
    NoInvept,
    /// INVEPT failed.
    Instruction(VmxInstructionFailure),
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
    /// A VMREAD of an exit field failed.
    ExitFields(VmxInstructionFailure),
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
    ept_root: Option<HostPhysAddr>,
    eptp: Option<EptPointer>,
    vpid: Option<u16>,
    unrestricted: bool,
    launched: bool,
    ready: bool,
    last_exit: Option<VmExit>,
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
        let ev = caps.require_ept().map_err(VmxOnError::Unsupported)?;
        // MAXPHYADDR: CPUID.80000008H:EAX[7:0] (Intel SDM Vol. 3A 4.1.4).
        let max_phys =
            if hw.cpuid(0x8000_0000, 0).eax >= 0x8000_0008 { hw.cpuid(0x8000_0008, 0).eax as u8 } else { 36 };
        let ept_caps = EptCapabilities::new(ev.raw, max_phys);
        enable_feature_control(&mut hw).map_err(VmxOnError::Unsupported)?;
        let cr0 = hw.read_cr0();
        hw.write_cr0(caps.cr0.apply(cr0));
        let cr4 = hw.read_cr4();
        hw.write_cr4(caps.cr4.apply(cr4 | CR4_VMXE));
        let vmxon_region = alloc.allocate_frame().ok_or(VmxOnError::OutOfFrames)?;
        let Some(vmcs) = alloc.allocate_frame() else {
            // SAFETY: allocated just above and not yet given to hardware.
            unsafe { alloc.deallocate_frames(vmxon_region, 1) };
            return Err(VmxOnError::OutOfFrames);
        };
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
            ept_root: None,
            eptp: None,
            vpid: None,
            unrestricted: false,
            launched: false,
            ready: false,
            last_exit: None,
            regs: GuestRegisters::default(),
        };
        if let Err(f) = me.hw.vmxon(vmxon_region) {
            let e = VmxOnError::Instruction(fail(&me.hw, "VMXON", f));
            me.vmxon_region = HostPhysAddr::new(0);
            // SAFETY: VMXON failed, so the hardware never took the regions.
            unsafe {
                me.alloc.deallocate_frames(vmxon_region, 1);
                me.alloc.deallocate_frames(vmcs, 1);
            }
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

    /// Receives the root of the EPT the guest will run on (from the address space).
    pub fn set_ept_root(&mut self, root: HostPhysAddr) {
        self.ept_root = Some(root);
    }

    /// Sets up the VMCS for a guest starting at `entry` on the EPT rooted at `ept_root`.
    pub fn setup(&mut self, ept_root: HostPhysAddr, entry: GuestEntry) -> Result<(), SetupError> {
        self.set_ept_root(ept_root);
        self.setup_vmcs(entry)
    }

    fn write(&mut self, field: F, value: u64) -> Result<(), SetupError> {
        self.hw.vmwrite(field, value).map_err(|f| SetupError::Instruction(fail(&self.hw, "VMWRITE", f)))
    }

    /// Host state, guest state, controls, then the EPT pointer.
    pub fn setup_vmcs(&mut self, entry: GuestEntry) -> Result<(), SetupError> {
        self.ready = false;
        self.unrestricted = matches!(entry, GuestEntry::Protected32 { .. });
        if self.unrestricted && !self.caps.has_unrestricted_guest() {
            return Err(SetupError::NeedsUnrestrictedGuest);
        }
        self.setup_vmcs_host()?;
        self.setup_vmcs_guest(entry)?;
        self.setup_vmcs_control(matches!(entry, GuestEntry::LongMode { .. }))?;
        self.set_ept_pointer()?;
        // The launch state is left alone: only VMCLEAR makes a VMCS clear again
        // (Intel SDM Vol. 3C 25.11.3), so a VMCS set up again is still resumed.
        self.ready = true;
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
        let (cr0_want, cr4_want, efer, code_ar, rip, rsp, cr3) = match entry {
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
        self.write(F::GUEST_CS_SELECTOR, 0x08)?;
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
            self.write(sel, 0x10)?;
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
        self.write(F::GUEST_GDTR_BASE, 0)?;
        self.write(F::GUEST_GDTR_LIMIT, 0)?;
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
    /// VPID and unrestricted guest when wanted and offered; 64-bit host; EFER saved and loaded.
    pub fn setup_vmcs_control(&mut self, long_mode_guest: bool) -> Result<(), SetupError> {
        let caps = self.caps;
        let pin = caps.pin.compute(ControlField::PinBased, 0).map_err(SetupError::Control)?;
        let proc1 = caps
            .proc1
            .compute(
                ControlField::PrimaryProcBased,
                c::PROC_HLT_EXITING | c::PROC_UNCONDITIONAL_IO_EXITING | c::PROC_ACTIVATE_SECONDARY,
            )
            .map_err(SetupError::Control)?;
        let mut want2 = c::PROC2_ENABLE_EPT;
        self.vpid = match self.config.vpid {
            Some(v) if v != 0 && caps.has_vpid() => {
                want2 |= c::PROC2_ENABLE_VPID;
                Some(v)
            }
            _ => None,
        };
        if self.unrestricted {
            want2 |= c::PROC2_UNRESTRICTED_GUEST;
        }
        let proc2 = caps.proc2.compute(ControlField::SecondaryProcBased, want2).map_err(SetupError::Control)?;
        let exit = caps
            .exit
            .compute(ControlField::Exit, c::EXIT_HOST_ADDRESS_SPACE_SIZE | c::EXIT_SAVE_EFER | c::EXIT_LOAD_EFER)
            .map_err(SetupError::Control)?;
        let mut want_entry = c::ENTRY_LOAD_EFER;
        if long_mode_guest {
            want_entry |= c::ENTRY_IA32E_MODE_GUEST;
        }
        let entry = caps.entry.compute(ControlField::Entry, want_entry).map_err(SetupError::Control)?;
        self.write(F::PIN_BASED_CONTROLS, u64::from(pin))?;
        self.write(F::PRIMARY_PROCBASED_CONTROLS, u64::from(proc1))?;
        self.write(F::SECONDARY_PROCBASED_CONTROLS, u64::from(proc2))?;
        self.write(F::EXIT_CONTROLS, u64::from(exit))?;
        self.write(F::ENTRY_CONTROLS, u64::from(entry))?;
        self.write(F::EXCEPTION_BITMAP, 0)?;
        self.write(F::PAGE_FAULT_ERROR_CODE_MASK, 0)?;
        self.write(F::PAGE_FAULT_ERROR_CODE_MATCH, 0)?;
        self.write(F::CR3_TARGET_COUNT, 0)?;
        self.write(F::EXIT_MSR_STORE_COUNT, 0)?;
        self.write(F::EXIT_MSR_LOAD_COUNT, 0)?;
        self.write(F::ENTRY_MSR_LOAD_COUNT, 0)?;
        self.write(F::ENTRY_INTERRUPTION_INFO, 0)?;
        if let Some(v) = self.vpid {
            self.write(F::VPID, u64::from(v))?;
            // Drop anything cached under this VPID before first use (Intel SDM Vol. 3C 29.4.3.3).
            let kind = if self.ept_caps.invvpid_single_context() {
                InvvpidKind::SingleContext
            } else {
                InvvpidKind::AllContext
            };
            self.hw.invvpid(kind, v, 0).map_err(|f| SetupError::Instruction(fail(&self.hw, "INVVPID", f)))?;
        }
        Ok(())
    }

    /// Builds the EPT pointer (write-back, 4-level walk, A/D when wanted and offered), checks it
    /// against the capabilities, writes it into the VMCS and runs INVEPT for it.
    pub fn set_ept_pointer(&mut self) -> Result<EptPointer, SetupError> {
        let root = self.ept_root.ok_or(SetupError::NoEptRoot)?;
        let ad = self.config.want_ept_ad && self.ept_caps.accessed_dirty();
        let eptp = EptPointer::new(root, 4, ad, &self.ept_caps).map_err(SetupError::EptPointer)?;
        self.write(F::EPT_POINTER, eptp.bits())?;
        self.eptp = Some(eptp);
        self.invept_current().map_err(|e| match e {
            InvalidateError::Instruction(f) => SetupError::Instruction(f),
            _ => SetupError::Instruction(VmxInstructionFailure { instruction: "INVEPT (not offered)", error: None }),
        })?;
        Ok(eptp)
    }

    /// INVEPT for the current EPTP: single-context where offered, else all-context
    /// (Intel SDM Vol. 3C 29.4.3.1).
    fn invept_current(&mut self) -> Result<InveptKind, InvalidateError> {
        let Some(eptp) = self.eptp else { return Ok(InveptKind::SingleContext) };
        let kind = if self.ept_caps.invept_single_context() {
            InveptKind::SingleContext
        } else if self.ept_caps.invept_all_context() {
            InveptKind::AllContext
        } else {
            return Err(InvalidateError::NoInvept);
        };
        self.hw.invept(kind, eptp.bits()).map_err(|f| InvalidateError::Instruction(fail(&self.hw, "INVEPT", f)))?;
        Ok(kind)
    }

    /// Carries out an engine invalidation. Returns the INVEPT type used, or `None` when nothing
    /// was needed (or the table is not the one this vCPU has loaded).
    pub fn invalidate(&mut self, inv: &EptInvalidation) -> Result<Option<InveptKind>, InvalidateError> {
        match *inv {
            EptInvalidation::None => Ok(None),
            EptInvalidation::SingleContext { root } => {
                if self.eptp.is_some_and(|p| p.root() == root) {
                    self.invept_current().map(Some)
                } else {
                    Ok(None)
                }
            }
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
    /// IA32_VMX_MISC[4:0]), or disarms it with `None`. The value is reloaded at every VM entry
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

    /// The last exit, if it was an EPT violation, as the seed's `NestedPageFaultInfo`.
    pub fn nested_page_fault_info(&self) -> Option<NestedPageFaultInfo> {
        match self.last_exit {
            Some(VmExit::EptViolation(v)) => Some(v.nested_page_fault_info()),
            _ => None,
        }
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
        // The VMXON region stays in use until VMXOFF; VMX operation lasts as long as the image,
        // so the region is deliberately kept.
    }
}
