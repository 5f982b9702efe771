//! twostage-scenarios-riscv: the RISC-V scenario suite, run by the QEMU image on the shared
//! harness (`twostage-harness`).
//!
//! Each topic module holds its scenarios and exports them as `SCENARIOS` (a name, the
//! capabilities it needs, a body): [`paging`] (capabilities, demand-zero, huge pages, remap,
//! wide formats), [`faults`] (permission faults, recovered hlv/hsv/hlvx faults, an implicit
//! VS-stage walk fault), [`guest_access`] (GPA and GVA copies, instruction fetch), [`dirty`]
//! (dirty logs, A/D bits), [`cow`] (copy-on-write and fork), [`mmio`] (the UART, the virtual
//! timer) and [`hostile`] (hostile and random guests). [`guest`] is the bundled VS-mode test
//! guest. [`Machine`] is the platform: what the hart offers decides, through each scenario's
//! [`Need`]s, which run and which are skipped (with the reason). [`run`] runs them all, then
//! checks that every frame came back.
//!
//! Built for `riscv64gc-unknown-none-elf` only; on any other target the crate is empty.
#![no_std]
#![warn(missing_docs)]
#![cfg(all(target_arch = "riscv64", target_os = "none"))]

extern crate alloc;

pub mod cow;
pub mod dirty;
pub mod faults;
pub mod guest;
pub mod guest_access;
pub mod hostile;
pub mod mmio;
pub mod paging;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use guest::{Routine, HC_DONE};
use twostage_aspace::GuestMemory;
use twostage_harness::{ensure, Pass, Platform, Scenario, Verdict};
use twostage_hv_riscv::hart::{frames, hart, HartInfo};
use twostage_hv_riscv::trap::ExitCsrs;
use twostage_hv_riscv::vm::{Exit, Vm};
use twostage_npt::{GpaRange, GuestPhysAddr, MappingFlags, PageSize};
use twostage_rvh::fault::GuestPageFault;
use twostage_rvh::probe::GStageAd;
use twostage_rvh::{csr::cause, hw};

/// The result of a check inside a scenario body: `Err` says what did not hold.
pub type Check = Result<(), String>;

/// What a scenario needs of the hart beyond the H extension, so that one the hart cannot run
/// is skipped with the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The hart sets G-stage A/D bits itself.
    HardwareAd,
    /// hgatp offers Sv48x4 or Sv57x4 (or both).
    WideGStage,
}

/// The machine the suite runs on: the probed hart, and the frames free when the suite began.
pub struct Machine {
    /// What the hart offers.
    pub hart: HartInfo,
    /// Free host frames before the first scenario.
    pub free_at_start: usize,
}

impl Platform for Machine {
    type Need = Need;

    fn lacks(&self, need: Need) -> Option<String> {
        match need {
            Need::HardwareAd if self.hart.ad != GStageAd::Hardware => {
                Some("this hart does not update G-stage A/D bits (no Svadu, or menvcfg.ADUE = 0)".to_string())
            }
            Need::WideGStage if !(self.hart.caps.sv48x4 || self.hart.caps.sv57x4) => {
                Some("hgatp offers neither Sv48x4 nor Sv57x4 on this hart".to_string())
            }
            Need::HardwareAd | Need::WideGStage => None,
        }
    }
}

/// Every topic's scenarios, in the order they run.
const TOPICS: &[&[Scenario<Machine>]] = &[
    paging::SCENARIOS,
    faults::SCENARIOS,
    cow::SCENARIOS,
    mmio::SCENARIOS,
    guest_access::SCENARIOS,
    dirty::SCENARIOS,
    hostile::SCENARIOS,
];

/// Runs every scenario, then checks that every frame came back; the exit status (0 when
/// nothing failed).
pub fn run() -> u32 {
    let mut machine = Machine { hart: hart(), free_at_start: frames().free() };
    let mut all: Vec<Scenario<Machine>> = TOPICS
        .iter()
        .flat_map(|topic| topic.iter())
        .map(|s| Scenario { name: s.name, needs: s.needs, body: s.body })
        .collect();
    all.push(Scenario::new("every frame returned", every_frame_returned));
    let tally = twostage_harness::run(&mut machine, &all, &mut twostage_hv_riscv::console::Console);
    tally.exit_status()
}

/// The last scenario: each VM frees its frames and tables on drop; the suite's own allocations
/// are gone too.
fn every_frame_returned(m: &mut Machine) -> Verdict {
    let free_before = m.free_at_start;
    let leaked = frames().in_use();
    ensure!(
        frames().free() == free_before,
        "{} frames not returned ({} in use)",
        free_before - frames().free(),
        leaked
    );
    Ok(Pass::Plain)
}

/// Guest-physical address of the test guest's code.
pub const CODE: u64 = 0x8000_0000;
/// The test guest's demand-zero RAM.
pub const RAM_LEN: u64 = 64 << 20;

/// Shorthand for a guest-physical address.
pub fn gpa(v: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(v)
}

/// A VM with the test guest's code at [`CODE`] and demand-zero RAM behind it.
pub fn test_vm(vmid: u16) -> Result<Vm, String> {
    let mut vm = Vm::new(vmid);
    vm.demand_zero = GpaRange::from_start_len(gpa(CODE), RAM_LEN);
    vm.uart.echo = false;
    vm.uart.record = true;
    let blob = guest::blob();
    let len = (blob.len() as u64).next_multiple_of(4096);
    vm.map_new(gpa(CODE), len, MappingFlags::RWX, PageSize::Size4K).map_err(String::from)?;
    vm.phys().write(gpa(CODE), blob).map_err(|e| format!("loading the guest: {e}"))?;
    fresh_vs_context(&vm);
    Ok(vm)
}

/// Loads `vm`'s hgatp and gives it a fresh VS context: Bare vsatp, no pending virtual interrupt.
pub fn fresh_vs_context(vm: &Vm) {
    // SAFETY: hgatp is this VM's (so HFENCE.VVMA drops the VS-stage entries of its VMID); the VS
    // CSRs only affect the guest.
    unsafe {
        hw::hgatp::write(vm.hgatp.bits());
        hw::hfence_gvma_all();
        hw::vsatp::write(0);
        hw::vsstatus::write(0);
        hw::hvip::write(0);
    }
    hw::hfence_vvma_all();
}

/// Enters routine `r` with `args` in a0.. and runs until an exit the VM does not handle.
pub fn call(vm: &mut Vm, r: Routine, args: &[u64]) -> Exit {
    vm.regs.gpr[10..10 + args.len()].copy_from_slice(args);
    vm.pc = CODE + guest::offset(r);
    vm.run()
}

/// Expects the routine to finish with the done hypercall; returns its result.
pub fn done(exit: Exit) -> Result<u64, String> {
    match exit {
        Exit::Test { fid: HC_DONE, args } => Ok(args[0]),
        other => Err(format!("expected the guest to finish, got {}", describe(&other))),
    }
}

/// Expects an unresolved guest-page fault.
pub fn fault(exit: Exit) -> Result<(GuestPageFault, ExitCsrs), String> {
    match exit {
        Exit::Fault(f, t) => Ok((f, t)),
        other => Err(format!("expected a guest-page fault, got {}", describe(&other))),
    }
}

/// A one-line description of an exit.
pub fn describe(e: &Exit) -> String {
    match e {
        Exit::Test { fid, args } => format!("hypercall {fid} a0={:#x}", args[0]),
        Exit::Reset(r) => format!("reset {r:?}"),
        Exit::Fault(f, t) => format!("guest-page fault {:?} at pc {:#x} (scause {})", f.info, t.sepc, t.scause),
        Exit::Exception(t) => format!("{} at pc {:#x} stval {:#x}", cause::name(t.scause), t.sepc, t.stval),
        Exit::Budget => "exit budget exhausted".into(),
    }
}

/// Reads a u64 through the nested table (software translation).
pub fn peek(vm: &Vm, at: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    vm.phys().read(gpa(at), &mut b).map_err(|e| format!("peek {at:#x}: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

/// Writes a u64 through the nested table.
pub fn poke(vm: &Vm, at: u64, v: u64) -> Check {
    vm.phys().write(gpa(at), &v.to_le_bytes()).map_err(|e| format!("poke {at:#x}: {e}"))
}
