//! Live migration of a running one-vCPU VM into a new VM on the same host (`cargo xtask run
//! --migrate`), by pre-copy over the address space's dirty log
//! ([`twostage_aspace::migrate::Migration`]).
//!
//! At its pause point (the guest's `after`-th exit from user space) VM A starts logging and a
//! destination space appears; the first round copies every populated page, then the guest runs
//! a slice ([`SLICE_MS`]) between rounds, each copying what the guest dirtied since the last
//! harvest, until a harvest finds fewer than [`SMALL_ROUND`] pages or [`MAX_ROUNDS`] rounds ran.
//! Then A stays stopped between two entries: the final copy (the pages still owed and a last
//! harvest's), its vCPU and device state ([`crate::state`]) go into VM B, which has its own
//! VMID; A is released (its frames go back: the free counts are printed) and the guest runs on
//! in B to its end. Each round's flush of A is carried out before the guest runs on, as the
//! protocol asks. Any failure abandons the migration and the guest runs on in A.

use crate::hart::{frames, hart};
use crate::loader::{drive, Ended};
use crate::vm::{Space, Vm};
use alloc::string::String;
use alloc::vec::Vec;
use twostage_aspace::migrate::{MigrateError, Migration};
use twostage_rvh::hw;

/// The destination's VMID (the source's is 1).
const DST_VMID: u16 = 2;
/// A harvest with fewer dirty pages than this ends the pre-copy rounds.
pub const SMALL_ROUND: u64 = 64;
/// Pre-copy rounds at most, however much the guest keeps dirtying.
pub const MAX_ROUNDS: u32 = 8;
/// How long the guest runs between two rounds (host time).
pub const SLICE_MS: u64 = 20;

/// The source's space.
fn src(vm: &mut Vm) -> &mut Space {
    vm.space_mut().expect("the loader's VM has an address space")
}

/// Runs `vm` (A) to its pause point after `after` exits from user space, migrates it into a new
/// VM while it runs, and runs the guest to its end there; returns the guest's status.
pub fn run(mut vm: Vm, after: u32) -> i32 {
    vm.pause_at_user_exit = Some(after);
    if let Ended::Status(s) = drive(&mut vm, "", false) {
        println!("migration: the guest ended before its exit number {after} from user space: nothing was migrated");
        vm.print_stats("guest file");
        return s;
    }
    let free_before = frames().free();
    let (mut mig, mut dst, flush) = match Migration::start(src(&mut vm), frames()) {
        Ok(started) => started,
        Err(e) => {
            crate::note!("migration: cannot start ({e}); the guest runs on in VM 1");
            return run_on(vm);
        }
    };
    vm.apply_space(flush);
    crate::note!("migration: VM 1 -> VM {DST_VMID} from its exit {} from user space", vm.stats.user_exits);
    let mut pages = Vec::new();
    let slice = u64::from(hart().timebase) * SLICE_MS / 1000;
    loop {
        // A slice of the guest, then a round: the copy of what the last harvest found (all
        // populated pages the first time) and a harvest of what the slice dirtied.
        vm.watchdog = Some(hw::rdtime() + slice);
        match drive(&mut vm, "", true) {
            Ended::Budget => {}
            Ended::Status(s) => {
                println!("migration: the guest ended during round {}: abandoned", mig.rounds());
                match mig.abandon(src(&mut vm)) {
                    Ok(flush) => vm.apply_space(flush),
                    Err(e) => println!("migration: abandoning failed: {e}"),
                }
                vm.print_stats("guest file");
                return s;
            }
            Ended::Paused => unreachable!("the pause point fired once"),
        }
        match mig.round(src(&mut vm), &mut dst) {
            Ok((round, flush)) => {
                vm.apply_space(flush);
                pages.push(round.pages);
                if round.dirty < SMALL_ROUND || mig.rounds() >= MAX_ROUNDS {
                    break;
                }
            }
            Err(e) => return abandon(vm, mig, e),
        }
    }
    vm.watchdog = None;
    // A is stopped between two entries: the final copy, then the vCPU and the devices.
    let paused_at = hw::rdtime();
    let (last, flush) = match mig.finish(src(&mut vm), &mut dst) {
        Ok(done) => done,
        Err(MigrateError::Unfinished { cause, migration }) => return abandon(vm, *migration, *cause),
        Err(e) => {
            // finish hands the migration back in `Unfinished` on every failure.
            crate::note!("migration: final copy failed: {e}; the guest runs on in VM 1");
            return run_on(vm);
        }
    };
    vm.apply_space(flush);
    let state = vm.capture();
    let mut b = Vm::with_space(dst, DST_VMID);
    // SAFETY: B's space holds every page of A's as of A's stop, where `state` was captured.
    unsafe { b.restore(&state) };
    let downtime_us = (hw::rdtime() - paused_at) * 1_000_000 / u64::from(hart().timebase).max(1);
    let total: u64 = pages.iter().sum::<u64>() + last.pages;
    let each: String = pages.iter().map(|p| alloc::format!(" {p}")).collect();
    crate::note!(
        "migration: rounds={} pages={total} final={} (round pages:{each}; guest stopped for {downtime_us} us)",
        pages.len(),
        last.pages
    );
    let mut report = String::new();
    let _ = vm.write_stats(&mut report, "migration source, VM 1");
    crate::note!("{}", report.trim_end());
    let (p4, p2, p1) = vm.leaves_by_size();
    let held = p4 + 512 * p2 + 512 * 512 * p1 + vm.table().table_frames();
    let free_both = frames().free();
    // A's release: its table (hgatp is B's again at B's first entry) and every frame.
    drop(vm);
    crate::note!(
        "migration: free frames {free_before} before, {free_both} with both copies, {} after VM 1 (holding {held} frames) was released",
        frames().free()
    );
    run_on(b)
}

/// Gives the migration up after `e` and runs the guest on in A.
fn abandon(mut vm: Vm, mig: Migration, e: MigrateError) -> i32 {
    crate::note!("migration: {e}: abandoned, the guest runs on in VM 1");
    match mig.abandon(src(&mut vm)) {
        Ok(flush) => vm.apply_space(flush),
        Err(e) => crate::note!("migration: abandoning failed too: {e}"),
    }
    vm.watchdog = None;
    run_on(vm)
}

/// Runs the guest in `vm` to its end; its status.
fn run_on(mut vm: Vm) -> i32 {
    let status = match drive(&mut vm, "", false) {
        Ended::Status(s) => s,
        Ended::Paused | Ended::Budget => unreachable!("no pause point and no slices left"),
    };
    vm.print_stats(if vm.vmid == DST_VMID { "guest file, migrated, VM 2" } else { "guest file" });
    status
}
