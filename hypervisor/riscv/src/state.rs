//! A vCPU's whole state and its devices', captured from a stopped one-vCPU VM and put into
//! another VM: what [`crate::vmfork`] copies besides memory.
//!
//! Most of a vCPU lives in the [`Vm`] between runs: its general registers and privilege
//! ([`crate::trap::VcpuRegs`]), its pc, its FP registers ([`crate::vcpu::FpState`], saved on
//! every exit that dirtied them) and its pending SBI timer deadline. The VS-level CSRs live only
//! in the hart: with V=0 the hypervisor reaches them under their VS names, and whatever runs on
//! the hart next (another VM) overwrites them, so they are captured here ([`VsCsrs`]). The
//! devices (the UART model and the PLIC) are plain values in the `Vm` and are cloned.
//!
//! Not captured: hgatp (each VM has its own table and VMID), hedeleg/hideleg/hcounteren and
//! hstatus (set by the run loop on every entry, the same for every guest here).

use crate::trap::VcpuRegs;
use crate::vcpu::FpState;
use crate::vm::Vm;
use twostage_rvh::csr::henvcfg;
use twostage_rvh::hw;

/// The VS-level and per-guest hypervisor CSRs of the hart a vCPU last ran on (Privileged spec,
/// chapter "Hypervisor Extension"; the section of each is named at its field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsCsrs {
    /// "Virtual Supervisor Status Register (vsstatus)": the guest's SIE/SPIE/SPP, FS, SUM, MXR.
    pub vsstatus: u64,
    /// "Virtual Supervisor Interrupt Registers (vsip and vsie)": the guest's interrupt enables
    /// (its pending bits are hvip's, below).
    pub vsie: u64,
    /// "Virtual Supervisor Trap Vector Base Address Register (vstvec)".
    pub vstvec: u64,
    /// "Virtual Supervisor Scratch Register (vsscratch)".
    pub vsscratch: u64,
    /// "Virtual Supervisor Exception Program Counter (vsepc)".
    pub vsepc: u64,
    /// "Virtual Supervisor Cause Register (vscause)".
    pub vscause: u64,
    /// "Virtual Supervisor Trap Value Register (vstval)".
    pub vstval: u64,
    /// "Virtual Supervisor Address Translation and Protection Register (vsatp)": the guest's
    /// own page-table root and ASID.
    pub vsatp: u64,
    /// "Hypervisor Interrupt Registers (hvip, hip, and hie)": the virtual interrupts the
    /// hypervisor raised (VSSIP, VSTIP, VSEIP), which vsip shows the guest.
    pub hvip: u64,
    /// "Hypervisor Environment Configuration Register (henvcfg)": STCE (Sstc for the guest) and
    /// the other environment bits.
    pub henvcfg: u64,
    /// "Hypervisor Time Delta Registers (htimedelta, htimedeltah)": the guest's time offset.
    pub htimedelta: u64,
    /// The Sstc extension's "Virtual Supervisor Timer Compare (vstimecmp) Register", when
    /// henvcfg.STCE is set (it is not reachable otherwise).
    pub vstimecmp: Option<u64>,
}

impl VsCsrs {
    /// Reads them from the calling hart (V=0, the vCPU stopped on it).
    pub fn capture() -> Self {
        let henvcfg = hw::henvcfg::read();
        Self {
            vsstatus: hw::vsstatus::read(),
            vsie: hw::vsie::read(),
            vstvec: hw::vstvec::read(),
            vsscratch: hw::vsscratch::read(),
            vsepc: hw::vsepc::read(),
            vscause: hw::vscause::read(),
            vstval: hw::vstval::read(),
            vsatp: hw::vsatp::read(),
            hvip: hw::hvip::read(),
            henvcfg,
            htimedelta: hw::htimedelta::read(),
            vstimecmp: (henvcfg & henvcfg::STCE != 0).then(hw::vstimecmp::read),
        }
    }

    /// Writes them into the calling hart, whose hgatp must already be the VM's that runs next:
    /// the guest's VS-stage translations cached under that VMID are dropped (HFENCE.VVMA), since
    /// they may belong to whatever ran there before.
    ///
    /// # Safety
    /// The values must be a guest's own (captured by [`VsCsrs::capture`] from a vCPU whose
    /// memory the VM about to run holds a copy of); the next entry runs that guest with them.
    pub unsafe fn restore(&self) {
        // SAFETY: the caller's promise; henvcfg first, so that vstimecmp is written only where
        // STCE makes it reachable (an access traps otherwise).
        unsafe {
            hw::henvcfg::write(self.henvcfg);
            hw::vsstatus::write(self.vsstatus);
            hw::vsie::write(self.vsie);
            hw::vstvec::write(self.vstvec);
            hw::vsscratch::write(self.vsscratch);
            hw::vsepc::write(self.vsepc);
            hw::vscause::write(self.vscause);
            hw::vstval::write(self.vstval);
            hw::vsatp::write(self.vsatp);
            hw::hvip::write(self.hvip);
            hw::htimedelta::write(self.htimedelta);
            if hw::henvcfg::read() & henvcfg::STCE != 0 {
                hw::vstimecmp::write(self.vstimecmp.unwrap_or(u64::MAX));
            }
        }
        hw::hfence_vvma_all();
    }
}

/// Everything of a stopped one-vCPU VM but its memory: the vCPU and the devices.
#[derive(Clone, Debug)]
pub struct VmState {
    /// General registers and privilege.
    pub regs: VcpuRegs,
    /// The pc the next entry resumes at.
    pub pc: u64,
    /// f0-f31 and fcsr.
    pub fp: FpState,
    /// The hart's VS-level CSRs.
    pub csrs: VsCsrs,
    /// The SBI timer deadline not yet injected.
    pub guest_timer: Option<u64>,
    /// The UART's registers and FIFO.
    pub uart: crate::uart::Ns16550,
    /// The PLIC's registers.
    pub plic: crate::plic::Plic,
    /// Whether the guest's console input comes from the host's.
    pub input: bool,
    /// hedeleg for the guest.
    pub hedeleg: u64,
    /// Whether unhandled exceptions go to the guest.
    pub reflect_exceptions: bool,
}

impl Vm {
    /// Captures this VM's vCPU and device state; the VM must be the one that last ran on the
    /// calling hart, stopped (between two `run`s). One-vCPU VMs only (an SMP vCPU's devices are
    /// the machine's).
    pub fn capture(&self) -> VmState {
        assert!(self.vcpu.is_none(), "an SMP vCPU's devices are shared: captured with its machine");
        VmState {
            regs: self.regs.clone(),
            pc: self.pc,
            fp: self.fp.clone(),
            csrs: VsCsrs::capture(),
            guest_timer: self.guest_timer,
            uart: self.uart.dev.clone(),
            plic: self.plic.clone(),
            input: self.uart.input,
            hedeleg: self.hedeleg,
            reflect_exceptions: self.reflect_exceptions,
        }
    }

    /// Puts `state` into this VM and its VS CSRs into the calling hart, with this VM's hgatp
    /// loaded: the next `run` resumes the captured vCPU here.
    ///
    /// # Safety
    /// This VM's memory must hold the captured guest's memory (a fork, a migrated copy, or the
    /// same space), so that the restored vsatp and pc describe this guest.
    pub unsafe fn restore(&mut self, state: &VmState) {
        self.regs = state.regs.clone();
        self.pc = state.pc;
        self.fp = state.fp.clone();
        self.guest_timer = state.guest_timer;
        self.uart.dev = state.uart.clone();
        self.plic = state.plic.clone();
        self.uart.input = state.input;
        self.hedeleg = state.hedeleg;
        self.reflect_exceptions = state.reflect_exceptions;
        // SAFETY: this VM's own hgatp; the VS CSRs are the caller's guest's (its promise).
        unsafe {
            hw::hgatp::write(self.hgatp.bits());
            hw::hfence_gvma_all();
            state.csrs.restore();
        }
    }
}
