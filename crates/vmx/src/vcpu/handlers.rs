//! Exit handlers for what an operating-system guest (Linux) does: control-register writes, MSR
//! accesses, XSETBV, HLT. Each checks the guest's request as the processor would (a refusal is
//! the processor's exception, injected) and leaves the vCPU ready to resume.

use super::{InjectError, VmxInstructionFailure, VmxVcpu};
use crate::controls as c;
use crate::emulate::{cr0_write, cr4_write, efer_write, xsetbv_check, CrWriteError};
use crate::exit::{CrAccess, CrAccessQualification};
use crate::hw::{InvvpidKind, VmxHardware};
use crate::msr::{self, MsrAction};
use crate::vmcs::VmcsField as F;
use twostage_npt::FrameAllocator;

/// How a handled exit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Emulated; RIP moved past the instruction.
    Done,
    /// Refused: the exception with this vector is queued (RIP unchanged, as a fault leaves it).
    Injected(u8),
}

/// Why a handler could not leave the vCPU in a state to resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandlerError {
    /// A VMREAD or VMWRITE the guest's state depends on failed.
    Vmcs(VmxInstructionFailure),
    /// A valid request this vCPU cannot run (see [`CrWriteError::Unrepresentable`]).
    Unsupported(CrWriteError),
    /// The exception could not be queued.
    Inject(InjectError),
}

impl From<VmxInstructionFailure> for HandlerError {
    fn from(e: VmxInstructionFailure) -> Self {
        Self::Vmcs(e)
    }
}

impl From<InjectError> for HandlerError {
    fn from(e: InjectError) -> Self {
        Self::Inject(e)
    }
}

impl core::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Vmcs(e) => write!(f, "exit handler: {e}"),
            Self::Unsupported(e) => write!(f, "exit handler: {e}"),
            Self::Inject(e) => write!(f, "exit handler: {e}"),
        }
    }
}

impl core::error::Error for HandlerError {}

impl<H: VmxHardware, A: FrameAllocator> VmxVcpu<H, A> {
    fn gp(&mut self) -> Result<Handled, HandlerError> {
        self.inject_exception(13, Some(0))?;
        Ok(Handled::Injected(13))
    }

    fn done(&mut self) -> Result<Handled, HandlerError> {
        self.advance_rip()?;
        Ok(Handled::Done)
    }

    fn gpr_or_rsp(&self, n: u8) -> Result<u64, HandlerError> {
        match self.regs.gpr(n) {
            Some(v) => Ok(v),
            None => Ok(self.vmread(F::GUEST_RSP)?),
        }
    }

    fn set_gpr_or_rsp(&mut self, n: u8, v: u64) -> Result<(), HandlerError> {
        if self.regs.set_gpr(n, v).is_err() {
            self.vmwrite(F::GUEST_RSP, v)?;
        }
        Ok(())
    }

    /// Drops the guest's cached linear translations (its VPID), as a MOV to CR0/CR3/CR4 that
    /// changes paging does on the processor (Intel SDM Vol. 3A 5.10.4.1); nothing without VPIDs,
    /// where every entry and exit flushes them already (Vol. 3C 29.4.3.3).
    fn flush_vpid(&mut self) -> Result<(), HandlerError> {
        if let Some(v) = self.vpid {
            let kind = if self.ept_caps.invvpid_single_context() {
                InvvpidKind::SingleContext
            } else {
                InvvpidKind::AllContext
            };
            self.hw.invvpid(kind, v, 0).map_err(|f| HandlerError::Vmcs(super::fail(&self.hw, "INVVPID", f)))?;
        }
        Ok(())
    }

    /// A control-register access exit (reason 28; Intel SDM Vol. 3C 28.2.1, Table 28-3): MOV to
    /// CR0/CR4 checked by [`cr0_write`]/[`cr4_write`] with the guest/host masks' read shadows
    /// updated (25.6.6) and EFER.LMA with the "IA-32e mode guest" entry control following
    /// CR0.PG; MOV to/from CR3 through GUEST_CR3; CLTS and LMSW on CR0.TS / the low four bits.
    pub fn handle_cr_access(&mut self, q: CrAccessQualification) -> Result<Handled, HandlerError> {
        let cr0_value = match q.access() {
            CrAccess::MovTo { cr: 0, reg } => self.gpr_or_rsp(reg)?,
            CrAccess::Clts => self.vmread(F::CR0_READ_SHADOW)? & !c::CR0_TS,
            CrAccess::Lmsw { source } => {
                // LMSW loads bits 3:0 and cannot clear PE (Intel SDM Vol. 2A "LMSW").
                let old = self.vmread(F::CR0_READ_SHADOW)?;
                (old & !0xe) | u64::from(source & 0xf) | (old & c::CR0_PE)
            }
            CrAccess::MovTo { cr: 4, reg } => {
                let v = self.gpr_or_rsp(reg)?;
                let efer = self.vmread(F::GUEST_IA32_EFER)?;
                return match cr4_write(v, efer, self.caps.cr4) {
                    Ok(w) => {
                        self.vmwrite(F::GUEST_CR4, w.guest)?;
                        self.vmwrite(F::CR4_READ_SHADOW, w.shadow)?;
                        self.flush_vpid()?;
                        self.done()
                    }
                    Err(CrWriteError::Unrepresentable(v)) => {
                        Err(HandlerError::Unsupported(CrWriteError::Unrepresentable(v)))
                    }
                    Err(_) => self.gp(),
                };
            }
            CrAccess::MovTo { cr: 3, reg } => {
                let v = self.gpr_or_rsp(reg)?;
                let phys = u32::from(crate::caps::max_phys_bits(&self.hw));
                if !crate::emulate::cr3_load_allowed(v & !(1 << 63), phys) {
                    return self.gp();
                }
                self.vmwrite(F::GUEST_CR3, v & !(1 << 63))?;
                self.flush_vpid()?;
                return self.done();
            }
            CrAccess::MovFrom { cr: 3, reg } => {
                let v = self.vmread(F::GUEST_CR3)?;
                self.set_gpr_or_rsp(reg, v)?;
                return self.done();
            }
            // CR8 and others do not exit with the controls set up (no TPR shadow, CR8 exiting 0).
            _ => return self.gp(),
        };
        let old = self.vmread(F::CR0_READ_SHADOW)?;
        let efer = self.vmread(F::GUEST_IA32_EFER)?;
        let cr4 = self.vmread(F::GUEST_CR4)?;
        match cr0_write(cr0_value, old, efer, cr4, self.caps.cr0, self.unrestricted) {
            Ok(w) => {
                self.vmwrite(F::GUEST_CR0, w.guest)?;
                self.vmwrite(F::CR0_READ_SHADOW, w.shadow)?;
                if w.efer != efer {
                    self.vmwrite(F::GUEST_IA32_EFER, w.efer)?;
                    self.sync_ia32e_mode_always()?;
                }
                if (old ^ w.shadow) & (c::CR0_PG | c::CR0_WP | c::CR0_PE) != 0 {
                    self.flush_vpid()?;
                }
                self.done()
            }
            Err(e @ CrWriteError::Unrepresentable(_)) => Err(HandlerError::Unsupported(e)),
            Err(_) => self.gp(),
        }
    }

    /// Keeps "IA-32e mode guest" equal to EFER.LMA (Intel SDM Vol. 3C 27.3.1.1).
    fn sync_ia32e_mode_always(&mut self) -> Result<(), VmxInstructionFailure> {
        let lma = self.vmread(F::GUEST_IA32_EFER)? & c::EFER_LMA != 0;
        let entry = self.vmread(F::ENTRY_CONTROLS)?;
        let bit = u64::from(c::ENTRY_IA32E_MODE_GUEST);
        let want = if lma { entry | bit } else { entry & !bit };
        if want != entry {
            self.vmwrite(F::ENTRY_CONTROLS, want)?;
        }
        Ok(())
    }

    /// An RDMSR or WRMSR exit (reasons 31, 32) for an MSR the bitmap intercepts, answered as
    /// [`msr::action`] says; ECX names the MSR, EDX:EAX the value (Intel SDM Vol. 2B "RDMSR",
    /// "WRMSR").
    pub fn handle_msr(&mut self, write: bool) -> Result<Handled, HandlerError> {
        let id = self.regs.rcx as u32;
        let value = (self.regs.rdx << 32) | (self.regs.rax & 0xffff_ffff);
        let read = match (msr::action(id), write) {
            (MsrAction::Efer, false) => self.vmread(F::GUEST_IA32_EFER)?,
            (MsrAction::Efer, true) => {
                let cur = self.vmread(F::GUEST_IA32_EFER)?;
                let paging = self.vmread(F::GUEST_CR0)? & c::CR0_PG != 0;
                match efer_write(cur, value, paging) {
                    Ok(v) => {
                        self.vmwrite(F::GUEST_IA32_EFER, v)?;
                        return self.done();
                    }
                    Err(_) => return self.gp(),
                }
            }
            (MsrAction::ApicBase | MsrAction::ReadHostIgnoreWrite, false) => self.hw.read_msr(id),
            (MsrAction::ApicBase, true) => {
                return if value == self.hw.read_msr(id) { self.done() } else { self.gp() };
            }
            (MsrAction::ReadHostIgnoreWrite, true) => return self.done(),
            (MsrAction::Gp, _) => return self.gp(),
        };
        self.regs.rax = read & 0xffff_ffff;
        self.regs.rdx = read >> 32;
        self.done()
    }

    /// An XSETBV exit (reason 55): checked against CPUID.(EAX=0DH,ECX=0) by [`xsetbv_check`]
    /// (#GP(0) when refused), then executed, with CR4.OSXSAVE set on the host first (XSETBV is
    /// #UD without it; Intel SDM Vol. 2C "XSETBV").
    pub fn handle_xsetbv(&mut self) -> Result<Handled, HandlerError> {
        let xcr = self.regs.rcx as u32;
        let value = (self.regs.rdx << 32) | (self.regs.rax & 0xffff_ffff);
        let d = self.hw.cpuid(0xd, 0);
        let supported = (u64::from(d.edx) << 32) | u64::from(d.eax);
        if xsetbv_check(xcr, value, supported).is_err() {
            return self.gp();
        }
        let cr4 = self.hw.read_cr4();
        if cr4 & c::CR4_OSXSAVE == 0 {
            self.hw.write_cr4(cr4 | c::CR4_OSXSAVE);
            self.vmwrite(F::HOST_CR4, cr4 | c::CR4_OSXSAVE)?;
        }
        self.hw.xsetbv(xcr, value);
        self.done()
    }

    /// A HLT exit (reason 12): RIP moves past it and, where the processor offers the HLT activity
    /// state (IA32_VMX_MISC bit 6), the guest is entered halted, so it waits in the guest for its
    /// next interrupt (Intel SDM Vol. 3C 25.4.2, 27.6.1). Blocking by STI and by MOV SS cover only
    /// the instruction after STI/MOV SS, which the HLT was, so they are cleared.
    pub fn handle_hlt(&mut self) -> Result<Handled, HandlerError> {
        self.advance_rip()?;
        if self.activity_hlt {
            let intr = self.vmread(F::GUEST_INTERRUPTIBILITY)?;
            self.vmwrite(F::GUEST_INTERRUPTIBILITY, intr & !3)?;
            self.vmwrite(F::GUEST_ACTIVITY_STATE, 1)?;
        }
        Ok(Handled::Done)
    }
}
