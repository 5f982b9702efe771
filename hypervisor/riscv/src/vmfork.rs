//! Fork of a running one-vCPU VM (`cargo xtask run --fork`): at its pause point (the guest's
//! `after`-th exit from user space) VM A is stopped between two entries, its address space is
//! forked copy-on-write ([`twostage_aspace::AddressSpace::fork`]) and its vCPU and device state
//! captured ([`crate::state`]); VM B, with its own VMID, gets the child space and that state and
//! runs to its end with every console line prefixed `[child] `; then A's VS CSRs go back into
//! the hart and A runs to its end. The run's status is A's.
//!
//! Both VMs run on the same hart one after the other, so only one vCPU's worth of hart state
//! is live at a time: the state A left in the hart is saved before B's is loaded.

use crate::hart::frames;
use crate::loader::{drive, Ended};
use crate::vm::{Space, Vm};
use twostage_aspace::SpaceFlush;
use twostage_npt::{GuestPhysAddr, HostPhysAddr};

/// The child's VMID (the parent's is 1).
const CHILD_VMID: u16 = 2;

/// Frames `space` maps that another space maps as well (reference count above one), counted in
/// 4 KiB frames (a shared 2 MiB leaf counts 512).
pub fn shared_frames(space: &Space) -> u64 {
    let refs = space.frame_refs();
    let mut n = 0;
    space.table().for_each_leaf(GuestPhysAddr::ZERO, 1 << 41, |l| {
        let frames = l.size.bytes() / 4096;
        n += (0..frames).filter(|i| refs.count(HostPhysAddr::new(l.hpa.as_u64() + i * 4096)) > 1).count() as u64;
    });
    n
}

/// The frames a space holds: the data frames its leaves map (4 KiB each) and its table frames.
fn held_frames(space: &Space) -> u64 {
    let mut n = space.table().table_frames() as u64;
    space.table().for_each_leaf(GuestPhysAddr::ZERO, 1 << 41, |l| n += l.size.bytes() / 4096);
    n
}

/// Copy-on-write breaks the space resolved (copies and reuses of a last reference).
fn cow_breaks(space: &Space) -> u64 {
    let s = space.stats();
    s.cow_copies + s.cow_reuses
}

/// Runs `vm` (A) to its pause point after `after` exits from user space, forks it, runs the
/// child to its end, then A to its end; returns A's status.
pub fn run(mut vm: Vm, after: u32) -> i32 {
    vm.pause_at_user_exit = Some(after);
    if let Ended::Status(s) = drive(&mut vm, "") {
        println!("fork: the guest ended before its exit number {after} from user space: nothing was forked");
        vm.print_stats("guest file");
        return s;
    }
    let state = vm.capture();
    let space = vm.space_mut().expect("the loader's VM has an address space");
    // Every frame must come back once both VMs are gone: what was free plus what A held.
    let at_fork = (frames().free() as u64, held_frames(space));
    let child = match space.fork() {
        Ok((child, flush)) => {
            vm.apply_space(flush);
            Some(child)
        }
        Err(e) => {
            crate::note!("fork failed: {e}; the parent runs on alone");
            // The partial fork's invalidations are pending in the parent's space.
            vm.apply_space(SpaceFlush::none());
            None
        }
    };
    let Some(child) = child else {
        return finish_parent(vm, &state, None, at_fork);
    };
    // A line the guest began before the fork is the child's to end: unprefixed, with the fork's
    // note after it.
    let line_start = crate::notes::at_line_start();
    crate::note!(
        "fork: VM 1 forked at its exit {} from user space (pc {:#x}) into VM {CHILD_VMID}: {} frames shared, {} frames free",
        vm.stats.user_exits,
        state.pc,
        shared_frames(&child),
        frames().free()
    );
    let mut b = Vm::with_space(child, CHILD_VMID);
    b.uart.prefix = Some("[child] ");
    b.uart.line_start = line_start;
    // SAFETY: B's space is a copy-on-write fork of A's taken with A stopped where `state` was
    // captured.
    unsafe { b.restore(&state) };
    let child_status = match drive(&mut b, "child: ") {
        Ended::Status(s) => s,
        Ended::Paused => unreachable!("the child has no pause point"),
    };
    println!("fork: the child (VM {CHILD_VMID}) ended with status {child_status}; the parent (VM 1) resumes");
    b.print_stats("fork child, VM 2");
    finish_parent(vm, &state, Some(b), at_fork)
}

/// Resumes A from `state` and runs it to its end; then the fork's summary and the child's
/// release. A's status.
fn finish_parent(mut vm: Vm, state: &crate::state::VmState, child: Option<Vm>, at_fork: (u64, u64)) -> i32 {
    // SAFETY: A's own state, captured from A at its pause point; A's space is the one it ran in.
    unsafe { vm.restore(state) };
    let status = match drive(&mut vm, "") {
        Ended::Status(s) => s,
        Ended::Paused => unreachable!("the pause point fired once"),
    };
    vm.print_stats("guest file, fork parent, VM 1");
    if let Some(b) = child {
        let (pa, ch) = (vm.space().expect("a space"), b.space().expect("a space"));
        println!(
            "fork: copy-on-write breaks: parent {} child {}; frames still shared at the end: {}",
            cow_breaks(pa),
            cow_breaks(ch),
            shared_frames(pa)
        );
        let free = frames().free();
        drop(b);
        // Frames only the child mapped come back now, except those of a 2 MiB run whose other
        // frames the parent still maps (a run goes back whole, with its last frame).
        println!("fork: the child released: free frames {free} -> {}", frames().free());
    }
    let (free, held) = at_fork;
    drop(vm);
    println!(
        "fork: both VMs released: free frames {} (at the fork: {free} free, VM 1 holding {held})",
        frames().free()
    );
    status
}
