//! Traps: the HS-mode vector (exception-table recovery) and the VS-mode entry/exit path.

use core::arch::global_asm;
use twostage_rvh::csr::{cause, hstatus as hs, sstatus as ss};
use twostage_rvh::extable::{self, HwFault, FAULT_SLOT};
use twostage_rvh::hw;

/// A guest's general registers plus the host registers saved across a guest run.
#[repr(C)]
#[derive(Clone, Debug)]
pub struct VcpuRegs {
    /// x0..x31 of the guest (x0 is never loaded).
    pub gpr: [u64; 32],
    /// ra, sp, gp, tp, s0..s11 of the hypervisor while the guest runs.
    host: [u64; 16],
    /// The guest's privilege: true for VS-mode, false for VU-mode. It is sstatus.SPP at the
    /// guest's exit (a trap from V=1 into HS-mode writes the trapped privilege there: Privileged
    /// spec, "Trap Entry"), and sstatus.SPP again before the SRET that resumes it, so a guest
    /// interrupted in VU-mode resumes in VU-mode.
    pub vs_mode: bool,
}

impl VcpuRegs {
    /// All zero, in VS-mode.
    pub const fn new() -> Self {
        Self { gpr: [0; 32], host: [0; 16], vs_mode: true }
    }
}

impl Default for VcpuRegs {
    fn default() -> Self {
        Self::new()
    }
}

// The VS-mode entry: saves the host's callee-saved registers in `VcpuRegs.host`, points sscratch
// at the VcpuRegs and stvec at `guest_exit`, loads the guest's registers and SRETs (with
// hstatus.SPV = 1 and sstatus.SPP set by the caller, SRET enters VS- or VU-mode: Privileged 1.12
// §8.6.4). `guest_exit` is the mirror image; it returns from `enter_guest` to the caller.
global_asm!(
    ".section .text",
    ".globl enter_guest",
    ".align 4",
    "enter_guest:",
    "sd ra, 256(a0)", "sd sp, 264(a0)", "sd gp, 272(a0)", "sd tp, 280(a0)",
    "sd s0, 288(a0)", "sd s1, 296(a0)", "sd s2, 304(a0)", "sd s3, 312(a0)",
    "sd s4, 320(a0)", "sd s5, 328(a0)", "sd s6, 336(a0)", "sd s7, 344(a0)",
    "sd s8, 352(a0)", "sd s9, 360(a0)", "sd s10, 368(a0)", "sd s11, 376(a0)",
    "csrw sscratch, a0",
    "la t0, guest_exit",
    "csrw stvec, t0",
    "ld x1, 8(a0)", "ld x2, 16(a0)", "ld x3, 24(a0)", "ld x4, 32(a0)",
    "ld x5, 40(a0)", "ld x6, 48(a0)", "ld x7, 56(a0)", "ld x8, 64(a0)",
    "ld x9, 72(a0)", "ld x11, 88(a0)", "ld x12, 96(a0)", "ld x13, 104(a0)",
    "ld x14, 112(a0)", "ld x15, 120(a0)", "ld x16, 128(a0)", "ld x17, 136(a0)",
    "ld x18, 144(a0)", "ld x19, 152(a0)", "ld x20, 160(a0)", "ld x21, 168(a0)",
    "ld x22, 176(a0)", "ld x23, 184(a0)", "ld x24, 192(a0)", "ld x25, 200(a0)",
    "ld x26, 208(a0)", "ld x27, 216(a0)", "ld x28, 224(a0)", "ld x29, 232(a0)",
    "ld x30, 240(a0)", "ld x31, 248(a0)",
    "ld x10, 80(a0)",
    "sret",
    ".align 4",
    "guest_exit:",
    "csrrw a0, sscratch, a0",
    "sd x1, 8(a0)", "sd x2, 16(a0)", "sd x3, 24(a0)", "sd x4, 32(a0)",
    "sd x5, 40(a0)", "sd x6, 48(a0)", "sd x7, 56(a0)", "sd x8, 64(a0)",
    "sd x9, 72(a0)", "sd x11, 88(a0)", "sd x12, 96(a0)", "sd x13, 104(a0)",
    "sd x14, 112(a0)", "sd x15, 120(a0)", "sd x16, 128(a0)", "sd x17, 136(a0)",
    "sd x18, 144(a0)", "sd x19, 152(a0)", "sd x20, 160(a0)", "sd x21, 168(a0)",
    "sd x22, 176(a0)", "sd x23, 184(a0)", "sd x24, 192(a0)", "sd x25, 200(a0)",
    "sd x26, 208(a0)", "sd x27, 216(a0)", "sd x28, 224(a0)", "sd x29, 232(a0)",
    "sd x30, 240(a0)", "sd x31, 248(a0)",
    "csrr t0, sscratch",
    "sd t0, 80(a0)",
    "ld ra, 256(a0)", "ld sp, 264(a0)", "ld gp, 272(a0)", "ld tp, 280(a0)",
    "ld s0, 288(a0)", "ld s1, 296(a0)", "ld s2, 304(a0)", "ld s3, 312(a0)",
    "ld s4, 320(a0)", "ld s5, 328(a0)", "ld s6, 336(a0)", "ld s7, 344(a0)",
    "ld s8, 352(a0)", "ld s9, 360(a0)", "ld s10, 368(a0)", "ld s11, 376(a0)",
    "la t0, hs_trap_entry",
    "csrw stvec, t0",
    "ret",
    // Traps taken in HS-mode itself: save every register, call the Rust handler, restore, SRET.
    ".align 4",
    ".globl hs_trap_entry",
    "hs_trap_entry:",
    "addi sp, sp, -256",
    "sd x1, 8(sp)", "sd x3, 24(sp)", "sd x4, 32(sp)",
    "sd x5, 40(sp)", "sd x6, 48(sp)", "sd x7, 56(sp)", "sd x8, 64(sp)",
    "sd x9, 72(sp)", "sd x10, 80(sp)", "sd x11, 88(sp)", "sd x12, 96(sp)", "sd x13, 104(sp)",
    "sd x14, 112(sp)", "sd x15, 120(sp)", "sd x16, 128(sp)", "sd x17, 136(sp)",
    "sd x18, 144(sp)", "sd x19, 152(sp)", "sd x20, 160(sp)", "sd x21, 168(sp)",
    "sd x22, 176(sp)", "sd x23, 184(sp)", "sd x24, 192(sp)", "sd x25, 200(sp)",
    "sd x26, 208(sp)", "sd x27, 216(sp)", "sd x28, 224(sp)", "sd x29, 232(sp)",
    "sd x30, 240(sp)", "sd x31, 248(sp)",
    "call {handler}",
    "ld x1, 8(sp)", "ld x3, 24(sp)", "ld x4, 32(sp)",
    "ld x5, 40(sp)", "ld x6, 48(sp)", "ld x7, 56(sp)", "ld x8, 64(sp)",
    "ld x9, 72(sp)", "ld x10, 80(sp)", "ld x11, 88(sp)", "ld x12, 96(sp)", "ld x13, 104(sp)",
    "ld x14, 112(sp)", "ld x15, 120(sp)", "ld x16, 128(sp)", "ld x17, 136(sp)",
    "ld x18, 144(sp)", "ld x19, 152(sp)", "ld x20, 160(sp)", "ld x21, 168(sp)",
    "ld x22, 176(sp)", "ld x23, 184(sp)", "ld x24, 192(sp)", "ld x25, 200(sp)",
    "ld x26, 208(sp)", "ld x27, 216(sp)", "ld x28, 224(sp)", "ld x29, 232(sp)",
    "ld x30, 240(sp)", "ld x31, 248(sp)",
    "addi sp, sp, 256",
    "sret",
    handler = sym hs_trap_handler,
);

extern "C" {
    fn enter_guest(regs: *mut VcpuRegs);
    fn hs_trap_entry();
}

/// A trap in HS-mode: recovered through the exception table, or fatal.
extern "C" fn hs_trap_handler() {
    let sepc = hw::sepc::read();
    let f = HwFault { scause: hw::scause::read(), stval: hw::stval::read(), htval: hw::htval::read() };
    if let Some(fixup) = extable::fixup_trap(hw::extable(), &FAULT_SLOT, sepc as usize, f) {
        // SAFETY: resumes at the fixup label the faulting wrapper emitted. The trap came from
        // V=0, so SRET must return to V=0: hstatus.SPV is cleared explicitly (§8.2.1, §8.6.4),
        // since QEMU 7.2 leaves the SPV=1 of the last guest exit in place for an HS-to-HS trap.
        unsafe {
            hw::sepc::write(fixup as u64);
            hw::hstatus::clear(twostage_rvh::csr::hstatus::SPV);
        }
        return;
    }
    println!(
        "\nfatal HS-mode trap: scause {:#x} ({}) sepc {:#x} stval {:#x} htval {:#x}",
        f.scause,
        cause::name(f.scause),
        sepc,
        f.stval,
        f.htval
    );
    (crate::board().exit)(102);
}

/// Installs the HS-mode trap vector; `board` is how a fatal trap ends the run.
pub fn init(board: &'static crate::Board) {
    crate::BOARD.store(core::ptr::from_ref(board).cast_mut(), core::sync::atomic::Ordering::Release);
    // SAFETY: the vector is a valid 4-byte-aligned direct-mode handler (§4.1.2).
    unsafe { hw::stvec::write(hs_trap_entry as *const () as usize as u64) };
}

/// The trap CSRs captured when the guest exits.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitCsrs {
    /// scause.
    pub scause: u64,
    /// stval.
    pub stval: u64,
    /// htval.
    pub htval: u64,
    /// htinst.
    pub htinst: u64,
    /// sepc: the guest pc of the trap.
    pub sepc: u64,
    /// hstatus at the trap (GVA, SPV).
    pub hstatus: u64,
}

/// Runs the guest at `sepc`, in the privilege `regs.vs_mode` names, until it traps into HS-mode;
/// returns the trap CSRs and leaves the privilege it trapped from in `regs.vs_mode`.
///
/// # Safety
/// hgatp, vsatp and the VS CSRs must describe a guest whose every reachable GPA maps only
/// memory given to it.
pub unsafe fn run_guest(regs: &mut VcpuRegs, sepc: u64) -> ExitCsrs {
    // SAFETY: SPV = 1 so SRET enters V=1 ("Hypervisor Status Register (hstatus)"); SPP says
    // VS-mode (1) or VU-mode (0) ("Supervisor Status Register (sstatus)", "Trap Entry"); SPVP
    // makes HLV/HSV act as VS-mode; sepc is the guest pc.
    unsafe {
        hw::hstatus::set(hs::SPV | hs::SPVP);
        if regs.vs_mode {
            hw::sstatus::set(ss::SPP);
        } else {
            hw::sstatus::clear(ss::SPP);
        }
        hw::sepc::write(sepc);
        enter_guest(regs);
    }
    regs.vs_mode = hw::sstatus::read() & ss::SPP != 0;
    ExitCsrs {
        scause: hw::scause::read(),
        stval: hw::stval::read(),
        htval: hw::htval::read(),
        htinst: hw::htinst::read(),
        sepc: hw::sepc::read(),
        hstatus: hw::hstatus::read(),
    }
}
