//! RISC-V: the project's Linux guest against the same kernel on bare QEMU, and on QEMU 10 (part
//! of `cargo xtask test`).
//!
//! - Console: on Debian's QEMU, the kernel boots bare (OpenSBI, no hypervisor) and under
//!   twostage, one vCPU and 128 MiB each; the two consoles, from the kernel's banner to its
//!   power-off, must be the same but for the lines of [`MUST_DIFFER`], each with the reason it
//!   differs.
//! - Cost: both runs use `-icount shift=0,sleep=off`, under which QEMU's virtual clock, the one
//!   the guest's `time` CSR reads, advances one nanosecond per emulated instruction (idle time
//!   skipped to the next timer). init's own phase timings (`twostage-linux: times:`) are then
//!   instruction counts: 1 ms = one million instructions, everything the hart executes counted,
//!   the hypervisor's exits included. Printed with the wall time of each run and the ratios,
//!   against a target of at most [`TARGET_RATIO`].
//! - QEMU 10 (bookworm-backports, harts without hardware A/D updating): the guest on four vCPUs
//!   runs init's checks to the end.

use crate::riscv::Qemu;
use crate::riscv_stage::{qemu_command, GuestOpts, Stage};
use crate::SuiteResult;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Wall-clock limit of one run.
const TIMEOUT: Duration = Duration::from_secs(180);
/// The most the guest may cost under twostage, as a multiple of bare QEMU (issue target).
const TARGET_RATIO: f64 = 1.25;
/// QEMU's instruction counting: 2^0 ns of virtual time per instruction, no real-time sleeping.
const ICOUNT: &str = "shift=0,sleep=off";
/// init's final line.
const PASSED: &str = "twostage-linux: all checks passed";

/// Console lines that differ between bare QEMU and twostage, and must: (the line's start, why).
pub const MUST_DIFFER: &[(&str, &str)] = &[
    (
        "SBI specification v",
        "twostage implements SBI 2.0 (it serves the debug console extension); OpenSBI 1.1 on QEMU 7.2 reports 1.0",
    ),
    (
        "SBI implementation ID=",
        "twostage reports its own implementation ID (0x7473) and version: claiming OpenSBI's would be false",
    ),
    ("riscv: base ISA extensions", "the guest's riscv,isa lacks 'h': twostage offers no nested hypervisor extension"),
    (
        "Memory: ",
        "8 KiB more reserved on bare QEMU: Linux allocates its unflattened device tree from memblock (booted \
         with memblock=debug: 0x284c bytes on bare QEMU, 0xbbc under twostage), and QEMU's tree describes \
         devices the guest does not get (eight virtio-mmio slots, the PCIe host bridge, flash, RTC, fw_cfg, the \
         test device and its poweroff/reboot nodes, the CLINT, the PMU, the platform bus); the flattened tree \
         itself has QEMU's address and the firmware tree's size",
    ),
    ("twostage-linux: times:", "init's timings of its own phases (compared below as instruction counts)"),
];

/// What one run printed.
struct Run {
    code: i32,
    out: String,
    wall: Duration,
}

/// Runs `cmd` to its end (or [`TIMEOUT`]), capturing its console.
fn run(mut cmd: Command) -> Result<Run, String> {
    eprintln!("+ {cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        all
    });
    let code = loop {
        match child.try_wait().map_err(|e| format!("waiting for QEMU: {e}"))? {
            Some(s) => break s.code().unwrap_or(128),
            None if start.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("QEMU did not finish within {} s", TIMEOUT.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let wall = start.elapsed();
    let out = String::from_utf8_lossy(&reader.join().unwrap_or_default()).replace('\r', "");
    Ok(Run { code, out, wall })
}

/// The kernel's console: from its banner to its power-off.
fn kernel_console(out: &str) -> Vec<&str> {
    out.lines()
        .skip_while(|l| !l.starts_with("Linux version"))
        .take_while(|l| !l.starts_with("reboot: Power down"))
        .collect()
}

/// Compares two consoles: the lines that differ other than as [`MUST_DIFFER`] allows. Empty when
/// they are the same.
pub fn console_differences(bare: &[&str], hv: &[&str]) -> Vec<String> {
    let allowed = |l: &str| MUST_DIFFER.iter().any(|(p, _)| l.starts_with(p));
    let b: Vec<&str> = bare.iter().copied().filter(|l| !allowed(l)).collect();
    let h: Vec<&str> = hv.iter().copied().filter(|l| !allowed(l)).collect();
    let mut out = Vec::new();
    for i in 0..b.len().max(h.len()) {
        let (x, y) = (b.get(i).copied(), h.get(i).copied());
        if x != y {
            out.push(format!("line {}: bare {x:?}, twostage {y:?}", i + 1));
        }
        if out.len() == 5 {
            break;
        }
    }
    // Every allowed line must really be there on both sides (a missing banner line is a
    // difference too).
    for (p, _) in MUST_DIFFER {
        let n = |c: &[&str]| c.iter().filter(|l| l.starts_with(p)).count();
        if n(bare) != n(hv) {
            out.push(format!("{p:?} lines: {} bare, {} under twostage", n(bare), n(hv)));
        }
    }
    out
}

/// init's phase timings in ms (`twostage-linux: times: fill 168 ms, cow 94 ms, ...`), summed.
pub fn phase_ms(out: &str) -> Option<u64> {
    let line = out.lines().find_map(|l| l.strip_prefix("twostage-linux: times:"))?;
    let mut sum = 0;
    for part in line.split(',') {
        let v = part.split_whitespace().nth(1)?;
        sum += v.parse::<u64>().ok()?;
    }
    Some(sum)
}

/// The kernel on bare QEMU (Debian's; OpenSBI), `vcpus` harts and 128 MiB as twostage's default.
fn bare(kernel: &Path, vcpus: u64) -> Command {
    let mut cmd = Command::new("qemu-system-riscv64");
    cmd.args(["-M", "virt", "-bios", "default", "-m", "128M", "-nographic", "-no-reboot", "-icount", ICOUNT])
        .arg("-smp")
        .arg(vcpus.to_string())
        .arg("-kernel")
        .arg(kernel);
    cmd
}

/// The Linux checks of `cargo xtask test` on `qemu` (see the module docs): console and cost
/// against bare QEMU on Debian's QEMU, a four-vCPU run on QEMU 10.
pub fn checks(qemu: &Qemu, image: &Path, tally: &mut SuiteResult) {
    let kernel = match crate::linux::kernel(crate::Arch::Riscv64) {
        Ok(k) => k,
        Err(e) => return tally.check(false, &format!("Linux guest: {e}")),
    };
    if qemu.dirs().is_some() {
        let opts = GuestOpts { vcpus: 4, ..GuestOpts::default() };
        let r = qemu_command(qemu, image, Stage::File(&kernel, &opts)).and_then(run);
        let what = "Linux 6.1 (4 vCPUs) on QEMU 10 without hardware A/D updating ran init's checks to the end";
        match r {
            Ok(r) => tally.check(
                r.code == 0 && r.out.contains(PASSED) && r.out.contains("twostage-linux: start (4 CPU"),
                &format!("{what}, exit status {}, {:.1} s", r.code, r.wall.as_secs_f64()),
            ),
            Err(e) => tally.check(false, &format!("{what}: {e}")),
        }
        return;
    }
    let opts = GuestOpts::default();
    let hv = qemu_command(qemu, image, Stage::File(&kernel, &opts)).map(|mut c| {
        c.args(["-icount", ICOUNT]);
        c
    });
    let (bare, hv) = match (run(bare(&kernel, opts.vcpus)), hv.and_then(run)) {
        (Ok(b), Ok(h)) => (b, h),
        (Err(e), _) | (_, Err(e)) => return tally.check(false, &format!("Linux against bare QEMU: {e}")),
    };
    let ran = |r: &Run| r.code == 0 && r.out.contains(PASSED);
    if !ran(&bare) || !ran(&hv) {
        return tally.check(
            false,
            &format!(
                "Linux against bare QEMU: bare exit {}, twostage exit {} (init finished: {}, {})",
                bare.code,
                hv.code,
                bare.out.contains(PASSED),
                hv.out.contains(PASSED)
            ),
        );
    }
    let diffs = console_differences(&kernel_console(&bare.out), &kernel_console(&hv.out));
    for d in &diffs {
        println!("  console difference: {d}");
    }
    tally.check(
        diffs.is_empty(),
        &format!(
            "Linux console under twostage is bare QEMU's but for the {} documented lines (xtask/src/riscv_linux.rs), 1 vCPU, 128 MiB",
            MUST_DIFFER.len()
        ),
    );
    match (phase_ms(&bare.out), phase_ms(&hv.out)) {
        (Some(b), Some(h)) if b > 0 => {
            let insns = h as f64 / b as f64;
            let wall = hv.wall.as_secs_f64() / bare.wall.as_secs_f64();
            let verdict = |r: f64| if r <= TARGET_RATIO { "target met" } else { "target missed" };
            println!(
                "Linux cost (1 vCPU, -icount {ICOUNT}): init's phases {h} M instructions under twostage, {b} M bare: \
                 {insns:.2}x ({}, target {TARGET_RATIO}x); whole run wall {:.2} s vs {:.2} s: {wall:.2}x ({})",
                verdict(insns),
                hv.wall.as_secs_f64(),
                bare.wall.as_secs_f64(),
                verdict(wall)
            );
        }
        _ => println!("Linux cost: init printed no phase timings"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BARE: &[&str] = &[
        "Linux version 6.1",
        "SBI specification v1.0 detected",
        "SBI implementation ID=0x1 Version=0x10001",
        "SBI IPI extension detected",
        "riscv: base ISA extensions acdfhim",
        "Memory: 124468K/129024K available",
        "Run /init as init process",
    ];
    const HV: &[&str] = &[
        "Linux version 6.1",
        "SBI specification v2.0 detected",
        "SBI implementation ID=0x7473 Version=0x1",
        "SBI IPI extension detected",
        "riscv: base ISA extensions acdfim",
        "Memory: 124476K/129024K available",
        "Run /init as init process",
    ];

    #[test]
    fn only_listed_lines_may_differ() {
        assert!(console_differences(BARE, HV).is_empty());
        // A missing line is seen.
        let hv: Vec<&str> = HV.iter().copied().filter(|l| !l.contains("IPI")).collect();
        assert!(console_differences(BARE, &hv)[0].contains("SBI IPI"));
        // Any other changed or added line is seen.
        let mut hv = HV.to_vec();
        hv[6] = "Run /sbin/init as init process";
        assert!(console_differences(BARE, &hv)[0].contains("/sbin/init"));
        let mut hv = HV.to_vec();
        hv.push("extra");
        assert!(console_differences(BARE, &hv)[0].contains("extra"));
        // An allowed line that vanished on one side is a difference.
        let hv: Vec<&str> = HV.iter().copied().filter(|l| !l.starts_with("Memory:")).collect();
        assert!(console_differences(BARE, &hv).iter().any(|d| d.contains("Memory")));
    }

    #[test]
    fn phase_timings_are_summed() {
        let out = "x\ntwostage-linux: times: fill 213 ms, cow 96 ms, threads 26 ms, shootdown 7 ms, churn 94 ms\n";
        assert_eq!(phase_ms(out), Some(436));
        assert_eq!(phase_ms("twostage-linux: times: fill x ms"), None);
        assert_eq!(phase_ms("nothing"), None);
    }

    #[test]
    fn the_kernel_console_is_banner_to_power_off() {
        let out = "OpenSBI v1.1\nLinux version 6.1\nmiddle\nreboot: Power down\nguest reset: type 0\n";
        assert_eq!(kernel_console(out), ["Linux version 6.1", "middle"]);
    }
}
