//! RISC-V: build the QEMU `virt` image and boot it (owned by the RISC-V image work).
//!
//! The hypervisor (`images/riscv-hv`) is entered by OpenSBI (`-bios default`) in HS-mode at
//! 0x80200000 on a hart with the H extension (`-cpu rv64,h=true`). It ends the run through the
//! `sifive_test` device, so QEMU's exit status is the hypervisor's (0 = every scenario passed,
//! or the guest's own SRST status when a guest file was given).
//!
//! A guest file is staged by QEMU's generic loader device: the file itself at host-physical
//! 0x88000000 (`force-raw=on`, so an ELF is copied as bytes and parsed by the hypervisor), and two
//! 8-byte values at 0x87fff000: the magic `TSGUEST!` and the file's size.

use crate::util;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TARGET: &str = "riscv64gc-unknown-none-elf";
/// Wall-clock limit of one QEMU run (a full suite takes about a second).
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the guest file is staged in host RAM (the hypervisor reserves it from its allocator).
const STAGE_ADDR: u64 = 0x8800_0000;
/// The staging header: magic at +0, size at +8.
const STAGE_HEADER: u64 = STAGE_ADDR - 0x1000;
/// The largest guest file the hypervisor accepts.
const MAX_GUEST: u64 = 32 << 20;
/// The exit status the suite's own riscv-hello run is built with, to prove it propagates.
const HELLO_TEST_STATUS: u32 = 7;
/// A guest nobody here built: Debian's S-mode U-Boot for QEMU virt (package u-boot-qemu).
const UBOOT: &str = "/usr/lib/u-boot/qemu-riscv64_smode/uboot.elf";

/// Installs u-boot-qemu when its S-mode image is missing (a package with no program to probe).
fn ensure_uboot() -> Result<PathBuf, String> {
    util::ensure_file(UBOOT, &["u-boot-qemu"])?;
    Ok(PathBuf::from(UBOOT))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| util::root().join("target"))
}

/// Installs the rustup target and QEMU (with OpenSBI, which Debian ships in qemu-system-data).
fn ensure_tools() -> Result<(), String> {
    util::ensure_target(TARGET)?;
    util::ensure_apt("qemu-system-riscv64", &["qemu-system-misc"])?;
    util::ensure_file("/usr/share/qemu/opensbi-riscv64-generic-fw_dynamic.bin", &["qemu-system-data"])?;
    Ok(())
}

/// Builds the hypervisor image; returns the ELF's path.
fn build_image() -> Result<PathBuf, String> {
    let code = util::cargo(&["build", "--release", "-j2", "-p", "twostage-riscv-hv", "--target", TARGET])?;
    if code != 0 {
        return Err(format!("building the RISC-V hypervisor failed ({code})"));
    }
    Ok(target_dir().join(TARGET).join("release").join("twostage-riscv-hv"))
}

/// Builds guests/riscv-hello with the exit status `status`; returns the ELF's path. Each status
/// gets its own target directory so that switching between them does not rebuild.
fn build_hello(status: u32) -> Result<PathBuf, String> {
    let dir = target_dir().join(format!("riscv-hello-{status}"));
    let manifest = util::root().join("guests/riscv-hello/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let code = util::run(
        Command::new(cargo)
            .args(["build", "--release", "-j2", "--target", TARGET, "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&dir)
            .env("RISCV_HELLO_STATUS", status.to_string())
            .current_dir(util::root()),
    )?;
    if code != 0 {
        return Err(format!("building riscv-hello failed ({code})"));
    }
    Ok(dir.join(TARGET).join("release").join("riscv-hello"))
}

/// The QEMU command line for `image`, with `guest` staged when given.
fn qemu_command(image: &Path, guest: Option<&Path>) -> Result<Command, String> {
    let mut cmd = Command::new("qemu-system-riscv64");
    cmd.args(["-machine", "virt", "-cpu", "rv64,h=true", "-nographic", "-bios", "default", "-m", "256M", "-kernel"])
        .arg(image);
    if let Some(g) = guest {
        let len = std::fs::metadata(g).map_err(|e| format!("guest file {}: {e}", g.display()))?.len();
        if len == 0 || len > MAX_GUEST {
            return Err(format!("guest file {} is {len} bytes; 1 to {MAX_GUEST} are accepted", g.display()));
        }
        let file = g.canonicalize().map_err(|e| format!("guest file {}: {e}", g.display()))?;
        let magic = u64::from_le_bytes(*b"TSGUEST!");
        cmd.arg("-device")
            .arg(format!("loader,file={},addr={STAGE_ADDR:#x},force-raw=on", file.display()))
            .arg("-device")
            .arg(format!("loader,addr={STAGE_HEADER:#x},data={magic:#x},data-len=8"))
            .arg("-device")
            .arg(format!("loader,addr={:#x},data={len},data-len=8", STAGE_HEADER + 8));
    }
    Ok(cmd)
}

/// Runs QEMU with a timeout, echoing its console to stdout; returns the exit code and the output.
fn run_qemu(cmd: Command) -> Result<(i32, String), String> {
    run_qemu_scripted(cmd, &[])
}

/// Like [`run_qemu`], and types `input` on the console once the output contains `trigger`, for
/// each `(trigger, input)` in order.
fn run_qemu_scripted(mut cmd: Command, script: &[(&str, &str)]) -> Result<(i32, String), String> {
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdin(if script.is_empty() { Stdio::null() } else { Stdio::piped() })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-riscv64: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stdin = child.stdin.take();
    let script: Vec<(String, String)> = script.iter().map(|(t, i)| (t.to_string(), i.to_string())).collect();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        let mut next = 0;
        let mut out = std::io::stdout();
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
            all.extend_from_slice(&buf[..n]);
            if let Some((trigger, input)) = script.get(next) {
                let text = String::from_utf8_lossy(&all);
                if text.contains(trigger.as_str()) {
                    if let Some(w) = stdin.as_mut() {
                        let _ = w.write_all(input.as_bytes());
                        let _ = w.flush();
                    }
                    next += 1;
                }
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&all).into_owned());
    });
    let start = Instant::now();
    let code = loop {
        match child.try_wait().map_err(|e| format!("waiting for QEMU: {e}"))? {
            Some(status) => break status.code().unwrap_or(128),
            None if start.elapsed() > QEMU_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                return Err(format!("QEMU did not finish within {} s", QEMU_TIMEOUT.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let out = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let _ = reader.join();
    Ok((code, out))
}

/// `cargo xtask run --arch riscv64 [--guest FILE]`: boots the hypervisor with FILE (an S-mode
/// ELF, or a raw binary for 0x80200000), or with the bundled demo guest (guests/riscv-hello)
/// when no file is given; the exit status is the guest's.
pub fn run(guest: Option<&Path>) -> Result<i32, String> {
    ensure_tools()?;
    let image = build_image()?;
    let guest = match guest {
        Some(g) => g.to_path_buf(),
        None => build_hello(0)?,
    };
    let (code, _) = run_qemu(qemu_command(&image, Some(&guest))?)?;
    Ok(code)
}

/// The RISC-V scenario suite under QEMU, plus one scenario of xtask's own: the separately built
/// riscv-hello guest, given as a guest file, must end QEMU with the status it was built with.
pub fn test_suite() -> Result<crate::SuiteResult, String> {
    ensure_tools()?;
    let image = build_image()?;
    let (code, out) = run_qemu(qemu_command(&image, None)?)?;
    let mut tally = util::parse_tally(&out).ok_or_else(|| format!("the suite printed no tally (QEMU exit {code})"))?;
    if code != 0 && tally.failed == 0 {
        println!("not ok - the hypervisor exited with {code} although every scenario passed");
        tally.failed += 1;
    }
    let hello = build_hello(HELLO_TEST_STATUS)?;
    let (hcode, hout) = run_qemu(qemu_command(&image, Some(&hello))?)?;
    let said_hello = hout.contains("riscv-hello: exiting through SRST");
    if hcode == HELLO_TEST_STATUS as i32 && said_hello {
        println!("ok - riscv-hello guest file ran and its SRST status {HELLO_TEST_STATUS} became QEMU's exit status");
        tally.passed += 1;
    } else {
        println!("not ok - riscv-hello guest file: exit status {hcode}, expected {HELLO_TEST_STATUS} (finished: {said_hello})");
        tally.failed += 1;
    }
    // U-Boot: its banner through the emulated ns16550, its prompt, then `poweroff` typed on the
    // console (the hypervisor feeds the UART's RBR from it) ends in SBI SRST, status 0.
    let uboot = ensure_uboot().and_then(|u| {
        run_qemu_scripted(
            qemu_command(&image, Some(&u))?,
            &[("Hit any key to stop autoboot", "\n"), ("=> ", "poweroff\n")],
        )
    });
    match uboot {
        Ok((0, out)) if out.contains("U-Boot 20") && out.contains("guest reset: type 0 reason 0x0") => {
            println!("ok - U-Boot (Debian u-boot-qemu, S-mode) booted to its prompt and powered off through SRST");
            tally.passed += 1;
        }
        Ok((code, _)) => {
            println!("not ok - U-Boot guest: exit status {code}");
            tally.failed += 1;
        }
        Err(e) => {
            println!("not ok - U-Boot guest: {e}");
            tally.failed += 1;
        }
    }
    Ok(tally)
}
