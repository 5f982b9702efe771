//! What the run loop does for a guest's exits besides MMIO ([`crate::devices`]): guest-page
//! faults resolved by the VM's memory, and the SBI calls ([`SbiBackend`]).

use crate::console;
use crate::trap::ExitCsrs;
use crate::vm::{Exit, Memory, Vm};
use twostage_npt::{GuestPhysAddr, PageSize};
use twostage_rvh::csr::irq;
use twostage_rvh::fault::GuestPageFault;
use twostage_rvh::hw;
use twostage_rvh::sbi::{self, BadGuestBuffer, SbiBackend};

impl Vm {
    /// Handles a guest-page fault: MMIO emulation or demand-zero paging; `Some` hands it back.
    pub(crate) fn resolve(&mut self, f: GuestPageFault, t: ExitCsrs) -> Option<Exit> {
        let gpa = f.info.fault_guest_paddr;
        let in_device = crate::devices::is_device(gpa.as_u64()) && !f.is_implicit();
        // Copy-on-write breaks this fault made, from the space's counters.
        let breaks = |s: &crate::vm::Space| s.stats().cow_copies + s.stats().cow_reuses;
        let outcome = match &mut self.mem {
            // A shared space carries out the flush itself, under its lock, on every hart.
            Memory::Shared(space) => {
                let before = space.with(breaks);
                let outcome = space.handle_fault(f.info);
                Some((outcome, space.with(breaks) - before))
            }
            Memory::Space(space) => {
                let before = breaks(space);
                let outcome = space.handle_fault(f.info);
                Some((outcome, breaks(space) - before))
            }
            Memory::Table(_) => None,
        };
        if let Some((outcome, cow)) = outcome {
            return match outcome {
                twostage_aspace::FaultOutcome::Resolved { flush } => {
                    self.stats.cow_breaks += cow as u32;
                    self.stats.space_resolved += 1;
                    if matches!(self.mem, Memory::Space(_)) {
                        self.apply_space(flush);
                    }
                    None
                }
                twostage_aspace::FaultOutcome::Mmio { .. } if in_device => {
                    if self.emulate_mmio(gpa, &f, t) {
                        None
                    } else {
                        Some(Exit::Fault(f, t))
                    }
                }
                _ => {
                    self.stats.faults_unresolved += 1;
                    Some(Exit::Fault(f, t))
                }
            };
        }
        if in_device {
            return if self.emulate_mmio(gpa, &f, t) { None } else { Some(Exit::Fault(f, t)) };
        }
        if let Some(ram) = self.demand_zero {
            if ram.contains(gpa) && self.table().query(gpa).is_none() {
                let page = gpa.align_down(4096);
                let flags = self.demand_flags;
                if self.map_new(page, 4096, flags, PageSize::Size4K).is_ok() {
                    self.stats.demand_zero += 1;
                    return None;
                }
            }
        }
        self.stats.faults_unresolved += 1;
        Some(Exit::Fault(f, t))
    }
}

impl SbiBackend for Vm {
    /// The SBI console and the UART share the guest's console: shown when `uart.echo` is set,
    /// recorded in `uart.out` when `uart.record` is.
    fn putchar(&mut self, c: u8) {
        if self.uart.echo {
            if let Some(p) = self.uart.prefix.filter(|_| self.uart.line_start) {
                p.bytes().for_each(console::putchar);
            }
            console::putchar(c);
            self.uart.line_start = c == b'\n';
            crate::notes::guest_byte(c);
        }
        if self.uart.record {
            self.uart.out.push(c);
        }
    }
    fn getchar(&mut self) -> Option<u8> {
        console::getchar()
    }
    fn read_guest(&mut self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), BadGuestBuffer> {
        match &self.mem {
            // The space reads untouched demand-zero memory as zeros without populating it.
            Memory::Space(s) => s.read(gpa, buf).map_err(|_| BadGuestBuffer { gpa }),
            Memory::Shared(s) => s.with(|s| s.read(gpa, buf)).map_err(|_| BadGuestBuffer { gpa }),
            Memory::Table(_) => {
                twostage_aspace::GuestMemory::read(&mut self.phys(), gpa, buf).map_err(|_| BadGuestBuffer { gpa })
            }
        }
    }
    fn set_timer(&mut self, deadline: u64) {
        // SAFETY: clears the injected virtual timer interrupt (§8.2.3), as set_timer must (SBI §6.1).
        unsafe { hw::hvip::clear(1 << irq::VSTI) };
        self.guest_timer = Some(deadline);
        self.arm_host_timer();
    }
    fn vcpus(&self) -> usize {
        self.vcpu.and_then(|_| crate::smp::machine()).map_or(0, |m| m.n)
    }
    fn hartid(&self) -> usize {
        self.vcpu.unwrap_or(0)
    }
    fn hart_start(&mut self, hart: usize, addr: u64, opaque: u64) -> i64 {
        crate::smp::calls::hart_start(hart, addr, opaque)
    }
    fn hart_stop(&mut self) -> Result<(), i64> {
        crate::smp::machine().ok_or(sbi::error::NOT_SUPPORTED)?.hsm.stop(self.hartid())
    }
    fn hart_status(&self, hart: usize) -> i64 {
        crate::smp::machine().map_or(sbi::error::NOT_SUPPORTED, |m| m.hsm.status(hart))
    }
    fn send_ipi(&mut self, harts: u64) {
        crate::smp::calls::send_ipi(self.hartid(), harts);
    }
    fn clear_ipi(&mut self) {
        crate::smp::machine().map(|m| m.mail.take_ipi(self.hartid()));
        // SAFETY: clears the guest's own virtual software interrupt.
        unsafe { hw::hvip::clear(1 << irq::VSSI) };
    }
    fn remote_fence(&mut self, harts: u64, fence: sbi::RemoteFence) {
        crate::smp::calls::remote_fence(self.hartid(), harts, fence);
    }
    fn read_legacy_mask(&mut self, va: u64) -> Option<u64> {
        // SAFETY: the guest's vsatp and this VM's hgatp are loaded; HS traps are fixed up.
        let mut hlv = unsafe { hw::Hlv::new() };
        twostage_rvh::access::GuestMemOps::load_u64(&mut hlv, twostage_npt::GuestVirtAddr::new(va)).ok()
    }
}
