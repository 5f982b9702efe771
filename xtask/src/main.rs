//! `cargo xtask`: builds the bare-metal images, boots them in their emulators, and runs every test.
//!
//! ```text
//! cargo xtask run   [--arch riscv64|x86_64] [--guest FILE | --linux]
//!                   [--cpu [MODEL][,hypervisor=on|off] (x86_64)]
//!                   [--mem SIZE] [--append "ARGS"] [--initrd FILE] [--smp N (riscv64)]
//!                   [--fork [--fork-after N] | --migrate [--migrate-after N]] (riscv64)
//!                   (riscv64: FILE an ELF or a raw Image; x86: a multiboot ELF or a bzImage)
//! cargo xtask test  [--host-only] [--arch riscv64|x86_64]
//! cargo xtask lint
//! cargo xtask bench
//! cargo xtask linux [--arch riscv64|x86_64] [--bare] [--smp N]
//! ```
//! Missing rustup targets and emulator packages are installed on first use (see `util`).
//!
//! Exit status of `run --guest FILE`:
//!
//! | status | meaning |
//! | --- | --- |
//! | the guest's | RISC-V: the guest's SBI SRST status; x86: the value it wrote to port 0xf4 |
//! | 126 | the file was refused (`twostage_baremetal::elf::EXIT_REFUSED`): by xtask before booting, or by the hypervisor; nothing of it ran; a `guest file ... refused:` line names the problem |
//! | 125 | the guest ran and the hypervisor stopped it (`EXIT_GUEST_STOPPED`): an unresolved fault, an exception or exit it cannot serve, an x86 halt without a status |
//! | 101 | the hypervisor panicked |
//! | 3 | the machine cannot run a guest (no H extension, VMX refused, no memory for the guest) |
//! | 1 | xtask itself failed (a build, an emulator that did not finish) |
//!
//! Only the console tells these apart from a guest that itself exits with 1, 3, 101, 125 or 126.

mod bench;
mod hostile;
mod lint;
mod linux;
mod riscv;
mod riscv_linux;
mod riscv_stage;
mod util;
mod x86;

use std::path::PathBuf;
use std::process::ExitCode;

/// Which emulated machine a command is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// QEMU `virt`, H extension.
    Riscv64,
    /// Bochs, VMX with EPT.
    X86_64,
}

/// Tally of one emulator scenario suite, parsed from its `N passed, M failed` line.
#[derive(Clone, Copy, Debug, Default)]
pub struct SuiteResult {
    /// Scenarios that printed `ok`.
    pub passed: u32,
    /// Scenarios that printed `not ok` (or a suite that never finished counts one).
    pub failed: u32,
    /// Scenarios skipped because the emulated machine lacks what they need.
    pub skipped: u32,
}

impl SuiteResult {
    /// Prints one `ok` / `not ok` line for a check of xtask's own and counts it.
    pub fn check(&mut self, ok: bool, what: &str) {
        println!("{} - {what}", if ok { "ok" } else { "not ok" });
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }
}

struct Args {
    cmd: String,
    arch: Option<Arch>,
    guest: Option<PathBuf>,
    cpu: Option<String>,
    host_only: bool,
    /// RISC-V guest options (--mem, --append, --initrd, --smp).
    rv: riscv_stage::GuestOpts,
    /// Whether any RISC-V guest option was given (they need `--guest`).
    rv_given: bool,
    /// `linux`: boot the kernel on the bare emulator.
    bare: bool,
    /// CPUs of the emulated machine.
    smp: Option<u32>,
    /// `run --arch x86_64`: guest RAM, command line, initrd.
    guest_opts: x86::GuestOptions,
    /// `run --linux`: boot the project's Linux guest (built or taken from the cache).
    linux: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().ok_or_else(usage)?;
    let mut args = Args {
        cmd,
        arch: None,
        guest: None,
        cpu: None,
        host_only: false,
        rv: riscv_stage::GuestOpts::default(),
        rv_given: false,
        bare: false,
        smp: None,
        guest_opts: x86::GuestOptions { mem: x86::DEFAULT_MEM, ..Default::default() },
        linux: false,
    };
    // --mem, --append and --initrd are checked once the architecture is known.
    let mut guest_args: Vec<(String, String)> = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--arch" => {
                args.arch = Some(match it.next().as_deref() {
                    Some("riscv64") => Arch::Riscv64,
                    Some("x86_64") => Arch::X86_64,
                    other => return Err(format!("--arch takes riscv64 or x86_64, not {other:?}")),
                })
            }
            "--guest" => args.guest = Some(it.next().ok_or("--guest takes a file")?.into()),
            "--cpu" => {
                args.cpu =
                    Some(it.next().ok_or("--cpu takes a Bochs CPU model and properties: MODEL[,hypervisor=off]")?)
            }
            "--host-only" => args.host_only = true,
            "--mem" | "--append" | "--initrd" | "--fork-after" | "--migrate-after" => {
                let v = it.next().ok_or_else(|| format!("{a} takes a value"))?;
                guest_args.push((a.clone(), v));
            }
            "--fork" | "--migrate" => guest_args.push((a.clone(), String::new())),
            "--linux" => args.linux = true,
            "--bare" => args.bare = true,
            "--smp" => {
                args.smp = Some(match it.next().and_then(|n| n.parse().ok()) {
                    Some(n @ 1..=64) => n,
                    _ => return Err("--smp takes a CPU count from 1 to 64".into()),
                })
            }
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    let riscv_run = args.cmd == "run" && args.arch != Some(Arch::X86_64);
    let x86_run = args.cmd == "run" && args.arch == Some(Arch::X86_64);
    if (!guest_args.is_empty() || args.linux) && args.cmd != "run" {
        return Err("--mem, --append, --initrd, --fork, --migrate and --linux are options of `run`".into());
    }
    if x86_run && guest_args.iter().any(|(o, _)| o.starts_with("--fork") || o.starts_with("--migrate")) {
        return Err("--fork and --migrate: the RISC-V hypervisor's (--arch riscv64)".into());
    }
    for (opt, v) in &guest_args {
        if riscv_run {
            args.rv.set(opt, v)?;
            args.rv_given = true;
        } else if x86_run {
            match opt.as_str() {
                "--mem" => args.guest_opts.mem = x86::parse_mem(v)?,
                "--append" => args.guest_opts.append = v.clone(),
                _ => args.guest_opts.initrd = Some(v.into()),
            }
        }
    }
    if let Some(cpu) = args.cpu.take() {
        if !x86_run {
            return Err(format!("--cpu {cpu:?}: an option of `run --arch x86_64` (the Bochs CPU model)"));
        }
        let choice = x86::parse_cpu(&cpu)?;
        args.guest_opts.hypervisor_off = choice.hypervisor == Some(false);
        args.cpu = choice.model;
        if args.guest_opts.hypervisor_off && args.guest.is_none() && !args.linux {
            return Err(format!("--cpu {cpu:?}: hypervisor=off is for a guest (--guest FILE or --linux)"));
        }
    }
    if x86_run && args.smp.is_some_and(|n| n > 1) {
        return Err("--smp: the x86 hypervisor runs one vCPU".into());
    }
    if riscv_run {
        if let Some(n) = args.smp {
            args.rv.set("--smp", &n.to_string())?;
        }
        args.rv.live.check(args.rv.vcpus)?;
        if args.linux && args.guest.is_some() {
            return Err("--linux and --guest name two guests: give one".into());
        }
    }
    Ok(args)
}

fn fail(e: &str) -> ExitCode {
    eprintln!("xtask: {e}");
    ExitCode::from(2)
}

fn usage() -> String {
    "usage: cargo xtask run [--arch riscv64|x86_64] [--guest FILE | --linux] [--cpu [MODEL][,hypervisor=on|off]] \
     [--mem SIZE] [--append ARGS] [--initrd FILE] [--smp N]\n                       \
     [--fork [--fork-after N] | --migrate [--migrate-after N]] (riscv64)\n       \
     cargo xtask test [--host-only] [--arch riscv64|x86_64]\n       cargo xtask lint\n       cargo xtask bench\n       \
     cargo xtask linux [--arch riscv64|x86_64] [--bare] [--smp N]"
        .into()
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.cmd.as_str() {
        "run" => match args.arch.unwrap_or(Arch::Riscv64) {
            Arch::Riscv64 if args.linux => {
                linux::kernel(Arch::Riscv64).and_then(|k| riscv::run(Some(k.as_path()), &args.rv))
            }
            Arch::Riscv64 => riscv::run(args.guest.as_deref(), &args.rv),
            Arch::X86_64 => {
                let guest = match (&args.guest, args.linux) {
                    (Some(_), true) => return fail("--linux and --guest exclude each other"),
                    (_, true) => Some(linux::kernel(Arch::X86_64)).transpose(),
                    (g, false) => Ok(g.clone()),
                };
                guest.and_then(|g| x86::run(g.as_deref(), args.cpu.as_deref(), &args.guest_opts))
            }
        },
        "test" => test(&args),
        "bench" => bench::bench(),
        "lint" => lint::lint().map(|failed| {
            failed.iter().for_each(|f| eprintln!("failed: {f}"));
            i32::from(!failed.is_empty())
        }),
        "linux" => linux::command(args.arch.unwrap_or(Arch::Riscv64), args.bare, args.smp),
        other => Err(format!("unknown command {other:?}\n{}", usage())),
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The lints, host tests (with the README's doctests), then the emulator suites; the exit status
/// is non-zero if anything failed.
fn test(args: &Args) -> Result<i32, String> {
    let mut failures = Vec::new();
    if args.arch.is_none() {
        failures.extend(lint::lint()?);
        println!("== host tests: cargo test --workspace (default members)");
        if util::cargo(&["test"])? != 0 {
            failures.push("host tests".to_string());
        }
    }
    if !args.host_only {
        let mut suites: Vec<(&str, Result<SuiteResult, String>)> = Vec::new();
        if args.arch != Some(Arch::X86_64) {
            suites.extend(riscv::test_suites());
        }
        if args.arch != Some(Arch::Riscv64) {
            for (name, r) in x86::test_suites() {
                suites.push((name, r));
            }
        }
        let (mut passed, mut failed, mut skipped) = (0, 0, 0);
        for (name, r) in suites {
            match r {
                Ok(s) => {
                    println!("== suite {name}: {} passed, {} failed, {} skipped", s.passed, s.failed, s.skipped);
                    passed += s.passed;
                    failed += s.failed;
                    skipped += s.skipped;
                    if s.failed > 0 || s.passed == 0 {
                        failures.push(format!("suite {name}"));
                    }
                }
                Err(e) => {
                    println!("== suite {name}: did not run: {e}");
                    failed += 1;
                    failures.push(format!("suite {name}"));
                }
            }
        }
        println!("scenarios: {passed} passed, {failed} failed, {skipped} skipped");
    }
    if failures.is_empty() {
        Ok(0)
    } else {
        eprintln!("failed: {}", failures.join(", "));
        Ok(1)
    }
}
