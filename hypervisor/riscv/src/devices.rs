//! The guest's devices on the run loop's side: loads and stores in the UART and PLIC windows reach
//! their models ([`crate::uart`], [`crate::plic`]), the UART's interrupt line goes through the
//! PLIC, and the PLIC's S-mode context output for the vCPU becomes the VS-level external interrupt
//! (hvip.VSEIP, Privileged spec "Hypervisor Interrupt Registers (hvip, hip, and hie)"), raised while
//! something is claimable and cleared when nothing is. Console input is polled from the host
//! console (SBI console_getchar) when the guest looks at the receiver and on a periodic host timer
//! tick, so a guest that waits for the receive interrupt gets it.
//!
//! Also the timer's side: whether a hart lets a guest use the Sstc extension ("RISC-V "stimecmp
//! / vstimecmp" Extension", Sstc) directly, probed by setting henvcfg.STCE and reading it back
//! (once on the boot hart; on every hart of an SMP VM, [`crate::smp::probe_sstc`]).

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

/// The vCPU whose PLIC context drives hvip.VSEIP in a one-vCPU VM (an SMP VM's shared PLIC:
/// [`crate::smp::with_devices`]).
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
        if let Some(me) = self.vcpu {
            // An SMP guest: one UART and one PLIC shared by every vCPU.
            let regs = &mut self.regs.gpr;
            let sent = crate::smp::with_devices(me, |uart, plic| {
                if (UART_GPA..UART_GPA + UART_LEN).contains(&gpa) {
                    uart::emulate_uart(uart, gpa - UART_GPA, access, regs, getc)
                } else {
                    plic::emulate_plic(plic, gpa - PLIC_GPA, access, regs);
                    None
                }
            });
            if let Some(c) = sent {
                twostage_rvh::sbi::SbiBackend::putchar(self, c);
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
    /// into hvip.VSEIP; an SMP vCPU takes its output from the shared PLIC
    /// ([`crate::smp::with_devices`]).
    pub fn update_irq(&mut self) {
        if let Some(me) = self.vcpu {
            crate::smp::apply_seip(me);
            return;
        }
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
            let fill = |dev: &mut uart::Ns16550| {
                while dev.wants_input() {
                    let Some(b) = console::getchar() else { break };
                    dev.receive(b);
                }
            };
            match self.vcpu {
                Some(me) => crate::smp::with_devices(me, |dev, _| fill(dev)),
                None => fill(&mut self.uart.dev),
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

/// Whether guests on the boot hart may use Sstc: probed once ([`sstc_here`]).
pub fn sstc() -> bool {
    match SSTC.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let yes = sstc_here();
            SSTC.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

/// Whether the calling hart lets its guest use Sstc: sets henvcfg.STCE (which stays set) and
/// reads it back; it reads 0 where the hart lacks Sstc or the firmware keeps menvcfg.STCE clear.
/// A hart with the H extension of Privileged 1.12 has henvcfg. Leaves vstimecmp at "never".
pub fn sstc_here() -> bool {
    // SAFETY: STCE only lets VS-mode reach vstimecmp; vstimecmp is set to "never" right after
    // (reset_vs_timer), so no virtual timer interrupt appears from it.
    unsafe { hw::henvcfg::set(henvcfg::STCE) };
    let yes = hw::henvcfg::read() & henvcfg::STCE != 0;
    reset_vs_timer();
    yes
}

/// A new guest's vstimecmp on the calling hart: never (with STCE set, time >= vstimecmp raises
/// VSTIP on its own, so the reset value 0 would hand every guest a timer interrupt it never asked
/// for). Only where this hart's henvcfg.STCE is set (vstimecmp is not reachable otherwise).
pub fn reset_vs_timer() {
    if hw::henvcfg::read() & henvcfg::STCE != 0 {
        // SAFETY: only the guest's timer compare value.
        unsafe { hw::vstimecmp::write(u64::MAX) };
    }
}

/// Whether the calling hart's Sstc timer (vstimecmp) has come due; false where STCE is clear.
pub fn vs_timer_due() -> bool {
    // vstimecmp is read only where this hart's henvcfg.STCE is set (it would trap otherwise).
    hw::henvcfg::read() & henvcfg::STCE != 0 && hw::rdtime() >= hw::vstimecmp::read()
}
