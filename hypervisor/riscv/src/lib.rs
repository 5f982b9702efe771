//! twostage-hv-riscv: the RISC-V hypervisor runtime of the QEMU `virt` image.
//!
//! Key pieces: [`console`] (the SBI console with `print!`/`println!`, the SBI timer), [`hart`]
//! (boot-time setup: frames from the device tree, hart probing of the H extension, hgatp modes
//! and G-stage A/D updating), [`trap`] (the HS-mode trap vector with exception-table recovery,
//! and the VS-mode entry/exit path), [`vm`] (one guest: its Sv39x4 table or address space, the
//! vCPU state and run loop, device emulation), [`stats`] (what the run loop counted), [`uart`]
//! (the ns16550 device model), [`plic`] (the platform-level interrupt controller model),
//! [`loader`] (running a guest file staged by QEMU's loader device), [`state`] (a vCPU's and its
//! devices' whole state, captured and restored), [`vmfork`] (fork of a running VM) and
//! [`smp::live`] (live migration into a new address space, on the SMP machine), whose reports
//! wait for the guest's console line to end ([`notes`]). The image (`images/riscv-hv`) boots,
//! hands over a [`Board`], and runs either the loader or the scenario suite
//! (`twostage-scenarios-riscv`).
//!
//! Safety model: the hypervisor runs in HS-mode with satp = Bare on one hart, so host-physical
//! addresses are usable as pointers; frames come from [`twostage_baremetal::frames::Frames`]
//! over the RAM the device tree reports, minus the image, the device tree and the staged guest.
//! Everything a guest controls reaches this code as a value to check, never as a pointer to trust.
//!
//! Everything but [`uart`], [`plic`] and [`boot`] builds for `riscv64gc-unknown-none-elf` only; on
//! any other target the crate holds those plain models alone, so that host builds of the workspace
//! still compile.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

#[cfg(all(target_arch = "riscv64", target_os = "none"))]
#[macro_use]
pub mod console;
pub mod boot;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod devices;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod exits;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod hart;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod loader;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod notes;
pub mod plic;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod smp;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod state;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod stats;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod trap;
pub mod uart;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod vcpu;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod vm;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod vmfork;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod walk;

/// What the image provides to the runtime: how to end the run and the heap's figures (the
/// image owns the exit device and the global heap).
#[derive(Clone, Copy, Debug)]
pub struct Board {
    /// Ends the machine's run with an exit status (a fatal HS-mode trap ends it with 102).
    pub exit: fn(i32) -> !,
    /// The global heap's figures, for the statistics.
    pub heap_stats: fn() -> twostage_baremetal::heap::HeapStats,
}

#[cfg(all(target_arch = "riscv64", target_os = "none"))]
static BOARD: core::sync::atomic::AtomicPtr<Board> = core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// The board [`trap::init`] was given.
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub fn board() -> &'static Board {
    let p = BOARD.load(core::sync::atomic::Ordering::Acquire);
    assert!(!p.is_null(), "trap::init hands the board over first");
    // SAFETY: set in `trap::init` from a `&'static Board` and never written through.
    unsafe { &*p }
}
