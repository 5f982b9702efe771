//! The guest's devices on the run loop's side: loads and stores in the UART and PLIC windows reach
//! their models ([`crate::uart`], [`crate::plic`]), the UART's interrupt line goes through the
//! PLIC, and the PLIC's S-mode context output for the vCPU becomes the VS-level external interrupt
//! (hvip.VSEIP, Privileged spec "Hypervisor Interrupt Registers (hvip, hip, and hie)"), raised while
//! something is claimable and cleared when nothing is. Console input is polled from the host
//! console (SBI console_getchar) when the guest looks at the receiver and on a periodic host timer
//! tick, so a guest that waits for the receive interrupt gets it.
//!
//! Also the timer's side: whether the hart lets a guest use the Sstc extension ("RISC-V "stimecmp
//! / vstimecmp" Extension", Sstc) directly, probed once by setting henvcfg.STCE and reading it back.

use crate::boot::{PLIC_GPA, PLIC_LEN, UART_IRQ};
use crate::console;
use crate::plic;
use crate::uart;
use crate::vm::{Vm, UART_GPA, UART_LEN};
use core::sync::atomic::{AtomicU8, Ordering};
use twostage_npt::{GuestPhysAddr, GuestVirtAddr};
use twostage_rvh::csr::{henvcfg, irq};
use twostage_rvh::fault::GuestPageFault;
use twostage_rvh::hw;
use twostage_rvh::insn::MemOp;
use twostage_rvh::mmio;

/// The vCPU whose PLIC context drives hvip.VSEIP (one vCPU per VM for now).
const VCPU: usize = 0;
/// Console input is polled this many times a second while the guest runs.
const POLL_HZ: u32 = 100;

/// Whether `gpa` is in an emulated device's window.
pub fn is_device(gpa: u64) -> bool {
    (UART_GPA..UART_GPA + UART_LEN).contains(&gpa) || (PLIC_GPA..PLIC_GPA + PLIC_LEN).contains(&gpa)
}

impl Vm {
    /// Decodes the faulting load/store (htinst, or the instruction fetched with HLVX) and emulates
    /// it against the device whose window holds `gpa`. Returns false if it cannot be decoded or
    /// no device is there.
    pub(crate) fn emulate_mmio(&mut self, gpa: GuestPhysAddr, f: &GuestPageFault, t: crate::trap::ExitCsrs) -> bool {
        let gpa = gpa.as_u64();
        if !is_device(gpa) {
            return false;
        }
        // SAFETY: the guest's vsatp and this VM's hgatp are loaded; HS traps are fixed up.
        let mut hlv = unsafe { hw::Hlv::new() };
        let Ok(access) = mmio::decode_access(f, GuestVirtAddr::new(t.sepc), &mut hlv) else { return false };
        match access.op {
            MemOp::Store { .. } => self.stats.mmio_writes += 1,
            MemOp::Load { .. } => self.stats.mmio_reads += 1,
        }
        let input = self.uart.input;
        let getc = || if input { console::getchar() } else { None };
        if self.vcpu.is_some() {
            // An SMP guest: one UART shared by every vCPU (polled; its guests get no PLIC).
            let (off, regs) = (gpa - UART_GPA, &mut self.regs.gpr);
            if (UART_GPA..UART_GPA + UART_LEN).contains(&gpa) {
                if let Some(c) = crate::smp::with_uart(|dev| uart::emulate_uart(dev, off, access, regs, getc)) {
                    twostage_rvh::sbi::SbiBackend::putchar(self, c);
                }
            } else {
                return false;
            }
        } else if (PLIC_GPA..PLIC_GPA + PLIC_LEN).contains(&gpa) {
            plic::emulate_plic(&mut self.plic, gpa - PLIC_GPA, access, &mut self.regs.gpr);
        } else {
            let sent = uart::emulate_uart(&mut self.uart.dev, gpa - UART_GPA, access, &mut self.regs.gpr, getc);
            if let Some(c) = sent {
                twostage_rvh::sbi::SbiBackend::putchar(self, c);
            }
        }
        self.update_irq();
        self.pc = self.pc.wrapping_add(u64::from(access.insn_len));
        true
    }

    /// Carries the UART's line into the PLIC and the PLIC's output for the vCPU's S-mode context
    /// into hvip.VSEIP.
    pub fn update_irq(&mut self) {
        self.plic.set_level(UART_IRQ as usize, self.uart.dev.irq());
        let bit = 1 << irq::VSEI;
        // SAFETY: hvip.VSEIP only raises or withdraws the guest's virtual external interrupt.
        unsafe {
            if self.plic.s_output(VCPU) {
                hw::hvip::set(bit)
            } else {
                hw::hvip::clear(bit)
            }
        }
    }

    /// Moves waiting console input into the UART's receiver (when `uart.input` is set) and
    /// updates the interrupt; called on host timer exits, acting once the poll is due.
    pub(crate) fn poll_console(&mut self, now: u64) {
        if self.uart.input && now >= self.uart.next_poll {
            while self.uart.dev.wants_input() {
                let Some(b) = console::getchar() else { break };
                self.uart.dev.receive(b);
            }
            self.uart.next_poll = now + u64::from(crate::hart::hart().timebase / POLL_HZ);
            self.update_irq();
        }
    }

    /// When the host timer must fire next for console input (never when input is off).
    pub(crate) fn next_poll(&self) -> u64 {
        if self.uart.input {
            self.uart.next_poll
        } else {
            u64::MAX
        }
    }
}

static SSTC: AtomicU8 = AtomicU8::new(0);

/// Whether guests may use Sstc: probed once by setting henvcfg.STCE (which stays set) and reading
/// it back; it reads 0 where the hart lacks Sstc or the firmware keeps menvcfg.STCE clear. A hart
/// with the H extension of Privileged 1.12 has henvcfg.
pub fn sstc() -> bool {
    match SSTC.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            // SAFETY: STCE only lets VS-mode reach vstimecmp; vstimecmp is set to "never" right
            // after (reset_vs_timer), so no virtual timer interrupt appears from it.
            unsafe { hw::henvcfg::set(henvcfg::STCE) };
            let yes = hw::henvcfg::read() & henvcfg::STCE != 0;
            SSTC.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            reset_vs_timer();
            yes
        }
    }
}

/// A new guest's vstimecmp: never (with STCE set, time >= vstimecmp raises VSTIP on its own, so
/// the reset value 0 would hand every guest a timer interrupt it never asked for).
pub fn reset_vs_timer() {
    if SSTC.load(Ordering::Relaxed) == 2 {
        // SAFETY: only the guest's timer compare value.
        unsafe { hw::vstimecmp::write(u64::MAX) };
    }
}
