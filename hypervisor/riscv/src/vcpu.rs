//! The vCPU state beyond its general registers ([`crate::trap::VcpuRegs`], which also keeps its
//! privilege): its floating-point registers, saved only when the guest dirtied them, and the
//! exceptions the hypervisor hands back to it ([`twostage_rvh::reflect`]).

use crate::vm::Vm;
use core::arch::asm;
use twostage_rvh::csr::sstatus as ss;
use twostage_rvh::hw;
use twostage_rvh::reflect::{self, VsState};

/// f0-f31 and fcsr of a guest.
#[derive(Clone, Debug, Default)]
#[repr(C)]
pub struct FpState {
    /// f0..f31 (64-bit each).
    pub f: [u64; 32],
    /// fcsr.
    pub fcsr: u64,
}

impl FpState {
    /// After a guest exit: saves the FP registers when the guest dirtied them, then marks
    /// sstatus.FS Clean. With V=1 an FP write sets both vsstatus.FS and the HS sstatus.FS Dirty
    /// (H extension, "Hypervisor Status Register (hstatus)" and "Supervisor Status Register
    /// (sstatus)" on FS with V=1), so the HS field says whether anything changed since the last
    /// save; the guest's own vsstatus.FS is left to the guest. Returns whether it saved.
    pub fn save_if_dirty(&mut self) -> bool {
        if hw::sstatus::read() & ss::FS_MASK != ss::FS_DIRTY {
            return false;
        }
        let p = self.f.as_mut_ptr();
        // SAFETY: `p` points at 32 u64 then fcsr (repr(C)); FS is not Off (it is Dirty), so the
        // FP instructions do not trap.
        unsafe {
            asm!(
                "fsd f0, 0({p})", "fsd f1, 8({p})", "fsd f2, 16({p})", "fsd f3, 24({p})",
                "fsd f4, 32({p})", "fsd f5, 40({p})", "fsd f6, 48({p})", "fsd f7, 56({p})",
                "fsd f8, 64({p})", "fsd f9, 72({p})", "fsd f10, 80({p})", "fsd f11, 88({p})",
                "fsd f12, 96({p})", "fsd f13, 104({p})", "fsd f14, 112({p})", "fsd f15, 120({p})",
                "fsd f16, 128({p})", "fsd f17, 136({p})", "fsd f18, 144({p})", "fsd f19, 152({p})",
                "fsd f20, 160({p})", "fsd f21, 168({p})", "fsd f22, 176({p})", "fsd f23, 184({p})",
                "fsd f24, 192({p})", "fsd f25, 200({p})", "fsd f26, 208({p})", "fsd f27, 216({p})",
                "fsd f28, 224({p})", "fsd f29, 232({p})", "fsd f30, 240({p})", "fsd f31, 248({p})",
                "frcsr {t}", "sd {t}, 256({p})",
                p = in(reg) p, t = out(reg) _, options(nostack),
            );
            hw::sstatus::clear(ss::FS_MASK);
            hw::sstatus::set(ss::FS_CLEAN);
        }
        true
    }

    /// Before entering the guest: loads its FP registers (the hypervisor's own code may have used
    /// them since the exit) and leaves sstatus.FS Clean, so the next save happens only if the
    /// guest writes them.
    pub fn restore(&self) {
        let p = self.f.as_ptr();
        // SAFETY: as in `save_if_dirty`; FS is set to Clean first so the loads do not trap, and
        // set back to Clean after them (the loads themselves make it Dirty).
        unsafe {
            hw::sstatus::clear(ss::FS_MASK);
            hw::sstatus::set(ss::FS_CLEAN);
            asm!(
                "fld f0, 0({p})", "fld f1, 8({p})", "fld f2, 16({p})", "fld f3, 24({p})",
                "fld f4, 32({p})", "fld f5, 40({p})", "fld f6, 48({p})", "fld f7, 56({p})",
                "fld f8, 64({p})", "fld f9, 72({p})", "fld f10, 80({p})", "fld f11, 88({p})",
                "fld f12, 96({p})", "fld f13, 104({p})", "fld f14, 112({p})", "fld f15, 120({p})",
                "fld f16, 128({p})", "fld f17, 136({p})", "fld f18, 144({p})", "fld f19, 152({p})",
                "fld f20, 160({p})", "fld f21, 168({p})", "fld f22, 176({p})", "fld f23, 184({p})",
                "fld f24, 192({p})", "fld f25, 200({p})", "fld f26, 208({p})", "fld f27, 216({p})",
                "fld f28, 224({p})", "fld f29, 232({p})", "fld f30, 240({p})", "fld f31, 248({p})",
                "ld {t}, 256({p})", "fscsr {t}",
                p = in(reg) p, t = out(reg) _, options(nostack),
            );
            hw::sstatus::clear(ss::FS_MASK);
            hw::sstatus::set(ss::FS_CLEAN);
        }
    }
}

impl Vm {
    /// Hands an exception the hypervisor does not handle to the guest, as the trap the hart would
    /// have taken into VS-mode ([`twostage_rvh::reflect`]): the cause the guest sees
    /// ([`reflect::guest_cause`]), the trap value, the pc, and the privilege it came from.
    pub fn reflect(&mut self, scause: u64, tval: u64) {
        let c = reflect::guest_cause(scause);
        // A virtual-instruction exception's stval holds the instruction bits, as an illegal
        // instruction's vstval would; an access fault's holds the faulting guest address.
        let state = VsState { vsstatus: hw::vsstatus::read(), vstvec: hw::vstvec::read() };
        let r = reflect::reflect(c, tval, self.pc, self.regs.vs_mode, state);
        // SAFETY: the guest's own VS CSRs, written as its trap entry would.
        unsafe {
            hw::vsstatus::write(r.vsstatus);
            hw::vsepc::write(r.vsepc);
            hw::vscause::write(r.vscause);
            hw::vstval::write(r.vstval);
        }
        self.pc = r.pc;
        self.regs.vs_mode = true;
        self.stats.reflected += 1;
    }
}
