//! What an SMP vCPU's hart does for the guest's multi-hart SBI calls: HSM start, stop and
//! suspend (the waits servicing the other harts), guest IPIs and remote fences.

use super::{m, service};
use crate::vm::Vm;
use core::arch::asm;
use core::sync::atomic::Ordering;
use twostage_rvh::csr::irq;
use twostage_rvh::hw;

/// The multi-hart SBI calls of vCPU `me` ([`twostage_rvh::sbi::SbiBackend`] forwards here).
pub mod calls {
    use super::super::*;

    /// HSM hart_start: the target's HSM state, then its hart's wake-up.
    pub fn hart_start(hart: usize, addr: u64, opaque: u64) -> i64 {
        let mc = m();
        match mc.hsm.start(hart, addr, opaque) {
            Ok(()) => {
                ipi_hart(mc.hartids[hart]);
                0
            }
            Err(e) => e,
        }
    }

    /// Guest IPIs to the bit set `harts`.
    pub fn send_ipi(me: usize, harts: u64) {
        let mc = m();
        for t in (0..mc.n).filter(|t| harts & (1 << t) != 0) {
            mc.mail.post_ipi(t);
            mc.counters[me].ipis_sent.fetch_add(1, Ordering::Relaxed);
            if t != me {
                ipi_hart(mc.hartids[t]);
            }
        }
    }

    /// A remote fence on the bit set `harts`, done when every target acknowledged.
    pub fn remote_fence(me: usize, harts: u64, fence: RemoteFence) {
        let mc = m();
        mc.counters[me].rfence_calls.fetch_add(1, Ordering::Relaxed);
        let mut gens = [(0usize, 0u64); MAX_VCPUS];
        let mut k = 0;
        for t in (0..mc.n).filter(|t| harts & (1 << t) != 0) {
            gens[k] = (t, mc.mail.post_fence(t, fence));
            k += 1;
            if t != me {
                ipi_hart(mc.hartids[t]);
            }
        }
        let mut spins = 0u64;
        while !gens[..k].iter().all(|&(t, g)| mc.mail.done(t, g)) {
            service(me);
            spins += 1;
            if spins.is_multiple_of(1 << 16) {
                gens[..k].iter().filter(|&&(t, g)| !mc.mail.done(t, g)).for_each(|&(t, _)| ipi_hart(mc.hartids[t]));
            }
            core::hint::spin_loop();
        }
    }
}

/// Waits, servicing, until `ready` says so; WFI in between (an HS IPI, a timer or a guest
/// interrupt wakes it: WFI resumes on any locally enabled pending interrupt, whatever
/// sstatus.SIE says).
pub(super) fn wait_until(me: usize, mut ready: impl FnMut() -> bool) {
    loop {
        // SAFETY: as in `before_entry`.
        unsafe { hw::sip::clear(1 << 1) };
        service(me);
        if ready() || m().ending.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: waits for an interrupt; none is taken in HS-mode (sstatus.SIE is 0).
        unsafe { asm!("wfi", options(nomem, nostack)) };
    }
}

/// Sets `vm` up to start at `addr` as a hart does after hart_start or a non-retentive resume:
/// a0 = hartid, a1 = opaque, VS-mode with vsatp Bare and vsstatus.SIE clear ("Hart State
/// Management Extension").
fn start_at(vm: &mut Vm, me: usize, addr: u64, opaque: u64) {
    vm.pc = addr;
    vm.regs.gpr[10] = me as u64;
    vm.regs.gpr[11] = opaque;
    vm.regs.vs_mode = true;
    // SAFETY: the guest's own VS CSRs, reset as a starting hart's.
    unsafe {
        hw::vsatp::write(0);
        hw::vsstatus::clear(twostage_rvh::csr::sstatus::SIE);
    }
    hw::hfence_vvma_all();
}

/// A stopped vCPU: waits for hart_start, then starts there.
pub fn park(vm: &mut Vm, me: usize) {
    let mc = m();
    // A stopped hart's timer is off (SBI set_timer to the end of time also clears a pending
    // VSTIP), so that a stale deadline does not keep its WFI from waiting.
    twostage_rvh::sbi::SbiBackend::set_timer(vm, u64::MAX);
    // Likewise its Sstc timer (vstimecmp), which the guest sets directly.
    crate::devices::reset_vs_timer();
    let mut start = None;
    mc.live.set_idle(me, true);
    wait_until(me, || {
        start = mc.hsm.take_start(me);
        start.is_some()
    });
    mc.live.set_idle(me, false);
    if let Some((addr, opaque)) = start {
        start_at(vm, me, addr, opaque);
    }
}

/// hart_suspend: waits until an interrupt is pending for the vCPU (its guest IPI, its SBI or Sstc
/// timer, anything in hvip, its PLIC context's output), then resumes after the call or,
/// non-retentive, at `resume`.
pub fn suspend(vm: &mut Vm, me: usize, resume: Option<(u64, u64)>) {
    let mc = m();
    mc.hsm.set_suspended(me, true);
    mc.live.set_idle(me, true);
    wait_until(me, || {
        crate::smp::apply_seip(me);
        mc.mail.pending(me)
            || hw::hvip::read() != 0
            || hw::sip::read() & (1 << irq::STI) != 0
            || crate::devices::vs_timer_due()
    });
    mc.live.set_idle(me, false);
    mc.hsm.set_suspended(me, false);
    match resume {
        Some((addr, opaque)) => start_at(vm, me, addr, opaque),
        None => {
            vm.regs.gpr[10] = 0;
            vm.pc = vm.pc.wrapping_add(4);
        }
    }
}
