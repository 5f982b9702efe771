//! twostage-riscv-hv: a bare-metal H-extension hypervisor for QEMU `virt`, running guests on twostage.
//!
//! This image is wiring only: [`boot`] (entry from OpenSBI, the exit device, the heap, the panic
//! handler), then boot-time setup (frames and hart probing, `twostage_hv_riscv::hart`), then
//! either the guest file QEMU's loader device staged (`twostage_hv_riscv::loader`) or the
//! scenario suite (`twostage_scenarios_riscv`). The runtime (VM, trap path, loader, console)
//! is `twostage-hv-riscv`.
//!
//! Built only for `riscv64gc-unknown-none-elf`; on any other target this is an empty program so
//! that `cargo clippy --workspace` on the host still builds.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![warn(missing_docs)]

#[cfg(all(target_arch = "riscv64", target_os = "none"))]
mod boot;

/// Frames and probes, then the staged guest or the suite; the run's exit status.
#[cfg(all(target_arch = "riscv64", target_os = "none"))]
fn run(hartid: usize, dtb: usize) -> i32 {
    use twostage_hv_riscv::hart::{self, Boot};
    match hart::start(hartid, dtb) {
        Boot::Stop(code) => code,
        Boot::Staged(base, len) => twostage_hv_riscv::loader::run_staged(base, len),
        Boot::Suite => twostage_scenarios_riscv::run() as i32,
    }
}

/// Host builds: nothing to run.
#[cfg(not(target_os = "none"))]
fn main() {}
