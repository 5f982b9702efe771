//! SMP guests: one VM's vCPUs on as many physical harts, sharing one address space.
//!
//! The boot hart builds the guest's address space, wraps it in a [`SharedAddressSpace`] whose
//! flushes go through the VM's [`Shootdown`] ([`twostage_rvh::shootdown::invalidator`]), and
//! starts one more hart per further vCPU with SBI HSM hart_start ("Hart State Management
//! Extension") at `smp_secondary_entry`, with a stack of its own and its vCPU index in `tp`
//! (the hypervisor never uses `tp` otherwise; the guest's is swapped on entry and exit).
//! vCPU i runs on hart `hartids[i]`, vCPU 0 on the boot hart.
//!
//! Between harts:
//! - G-stage shootdowns ([`twostage_rvh::shootdown`]): each hart `enter`s before it loads
//!   hgatp, and `service`s before each guest entry, in its idle loops and while it waits for a
//!   lock or an acknowledgement ([`service`]); its IPI is an HS supervisor software interrupt
//!   sent with SBI send_ipi ("IPI Extension"), which exits the guest (sie.SSIE).
//! - The guest's own IPIs and remote fences ([`twostage_rvh::smp::Mailbox`]): posted to the
//!   target vCPU's slot, then the same HS IPI; the target raises hvip.VSSIP or executes the
//!   HFENCE.VVMA/FENCE.I before its next entry; an RFENCE call returns once every target
//!   acknowledged.
//! - HSM ([`twostage_rvh::smp::Hsm`]): a stopped vCPU's hart waits in [`park`] (WFI with
//!   sie.SSIE, servicing) until a hart_start gives it an entry.
//!
//! - Devices ([`with_devices`]): one UART and one PLIC for the VM, behind one lock; the PLIC's S
//!   context of vCPU i (QEMU virt's context 2i+1) drives vCPU i's hvip.VSEIP. After each access
//!   the lock holder records every vCPU's PLIC output and sends an HS IPI to each other vCPU whose
//!   output changed; that vCPU applies it before its next entry ([`before_entry`]).
//! - Sstc: before the guest's device tree is written, [`probe_sstc`] starts each further hart
//!   once to set and read back its henvcfg.STCE (it stops itself again); the guest gets `sstc`
//!   only if every hart has it, and each hart sets STCE and vstimecmp = never for its vCPU.
//!
//! Nothing here spins on something another hart may hold without servicing: the shared space's
//! lock relaxes with `relax`, the device lock likewise, the RFENCE wait services its own slots.

use crate::hart::frames;
use crate::plic::Plic;
use crate::uart::Ns16550;
use crate::vm::{Exit, Vm};
use alloc::boxed::Box;
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use twostage_aspace::{AddressSpace, SharedAddressSpace};
use twostage_baremetal::elf::EXIT_GUEST_STOPPED;
use twostage_baremetal::frames::Frames;
use twostage_npt::{FrameAllocator, Sv39x4};
use twostage_rvh::csr::{cause, irq};
use twostage_rvh::hw;
use twostage_rvh::sbi::RemoteFence;
use twostage_rvh::shootdown::{HartOps, LocalFence, Shootdown};
use twostage_rvh::smp::{Hsm, Mailbox};

mod guest;
pub mod live;

/// The most vCPUs (and harts) of one VM.
pub const MAX_VCPUS: usize = crate::boot::MAX_VCPUS as usize;
/// The shared address space of an SMP VM.
pub type Shared = SharedAddressSpace<Sv39x4, &'static Frames>;
/// Each further hart's stack.
const STACK_FRAMES: usize = 32;

/// Per-hart counters for the run summary.
#[derive(Default)]
pub struct HartCounters {
    /// Guest exits.
    pub exits: AtomicU64,
    /// Guest IPIs this vCPU sent (per target).
    pub ipis_sent: AtomicU64,
    /// RFENCE calls this vCPU made.
    pub rfence_calls: AtomicU64,
}

/// What a VM's vCPUs share.
pub struct Machine {
    /// vCPUs.
    pub n: usize,
    /// The physical hart of each vCPU.
    pub hartids: [usize; MAX_VCPUS],
    /// G-stage shootdowns.
    pub shootdown: &'static Shootdown,
    /// HSM states.
    pub hsm: Hsm,
    /// Guest IPIs and remote fences.
    pub mail: Mailbox,
    /// The guest's memory.
    pub space: Shared,
    /// The UART and the PLIC, one of each for every vCPU.
    devices: SpinLock<(Ns16550, Plic)>,
    /// Each vCPU's PLIC S-context output as last computed under the device lock: its
    /// hvip.VSEIP from its next entry on.
    seip: [AtomicBool; MAX_VCPUS],
    /// Counters per vCPU.
    pub counters: [HartCounters; MAX_VCPUS],
    /// A live migration's shared state, and the VM's current VMID.
    pub live: live::Live,
    /// The guest's entry (vCPU 0) and device tree.
    entry: (u64, u64),
    /// A live migration asked for.
    op: crate::boot::LiveOp,
    /// A vCPU ended the run (the others stop entering the guest).
    ending: AtomicBool,
}

static MACHINE: AtomicPtr<Machine> = AtomicPtr::new(core::ptr::null_mut());

/// The running SMP VM, once [`run`] set it up.
pub fn machine() -> Option<&'static Machine> {
    let p = MACHINE.load(Ordering::Acquire);
    // SAFETY: set once in `run` from a leaked Box, never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

fn m() -> &'static Machine {
    machine().expect("SMP VM set up")
}

/// The calling hart's vCPU index (`tp`).
pub fn current() -> usize {
    let tp: usize;
    // SAFETY: reads a register.
    unsafe { asm!("mv {0}, tp", out(reg) tp, options(nomem, nostack)) };
    tp
}

/// An SBI call with a value result.
fn sbi(eid: u64, fid: u64, a0: u64, a1: u64, a2: u64) -> (i64, i64) {
    let (e, v): (i64, i64);
    // SAFETY: an ecall into OpenSBI with value arguments only.
    unsafe {
        asm!("ecall", inlateout("a0") a0 as i64 => e, inlateout("a1") a1 as i64 => v, in("a2") a2,
             in("a6") fid, in("a7") eid, options(nostack))
    };
    (e, v)
}

/// An HS supervisor software interrupt to physical hart `hartid` (SBI "IPI Extension").
fn ipi_hart(hartid: usize) {
    sbi(twostage_rvh::sbi::eid::IPI, 0, 1, hartid as u64, 0);
}

/// The machine side of the shootdown: SBI IPIs and HFENCE.GVMA.
struct Ops;

impl HartOps for Ops {
    fn send_ipi(&self, hart: usize) {
        ipi_hart(m().hartids[hart]);
    }
    fn fence_local(&self, _hart: usize, fence: LocalFence) {
        match fence {
            LocalFence::Gvma(f) => hw::hfence_gvma(f),
            LocalFence::AllVmids => hw::hfence_gvma_all(),
        }
    }
}

/// Everything other harts may wait for on `me`: shootdowns, then remote VS fences.
pub fn service(me: usize) {
    let mc = m();
    mc.shootdown.service(me, &Ops);
    mc.mail.service(me, hw::vs_fence);
}

/// What a hart does while it waits for a lock: service, then pause.
fn relax() {
    service(current());
    core::hint::spin_loop();
}

/// Before every guest entry on `me`: acknowledge the HS IPI, serve the requests, raise a guest
/// IPI as hvip.VSSIP.
pub fn before_entry(me: usize) {
    // SAFETY: clears this hart's own software-interrupt pending bit (sip.SSIP is writable in
    // S-mode, Privileged "Supervisor Interrupt Registers") before reading what it announced.
    unsafe { hw::sip::clear(1 << 1) };
    service(me);
    let mc = m();
    if mc.mail.take_ipi(me) {
        // SAFETY: raises the guest's virtual software interrupt (hvip.VSSIP).
        unsafe { hw::hvip::set(1 << irq::VSSI) };
    }
    mc.counters[me].exits.fetch_add(1, Ordering::Relaxed);
    apply_seip(me);
}

/// Sets or clears hvip.VSEIP on the calling hart, vCPU `me`'s, from the shared PLIC's output.
pub fn apply_seip(me: usize) {
    let bit = 1 << irq::VSEI;
    // SAFETY: hvip.VSEIP only raises or withdraws the guest's virtual external interrupt.
    unsafe {
        if m().seip[me].load(Ordering::Acquire) {
            hw::hvip::set(bit)
        } else {
            hw::hvip::clear(bit)
        }
    }
}

/// A spin lock whose waiters service their hart.
struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands `&mut T` to one hart at a time.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        while self.locked.swap(true, Ordering::Acquire) {
            relax();
        }
        // SAFETY: the flag is ours until the store below.
        let r = f(unsafe { &mut *self.value.get() });
        self.locked.store(false, Ordering::Release);
        r
    }
}

/// The shared UART and PLIC, locked while `f` runs on vCPU `me`'s hart; then the UART's line
/// goes into the PLIC, and each vCPU's S-context output into its VSEIP: `me`'s directly, each
/// other vCPU's whose output changed through an HS IPI (after the lock is released).
pub fn with_devices<R>(me: usize, f: impl FnOnce(&mut Ns16550, &mut Plic) -> R) -> R {
    let mc = m();
    let mut changed = [false; MAX_VCPUS];
    let r = mc.devices.with(|(uart, plic)| {
        let r = f(uart, plic);
        plic.set_level(crate::boot::UART_IRQ as usize, uart.irq());
        for (i, c) in changed.iter_mut().enumerate().take(mc.n) {
            let out = plic.s_output(i);
            *c = mc.seip[i].swap(out, Ordering::AcqRel) != out;
        }
        r
    });
    for (i, _) in changed.iter().enumerate().take(mc.n).filter(|&(i, &c)| c && i != me) {
        ipi_hart(mc.hartids[i]);
    }
    apply_seip(me);
    r
}

use guest::wait_until;
pub use guest::{calls, park, suspend};

extern "C" {
    fn hs_trap_entry();
    fn smp_secondary_entry();
    fn smp_probe_entry();
}

// A further hart's entry for the Sstc probe (no stack needed): sets henvcfg.STCE (0x60a, bit 63),
// stores 2 | STCE-read-back to the word at a1 (opaque), and stops itself (SBI HSM hart_stop).
global_asm!(
    ".section .text",
    ".globl smp_probe_entry",
    ".align 4",
    "smp_probe_entry:",
    "li t1, 1",
    "slli t1, t1, 63",
    "csrs 0x60a, t1",
    "csrr t0, 0x60a",
    "srli t0, t0, 63",
    "ori t0, t0, 2",
    "fence rw, rw",
    "sd t0, 0(a1)",
    "fence rw, rw",
    "li a7, 0x48534D",
    "li a6, 1",
    "ecall",
    "1: wfi",
    "j 1b",
);

/// Whether every hart an SMP VM of `n` vCPUs would run on (the boot hart `boot` and the ones
/// [`run`] will pick) lets its guest use Sstc: each further hart is started once at
/// `smp_probe_entry` and waited for until it stopped again. False if they cannot be found.
pub fn probe_sstc(n: usize, boot: usize) -> bool {
    static SLOTS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
    let slots = &SLOTS;
    if !crate::devices::sstc() {
        return false;
    }
    let Some(hartids) = find_harts(boot, n) else { return false };
    let mut all = true;
    for (i, &hartid) in hartids.iter().enumerate().take(n).skip(1) {
        let slot = &slots[i] as *const AtomicU64 as u64;
        let (e, _) = sbi(twostage_rvh::sbi::eid::HSM, 0, hartid as u64, smp_probe_entry as *const () as u64, slot);
        if e != 0 {
            return false;
        }
        // Its answer, then its return to STOPPED (so that `run` can start it again); no other
        // hart runs a guest yet, so nothing needs servicing.
        let mut stopped = false;
        for _ in 0..100_000_000u64 {
            if slots[i].load(Ordering::Acquire) != 0 {
                let (e, state) = sbi(twostage_rvh::sbi::eid::HSM, 2, hartid as u64, 0, 0);
                if e == 0 && state == twostage_rvh::sbi::hsm_state::STOPPED {
                    stopped = true;
                    break;
                }
            }
            core::hint::spin_loop();
        }
        all &= stopped && slots[i].load(Ordering::Acquire) == 3;
    }
    all
}

// A further hart's entry from SBI hart_start: a0 = hartid, a1 = opaque, which points at
// [stack top, vCPU index] (SBI "HSM": satp = 0, sstatus.SIE = 0 at the start).
global_asm!(
    ".section .text",
    ".globl smp_secondary_entry",
    ".align 4",
    "smp_secondary_entry:",
    "ld sp, 0(a1)",
    "ld tp, 8(a1)",
    "call {main}",
    "1: wfi",
    "j 1b",
    main = sym secondary_main,
);

/// The first Rust code of a further hart: its trap vector and FP state, then its vCPU.
extern "C" fn secondary_main(_hartid: usize, _opaque: usize) -> ! {
    // SAFETY: the HS trap vector (4-byte aligned direct mode) and the hypervisor's own FS field,
    // as the boot hart set them.
    unsafe {
        hw::stvec::write(hs_trap_entry as *const () as usize as u64);
        hw::sstatus::set(twostage_rvh::csr::sstatus::FS_INITIAL);
    }
    let me = current();
    let status = vcpu_main(me);
    finish(me, status)
}

/// Physical harts other than `boot` that OpenSBI holds stopped, for vCPUs 1..n.
fn find_harts(boot: usize, n: usize) -> Option<[usize; MAX_VCPUS]> {
    let mut ids = [boot; MAX_VCPUS];
    let mut k = 1;
    for id in (0..64).filter(|&id| id != boot) {
        if k == n {
            break;
        }
        let (e, state) = sbi(twostage_rvh::sbi::eid::HSM, 2, id as u64, 0, 0);
        if e == 0 && state == twostage_rvh::sbi::hsm_state::STOPPED {
            ids[k] = id;
            k += 1;
        }
    }
    (k == n).then_some(ids)
}

/// Runs `space` as an SMP VM of `n` vCPUs from `entry` with the device tree at `dtb`, on the
/// boot hart `boot` and `n - 1` others; returns the run's status (the first vCPU to end the
/// run ends it for all, through `finish`).
pub fn run(
    space: AddressSpace<Sv39x4, &'static Frames>,
    n: usize,
    boot: usize,
    entry: u64,
    dtb: u64,
    op: crate::boot::LiveOp,
) -> i32 {
    // SAFETY: vCPU 0 runs here: `tp` names it for `current` (the shared space's lock checks).
    unsafe { asm!("mv tp, zero", options(nomem, nostack)) };
    let Some(hartids) = find_harts(boot, n) else {
        println!("cannot run {n} vCPUs: fewer than {n} harts (QEMU -smp) are available");
        return 3;
    };
    let vmid = 1;
    let shootdown: &'static Shootdown = Box::leak(Box::new(Shootdown::new(n)));
    // Flushes are fenced under the VM's current VMID (a migration changes it).
    let inv = move |inv: &twostage_npt::GvmaInvalidation<'_>| {
        shootdown.request(current(), inv, m().live.vmid.load(Ordering::SeqCst), &Ops);
    };
    let shared = SharedAddressSpace::new(space, Box::new(inv), current).relax_with(relax);
    let mc = Box::leak(Box::new(Machine {
        n,
        hartids,
        shootdown,
        hsm: Hsm::new(n),
        mail: Mailbox::new(n),
        space: shared,
        devices: SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new((Ns16550::default(), Plic::new(n))),
        },
        seip: Default::default(),
        counters: Default::default(),
        live: live::Live::new(vmid),
        entry: (entry, dtb),
        op,
        ending: AtomicBool::new(false),
    }));
    MACHINE.store(mc, Ordering::Release);
    println!("SMP: {n} vCPUs on harts {:?}", &hartids[..n]);
    for (i, &hartid) in hartids.iter().enumerate().take(n).skip(1) {
        let stack = frames().allocate_frames(STACK_FRAMES, 1).expect("frames for a hart's stack");
        let top = stack.as_u64() + (STACK_FRAMES as u64) * 4096 - 16;
        // SAFETY: the last 16 bytes of the fresh stack hold [stack top, vCPU index] for the entry.
        unsafe { core::ptr::write(top as *mut [u64; 2], [top, i as u64]) };
        let (e, _) = sbi(twostage_rvh::sbi::eid::HSM, 0, hartid as u64, smp_secondary_entry as *const () as u64, top);
        if e != 0 {
            println!("SBI hart_start of hart {hartid} failed: {e}");
            return 3;
        }
    }
    let status = vcpu_main(0);
    finish(0, status)
}

/// One vCPU's life on its hart; the status it ended the run with.
fn vcpu_main(me: usize) -> i32 {
    let mc = m();
    // This hart's henvcfg.STCE and vstimecmp = never (the guest's tree says sstc only if every
    // hart had it in `probe_sstc`).
    if !crate::devices::sstc_here() && crate::devices::sstc() {
        println!("hart {}: no Sstc (henvcfg.STCE reads 0)", mc.hartids[me]);
    }
    let vmid = mc.live.vmid.load(Ordering::SeqCst);
    let mut vm = Vm::with_shared(&mc.space, vmid, me);
    vm.uart.input = me == 0;
    vm.hedeleg = twostage_rvh::reflect::HEDELEG;
    vm.reflect_exceptions = true;
    // SAFETY: a fresh VS context on this hart: Bare vsatp, FS = Initial, nothing pending; sie.SSIE
    // so that HS IPIs exit the guest and end a WFI.
    unsafe {
        hw::vsatp::write(0);
        hw::vsstatus::write(twostage_rvh::csr::sstatus::FS_INITIAL);
        hw::hvip::write(0);
        hw::sie::set(1 << 1);
    }
    hw::hfence_vvma_all();
    mc.shootdown.enter(me, vmid, &Ops);
    if me == 0 {
        vm.regs.gpr[10] = 0;
        vm.regs.gpr[11] = mc.entry.1;
        vm.pc = mc.entry.0;
    } else {
        park(&mut vm, me);
    }
    mc.live.set_vmid_of(me, vmid);
    let mut migrating = live::Migrating::No;
    if let (0, crate::boot::LiveOp::Migrate { after }) = (me, mc.op) {
        vm.pause_at_user_exit = Some(after.min(u64::from(u32::MAX)) as u32);
    }
    let status = loop {
        if mc.ending.load(Ordering::Relaxed) {
            loop {
                wait_until(me, || false);
            }
        }
        match vm.run() {
            Exit::Reset(r) => {
                println!(
                    "\nguest reset on vCPU {me}: type {} reason {:#x} -> exit status {}",
                    r.reset_type,
                    r.reason,
                    r.exit_status()
                );
                break i32::from(r.exit_status());
            }
            Exit::Budget if me == 0 => live::step(&mut vm, &mut migrating),
            Exit::Test { .. } | Exit::Budget => {}
            Exit::Fault(f, t) => {
                println!("\nguest stopped: unresolved guest-page fault {:?} at pc {:#x} on vCPU {me}", f.info, t.sepc);
                break i32::from(EXIT_GUEST_STOPPED);
            }
            Exit::Exception(t) => {
                println!("\nguest stopped: {} at pc {:#x} on vCPU {me}", cause::name(t.scause), t.sepc);
                break i32::from(EXIT_GUEST_STOPPED);
            }
        }
    };
    live::ended(migrating);
    vm.print_stats(&alloc::format!("guest file, vCPU {me}"));
    status
}

/// Ends the run for every vCPU with `status`, after the per-hart summary.
fn finish(me: usize, status: i32) -> ! {
    let mc = m();
    if !mc.ending.swap(true, Ordering::AcqRel) {
        print_harts(mc);
        (crate::board().exit)(status);
    }
    loop {
        wait_until(me, || false);
    }
}

/// The per-hart figures of the run summary.
fn print_harts(mc: &Machine) {
    println!("== per hart (vCPU: physical hart)");
    for i in 0..mc.n {
        let sd = mc.shootdown.stats(i);
        let mail = mc.mail.stats(i);
        let c = &mc.counters[i];
        println!(
            "vCPU {i} (hart {}): exits={} shootdowns requested={} local-only={} harts asked={} acknowledged={} gvma fences={}; guest IPIs sent={} received={}; RFENCE calls={} requests served={} (of {})",
            mc.hartids[i],
            c.exits.load(Ordering::Relaxed),
            sd.requested,
            sd.local,
            sd.targeted,
            sd.acknowledged,
            sd.fences,
            c.ipis_sent.load(Ordering::Relaxed),
            mail.ipis,
            c.rfence_calls.load(Ordering::Relaxed),
            mail.fences_served,
            mail.fence_requests,
        );
    }
}
