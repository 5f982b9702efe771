//! twostage-riscv-hv: a bare-metal H-extension hypervisor for QEMU `virt`, running guests on twostage.
//!
//! Key pieces: [`boot`] (entry from OpenSBI, console, exit, heap), [`trap`] (the HS-mode trap
//! vector with exception-table recovery, and the VS-mode entry/exit path), [`vm`] (one guest:
//! its Sv39x4 table from the twostage engine, the run loop and its statistics), [`guest`] (the
//! bundled VS-mode test guest), [`scenarios`] (the suite) and [`loader`] (running a guest file
//! staged by QEMU's loader device).
//!
//! Safety model: the hypervisor runs in HS-mode with satp = Bare on one hart, so host-physical
//! addresses are usable as pointers; frames come from [`twostage_baremetal::frames::Frames`]
//! over the RAM the device tree reports, minus the image, the device tree and the staged guest.
//! Everything a guest controls reaches this code as a value to check, never as a pointer to trust.
//!
//! Built only for `riscv64gc-unknown-none-elf`; on any other target this is an empty program so
//! that `cargo clippy --workspace` on the host still builds.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![warn(missing_docs)]

#[cfg(all(target_arch = "riscv64", target_os = "none"))]
extern crate alloc;

#[cfg(all(target_arch = "riscv64", target_os = "none"))]
#[macro_use]
mod boot;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod guest;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod loader;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod scenarios;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod scenarios2;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod scenarios3;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod trap;
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod vm;

/// Host builds: nothing to run.
#[cfg(not(target_os = "none"))]
fn main() {}
