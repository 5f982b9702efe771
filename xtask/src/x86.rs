//! x86: build the GRUB ISO and boot it in Bochs (owned by the x86 image work).
//!
//! The hypervisor (`images/x86-hv`) is a multiboot (v1) ELF64 kernel; GRUB loads it from an
//! El Torito ISO, together with an optional guest as a multiboot module. Bochs runs headless
//! (rfb display with `timeout=0`); the hypervisor reports on COM1 (a file) and ends the run with
//! a `twostage-exit: N` line followed by a magic breakpoint, which the rc file answers with `quit`.

use crate::util;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Bochs CPU models the suite runs on: one with EPT A/D bits, one without.
const SUITE_CPUS: [(&str, &str); 2] =
    [("x86_64 skylake_x (Bochs)", "corei7_skylake_x"), ("x86_64 sandy_bridge (Bochs)", "corei7_sandy_bridge_2600k")];
/// The model `cargo xtask run --arch x86_64` uses when `--cpu` is not given.
const DEFAULT_CPU: &str = "corei7_skylake_x";
/// Wall-clock limit of one Bochs run.
const BOCHS_TIMEOUT: Duration = Duration::from_secs(300);
/// The line the hypervisor prints just before it stops Bochs.
const EXIT_PREFIX: &str = "twostage-exit: ";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| util::root().join("target"))
}

/// Installs the rustup target and the Debian packages the x86 flow needs, when missing.
fn ensure_tools() -> Result<(), String> {
    util::ensure_target("x86_64-unknown-none")?;
    util::ensure_apt("bochs", &["bochs", "bochsbios", "vgabios"])?;
    util::ensure_apt("grub-mkimage", &["grub-common", "grub-pc-bin"])?;
    util::ensure_apt("xorriso", &["xorriso", "mtools"])?;
    // The BIOS images and GRUB's i386-pc modules come in packages that install no program.
    let files = [
        ("/usr/share/bochs/BIOS-bochs-latest", "bochsbios"),
        ("/usr/share/vgabios/vgabios.bin", "vgabios"),
        ("/usr/lib/grub/i386-pc/multiboot.mod", "grub-pc-bin"),
    ];
    for (file, package) in files {
        util::ensure_file(file, &[package])?;
    }
    Ok(())
}

/// Builds the hypervisor image and returns the ELF's path.
fn build_hv() -> Result<PathBuf, String> {
    let code = util::cargo(&[
        "build",
        "--release",
        "-j2",
        "-p",
        "twostage-x86-hv",
        "--target",
        "x86_64-unknown-none",
        "--config",
        "target.x86_64-unknown-none.rustflags=[\"-C\",\"relocation-model=static\"]",
    ])?;
    if code != 0 {
        return Err(format!("building twostage-x86-hv failed ({code})"));
    }
    Ok(target_dir().join("x86_64-unknown-none/release/twostage-x86-hv"))
}

/// Builds guests/x86-hello (its own workspace) and returns the ELF's path.
pub fn build_hello() -> Result<PathBuf, String> {
    let dir = target_dir().join("x86-hello");
    let manifest = util::root().join("guests/x86-hello/Cargo.toml");
    let code = util::cargo(&[
        "build",
        "--release",
        "-j2",
        "--manifest-path",
        manifest.to_str().ok_or("non-UTF-8 workspace path")?,
        "--target",
        "x86_64-unknown-none",
        "--target-dir",
        dir.to_str().ok_or("non-UTF-8 target path")?,
        "--config",
        "target.x86_64-unknown-none.rustflags=[\"-C\",\"relocation-model=static\"]",
    ])?;
    if code != 0 {
        return Err(format!("building guests/x86-hello failed ({code})"));
    }
    Ok(dir.join("x86_64-unknown-none/release/x86-hello"))
}

/// Makes a GRUB El Torito ISO in `work` holding the hypervisor and, if given, a guest module.
fn build_iso(work: &Path, hv: &Path, guest: Option<&Path>) -> Result<PathBuf, String> {
    let root = work.join("iso_root");
    let boot = root.join("boot");
    std::fs::create_dir_all(&boot).map_err(|e| format!("mkdir {}: {e}", boot.display()))?;
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).map(drop).map_err(|e| format!("copy {} -> {}: {e}", from.display(), to.display()))
    };
    copy(hv, &boot.join("hv.elf"))?;
    let mut cfg = String::from("set timeout=0\nmultiboot /boot/hv.elf\n");
    let guest_file = boot.join("guest.elf");
    let _ = std::fs::remove_file(&guest_file);
    if let Some(g) = guest {
        copy(g, &guest_file)?;
        cfg.push_str("module /boot/guest.elf guest\n");
    }
    cfg.push_str("boot\n");
    let early = work.join("early.cfg");
    std::fs::write(&early, cfg).map_err(|e| format!("write {}: {e}", early.display()))?;
    let core = boot.join("core.img");
    let code = util::run(
        Command::new("grub-mkimage")
            .args(["-O", "i386-pc-eltorito", "-p", "/boot/grub", "-c"])
            .arg(&early)
            .arg("-o")
            .arg(&core)
            .args(["biosdisk", "iso9660", "multiboot", "normal", "configfile"]),
    )?;
    if code != 0 {
        return Err(format!("grub-mkimage failed ({code})"));
    }
    let iso = work.join("twostage-x86.iso");
    let code = util::run(
        Command::new("xorriso")
            .args(["-as", "mkisofs", "-quiet", "-o"])
            .arg(&iso)
            .args(["-b", "boot/core.img", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"])
            .arg(&root)
            .stderr(Stdio::null()),
    )?;
    if code != 0 {
        return Err(format!("xorriso failed ({code})"));
    }
    Ok(iso)
}

/// What one Bochs run left behind.
struct BochsRun {
    /// Everything the machine wrote to COM1.
    serial: String,
    /// Bochs' own exit status.
    code: i32,
    /// Whether the wall-clock limit stopped it.
    timed_out: bool,
}

/// Boots `iso` in Bochs with CPU `model`; streams COM1 to stdout when `echo`.
fn run_bochs(work: &Path, iso: &Path, model: &str, echo: bool) -> Result<BochsRun, String> {
    let serial = work.join(format!("serial-{model}.log"));
    let rc = work.join("cont.rc");
    let conf = work.join(format!("bochsrc-{model}"));
    let _ = std::fs::remove_file(&serial);
    std::fs::write(&rc, "c\nquit\n").map_err(|e| format!("write {}: {e}", rc.display()))?;
    let bochsrc = format!(
        "megs: 128\n\
         display_library: rfb, options=\"timeout=0\"\n\
         sound: driver=dummy\n\
         speaker: enabled=0\n\
         romimage: file=/usr/share/bochs/BIOS-bochs-latest, options=fastboot\n\
         vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
         cpu: model={model}, count=1, ips=10000000, reset_on_triple_fault=0\n\
         boot: cdrom\n\
         ata0-master: type=cdrom, path={iso}, status=inserted\n\
         com1: enabled=1, mode=file, dev={serial}\n\
         port_e9_hack: enabled=1\n\
         magic_break: enabled=1\n\
         clock: sync=none, time0=local\n\
         log: {log}\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=ignore\n",
        iso = iso.display(),
        serial = serial.display(),
        log = work.join(format!("bochs-{model}.log")).display(),
    );
    std::fs::write(&conf, bochsrc).map_err(|e| format!("write {}: {e}", conf.display()))?;
    eprintln!("+ bochs -q -f {} -rc {} (cpu {model})", conf.display(), rc.display());
    let mut child = Command::new("bochs")
        .arg("-q")
        .arg("-f")
        .arg(&conf)
        .arg("-rc")
        .arg(&rc)
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start bochs: {e}"))?;
    let start = Instant::now();
    let mut shown = 0u64;
    let mut out = std::io::stdout();
    let mut pump = |shown: &mut u64| {
        if !echo {
            return;
        }
        if let Ok(mut f) = std::fs::File::open(&serial) {
            if f.seek(SeekFrom::Start(*shown)).is_ok() {
                let mut buf = Vec::new();
                if f.read_to_end(&mut buf).is_ok() {
                    *shown += buf.len() as u64;
                    let _ = out.write_all(&buf);
                    let _ = out.flush();
                }
            }
        }
    };
    let (code, timed_out) = loop {
        pump(&mut shown);
        match child.try_wait().map_err(|e| format!("waiting for bochs: {e}"))? {
            Some(status) => break (status.code().unwrap_or(128), false),
            None if start.elapsed() > BOCHS_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break (124, true);
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    pump(&mut shown);
    let text = std::fs::read(&serial).map(|b| String::from_utf8_lossy(&b).replace('\r', "")).unwrap_or_default();
    Ok(BochsRun { serial: text, code, timed_out })
}

/// The status the hypervisor reported with its `twostage-exit: N` line.
fn exit_status(serial: &str) -> Option<i32> {
    serial.lines().rev().find_map(|l| l.trim().strip_prefix(EXIT_PREFIX)?.trim().parse().ok())
}

fn work_dir(name: &str) -> Result<PathBuf, String> {
    let w = target_dir().join("x86-iso").join(name);
    std::fs::create_dir_all(&w).map_err(|e| format!("mkdir {}: {e}", w.display()))?;
    Ok(w)
}

/// `cargo xtask run --arch x86_64 [--guest FILE] [--cpu MODEL]`.
///
/// Without a guest the hypervisor runs its bundled guest and prints what the memory subsystem
/// did; with one, the guest's COM1 output appears on stdout and the exit status is the value the
/// guest wrote to I/O port 0xf4.
pub fn run(guest: Option<&Path>, cpu: Option<&str>) -> Result<i32, String> {
    ensure_tools()?;
    let hv = build_hv()?;
    let work = work_dir(if guest.is_some() { "guest" } else { "bundled" })?;
    let iso = build_iso(&work, &hv, guest)?;
    let model = cpu.unwrap_or(DEFAULT_CPU);
    let r = run_bochs(&work, &iso, model, true)?;
    if r.timed_out {
        return Err(format!("bochs did not finish within {}s", BOCHS_TIMEOUT.as_secs()));
    }
    match exit_status(&r.serial) {
        Some(s) => Ok(s),
        None => Err(format!("the hypervisor never reported an exit status (bochs exited with {})", r.code)),
    }
}

/// Runs guests/x86-hello through [`run`]'s path and checks its exit status (it exits with 0x31
/// after reading a non-empty memory map).
fn hello_check(hv: &Path) -> Result<crate::SuiteResult, String> {
    const HELLO_STATUS: i32 = 0x31;
    let hello = build_hello()?;
    let work = work_dir("hello")?;
    let iso = build_iso(&work, hv, Some(&hello))?;
    let r = run_bochs(&work, &iso, DEFAULT_CPU, false)?;
    let status = exit_status(&r.serial);
    let ok = status == Some(HELLO_STATUS) && r.serial.contains("x86-hello:");
    println!(
        "{} 1 - x86-hello guest exits with status {HELLO_STATUS:#x} (got {status:?})",
        if ok { "ok" } else { "not ok" }
    );
    Ok(crate::SuiteResult { passed: ok as u32, failed: (!ok) as u32, skipped: 0 })
}

/// The x86 scenario suites under Bochs, one per CPU model, then the x86-hello guest run.
pub fn test_suites() -> Vec<(&'static str, Result<crate::SuiteResult, String>)> {
    let hv = ensure_tools().and_then(|()| build_hv());
    let iso = hv.clone().and_then(|hv| {
        let work = work_dir("suite")?;
        Ok((work.clone(), build_iso(&work, &hv, None)?))
    });
    let mut out = Vec::new();
    for (name, model) in SUITE_CPUS {
        let r = iso.clone().and_then(|(work, iso)| {
            let r = run_bochs(&work, &iso, model, false)?;
            print!("{}", r.serial);
            if r.timed_out {
                return Err(format!("bochs timed out after {}s", BOCHS_TIMEOUT.as_secs()));
            }
            util::parse_tally(&r.serial).ok_or_else(|| format!("no tally line (bochs exit {})", r.code))
        });
        out.push((name, r));
    }
    out.push(("x86_64 multiboot guest (Bochs)", hv.and_then(|hv| hello_check(&hv))));
    out
}

#[cfg(test)]
mod tests {
    use super::exit_status;

    #[test]
    fn exit_status_is_the_last_report() {
        let log = "guest-exit-status: 49\ntwostage-exit: 49\n";
        assert_eq!(exit_status(log), Some(49));
        assert_eq!(exit_status("twostage-exit: 1\nnoise\ntwostage-exit: 0\n"), Some(0));
        assert_eq!(exit_status("PANIC: boom\n"), None);
        assert_eq!(exit_status("twostage-exit: x\n"), None);
    }
}
