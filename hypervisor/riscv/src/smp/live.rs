//! Live migration of a running VM into a new address space under a new VMID on the same host
//! (`cargo xtask run --migrate [--smp N]`; every migration runs on the SMP machine, one vCPU
//! included), by pre-copy over the address space's dirty log
//! ([`twostage_aspace::migrate::Migration`]): the first round copies every populated page, then
//! the guest runs slices ([`SLICE_MS`]) between rounds, each copying what the guest dirtied since
//! the last harvest, until a harvest finds fewer than [`SMALL_ROUND`] pages or [`MAX_ROUNDS`]
//! rounds ran; then the guest stops for the final copy.
//!
//! vCPU 0 drives it. At its pause point it starts the migration under the shared space's write
//! lock; the other vCPUs keep running. Between two slices of vCPU 0's guest, a round copies
//! under the write lock, and its flush of the source reaches every hart through the VM's
//! shootdown (the space's invalidator). When a harvest is small or the round limit is hit:
//!
//! 1. Rendezvous: vCPU 0 sets the pause flag and sends every other hart an HS IPI. Each vCPU
//!    checks the flag at its next service point before an entry ([`at_entry`]), marks itself
//!    arrived and waits there, servicing (shootdowns, remote fences) and in WFI; a vCPU that is
//!    stopped or suspended (HSM) is out of the guest already and counts as idle. vCPU 0 waits,
//!    servicing, until every other vCPU has arrived or is idle.
//! 2. With every vCPU out of the guest: the final copy, then the destination space takes the
//!    source's place inside the shared space (a swap under the write lock), and the VM's VMID
//!    becomes the destination's.
//! 3. Switch: each vCPU waiting at the rendezvous leaves the old VMID on its hart (HFENCE.GVMA
//!    of it), loads the new hgatp and enters the new VMID ([`twostage_rvh::shootdown`]'s
//!    `leave`/`enter`); vCPU 0 waits until all of them have, drops the source space (its frames
//!    go back, counted with no guest running), and only then lets every vCPU run on. An idle
//!    vCPU switches when it next runs; its hart does not use the old hgatp meanwhile (V=0, no
//!    HLV/HSV).
//!
//! The vCPUs stay on their harts and the devices are the machine's: the vCPU state (registers,
//! VS CSRs, timers) and the device state stay where they are (a fork, [`crate::vmfork`], is
//! where they are copied); what moves is the guest's memory, into a new table under a new VMID.

use super::{m, wait_until, Ops, Shared};
use crate::hart::{frames, hart};
use crate::vm::{Space, Vm};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use twostage_aspace::migrate::{MigrateError, Migration, Round};
use twostage_aspace::SpaceFlush;
use twostage_npt::{Hgatp, HgatpMode};
use twostage_rvh::hw;

/// The destination's VMID (the source's is 1).
const DST_VMID: u16 = 2;
/// A harvest with fewer dirty pages than this ends the pre-copy rounds.
pub const SMALL_ROUND: u64 = 64;
/// Pre-copy rounds at most, however much the guest keeps dirtying.
pub const MAX_ROUNDS: u32 = 8;
/// How long vCPU 0's guest runs between two rounds (host time).
pub const SLICE_MS: u64 = 20;

/// What the vCPUs share about a migration.
pub struct Live {
    /// vCPU 0 asks every vCPU to stay out of the guest.
    pause: AtomicBool,
    /// vCPU i waits at the rendezvous.
    arrived: [AtomicBool; super::MAX_VCPUS],
    /// vCPU i is stopped or suspended (HSM): out of the guest, and passes [`at_entry`] before
    /// it enters again.
    idle: [AtomicBool; super::MAX_VCPUS],
    /// The VMID vCPU i's hart runs the guest under.
    on_vmid: [AtomicU16; super::MAX_VCPUS],
    /// The VM's VMID: its space's flushes are fenced under it, each vCPU switches to it.
    pub vmid: AtomicU16,
}

impl Live {
    /// No migration yet, VMID `vmid`.
    pub fn new(vmid: u16) -> Self {
        Self {
            pause: AtomicBool::new(false),
            arrived: Default::default(),
            idle: Default::default(),
            on_vmid: [const { AtomicU16::new(0) }; super::MAX_VCPUS],
            vmid: AtomicU16::new(vmid),
        }
    }

    /// Records the VMID vCPU `me`'s hart entered first.
    pub fn set_vmid_of(&self, me: usize, vmid: u16) {
        self.on_vmid[me].store(vmid, Ordering::SeqCst);
    }

    /// Marks vCPU `me` stopped or suspended (or running again).
    pub fn set_idle(&self, me: usize, idle: bool) {
        self.idle[me].store(idle, Ordering::SeqCst);
    }
}

/// Before each entry of an SMP vCPU: waits out a rendezvous (switching to the destination
/// there as soon as vCPU 0 swapped it in), then switches the hart to the VM's current VMID and
/// table if it changed.
pub fn at_entry(vm: &mut Vm, me: usize) {
    let live = &m().live;
    if me != 0 && live.pause.load(Ordering::SeqCst) {
        live.arrived[me].store(true, Ordering::SeqCst);
        super::ipi_hart(m().hartids[0]);
        loop {
            let mine = vm.vmid;
            wait_until(me, || !live.pause.load(Ordering::SeqCst) || live.vmid.load(Ordering::SeqCst) != mine);
            let vmid = live.vmid.load(Ordering::SeqCst);
            if vm.vmid != vmid {
                switch(vm, me, vmid);
            }
            if !live.pause.load(Ordering::SeqCst) || m().ending.load(Ordering::Relaxed) {
                break;
            }
        }
        live.arrived[me].store(false, Ordering::SeqCst);
    }
    let vmid = live.vmid.load(Ordering::SeqCst);
    if vm.vmid != vmid {
        switch(vm, me, vmid);
    }
}

/// Moves vCPU `me`'s hart from its VMID to `vmid` and the shared space's current table.
fn switch(vm: &mut Vm, me: usize, vmid: u16) {
    let mc = m();
    mc.shootdown.leave(me, vm.vmid, &Ops);
    let root = mc.space.with(|s| s.root());
    vm.hgatp = Hgatp::new(HgatpMode::Sv39x4, vmid, root, &hart().caps).expect("Sv39x4 with this VMID is offered");
    vm.vmid = vmid;
    // SAFETY: the VM's current table under its current VMID; `enter` fences that VMID here
    // before the hart may hold anything of it.
    unsafe { hw::hgatp::write(vm.hgatp.bits()) };
    mc.shootdown.enter(me, vmid, &Ops);
    mc.live.on_vmid[me].store(vmid, Ordering::SeqCst);
    if me != 0 {
        // vCPU 0 may wait for this switch.
        super::ipi_hart(mc.hartids[0]);
    }
}

/// vCPU 0's migration, advanced at each of its budget exits.
pub enum Migrating {
    /// Not started (waiting for the pause point), or over.
    No,
    /// Copying while the guest runs.
    Rounds {
        /// The migration.
        mig: Migration,
        /// The destination space.
        dst: Box<Space>,
        /// Pages of each round so far.
        pages: Vec<u64>,
        /// Free frames before the start.
        free_before: usize,
    },
}

/// Runs `f` on the source under the shared space's write lock; its flush goes to every hart.
fn on_src<R>(
    space: &Shared,
    f: impl FnOnce(&mut Space) -> Result<(R, SpaceFlush<twostage_npt::Sv39x4>), MigrateError>,
) -> Result<R, MigrateError> {
    space.with_mut(|s| match f(s) {
        Ok((r, flush)) => (Ok(r), flush),
        Err(e) => (Err(e), SpaceFlush::none()),
    })
}

/// The slice vCPU 0's guest runs before the next round.
fn next_slice(vm: &mut Vm) {
    vm.watchdog = Some(hw::rdtime() + u64::from(hart().timebase) * SLICE_MS / 1000);
}

/// Called on vCPU 0 at each budget exit: starts the migration at the pause point, does a round
/// after each slice, and ends it when a round was small or the limit was reached.
pub fn step(vm: &mut Vm, state: &mut Migrating) {
    let mc = m();
    match core::mem::replace(state, Migrating::No) {
        Migrating::No if vm.paused => {
            vm.paused = false;
            let free_before = frames().free();
            match mc.space.with_mut(|s| match Migration::start(s, frames()) {
                Ok((mig, dst, flush)) => (Ok((mig, Box::new(dst))), flush),
                Err(e) => (Err(e), SpaceFlush::none()),
            }) {
                Ok((mig, dst)) => {
                    crate::note!(
                        "migration: VM 1 -> VM {DST_VMID} ({} vCPUs) from vCPU 0's exit {} from user space",
                        mc.n,
                        vm.stats.user_exits
                    );
                    *state = Migrating::Rounds { mig, dst, pages: Vec::new(), free_before };
                    next_slice(vm);
                }
                Err(e) => crate::note!("migration: cannot start ({e}); the guest runs on in VM 1"),
            }
        }
        Migrating::No => {}
        Migrating::Rounds { mut mig, mut dst, mut pages, free_before } => {
            if vm.watchdog.is_some() {
                // An exit budget ran out before the slice did: the slice goes on.
                *state = Migrating::Rounds { mig, dst, pages, free_before };
                return;
            }
            match on_src(&mc.space, |s| mig.round(s, &mut dst)) {
                Ok(round) => {
                    pages.push(round.pages);
                    if round.dirty < SMALL_ROUND || mig.rounds() >= MAX_ROUNDS {
                        finish(vm, mig, dst, pages, free_before);
                    } else {
                        *state = Migrating::Rounds { mig, dst, pages, free_before };
                        next_slice(vm);
                    }
                }
                Err(e) => abandon(mig, e),
            }
        }
    }
}

/// Gives the migration up; the guest runs on in VM 1.
fn abandon(mig: Migration, e: MigrateError) {
    crate::note!("migration: {e}: abandoned, the guest runs on in VM 1");
    if let Err(e) = on_src(&m().space, |s| mig.abandon(s).map(|f| ((), f))) {
        crate::note!("migration: abandoning failed too: {e}");
    }
}

/// The guest ended during the migration: gives it up.
pub fn ended(state: Migrating) {
    if let Migrating::Rounds { mig, .. } = state {
        println!("migration: the guest ended during the rounds: abandoned");
        if let Err(e) = on_src(&m().space, |s| mig.abandon(s).map(|f| ((), f))) {
            println!("migration: abandoning failed: {e}");
        }
    }
}

/// Ends a rendezvous without a switch: every vCPU goes back into the guest.
fn release() {
    let mc = m();
    mc.live.pause.store(false, Ordering::SeqCst);
    (1..mc.n).for_each(|i| super::ipi_hart(mc.hartids[i]));
}

/// The rendezvous, the final copy, the switch to the destination and the source's release.
fn finish(vm: &mut Vm, mig: Migration, mut dst: Box<Space>, pages: Vec<u64>, free_before: usize) {
    let mc = m();
    let live = &mc.live;
    let paused_at = hw::rdtime();
    live.pause.store(true, Ordering::SeqCst);
    for i in 1..mc.n {
        super::ipi_hart(mc.hartids[i]);
    }
    let all_out = || (1..mc.n).all(|i| live.arrived[i].load(Ordering::SeqCst) || live.idle[i].load(Ordering::SeqCst));
    wait_until(0, all_out);
    let all_out_at = hw::rdtime();
    let last: Round = match on_src(&mc.space, |s| mig.finish(s, &mut dst)) {
        Ok(r) => r,
        Err(MigrateError::Unfinished { cause, migration }) => {
            release();
            return abandon(*migration, *cause);
        }
        Err(e) => {
            release();
            crate::note!("migration: final copy failed: {e}; the guest runs on in VM 1");
            return;
        }
    };
    // The destination takes the source's place; `dst` is the source from here on.
    mc.space.with_mut(|s| {
        core::mem::swap(s, &mut *dst);
        ((), SpaceFlush::none())
    });
    live.vmid.store(DST_VMID, Ordering::SeqCst);
    switch(vm, 0, DST_VMID);
    // The vCPUs waiting at the rendezvous switch there; the source goes once they all have, with
    // no guest running (so the free count says exactly what its release gave back). An idle
    // vCPU switches when it next runs; its hart does not use the old hgatp meanwhile.
    let waiting: Vec<usize> = (1..mc.n).filter(|&i| live.arrived[i].load(Ordering::SeqCst)).collect();
    waiting.iter().for_each(|&i| super::ipi_hart(mc.hartids[i]));
    wait_until(0, || waiting.iter().all(|&i| live.on_vmid[i].load(Ordering::SeqCst) == DST_VMID));
    let held = {
        let (mut data, t) = (0usize, dst.table().table_frames());
        dst.table()
            .for_each_leaf(twostage_npt::GuestPhysAddr::ZERO, 1 << 41, |l| data += (l.size.bytes() / 4096) as usize);
        data + t
    };
    let free_both = frames().free();
    drop(dst);
    let free_after = frames().free();
    release();
    let us = |t: u64| t * 1_000_000 / u64::from(hart().timebase).max(1);
    let (downtime_us, rendezvous_us) = (us(hw::rdtime() - paused_at), us(all_out_at - paused_at));
    let total: u64 = pages.iter().sum::<u64>() + last.pages;
    let each: alloc::string::String = pages.iter().map(|p| alloc::format!(" {p}")).collect();
    crate::note!(
        "migration: rounds={} pages={total} final={} (round pages:{each}; guest stopped for {downtime_us} us on {} vCPUs, {rendezvous_us} us of it to stop them all)",
        pages.len(),
        last.pages,
        mc.n
    );
    crate::note!(
        "migration: free frames {free_before} before, {free_both} with both copies, {free_after} after VM 1 (holding {held} frames) was released"
    );
}
