//! twostage-scenarios-x86: the x86 scenario suite. Each scenario makes the bundled guest
//! ([`guest`]) touch memory on one VMX vCPU with an EPT built by `twostage-npt`, and checks what
//! the (emulated) hardware and twostage did.
//!
//! The scenarios live in one file per topic, each exporting its list: [`paging`], [`faults`],
//! [`guest_access`], [`dirty`], [`cow`], [`mmio`], [`hostile`]. [`run`] runs them in that order
//! under the shared harness (`twostage-harness`), which numbers them by position, prints TAP and
//! skips, with the reason, a scenario whose [`Need`]s the CPU does not meet.
//!
//! Like `twostage-hv-x86`, the crate is compiled for x86-64 bare metal only and is empty
//! elsewhere (the `cfg` on the crate root).
#![cfg(all(target_arch = "x86_64", target_os = "none"))]
#![no_std]

extern crate alloc;

pub mod cow;
pub mod dirty;
pub mod faults;
pub mod guest;
pub mod guest_access;
pub mod hostile;
pub mod mmio;
pub mod paging;
mod space;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use twostage_baremetal::frames::Frames;
use twostage_harness::{Platform, Scenario};
use twostage_hv_x86::hv::{Hv, Stats};
use twostage_hv_x86::println;
use twostage_hv_x86::serial::Console;
use twostage_npt::{Ept4, EptCapabilities, PageTable};
use twostage_vmx::hw::RealCpu;
use twostage_vmx::{VcpuConfig, VmxVcpu};

/// A CPU capability a scenario may need, read from IA32_VMX_EPT_VPID_CAP (Intel SDM Vol. 3C
/// A.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// 2 MiB EPT pages (bit 16).
    Ept2M,
    /// Execute-only EPT translations (bit 0).
    EptExecuteOnly,
    /// EPT accessed and dirty flags (bit 21).
    EptAccessedDirty,
}

/// What the scenarios know of the CPU.
pub struct Caps {
    /// EPT and VPID capabilities.
    pub ept: EptCapabilities,
}

/// The machine the suite runs on: the hypervisor's one guest and the CPU's capabilities.
pub struct Machine {
    /// The vCPU, the bundled guest's EPT, the frames and the counters.
    pub hv: Hv,
    /// The capabilities.
    pub caps: Caps,
}

impl Platform for Machine {
    type Need = Need;

    fn lacks(&self, need: Need) -> Option<String> {
        let ept = &self.caps.ept;
        let (offered, why) = match need {
            Need::Ept2M => (ept.pages_2m(), "no 2 MiB EPT pages on this CPU (IA32_VMX_EPT_VPID_CAP bit 16 clear)"),
            Need::EptExecuteOnly => {
                (ept.execute_only(), "no execute-only EPT translations on this CPU (IA32_VMX_EPT_VPID_CAP bit 0 clear)")
            }
            Need::EptAccessedDirty => {
                (ept.accessed_dirty(), "no EPT A/D on this CPU (IA32_VMX_EPT_VPID_CAP bit 21 clear)")
            }
        };
        (!offered).then(|| String::from(why))
    }
}

/// Converts any debuggable error into a scenario failure with context.
pub fn ctx<T, E: core::fmt::Debug>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e:?}"))
}

/// GPAs of the scenario regions (each in its own 2 MiB of guest-physical space; the guest's page
/// tables identity-map the first 4 GiB).
pub mod gpa {
    /// Demand-zero region (64 KiB).
    pub const DEMAND: u64 = 0x0100_0000;
    /// One 2 MiB page.
    pub const HUGE: u64 = 0x0200_0000;
    /// Read-only page.
    pub const RO: u64 = 0x0300_0000;
    /// No-execute page with code.
    pub const NX: u64 = 0x0301_0000;
    /// Execute-only page with code.
    pub const XO: u64 = 0x0302_0000;
    /// Two pages sharing one frame, copy-on-write.
    pub const COW: u64 = 0x0400_0000;
    /// A page remapped while the guest runs.
    pub const REMAP: u64 = 0x0500_0000;
    /// Four pages for EPT A/D.
    pub const AD: u64 = 0x0600_0000;
    /// Four pages for dirty tracking.
    pub const DIRTY: u64 = 0x0700_0000;
    /// A second four pages for dirty tracking by write protection.
    pub const DIRTY_WP: u64 = 0x0710_0000;
    /// Nothing is mapped or emulated here.
    pub const UNASSIGNED: u64 = 0x0900_0000;
    /// The address-space (fork) scenario's demand-zero data region.
    pub const FORK_DATA: u64 = 0x0a00_0000;
    /// The address-space dirty-log scenario's data region (16 pages).
    pub const DIRTY_AS: u64 = 0x0b00_0000;
    /// The emulated UART's registers.
    pub const MMIO: u64 = 0xfeb0_0000;
}

/// `mov eax, 0x1234; ret`.
pub const CODE_1234: [u8; 6] = [0xb8, 0x34, 0x12, 0x00, 0x00, 0xc3];

/// Every topic's scenarios, in the order the suite runs them.
const TOPICS: [&[Scenario<Machine>]; 7] = [
    paging::SCENARIOS,
    faults::SCENARIOS,
    guest_access::SCENARIOS,
    dirty::SCENARIOS,
    cow::SCENARIOS,
    mmio::SCENARIOS,
    hostile::SCENARIOS,
];

/// Runs the suite on `frames`, printing TAP and the harness's tally line on COM1, then what the
/// memory subsystem did (`heap_in_use` gives the image's heap bytes in use); returns the exit
/// status (0 when no scenario failed and at least one ran).
pub fn run(frames: &'static Frames, heap_in_use: fn() -> usize) -> u32 {
    // SAFETY: ring 0, interrupts off, and this is the only RealCpu the image creates.
    let cpu = unsafe { RealCpu::new() };
    let vcpu = match VmxVcpu::new(cpu, frames, VcpuConfig::default()) {
        Ok(v) => v,
        Err(e) => {
            println!("VMXON failed: {e:?}");
            println!("not ok 1 - capabilities");
            println!("0 passed, 1 failed, 0 skipped");
            return 1;
        }
    };
    let ept_caps = *vcpu.ept_capabilities();
    let ept = match PageTable::<Ept4, _>::new(frames, ept_caps.table_options(true)) {
        Ok(t) => t,
        Err(e) => {
            println!("EPT root: {e:?}");
            return 1;
        }
    };
    let mut hv = Hv { vcpu, ept, frames, stats: Stats::default() };
    let setup =
        guest::build(&mut hv).map_err(String::from).and_then(|entry| ctx(hv.vcpu.setup(&hv.ept, entry), "VMCS setup"));
    if let Err(e) = setup {
        println!("guest setup failed: {e}");
        println!("not ok 1 - capabilities");
        println!("0 passed, 1 failed, 0 skipped");
        return 1;
    }
    let mut machine = Machine { hv, caps: Caps { ept: ept_caps } };
    let c = &machine.caps;
    println!(
        "# twostage x86 suite on this CPU: EPT A/D {}, execute-only {}, 2M pages {}, 1G pages {}",
        c.ept.accessed_dirty(),
        c.ept.execute_only(),
        c.ept.pages_2m(),
        c.ept.pages_1g()
    );
    // The harness takes one list; the topics' lists are copied into it in order.
    let suite: Vec<Scenario<Machine>> = TOPICS
        .iter()
        .flat_map(|topic| topic.iter())
        .map(|s| Scenario { name: s.name, needs: s.needs, body: s.body })
        .collect();
    let tally = twostage_harness::run(&mut machine, &suite, &mut Console);
    machine.hv.report("what the memory subsystem did", heap_in_use());
    tally.exit_status()
}
