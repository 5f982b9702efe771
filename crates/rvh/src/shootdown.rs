//! Remote G-stage shootdown: carrying one VM's G-stage invalidation out on every hart that may
//! hold its translations, and waiting until they all have, before the change counts as done.
//!
//! # Why
//!
//! An HFENCE.GVMA orders and invalidates only the address-translation cache of the hart that
//! executes it (RISC-V Privileged, "Hypervisor Memory-Management Fence Instructions": the fence
//! is the G-stage counterpart of SFENCE.VMA, whose commentary in "Supervisor Memory-Management
//! Fence Instruction" says that to make a page-table change visible to other harts, the hart
//! that made it must have them execute the fence, typically with an interprocessor interrupt).
//! All of a VM's vCPUs share one G-stage table and one VMID, and each vCPU runs on its own
//! physical hart, so a change to the table (copy-on-write break, dirty harvest, unmap, protect,
//! collapse) must be fenced on every hart that may have cached a translation for that VMID
//! before the change is reported done and before a frame it unmapped or a table it unlinked is
//! released.
//!
//! # What needs other harts, and what does not
//!
//! A hart may cache G-stage entries whose V bit is clear, and keep them until it fences
//! (RISC-V Privileged, "Virtual Address Translation Process": "This specification permits the
//! caching of PTEs whose V (Valid) bit is clear"); a guest-page fault removes nothing. But all
//! a hart does with a stale invalid entry, or with a cached leaf that lacks a right or an A/D
//! bit the table now has, is take a guest-page fault. So the engine's tokens say which kind of
//! change they carry ([`GvmaInvalidation`]):
//!
//! - `Local`: only widened: invalid entries became valid (a fault filled a page, a table was
//!   linked), a leaf gained rights or A/D bits on the same frame, or a stale fault. [`Shootdown::request`] fences the requesting
//!   hart and asks no one else. Another hart that cached the old invalid entry faults on it;
//!   the hypervisor finds the entry valid and allowing the access and resolves the fault as
//!   stale (`PageTable::stale_fault_flush`), itself a `Local` fence of the whole VMID on that
//!   hart. Its guest never sees the fault, nor a wrong translation. Frames and table pages are
//!   never released by a `Local` fence (nothing was unmapped).
//! - `Addresses` / `All`: a valid entry was redirected or narrowed (copy-on-write break, dirty
//!   harvest, unmap, protect, remap, split, collapse): another hart may translate through the
//!   old entry without faulting, so every hart that may hold the VM's translations fences before
//!   the change counts as done: the protocol below.
//!
//! This is what a Linux kernel does for its own page tables on RISC-V (a new mapping is fenced
//! locally, a spurious fault on another hart fences that hart), and it differs from KVM's
//! G-stage handling, which sends every new mapping to all harts. The Svvptc extension would
//! bound how long a hart keeps an invalid entry; it is not needed here.
//!
//! # The protocol
//!
//! One [`Shootdown`] per VM, with one slot per physical hart. Each slot holds:
//!
//! - a "may hold translations" flag. [`Shootdown::enter`] sets it before the hart first runs
//!   the VM (loads its hgatp) and, when it was clear, fences the VMID on the hart;
//!   [`Shootdown::leave`] fences the VMID on the hart after the hart stopped using the VM's
//!   hgatp, then clears it. A hart whose flag is clear has never entered the VM or has fenced
//!   the whole VMID since leaving it: it holds nothing of the VM and is not asked.
//! - a mailbox: up to [`MAILBOX_SLOTS`] pending addresses (each tagged with its VMID), one
//!   pending whole-VMID fence, and a flag for "fence every VMID" (only set when requests for two
//!   different VMIDs meet in one mailbox). A request that does not fit is widened: addresses
//!   become the whole VMID, two VMIDs become every VMID. Widening is always correct; it only
//!   costs refills.
//! - two generation counters: `requested`, raised by every requester after it posted to the
//!   mailbox, and `acked`, written only by the hart itself once it has fenced everything that
//!   was posted up to that generation.
//!
//! [`Shootdown::request`], run by the hart that changed the table (`from`), with the change's
//! invalidation:
//!
//! 1. a sequentially consistent fence: the table writes are ordered before the reads of the
//!    other harts' flags and before the posts;
//! 2. for every other hart whose flag is set: post the invalidation to its mailbox, raise its
//!    `requested` generation (remembering the value it raised it to), send it an IPI;
//! 3. fence locally (if `from` itself may hold translations);
//! 4. wait until every target's `acked` has reached the remembered generation, servicing its
//!    own mailbox meanwhile and re-sending an IPI now and then.
//!
//! [`Shootdown::service`], run by a hart in its IPI handler, in its idle loop and before
//! entering the guest: read `requested`, drain the mailbox, execute the fences, store that
//! generation into `acked`; repeat while `requested` moved on.
//!
//! # Ordering
//!
//! - Table write before request: the engine writes entries with atomics before it returns the
//!   flush token; step 1's `fence(SeqCst)` (a `fence rw,rw` on RISC-V) orders them before
//!   everything the request does.
//! - Post before generation: a requester posts with read-modify-writes (a compare-exchange
//!   even when its entry is already there) and raises `requested` with a `fetch_add` after
//!   them; the target loads `requested` with Acquire before it drains. All writers of a
//!   counter use read-modify-writes, so the target's load synchronizes with every requester
//!   whose increment it sees (release sequence): their table writes and posts happen before
//!   its drain, and its fences come after its drain.
//! - Fence before acknowledgement: `acked` is stored with Release after the fences have been
//!   executed, and the requester loads it with Acquire: whatever the requester does after
//!   the wait (free a frame, reuse it, report the change done) comes after the target's fence.
//!   The target runs no guest instruction between the fence and the acknowledgement that could
//!   use a stale translation: the fence is in its program order before the return to the guest.
//! - The skip is safe: a requester reads a hart's flag after the fence of step 1; `enter`
//!   sets the flag with a sequentially consistent swap followed by `fence(SeqCst)` before the
//!   hart loads hgatp. Either the requester sees the flag set (and asks the hart), or the
//!   hart's walks come after the table write, and `enter` executed HFENCE.GVMA for the VMID
//!   when the flag was clear, which orders the stores already visible to the hart before its
//!   implicit G-stage reads ("Hypervisor Memory-Management Fence Instructions").
//!
//! # Progress
//!
//! - A target running the guest takes the IPI as a supervisor software interrupt in HS-mode
//!   (interrupts for HS-mode are always enabled while V = 1: "Trap Cause Codes" / the
//!   sstatus.SIE rules for lower privilege modes), services, and returns to the guest.
//! - A target idle in the hypervisor services in its loop (or takes the IPI with interrupts
//!   enabled around `wfi`).
//! - Two harts requesting at once do not deadlock: each services its own mailbox on every
//!   iteration of its wait. The same holds for any other wait: **a hart must never spin on
//!   something another hart may hold while requesting (the lock of a `SharedAddressSpace`)
//!   without servicing** — wait with interrupts enabled, or call `service` in the wait loop.
//! - A lost or early IPI (one that arrives before the posts are visible to the target) costs a
//!   delay, not a hang: the requester re-sends every [`RESEND_SPINS`] iterations.
//! - `service` is re-entrant on one hart: an IPI taken while the hart is already servicing
//!   returns at once, and the outer pass re-checks the generation before it returns.
//!
//! # Using it
//!
//! The image implements [`HartOps`] (SBI `sbi_send_ipi` or an IMSIC write for `send_ipi`,
//! [`crate::hw::hfence_gvma`] / [`crate::hw::hfence_gvma_all`] for `fence_local`) and then:
//!
//! - before the first entry of a VM on a hart: [`Shootdown::enter`]; after switching the hart
//!   to another VM: [`Shootdown::leave`];
//! - in the supervisor-software-interrupt handler, in the idle loop and before each entry:
//!   [`Shootdown::service`];
//! - for every flush of the VM's table: [`Shootdown::request`] as the invalidation closure:
//!   `space.flush(token, sd.invalidate_from(hart, vmid, &ops))`, or [`invalidator`] as a
//!   `SharedAddressSpace`'s stored invalidator. `PageTable::flush` and `AddressSpace::flush`
//!   free retired tables and release data frames only after the closure returns, and the
//!   closure returns only after every target acknowledged: "no frame is released before every
//!   hart fenced" holds by construction.
//!
//! Counters per hart ([`HartStats`]) say how many shootdowns a hart started, how many harts it
//! asked, how many requests it acknowledged and how many fences it executed.

use crate::fence::{plan_gvma, GvmaFence};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ops::Deref;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use twostage_npt::{GuestPhysAddr, GvmaInvalidation, FLUSH_ADDRESS_SLOTS};

/// Pending addresses one hart's mailbox holds before a request is widened to its whole VMID.
pub const MAILBOX_SLOTS: usize = FLUSH_ADDRESS_SLOTS;

/// How many iterations of its wait a requester spins before it sends a target's IPI again.
pub const RESEND_SPINS: u64 = 1 << 16;

/// One fence a hart executes on itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalFence {
    /// HFENCE.GVMA by address and VMID, or by VMID ([`GvmaFence`]).
    Gvma(GvmaFence),
    /// HFENCE.GVMA x0, x0: every VMID. Only when requests for two VMIDs met in one mailbox.
    AllVmids,
}

/// What the protocol needs from the machine. On hardware: an IPI through SBI (or the IMSIC) and
/// HFENCE.GVMA; in tests: threads, queues and model TLBs.
pub trait HartOps {
    /// Interrupts `hart` so that it runs [`Shootdown::service`] soon (SBI IPI extension,
    /// `sbi_send_ipi`). Sending it to a hart that needs nothing is harmless.
    fn send_ipi(&self, hart: usize);
    /// Executes `fence` on the calling hart, which is `hart` (given so that a test can model
    /// several harts with one object; hardware ignores it).
    fn fence_local(&self, hart: usize, fence: LocalFence);
    /// One iteration of a wait (`core::hint::spin_loop` by default; a test may yield or run
    /// other modelled harts).
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// Counters of one hart, for a run summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HartStats {
    /// Shootdowns this hart started (requests that other harts had to carry out too).
    pub requested: u64,
    /// Changes this hart made that needed only its own fence ([`GvmaInvalidation::Local`]:
    /// fills, new tables, A/D bits set, stale faults).
    pub local: u64,
    /// Other harts it asked (sum over its shootdowns).
    pub targeted: u64,
    /// Other harts it did not ask because they could not hold translations of the VM.
    pub skipped: u64,
    /// IPIs it sent (resends included).
    pub ipis: u64,
    /// Requests from other harts it acknowledged.
    pub acknowledged: u64,
    /// Fences it executed on itself (HFENCE.GVMA instructions).
    pub fences: u64,
}

impl HartStats {
    fn add(mut self, o: HartStats) -> HartStats {
        self.requested += o.requested;
        self.local += o.local;
        self.targeted += o.targeted;
        self.skipped += o.skipped;
        self.ipis += o.ipis;
        self.acknowledged += o.acknowledged;
        self.fences += o.fences;
        self
    }
}

/// Mailbox entry for an address: bit 63 set, VMID in bits 62:47, GPA >> 12 in bits 46:0 (GPAs
/// are below 2^59, the widest G-stage GPA: Sv57x4; a wider one would widen to the VMID). A
/// fence by any address inside the leaf's page covers the leaf, so the page offset is dropped.
fn encode(gpa: GuestPhysAddr, vmid: u16) -> Option<u64> {
    let page = gpa.as_u64() >> 12;
    (page >> 47 == 0).then_some(1 << 63 | (vmid as u64) << 47 | page)
}

fn decode(e: u64) -> (GuestPhysAddr, u16) {
    (GuestPhysAddr::new((e & ((1 << 47) - 1)) << 12), (e >> 47) as u16)
}

#[derive(Default)]
struct Hart {
    may_hold: AtomicBool,
    servicing: AtomicBool,
    requested_gen: AtomicU64,
    acked_gen: AtomicU64,
    every_vmid: AtomicBool,
    /// 0, or the VMID + 1 to fence whole.
    whole: AtomicU32,
    addrs: [AtomicU64; MAILBOX_SLOTS],
    c_requested: AtomicU64,
    c_local: AtomicU64,
    c_targeted: AtomicU64,
    c_skipped: AtomicU64,
    c_ipis: AtomicU64,
    c_acknowledged: AtomicU64,
    c_fences: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Hart {
    /// Puts `value` into `slot` if it is empty, or touches it if it already holds `value` (a
    /// read-modify-write either way, so the drain that takes it synchronizes with us).
    fn claim(slot: &AtomicU64, value: u64) -> bool {
        loop {
            match slot.compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(cur) if cur == value => {
                    if slot.compare_exchange(value, value, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                        return true;
                    }
                    // Drained meanwhile: try again on the now empty slot.
                }
                Err(_) => return false,
            }
        }
    }

    fn post_whole(&self, vmid: u16) {
        let want = vmid as u32 + 1;
        loop {
            match self.whole.compare_exchange(0, want, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(cur) if cur == want => {
                    if self.whole.compare_exchange(want, want, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                        return;
                    }
                }
                Err(_) => {
                    // Another VMID is pending: fence them all.
                    self.every_vmid.swap(true, Ordering::AcqRel);
                    return;
                }
            }
        }
    }

    fn post(&self, inv: &GvmaInvalidation<'_>, vmid: u16) {
        match inv {
            // Never posted: `request` carries a local invalidation out on its own hart.
            GvmaInvalidation::None | GvmaInvalidation::Local { .. } => {}
            GvmaInvalidation::All { .. } => self.post_whole(vmid),
            GvmaInvalidation::Addresses { addrs, .. } => {
                for &gpa in addrs.iter() {
                    let posted = encode(gpa, vmid).is_some_and(|e| self.addrs.iter().any(|s| Hart::claim(s, e)));
                    if !posted {
                        self.post_whole(vmid);
                        return;
                    }
                }
            }
        }
    }
}

/// The shootdown state of one VM: one slot per physical hart. See the [module docs](self).
pub struct Shootdown {
    harts: Box<[Hart]>,
}

impl core::fmt::Debug for Shootdown {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut l = f.debug_list();
        for h in 0..self.harts.len() {
            l.entry(&(h, self.may_hold(h), self.stats(h)));
        }
        l.finish()
    }
}

impl Shootdown {
    /// State for a VM on a machine of `harts` harts (numbered 0..harts, as the image numbers
    /// them: hart IDs or a dense index), none of which has entered the VM yet.
    pub fn new(harts: usize) -> Self {
        Self { harts: (0..harts).map(|_| Hart::default()).collect() }
    }

    /// Number of hart slots.
    pub fn harts(&self) -> usize {
        self.harts.len()
    }

    /// Whether `hart` may hold translations of the VM (entered it and has not fenced it whole
    /// since leaving).
    pub fn may_hold(&self, hart: usize) -> bool {
        self.harts[hart].may_hold.load(Ordering::SeqCst)
    }

    /// The counters of `hart`.
    pub fn stats(&self, hart: usize) -> HartStats {
        let h = &self.harts[hart];
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HartStats {
            requested: r(&h.c_requested),
            local: r(&h.c_local),
            targeted: r(&h.c_targeted),
            skipped: r(&h.c_skipped),
            ipis: r(&h.c_ipis),
            acknowledged: r(&h.c_acknowledged),
            fences: r(&h.c_fences),
        }
    }

    /// The counters of every hart added up.
    pub fn total(&self) -> HartStats {
        (0..self.harts.len()).map(|h| self.stats(h)).fold(HartStats::default(), HartStats::add)
    }

    fn fence_on(&self, hart: usize, f: LocalFence, ops: &impl HartOps) {
        ops.fence_local(hart, f);
        bump(&self.harts[hart].c_fences, 1);
    }

    /// Call on `hart` before it first runs the VM under `vmid` (before writing hgatp and
    /// entering the guest), and after every [`Shootdown::leave`]. Marks the hart as one that
    /// may hold translations; when it was not marked, fences the VMID on the hart, so that
    /// table changes made while it was not asked are visible to its walks. Then services the
    /// hart's mailbox.
    pub fn enter(&self, hart: usize, vmid: u16, ops: &impl HartOps) {
        let was = self.harts[hart].may_hold.swap(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !was {
            self.fence_on(hart, LocalFence::Gvma(GvmaFence::Vmid { vmid }), ops);
        }
        self.service(hart, ops);
    }

    /// Call on `hart` once it no longer uses the VM's hgatp (switched to another VM, or to
    /// Bare): fences the VMID on the hart, then marks it as holding nothing, so that later
    /// requests skip it. Then services its mailbox (requests that raced with the leave). The
    /// hart must keep servicing IPIs for this VM: a requester may still have seen the mark.
    pub fn leave(&self, hart: usize, vmid: u16, ops: &impl HartOps) {
        self.fence_on(hart, LocalFence::Gvma(GvmaFence::Vmid { vmid }), ops);
        self.harts[hart].may_hold.store(false, Ordering::SeqCst);
        self.service(hart, ops);
    }

    /// Carries out `inv` (a change to the VM's G-stage table, running under `vmid`) on every
    /// hart that may hold translations of the VM, from `from`, the calling hart; returns once
    /// all of them have fenced. Returns how many other harts were asked. A
    /// [`GvmaInvalidation::Local`] is fenced on `from` alone (see the [module docs](self)).
    ///
    /// Call it after the table change (the engine's flush token is only handed out after the
    /// entries were written), as the invalidation closure of `PageTable::flush` or
    /// `AddressSpace::flush` (see [`Shootdown::invalidate_from`]), so that nothing is freed
    /// before it returns. It never blocks without servicing `from`'s own mailbox.
    pub fn request(&self, from: usize, inv: &GvmaInvalidation<'_>, vmid: u16, ops: &impl HartOps) -> usize {
        if matches!(inv, GvmaInvalidation::None) {
            return 0;
        }
        let me = &self.harts[from];
        if let GvmaInvalidation::Local { .. } = inv {
            // Only widened: this hart fences; another that cached an old (invalid or narrower)
            // entry faults on it, and that stale fault is resolved with its own local fence.
            bump(&me.c_local, 1);
            if me.may_hold.load(Ordering::SeqCst) {
                plan_gvma(inv, vmid, |f| self.fence_on(from, LocalFence::Gvma(f), ops));
            }
            return 0;
        }
        // 1. The table writes before the flags and the posts.
        fence(Ordering::SeqCst);
        bump(&me.c_requested, 1);

        // 2. Post, raise, interrupt.
        let mut waits: Vec<(usize, u64)> = Vec::new();
        for (t, h) in self.harts.iter().enumerate() {
            if t == from {
                continue;
            }
            if !h.may_hold.load(Ordering::SeqCst) {
                bump(&me.c_skipped, 1);
                continue;
            }
            h.post(inv, vmid);
            let g = h.requested_gen.fetch_add(1, Ordering::SeqCst) + 1;
            waits.push((t, g));
            ops.send_ipi(t);
        }
        bump(&me.c_targeted, waits.len() as u64);
        bump(&me.c_ipis, waits.len() as u64);

        // 3. Our own fence, while the others run theirs.
        if me.may_hold.load(Ordering::SeqCst) {
            plan_gvma(inv, vmid, |f| self.fence_on(from, LocalFence::Gvma(f), ops));
        }

        // 4. Wait for every acknowledgement, serving our own mailbox meanwhile.
        for &(t, g) in &waits {
            let mut spins = 0u64;
            while self.harts[t].acked_gen.load(Ordering::Acquire) < g {
                self.service(from, ops);
                ops.relax();
                spins += 1;
                if spins == RESEND_SPINS {
                    spins = 0;
                    ops.send_ipi(t);
                    bump(&me.c_ipis, 1);
                }
            }
        }
        waits.len()
    }

    /// Performs the fences posted to `hart` and acknowledges them. Run it on `hart` itself: in
    /// its IPI (supervisor software interrupt) handler, in its idle loop and before every
    /// entry into the guest. Cheap when nothing is pending (two loads). Returns how many
    /// requests it acknowledged.
    pub fn service(&self, hart: usize, ops: &impl HartOps) -> u64 {
        let h = &self.harts[hart];
        let mut acked = 0;
        loop {
            if h.requested_gen.load(Ordering::Acquire) == h.acked_gen.load(Ordering::Relaxed) {
                return acked;
            }
            if h.servicing.swap(true, Ordering::Acquire) {
                // Interrupted an outer pass on this hart: it re-checks before returning.
                return acked;
            }
            loop {
                let g = h.requested_gen.load(Ordering::Acquire);
                let done = h.acked_gen.load(Ordering::Relaxed);
                if g == done {
                    break;
                }
                self.drain(hart, ops);
                h.acked_gen.store(g, Ordering::Release);
                bump(&h.c_acknowledged, g - done);
                acked += g - done;
            }
            h.servicing.store(false, Ordering::Release);
        }
    }

    fn drain(&self, hart: usize, ops: &impl HartOps) {
        let h = &self.harts[hart];
        let every = h.every_vmid.swap(false, Ordering::AcqRel);
        let whole = h.whole.swap(0, Ordering::AcqRel);
        let mut addrs = [0u64; MAILBOX_SLOTS];
        for (a, slot) in addrs.iter_mut().zip(&h.addrs) {
            *a = slot.swap(0, Ordering::AcqRel);
        }
        if every {
            self.fence_on(hart, LocalFence::AllVmids, ops);
            return;
        }
        let whole_vmid = whole.checked_sub(1).map(|v| v as u16);
        if let Some(vmid) = whole_vmid {
            self.fence_on(hart, LocalFence::Gvma(GvmaFence::Vmid { vmid }), ops);
        }
        for &e in addrs.iter().filter(|&&e| e != 0) {
            let (gpa, vmid) = decode(e);
            if whole_vmid != Some(vmid) {
                self.fence_on(hart, LocalFence::Gvma(GvmaFence::Address { gpa, vmid }), ops);
            }
        }
    }

    /// The invalidation closure for a flush made on `hart`: hand it to `PageTable::flush` or
    /// `AddressSpace::flush` (`space.flush(token, sd.invalidate_from(hart, vmid, &ops))`).
    pub fn invalidate_from<'s, O: HartOps>(
        &'s self,
        hart: usize,
        vmid: u16,
        ops: &'s O,
    ) -> impl for<'a> Fn(&GvmaInvalidation<'a>) + 's {
        move |inv| {
            self.request(hart, inv, vmid, ops);
        }
    }
}

/// A stored invalidator (the shape `SharedAddressSpace` keeps: `Box::new(invalidator(...))`),
/// for flushes made on whichever hart holds the space's lock: `current_hart` says which (the
/// image reads it from `tp` or `sscratch`).
pub fn invalidator<S, O, H>(
    shootdown: S,
    vmid: u16,
    ops: O,
    current_hart: H,
) -> impl for<'a> Fn(&GvmaInvalidation<'a>) + Send + Sync
where
    S: Deref<Target = Shootdown> + Send + Sync,
    O: HartOps + Send + Sync,
    H: Fn() -> usize + Send + Sync,
{
    move |inv| {
        shootdown.request(current_hart(), inv, vmid, &ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;
    use twostage_npt::HostPhysAddr;

    /// Harts modelled in one thread: IPIs are queued and delivered when a waiter relaxes.
    #[derive(Default)]
    struct Log {
        ipis: RefCell<Vec<usize>>,
        fences: RefCell<Vec<(usize, LocalFence)>>,
        sd: Option<&'static Shootdown>,
    }

    impl HartOps for Log {
        fn send_ipi(&self, hart: usize) {
            self.ipis.borrow_mut().push(hart);
        }
        fn fence_local(&self, hart: usize, fence: LocalFence) {
            self.fences.borrow_mut().push((hart, fence));
        }
        fn relax(&self) {
            let pending = core::mem::take(&mut *self.ipis.borrow_mut());
            for h in pending {
                self.sd.unwrap().service(h, self);
            }
        }
    }

    const ROOT: HostPhysAddr = HostPhysAddr::new(0x8040_0000);

    fn leak(sd: Shootdown) -> &'static Shootdown {
        alloc::boxed::Box::leak(alloc::boxed::Box::new(sd))
    }

    #[test]
    fn encoding_round_trips_for_every_gpa_and_vmid() {
        let g = GuestPhysAddr::new((1 << 59) - 4096);
        assert_eq!(decode(encode(g, 0xffff).unwrap()), (g, 0xffff));
        assert_eq!(decode(encode(GuestPhysAddr::new(0x8000_1234), 3).unwrap()), (GuestPhysAddr::new(0x8000_1000), 3));
        assert_eq!(GuestPhysAddr::BITS, 59, "every GPA fits the 47-bit page field");
    }

    #[test]
    fn harts_that_never_entered_are_skipped_and_the_others_fence_by_address() {
        let sd = leak(Shootdown::new(4));
        let ops = Log { sd: Some(sd), ..Default::default() };
        sd.enter(0, 5, &ops);
        sd.enter(2, 5, &ops);
        let vmid5 = LocalFence::Gvma(GvmaFence::Vmid { vmid: 5 });
        assert_eq!(*ops.fences.borrow(), [(0, vmid5), (2, vmid5)], "entering fences the VMID once");
        sd.enter(2, 5, &ops);
        assert_eq!(ops.fences.borrow().len(), 2, "entering again needs no fence");
        ops.fences.borrow_mut().clear();
        let addrs = [GuestPhysAddr::new(0x8000_0000), GuestPhysAddr::new(0x8020_0000)];
        let asked = sd.request(0, &GvmaInvalidation::Addresses { root: ROOT, addrs: &addrs }, 5, &ops);
        assert_eq!(asked, 1, "only hart 2 entered besides the requester");
        let f = ops.fences.borrow();
        for h in [0, 2] {
            let mine: Vec<_> = f.iter().filter(|x| x.0 == h).map(|x| x.1).collect();
            assert_eq!(mine, addrs.map(|gpa| LocalFence::Gvma(GvmaFence::Address { gpa, vmid: 5 })));
        }
        assert!(f.iter().all(|x| x.0 == 0 || x.0 == 2));
        let s = sd.total();
        assert_eq!((s.requested, s.targeted, s.skipped, s.acknowledged), (1, 1, 2, 1));
    }

    #[test]
    fn a_hart_that_left_is_skipped_until_it_enters_again() {
        let sd = leak(Shootdown::new(2));
        let ops = Log { sd: Some(sd), ..Default::default() };
        sd.enter(0, 1, &ops);
        sd.enter(1, 1, &ops);
        sd.leave(1, 1, &ops);
        assert!(!sd.may_hold(1));
        assert_eq!(sd.request(0, &GvmaInvalidation::All { root: ROOT }, 1, &ops), 0);
        sd.enter(1, 1, &ops);
        assert_eq!(sd.request(0, &GvmaInvalidation::All { root: ROOT }, 1, &ops), 1);
        assert_eq!(sd.request(0, &GvmaInvalidation::None, 1, &ops), 0);
        assert_eq!(sd.stats(0).requested, 2);
    }

    #[test]
    fn a_local_invalidation_fences_the_requester_only() {
        let sd = leak(Shootdown::new(3));
        let ops = Log { sd: Some(sd), ..Default::default() };
        (0..3).for_each(|h| sd.enter(h, 4, &ops));
        ops.fences.borrow_mut().clear();
        let addrs = [GuestPhysAddr::new(0x8000_3000)];
        let local = GvmaInvalidation::Local { root: ROOT, addrs: Some(&addrs) };
        assert_eq!(sd.request(1, &local, 4, &ops), 0, "no other hart is asked");
        assert!(ops.ipis.borrow().is_empty());
        let gpa = addrs[0];
        assert_eq!(*ops.fences.borrow(), [(1, LocalFence::Gvma(GvmaFence::Address { gpa, vmid: 4 }))]);
        ops.fences.borrow_mut().clear();
        sd.request(2, &GvmaInvalidation::Local { root: ROOT, addrs: None }, 4, &ops);
        assert_eq!(*ops.fences.borrow(), [(2, LocalFence::Gvma(GvmaFence::Vmid { vmid: 4 }))]);
        let s = sd.total();
        assert_eq!((s.requested, s.local, s.targeted, s.ipis), (0, 2, 0, 0));
    }

    #[test]
    fn full_mailboxes_widen_to_the_vmid_and_two_vmids_to_every_vmid() {
        let sd = Shootdown::new(2);
        let ops = Log::default();
        sd.enter(1, 1, &ops);
        ops.fences.borrow_mut().clear();
        let many: Vec<_> = (0..MAILBOX_SLOTS as u64 + 1).map(|i| GuestPhysAddr::new(0x8000_0000 + i * 4096)).collect();
        // Post without waiting (the mailbox as a requester leaves it), then service.
        sd.harts[1].post(&GvmaInvalidation::Addresses { root: ROOT, addrs: &many }, 1);
        sd.harts[1].requested_gen.fetch_add(1, Ordering::SeqCst);
        assert_eq!(sd.service(1, &ops), 1);
        assert_eq!(*ops.fences.borrow(), [(1, LocalFence::Gvma(GvmaFence::Vmid { vmid: 1 }))]);
        ops.fences.borrow_mut().clear();
        sd.harts[1].post(&GvmaInvalidation::All { root: ROOT }, 1);
        sd.harts[1].post(&GvmaInvalidation::All { root: ROOT }, 2);
        sd.harts[1].requested_gen.fetch_add(2, Ordering::SeqCst);
        assert_eq!(sd.service(1, &ops), 2);
        assert_eq!(*ops.fences.borrow(), [(1, LocalFence::AllVmids)]);
        assert_eq!(sd.service(1, &ops), 0, "nothing pending");
    }
}
