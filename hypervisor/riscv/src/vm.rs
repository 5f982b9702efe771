//! One guest: its Sv39x4 nested table or address space, the VS-mode run loop and its exits
//! (guest-page faults and the SBI are handled in `exits.rs`, MMIO in [`crate::devices`]), the
//! emulated UART.

use crate::console;
use crate::hart::{frames, g_stage_options, hart};
use crate::plic::Plic;
use crate::stats::Stats;
use crate::trap::{self, ExitCsrs, VcpuRegs};
use crate::uart::Ns16550;
use crate::vcpu::FpState;
use alloc::boxed::Box;
use alloc::vec::Vec;
use twostage_baremetal::frames::Frames;
use twostage_npt::{
    Flush, FrameAllocator, GpaRange, GuestPhysAddr, HostPhysAddr, MapSize, MappingFlags, PageSize, PageTable, Sv39x4,
};
use twostage_npt::{Hgatp, HgatpMode};
use twostage_rvh::csr::{cause, irq};
use twostage_rvh::fault::{decode_guest_page_fault, FaultDecodeError, GuestPageFault, TrapCsrs};
use twostage_rvh::hw;
use twostage_rvh::sbi::{self, ResetRequest, SbiCall, SbiOutcome};

/// The nested table type every VM here uses.
pub type Table = PageTable<Sv39x4, &'static Frames>;
/// The address space type (regions, demand-zero, copy-on-write, MMIO) over such a table.
pub type Space = twostage_aspace::AddressSpace<Sv39x4, &'static Frames>;

/// What stands behind a VM's guest-physical memory.
pub enum Memory {
    /// The engine's table, changed directly by the hypervisor (the engine scenarios): faults in
    /// [`Vm::demand_zero`] get zero pages, faults in the UART window are emulated.
    Table(Table),
    /// An address space: every guest-page fault is resolved by it (demand-zero, copy-on-write,
    /// MMIO regions), the run loop only carries out its flushes and emulates the UART.
    Space(Box<Space>),
    /// An address space shared by the vCPUs of an SMP VM ([`crate::smp`]): faults resolve in
    /// it under its lock, its flushes reach every hart through the VM's shootdown.
    Shared(&'static crate::smp::Shared),
}

pub use crate::boot::UART_GPA;
pub(crate) const UART_LEN: u64 = 0x100;

/// Why the run loop gave control back.
#[derive(Clone, Copy, Debug)]
pub enum Exit {
    /// A test hypercall (fid, a0..a2); sepc is already past the ecall.
    Test {
        /// Function.
        fid: u64,
        /// Arguments.
        args: [u64; 3],
    },
    /// The guest asked to stop.
    Reset(ResetRequest),
    /// A guest-page fault the VM could not resolve (sepc still at the faulting instruction).
    Fault(GuestPageFault, ExitCsrs),
    /// Any other exception (sepc at the trapping instruction).
    Exception(ExitCsrs),
    /// The exit budget ran out.
    Budget,
}

/// The emulated UART: the device model ([`crate::uart`]) plus what this hypervisor does with it.
#[derive(Default)]
pub struct Uart {
    /// Register state.
    pub dev: Ns16550,
    /// Bytes the guest wrote to its console (UART THR and SBI console calls), when `record` is set.
    pub out: Vec<u8>,
    /// Keep what the guest writes in `out` (the scenarios; a long-running guest would fill the heap).
    pub record: bool,
    /// Echo transmitted bytes to the console.
    pub echo: bool,
    /// Feed the receiver from the hypervisor's console (SBI console_getchar); off in the scenarios.
    pub input: bool,
    /// When console input is polled next (host time).
    pub(crate) next_poll: u64,
    /// Shown before each line the guest writes to the console (a forked child's `[child] `).
    pub prefix: Option<&'static str>,
    /// The next byte shown starts a line.
    pub(crate) line_start: bool,
}

/// One guest.
pub struct Vm {
    /// The guest's memory.
    pub mem: Memory,
    /// The VMID.
    pub vmid: u16,
    /// hgatp for `table` and `vmid`.
    pub hgatp: Hgatp,
    /// Guest registers.
    pub regs: VcpuRegs,
    /// Guest pc for the next entry.
    pub pc: u64,
    /// Guest RAM resolved on demand with zero pages (None: no demand paging).
    pub demand_zero: Option<GpaRange>,
    /// Rights of demand-zero pages.
    pub demand_flags: MappingFlags,
    /// The UART at [`UART_GPA`].
    pub uart: Uart,
    /// The PLIC at [`crate::boot::PLIC_GPA`]; the UART is its source [`crate::boot::UART_IRQ`].
    pub plic: Plic,
    /// Counters.
    pub stats: Stats,
    /// hedeleg for this guest (Privileged 1.12 §8.2.2).
    pub hedeleg: u64,
    /// Exits allowed per `run` call.
    pub budget: u32,
    /// A host time after which `run` gives up with [`Exit::Budget`] even if the guest never
    /// exits on its own (a loop, a WFI with nothing to wake it).
    pub watchdog: Option<u64>,
    /// The guest's own timer deadline (SBI set_timer), pending injection.
    pub(crate) guest_timer: Option<u64>,
    /// The guest's FP registers.
    pub fp: FpState,
    /// Hand exceptions the run loop does not handle (and guest-page faults nothing resolves) to
    /// the guest ([`Vm::reflect`]) instead of returning them: a guest nobody is testing.
    pub reflect_exceptions: bool,
    /// This vCPU's index in an SMP VM ([`crate::smp`]): it services the other harts' requests
    /// before each entry and serves HSM, IPI and RFENCE.
    pub vcpu: Option<usize>,
    /// Pause (return [`Exit::Budget`] with [`Vm::paused`] set) before the next entry once this
    /// many exits came from VU-mode (the guest's user space): where a fork or a migration
    /// starts. Cleared when it fires.
    pub pause_at_user_exit: Option<u32>,
    /// Set when `pause_at_user_exit` fired; the owner clears it.
    pub paused: bool,
}

impl Vm {
    /// A VM with an empty Sv39x4 table and `vmid`.
    pub fn new(vmid: u16) -> Self {
        // The run loop leaves a table VM's faults to its owner (and the hypervisor's own hlv/hsv
        // accesses do not retry), so nothing would set A/D bits on a fault: preset where the
        // hart does not set them.
        let table = PageTable::new(frames(), g_stage_options::<Sv39x4>(false)).expect("frames for the root");
        Self::with_memory(Memory::Table(table), vmid)
    }

    /// A VM over an address space.
    pub fn with_space(space: Space, vmid: u16) -> Self {
        Self::with_memory(Memory::Space(Box::new(space)), vmid)
    }

    /// vCPU `vcpu` of an SMP VM over `space`.
    pub fn with_shared(space: &'static crate::smp::Shared, vmid: u16, vcpu: usize) -> Self {
        let mut vm = Self::with_memory(Memory::Shared(space), vmid);
        vm.vcpu = Some(vcpu);
        vm
    }

    fn with_memory(mem: Memory, vmid: u16) -> Self {
        let caps = hart().caps;
        let root = match &mem {
            Memory::Table(t) => t.root(),
            Memory::Space(s) => s.root(),
            Memory::Shared(s) => s.with(|s| s.root()),
        };
        let hgatp = Hgatp::new(HgatpMode::Sv39x4, vmid, root, &caps).expect("Sv39x4 with this VMID is offered");
        crate::devices::reset_vs_timer();
        Self {
            mem,
            vmid,
            hgatp,
            regs: VcpuRegs::new(),
            pc: 0,
            demand_zero: None,
            demand_flags: MappingFlags::RWX,
            uart: Uart { echo: true, ..Default::default() },
            plic: Plic::new(1),
            stats: Stats::default(),
            hedeleg: 0,
            budget: 100_000,
            watchdog: None,
            guest_timer: None,
            fp: FpState::default(),
            reflect_exceptions: false,
            vcpu: None,
            pause_at_user_exit: None,
            paused: false,
        }
    }

    /// The nested table (the space's, for an address-space VM).
    pub fn table(&self) -> &Table {
        match &self.mem {
            Memory::Table(t) => t,
            Memory::Space(s) => s.table(),
            Memory::Shared(_) => panic!("a shared space's table is read under its lock (Vm::with_table)"),
        }
    }

    /// Runs `f` on the nested table (under the lock of a shared space).
    pub fn with_table<R>(&self, f: impl FnOnce(&Table) -> R) -> R {
        match &self.mem {
            Memory::Shared(s) => s.with(|s| f(s.table())),
            _ => f(self.table()),
        }
    }

    /// The nested table, to change directly. Only table VMs: an address space's table is
    /// changed through the space (a hypervisor bug otherwise, never a guest's doing).
    pub fn table_mut(&mut self) -> &mut Table {
        match &mut self.mem {
            Memory::Table(t) => t,
            Memory::Space(_) | Memory::Shared(_) => panic!("an address-space VM's table is changed through its space"),
        }
    }

    /// The address space, for an address-space VM.
    pub fn space(&self) -> Option<&Space> {
        match &self.mem {
            Memory::Space(s) => Some(s),
            Memory::Table(_) | Memory::Shared(_) => None,
        }
    }

    /// The address space, mutably, for an address-space VM.
    pub fn space_mut(&mut self) -> Option<&mut Space> {
        match &mut self.mem {
            Memory::Space(s) => Some(s),
            Memory::Table(_) | Memory::Shared(_) => None,
        }
    }

    /// The HFENCE.GVMA sequence for one invalidation, counted.
    fn fence(stats: &mut Stats, vmid: u16, inv: &twostage_npt::GvmaInvalidation<'_>) {
        twostage_rvh::fence::plan_gvma(inv, vmid, |fence| {
            match fence {
                twostage_rvh::fence::GvmaFence::Address { .. } => stats.gvma_addr += 1,
                twostage_rvh::fence::GvmaFence::Vmid { .. } => stats.gvma_vmid += 1,
            }
            hw::hfence_gvma(fence);
        });
    }

    /// Carries out a table flush token with HFENCE.GVMA by address or by VMID.
    pub fn apply(&mut self, f: Flush<Sv39x4>) {
        let (vmid, stats) = (self.vmid, &mut self.stats);
        match &mut self.mem {
            Memory::Table(t) => t.flush(f, |inv| Self::fence(stats, vmid, inv)).expect("token of this VM's table"),
            Memory::Space(_) | Memory::Shared(_) => panic!("an address-space VM's flushes are SpaceFlush tokens"),
        }
    }

    /// Carries out an address-space flush token.
    pub fn apply_space(&mut self, f: twostage_aspace::SpaceFlush<Sv39x4>) {
        let (vmid, stats) = (self.vmid, &mut self.stats);
        match &mut self.mem {
            Memory::Space(s) => s.flush(f, |inv| Self::fence(stats, vmid, inv)).expect("the VM's own token"),
            Memory::Table(_) | Memory::Shared(_) => panic!("a table VM has no own address space"),
        }
    }

    /// Allocates zeroed frames and maps them at `gpa` with `flags` in pages of `size`.
    pub fn map_new(
        &mut self,
        gpa: GuestPhysAddr,
        len: u64,
        flags: MappingFlags,
        size: PageSize,
    ) -> Result<HostPhysAddr, &'static str> {
        let frames_n = (len / 4096) as usize;
        let align = (size.bytes() / 4096) as usize;
        let hpa = frames().allocate_frames(frames_n, align).ok_or("out of frames")?;
        // SAFETY: freshly allocated frames, identity-mapped in HS-mode.
        unsafe { core::ptr::write_bytes(frames().phys_to_virt(hpa).as_ptr(), 0, len as usize) };
        match self.table_mut().map(gpa, hpa, len, flags, MapSize::Exactly(size)) {
            Ok(f) => {
                self.apply(f);
                Ok(hpa)
            }
            Err(_) => {
                // SAFETY: the frames were never mapped.
                unsafe { frames().deallocate_frames(hpa, frames_n) };
                Err("map refused")
            }
        }
    }

    /// Guest-physical memory through the table (software translation).
    pub fn phys(&self) -> twostage_aspace::TableMemory<'_, Sv39x4, &'static Frames> {
        // SAFETY: every leaf of a VM's table maps frames from `frames()` (identity-mapped RAM),
        // which the table's allocator (`frames()`) reaches.
        unsafe { twostage_aspace::TableMemory::new(self.table()) }
    }

    fn load_csrs(&self) {
        // SAFETY: the VM's own hgatp (checked against the probed capabilities); delegation of
        // VS-level interrupts to VS-mode (§8.2.2: hideleg bits 2, 6, 10) and of the chosen
        // exceptions; counters time/cycle/instret visible to the guest (§8.2.6 hcounteren).
        unsafe {
            if hw::hgatp::read() != self.hgatp.bits() {
                hw::hgatp::write(self.hgatp.bits());
                hw::hfence_gvma_all();
            }
            hw::hedeleg::write(self.hedeleg);
            hw::hideleg::write((1 << irq::VSSI) | (1 << irq::VSTI) | (1 << irq::VSEI));
            hw::hcounteren::write(7);
            if self.vcpu.is_some() {
                // sie.SSIE: another hart's IPI (a shootdown, a guest IPI) exits the guest.
                hw::sie::set(1 << 1);
            }
            // sie.STIE: host timer interrupts exit the guest (§4.1.3); sstatus.SIE stays 0, so
            // they never interrupt the hypervisor itself.
            hw::sie::set(1 << irq::STI);
        }
    }

    /// Programs the host timer (SBI set_timer) for the earliest of the guest's deadline, the
    /// watchdog and the console poll; the hart's one supervisor timer serves them all.
    pub(crate) fn arm_host_timer(&self) {
        let t = self.guest_timer.unwrap_or(u64::MAX).min(self.watchdog.unwrap_or(u64::MAX));
        console::sbi_set_timer(t.min(self.next_poll()));
    }

    /// Runs the guest from `self.pc` until an exit the VM does not handle itself.
    pub fn run(&mut self) -> Exit {
        self.load_csrs();
        self.update_irq();
        self.arm_host_timer();
        for _ in 0..self.budget {
            if self.pause_at_user_exit.is_some_and(|n| self.stats.user_exits >= n) {
                self.pause_at_user_exit = None;
                self.paused = true;
                return Exit::Budget;
            }
            if let Some(me) = self.vcpu {
                crate::smp::live::at_entry(self, me);
                crate::smp::before_entry(me);
            }
            self.fp.restore();
            // SAFETY: the table maps only frames this VM was given; hgatp is loaded above.
            let t = unsafe { trap::run_guest(&mut self.regs, self.pc) };
            if self.fp.save_if_dirty() {
                self.stats.fp_saves += 1;
            }
            self.pc = t.sepc;
            if !self.regs.vs_mode {
                self.stats.user_exits += 1;
            }
            if t.scause & cause::INTERRUPT != 0 {
                self.stats.irq_exits += 1;
                if t.scause & !cause::INTERRUPT == irq::STI {
                    let now = hw::rdtime();
                    if self.guest_timer.is_some_and(|d| now >= d) {
                        // The guest's timer fired: inject VSTIP (§8.2.3 hvip bit 6).
                        // SAFETY: hvip only raises a virtual interrupt for the guest.
                        unsafe { hw::hvip::set(1 << irq::VSTI) };
                        self.guest_timer = None;
                        self.stats.timer_injections += 1;
                    }
                    self.poll_console(now);
                    if self.watchdog.is_some_and(|w| now >= w) {
                        self.watchdog = None;
                        self.arm_host_timer();
                        return Exit::Budget;
                    }
                    self.arm_host_timer();
                }
                continue;
            }
            if let Some(n) = self.stats.exits.get_mut(t.scause as usize) {
                *n += 1;
            }
            match t.scause {
                cause::ECALL_VS => {
                    self.stats.sbi_calls += 1;
                    let mut a = [0u64; 8];
                    a.copy_from_slice(&self.regs.gpr[10..18]);
                    match sbi::handle(SbiCall::decode(a), self) {
                        SbiOutcome::Return { error, value } => {
                            self.regs.gpr[10] = error as u64;
                            self.regs.gpr[11] = value as u64;
                            self.pc = self.pc.wrapping_add(4);
                        }
                        SbiOutcome::LegacyReturn { value } => {
                            self.regs.gpr[10] = value as u64;
                            self.pc = self.pc.wrapping_add(4);
                        }
                        SbiOutcome::Reset(r) => return Exit::Reset(r),
                        SbiOutcome::Stopped => crate::smp::park(self, self.vcpu.expect("HSM is offered to SMP vCPUs")),
                        SbiOutcome::Suspend { resume } => {
                            crate::smp::suspend(self, self.vcpu.expect("HSM is offered to SMP vCPUs"), resume)
                        }
                        SbiOutcome::Test { fid, args } => {
                            self.pc = self.pc.wrapping_add(4);
                            return Exit::Test { fid, args };
                        }
                    }
                }
                cause::INSN_GUEST_PAGE | cause::LOAD_GUEST_PAGE | cause::STORE_GUEST_PAGE => {
                    let csrs = TrapCsrs {
                        scause: t.scause,
                        stval: t.stval,
                        htval: t.htval,
                        htinst: t.htinst,
                        gva_valid: t.hstatus & twostage_rvh::csr::hstatus::GVA != 0,
                    };
                    let f = match decode_guest_page_fault(&csrs) {
                        Ok(f) => f,
                        // htval 0: find the GPA in the guest's own tables, never take it as 0.
                        Err(FaultDecodeError::GpaNotReported(u)) => match self.find_unreported_gpa(&u) {
                            Some(f) => f,
                            None if self.reflect_exceptions => {
                                self.reflect(t.scause, t.stval);
                                continue;
                            }
                            None => return Exit::Exception(t),
                        },
                        Err(_) if self.reflect_exceptions => {
                            self.reflect(t.scause, t.stval);
                            continue;
                        }
                        Err(_) => return Exit::Exception(t),
                    };
                    match self.resolve(f, t) {
                        // Nothing at that guest-physical address: an access fault to the guest.
                        Some(Exit::Fault(..)) if self.reflect_exceptions => self.reflect(t.scause, t.stval),
                        Some(exit) => return exit,
                        None => {}
                    }
                }
                _ if self.reflect_exceptions => self.reflect(t.scause, t.stval),
                _ => return Exit::Exception(t),
            }
        }
        Exit::Budget
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A table VM's guest frames were allocated here: free them (table frames go with the
        // table). An address space frees its own.
        let mut leaves = Vec::new();
        if let Memory::Table(t) = &self.mem {
            t.for_each_leaf(GuestPhysAddr::ZERO, 1 << 41, |l| leaves.push((l.hpa, l.size)));
        }
        for (hpa, size) in leaves {
            // SAFETY: VM frames are mapped exactly once (scenarios that share frames unmap the
            // sharer first), and the table is dropped with this VM.
            unsafe { frames().deallocate_frames(hpa, (size.bytes() / 4096) as usize) };
        }
        // SAFETY: no guest runs with this VMID after the drop.
        unsafe { hw::hgatp::write(0) };
        hw::hfence_gvma_all();
    }
}
