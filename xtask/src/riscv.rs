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

use crate::{hostile, util};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use twostage_baremetal::elf::{self, LoadError, Machine, Place, EXIT_REFUSED};

const TARGET: &str = "riscv64gc-unknown-none-elf";
/// Wall-clock limit of one QEMU run (a full suite takes about a second).
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the guest file is staged in host RAM (the hypervisor reserves it from its allocator).
const STAGE_ADDR: u64 = 0x8800_0000;
/// The staging header: magic at +0, size at +8.
const STAGE_HEADER: u64 = STAGE_ADDR - 0x1000;
/// The largest guest file the hypervisor accepts (images/riscv-hv/src/loader.rs: MAX_FILE).
const MAX_GUEST: u64 = 32 << 20;
/// The guest's RAM (images/riscv-hv/src/loader.rs: GUEST_RAM, GUEST_RAM_LEN).
const GUEST_RAM: Range<u64> = 0x8000_0000..0x8400_0000;
/// Where a raw image goes (images/riscv-hv/src/loader.rs: RAW_LOAD).
const RAW_LOAD: u64 = 0x8020_0000;
/// The device tree's alignments, tried in turn at the top of guest RAM (loader.rs: DTB_ALIGNS).
const DTB_ALIGNS: [u64; 3] = [1 << 20, 0x1000, 8];
/// At least the size of the guest's device tree (about 1.3 KiB), for the check before booting.
const DTB_SIZE: u64 = 0x800;
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

/// What xtask stages for the hypervisor.
enum Stage<'a> {
    /// Nothing: the hypervisor runs its scenario suite.
    Nothing,
    /// A guest file (of 1 to [`MAX_GUEST`] bytes).
    File(&'a Path),
    /// Only the staging header, saying `len` bytes: what the hypervisor sees of an empty or an
    /// oversized file when it is booted without xtask.
    HeaderOnly(u64),
}

/// `path` as one QEMU option value: each comma doubled, so a comma in a file name cannot end the
/// value (`-device loader,file=a,,b` names the file `a,b`).
fn qemu_value(path: &Path) -> OsString {
    let mut v = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        v.push(b);
        if b == b',' {
            v.push(b',');
        }
    }
    OsString::from_vec(v)
}

/// The QEMU command line for `image`, with `stage` staged.
fn qemu_command(image: &Path, stage: Stage<'_>) -> Result<Command, String> {
    let mut cmd = Command::new("qemu-system-riscv64");
    cmd.args(["-machine", "virt", "-cpu", "rv64,h=true", "-nographic", "-bios", "default", "-m", "256M", "-kernel"])
        .arg(image);
    let len = match stage {
        Stage::Nothing => return Ok(cmd),
        Stage::HeaderOnly(len) => len,
        Stage::File(g) => {
            let len = std::fs::metadata(g).map_err(|e| format!("guest file {}: {e}", g.display()))?.len();
            if len == 0 || len > MAX_GUEST {
                return Err(format!("guest file {} is {len} bytes; 1 to {MAX_GUEST} can be staged", g.display()));
            }
            let file = g.canonicalize().map_err(|e| format!("guest file {}: {e}", g.display()))?;
            let mut device = OsString::from("loader,file=");
            device.push(qemu_value(&file));
            device.push(format!(",addr={STAGE_ADDR:#x},force-raw=on"));
            cmd.arg("-device").arg(device);
            len
        }
    };
    let magic = u64::from_le_bytes(*b"TSGUEST!");
    cmd.arg("-device")
        .arg(format!("loader,addr={STAGE_HEADER:#x},data={magic:#x},data-len=8"))
        .arg("-device")
        .arg(format!("loader,addr={:#x},data={len},data-len=8", STAGE_HEADER + 8));
    Ok(cmd)
}

/// The hypervisor's checks on a guest file (images/riscv-hv/src/loader.rs), run before booting:
/// `Ok(Some(message))` when the file would be refused, `Ok(None)` when it would run, `Err` when
/// it cannot be read.
pub fn guest_refusal(path: &Path) -> Result<Option<String>, String> {
    let len = std::fs::metadata(path).map_err(|e| format!("guest file {}: {e}", path.display()))?.len();
    if len > MAX_GUEST {
        return Ok(Some(format!(
            "the file is {len} bytes: the hypervisor's staging area holds at most {MAX_GUEST} ({} MiB)",
            MAX_GUEST >> 20
        )));
    }
    let file = std::fs::read(path).map_err(|e| format!("guest file {}: {e}", path.display()))?;
    let checked = elf::plan_elf_or_raw(&file, Machine::Riscv64, GUEST_RAM, RAW_LOAD)
        .and_then(|plan| plan.place("device tree", GUEST_RAM, DTB_SIZE, &DTB_ALIGNS, Place::Highest).map(drop));
    Ok(checked.err().map(|e: LoadError| e.to_string()))
}

/// Checks `guest` as the hypervisor would, then boots it (typing `script` on the console): the
/// exit status and the console output. A refused file does not boot: the status is
/// [`EXIT_REFUSED`] and the output the refusal.
fn run_guest(image: &Path, guest: &Path, script: &[(&str, &str)]) -> Result<(i32, String), String> {
    if let Some(why) = guest_refusal(guest)? {
        let msg = format!("xtask: guest file {} refused: {why}", guest.display());
        eprintln!("{msg}");
        return Ok((i32::from(EXIT_REFUSED), msg));
    }
    run_qemu_scripted(qemu_command(image, Stage::File(guest))?, script)
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
/// when no file is given; the exit status is the guest's, or [`EXIT_REFUSED`] for a file that
/// xtask or the hypervisor refused.
pub fn run(guest: Option<&Path>) -> Result<i32, String> {
    if let Some(g) = guest {
        // Refuse before building anything.
        if let Some(why) = guest_refusal(g)? {
            eprintln!("xtask: guest file {} refused: {why}", g.display());
            return Ok(i32::from(EXIT_REFUSED));
        }
    }
    ensure_tools()?;
    let image = build_image()?;
    let guest = match guest {
        Some(g) => g.to_path_buf(),
        None => build_hello(0)?,
    };
    let (code, _) = run_guest(&image, &guest, &[])?;
    Ok(code)
}

/// The RISC-V scenario suite under QEMU, plus one scenario of xtask's own: the separately built
/// riscv-hello guest, given as a guest file, must end QEMU with the status it was built with.
pub fn test_suite() -> Result<crate::SuiteResult, String> {
    ensure_tools()?;
    let image = build_image()?;
    let (code, out) = run_qemu(qemu_command(&image, Stage::Nothing)?)?;
    let mut tally = util::parse_tally(&out).ok_or_else(|| format!("the suite printed no tally (QEMU exit {code})"))?;
    if code != 0 && tally.failed == 0 {
        println!("not ok - the hypervisor exited with {code} although every scenario passed");
        tally.failed += 1;
    }
    let hello = build_hello(HELLO_TEST_STATUS)?;
    let (hcode, hout) = run_guest(&image, &hello, &[])?;
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
    let uboot = ensure_uboot()
        .and_then(|u| run_guest(&image, &u, &[("Hit any key to stop autoboot", "\n"), ("=> ", "poweroff\n")]));
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
    let hostile = hostile_checks(&image, &hello)?;
    tally.passed += hostile.passed;
    tally.failed += hostile.failed;
    Ok(tally)
}

/// Prints one `ok` / `not ok` line and counts it.
fn check(tally: &mut crate::SuiteResult, ok: bool, what: &str) {
    println!("{} - {what}", if ok { "ok" } else { "not ok" });
    if ok {
        tally.passed += 1;
    } else {
        tally.failed += 1;
    }
}

/// Hostile guest files, written to the target directory: a file name with commas runs as
/// written; every other file is refused by xtask before booting and, booted without xtask's
/// check, by the hypervisor itself, with the same message and [`EXIT_REFUSED`]; a guest with
/// data where the device tree used to go finds its data and a device tree at a1.
fn hostile_checks(image: &Path, hello: &Path) -> Result<crate::SuiteResult, String> {
    let mut tally = crate::SuiteResult::default();
    let dir = target_dir().join("hostile").join("riscv");
    let _ = std::fs::remove_dir_all(&dir);
    let hello_bytes = std::fs::read(hello).map_err(|e| format!("read {}: {e}", hello.display()))?;

    let commas = hostile::write(&dir, "riscv-hello,copy,addr=0x0", &hello_bytes)?;
    let (code, out) = run_guest(image, &commas, &[])?;
    check(
        &mut tally,
        code == HELLO_TEST_STATUS as i32 && out.contains("riscv-hello: exiting through SRST"),
        &format!(
            "a guest file named {:?} runs as written (exit status {code})",
            commas.file_name().unwrap_or_default()
        ),
    );

    let probe = hostile::write(&dir, "dtb-spot.elf", &hostile::riscv_probe())?;
    let (code, _) = run_guest(image, &probe, &[])?;
    check(
        &mut tally,
        code == hostile::PROBE_OK,
        &format!(
            "a guest with data where the device tree used to go keeps it and gets a device tree at a1 (exit status \
             {code}, expected {})",
            hostile::PROBE_OK
        ),
    );

    let mut refused = vec![
        ("wrong-machine.elf", hostile::relabel(hello_bytes.clone(), hostile::EM_X86_64), "x86-64 (e_machine 62)"),
        ("empty", Vec::new(), "the file is empty"),
    ];
    refused.extend(hostile::riscv_refused().into_iter().map(|(name, bytes)| {
        let expect = match name {
            "no-segment.elf" => "no loadable segment",
            "overlap.elf" => "overlap in guest memory",
            _ => "lies outside guest RAM",
        };
        (name, bytes, expect)
    }));
    for (name, bytes, expect) in refused {
        let path = hostile::write(&dir, name, &bytes)?;
        let why = guest_refusal(&path)?.unwrap_or_default();
        let (code, _) = run_guest(image, &path, &[])?;
        check(
            &mut tally,
            why.contains(expect) && code == i32::from(EXIT_REFUSED),
            &format!("xtask refuses {name} before booting, exit status {code}: {why}"),
        );
        // The hypervisor on its own: staged without xtask's check.
        let stage = if bytes.is_empty() { Stage::HeaderOnly(0) } else { Stage::File(&path) };
        let (code, out) = run_qemu(qemu_command(image, stage)?)?;
        let said = format!("guest file refused: {why}");
        check(
            &mut tally,
            !why.is_empty() && code == i32::from(EXIT_REFUSED) && out.contains(&said),
            &format!("the hypervisor refuses {name} on its own with the same message, exit status {code}"),
        );
    }
    // Too large to stage: the hypervisor sees the header's size and refuses it.
    let (code, out) = run_qemu(qemu_command(image, Stage::HeaderOnly(MAX_GUEST + 1))?)?;
    check(
        &mut tally,
        code == i32::from(EXIT_REFUSED) && out.contains("guest file refused: the staged size"),
        &format!("the hypervisor refuses a staged size over {} MiB, exit status {code}", MAX_GUEST >> 20),
    );
    Ok(tally)
}
