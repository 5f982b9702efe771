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
//!
//! `cargo xtask test` runs the suite twice: on Debian's QEMU 7.2, whose harts set G-stage A/D
//! bits themselves, and on QEMU 10 from Debian's bookworm-backports with `svadu=false,svade=true`,
//! a hart that faults on A=0/D=0 instead. QEMU 10 is unpacked into [`QEMU10_DIR`] beside the
//! system's QEMU (which it would replace if installed as a package), using apt with a private
//! sources list derived from the machine's own.

use crate::riscv_stage::{guest_refusal, qemu_command, GuestOpts, Stage};
use crate::{hostile, util};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use twostage_baremetal::elf::EXIT_REFUSED;
use twostage_hv_riscv::boot::LiveOp;
use twostage_hv_riscv::boot::MAX_FILE;

const TARGET: &str = "riscv64gc-unknown-none-elf";
/// Wall-clock limit of one QEMU run (a full suite takes about a second).
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
/// The exit status the suite's own riscv-hello run is built with, to prove it propagates.
const HELLO_TEST_STATUS: u32 = 7;
/// Where QEMU 10 (and the OpenSBI it boots) is unpacked.
const QEMU10_DIR: &str = "/var/cache/twostage/qemu10";
/// The packages unpacked there, from bookworm-backports.
const QEMU10_PACKAGES: [&str; 4] = ["qemu-system-riscv", "qemu-system-common", "qemu-system-data", "opensbi"];

/// One QEMU to run the hypervisor on.
pub struct Qemu {
    /// The qemu-system-riscv64 program.
    program: PathBuf,
    /// The `-cpu` value.
    cpu: &'static str,
    /// Its own module and data directories, for a QEMU unpacked beside the system's.
    dirs: Option<(PathBuf, PathBuf)>,
}

impl Qemu {
    /// The qemu-system-riscv64 program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The `-cpu` value.
    pub fn cpu(&self) -> &'static str {
        self.cpu
    }

    /// Its own module and data directories, if it has them.
    pub fn dirs(&self) -> Option<&(PathBuf, PathBuf)> {
        self.dirs.as_ref()
    }

    /// Debian's default QEMU (7.2 on Debian 12), whose harts update G-stage A/D bits.
    fn system() -> Self {
        Self { program: PathBuf::from("qemu-system-riscv64"), cpu: "rv64,h=true", dirs: None }
    }

    /// QEMU 10 from bookworm-backports, with hardware A/D updating turned off (Svadu off, Svade on).
    fn qemu10_no_hw_ad() -> Result<Self, String> {
        let root = ensure_qemu10()?;
        Ok(Self {
            program: root.join("usr/bin/qemu-system-riscv64"),
            cpu: "rv64,h=true,svadu=false,svade=true",
            dirs: Some((root.join("usr/lib/x86_64-linux-gnu/qemu"), root.join("usr/share/qemu"))),
        })
    }
}

/// The machine's main Debian archive stanza in deb822 form (URIs and Signed-By of the entry whose
/// suites include the release itself), from /etc/apt/sources.list.d/debian.sources or, failing
/// that, /etc/apt/sources.list; nothing about the archive is written into this repository.
fn debian_archive() -> Result<(String, Option<String>), String> {
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources") {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim_start_matches(':').trim().to_string()))
            };
            let suites = field("Suites").unwrap_or_default();
            if suites.split_whitespace().any(|s| s == "bookworm") {
                let uri = field("URIs").ok_or("debian.sources: a bookworm stanza without URIs")?;
                let uri = uri.split_whitespace().next().unwrap_or_default().to_string();
                return Ok((uri, field("Signed-By")));
            }
        }
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    list.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.len() >= 3 && w[0] == "deb" && w[2] == "bookworm")
        .map(|w| (w[1].to_string(), None))
        .ok_or_else(|| "no Debian bookworm archive in apt's sources to take bookworm-backports from".into())
}

/// Unpacks QEMU 10 and OpenSBI from bookworm-backports into [`QEMU10_DIR`] when not there yet
/// (apt-get download with a private sources list and lists directory, then dpkg -x: the system's
/// QEMU and apt configuration stay as they are); returns the unpacked root.
fn ensure_qemu10() -> Result<PathBuf, String> {
    let dir = Path::new(QEMU10_DIR);
    let root = dir.join("root");
    let ready = |r: &Path| {
        r.join("usr/bin/qemu-system-riscv64").exists()
            && r.join("usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin").exists()
    };
    if ready(&root) {
        return Ok(root);
    }
    eprintln!("QEMU 10 is missing: unpacking {} from bookworm-backports into {QEMU10_DIR}", QEMU10_PACKAGES.join(" "));
    let (uri, signed_by) = debian_archive()?;
    let apt = dir.join("apt");
    let debs = dir.join("debs");
    std::fs::create_dir_all(apt.join("lists/partial")).map_err(|e| format!("{}: {e}", apt.display()))?;
    std::fs::create_dir_all(&debs).map_err(|e| format!("{}: {e}", debs.display()))?;
    let sources = apt.join("backports.sources");
    let mut stanza = format!("Types: deb\nURIs: {uri}\nSuites: bookworm-backports\nComponents: main\n");
    if let Some(key) = signed_by {
        stanza.push_str(&format!("Signed-By: {key}\n"));
    }
    std::fs::write(&sources, stanza).map_err(|e| format!("{}: {e}", sources.display()))?;
    let opts = [
        format!("Dir::Etc::SourceList={}", sources.display()),
        "Dir::Etc::SourceParts=/nonexistent".to_string(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
    ];
    let apt_get = |args: &[&str]| -> Result<i32, String> {
        let mut cmd = Command::new("apt-get");
        for o in &opts {
            cmd.arg("-o").arg(o);
        }
        util::run(cmd.args(args).current_dir(&debs).env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if apt_get(&["update"])? != 0 {
        return Err("apt-get update of bookworm-backports failed".into());
    }
    let mut download = vec!["download"];
    download.extend(QEMU10_PACKAGES);
    if apt_get(&download)? != 0 {
        return Err(format!("apt-get download {} failed", QEMU10_PACKAGES.join(" ")));
    }
    let staging = dir.join("root.new");
    let _ = std::fs::remove_dir_all(&staging);
    for entry in std::fs::read_dir(&debs).map_err(|e| format!("{}: {e}", debs.display()))? {
        let deb = entry.map_err(|e| e.to_string())?.path();
        let name = deb.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let wanted = name.ends_with(".deb") && QEMU10_PACKAGES.iter().any(|p| name.starts_with(&format!("{p}_")));
        if wanted && util::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&staging))? != 0 {
            return Err(format!("dpkg -x {} failed", deb.display()));
        }
    }
    if !ready(&staging) {
        return Err(format!("the unpacked packages in {} lack QEMU or OpenSBI", staging.display()));
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&staging, &root).map_err(|e| format!("{}: {e}", root.display()))?;
    Ok(root)
}

/// A guest nobody here built: Debian's S-mode U-Boot for QEMU virt (package u-boot-qemu).
const UBOOT: &str = "/usr/lib/u-boot/qemu-riscv64_smode/uboot.elf";

/// Installs u-boot-qemu when its S-mode image is missing (a package with no program to probe).
fn ensure_uboot() -> Result<PathBuf, String> {
    util::ensure_file(UBOOT, &["u-boot-qemu"])?;
    Ok(PathBuf::from(UBOOT))
}

pub fn target_dir() -> PathBuf {
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

/// Checks `guest` as the hypervisor would, then boots it (typing `script` on the console): the
/// exit status and the console output. A refused file does not boot: the status is
/// [`EXIT_REFUSED`] and the output the refusal.
fn run_guest(
    qemu: &Qemu,
    image: &Path,
    guest: &Path,
    opts: &GuestOpts,
    script: &[(&str, &str)],
) -> Result<(i32, String), String> {
    if let Some(why) = guest_refusal(guest, opts)? {
        let msg = format!("xtask: guest file {} refused: {why}", guest.display());
        eprintln!("{msg}");
        return Ok((i32::from(EXIT_REFUSED), msg));
    }
    run_qemu_scripted(qemu_command(qemu, image, Stage::File(guest, opts))?, script)
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
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
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
pub fn run(guest: Option<&Path>, opts: &GuestOpts) -> Result<i32, String> {
    if let Some(g) = guest {
        // Refuse before building anything.
        if let Some(why) = guest_refusal(g, opts)? {
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
    let (code, _) = run_guest(&Qemu::system(), &image, &guest, opts, &[])?;
    Ok(code)
}

/// The RISC-V suites: on Debian's QEMU (hardware A/D updating) and on QEMU 10 with it turned off.
pub fn test_suites() -> Vec<(&'static str, Result<crate::SuiteResult, String>)> {
    let image = ensure_tools().and_then(|()| build_image());
    let mut out = Vec::new();
    for (name, qemu) in
        [("riscv64 (QEMU)", Ok(Qemu::system())), ("riscv64 (QEMU 10, no hardware A/D)", Qemu::qemu10_no_hw_ad())]
    {
        let r = match (&image, qemu) {
            (Ok(image), Ok(qemu)) => {
                println!("== {name}: {} -cpu {}", qemu.program.display(), qemu.cpu);
                test_suite(&qemu, image)
            }
            (Err(e), _) => Err(e.clone()),
            (_, Err(e)) => Err(e),
        };
        out.push((name, r));
    }
    out
}

/// The RISC-V scenario suite under `qemu`, plus xtask's own scenarios: the separately built
/// riscv-hello guest, given as a guest file, must end QEMU with the status it was built with;
/// U-Boot must boot to its prompt and power off. Scenarios the hart cannot run are listed as
/// skipped (the image prints `# SKIP` and the reason).
fn test_suite(qemu: &Qemu, image: &Path) -> Result<crate::SuiteResult, String> {
    let image = image.to_path_buf();
    let (code, out) = run_qemu(qemu_command(qemu, &image, Stage::Nothing)?)?;
    let mut tally = util::parse_tally(&out).ok_or_else(|| format!("the suite printed no tally (QEMU exit {code})"))?;
    for skip in out.lines().filter(|l| l.contains(" # SKIP ")) {
        println!("skipped: {}", skip.trim());
    }
    if code != 0 && tally.failed == 0 {
        println!("not ok - the hypervisor exited with {code} although every scenario passed");
        tally.failed += 1;
    }
    let hello = build_hello(HELLO_TEST_STATUS)?;
    let (hcode, hout) = run_guest(qemu, &image, &hello, &GuestOpts::default(), &[])?;
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
        run_guest(
            qemu,
            &image,
            &u,
            &GuestOpts::default(),
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
    // The project's Linux guest (cargo xtask linux), unmodified, on one vCPU, two and four (one
    // hart each, sharing the address space): init's memory checks pass (on more than one, its
    // threads pinned per CPU and its shootdown check need HSM, IPI and RFENCE) and it powers off
    // through SRST with status 0. Then the same guest forked and migrated while it runs, each
    // compared with the plain run on as many vCPUs.
    if qemu.dirs.is_none() {
        let mut plain = std::collections::BTreeMap::new();
        for vcpus in [1, 2, 4] {
            let opts = GuestOpts { vcpus, ..GuestOpts::default() };
            let run = crate::linux::kernel(crate::Arch::Riscv64).and_then(|k| run_guest(qemu, &image, &k, &opts, &[]));
            match run {
                Ok((code, out)) => {
                    let ok = code == 0
                        && out.contains("twostage-linux: all checks passed")
                        && out.contains(&format!("twostage-linux: start ({vcpus} CPU"));
                    tally.check(
                        ok,
                        &format!(
                            "Linux 6.1 (the project's guest, {vcpus} vCPU(s), 128 MiB) ran init's checks to the end, exit status {code}"
                        ),
                    );
                    if ok {
                        plain.insert(vcpus, out);
                    }
                }
                Err(e) => tally.check(false, &format!("Linux guest on {vcpus} vCPU(s): {e}")),
            }
        }
        live_checks(qemu, &image, &plain, &mut tally);
    }
    // The same kernel against bare QEMU (console, cost), and on QEMU 10 (riscv_linux.rs).
    crate::riscv_linux::checks(qemu, &image, &mut tally);
    // Hostile guest files do not depend on how the hart keeps A/D bits: checked on one QEMU.
    if qemu.dirs.is_none() {
        let hostile = hostile_checks(qemu, &image, &hello)?;
        tally.passed += hostile.passed;
        tally.failed += hostile.failed;
    }
    Ok(tally)
}

/// The project's Linux guest forked (`--fork`, one vCPU) and migrated (`--migrate`, on one vCPU
/// and on two) while it runs, each checked against the plain run on as many vCPUs (`plain`, its
/// output by vCPUs): the fork's init lines ([`crate::linux::check_fork`]), the migrated guest's
/// whole console ([`crate::linux::check_migration`]);
/// the exit status must be 0 (the parent's, for a fork).
fn live_checks(
    qemu: &Qemu,
    image: &Path,
    plain: &std::collections::BTreeMap<u64, String>,
    tally: &mut crate::SuiteResult,
) {
    let kernel = match crate::linux::kernel(crate::Arch::Riscv64) {
        Ok(k) => k,
        Err(e) => return tally.check(false, &format!("Linux fork and migration: {e}")),
    };
    let Some(plain_one) = plain.get(&1) else {
        return tally.check(false, "Linux fork and migration: no plain one-vCPU run to compare with");
    };
    let fork = GuestOpts { live: LiveOp::Fork { after: 1 }, ..GuestOpts::default() };
    match run_guest(qemu, image, &kernel, &fork, &[]) {
        Ok((code, out)) => {
            let verdict = crate::linux::check_fork(&out, &crate::linux::init_lines(plain_one, ""));
            tally.check(
                code == 0 && verdict.is_ok(),
                &format!(
                    "Linux forked at its first exit from user space: child ([child] lines) and parent both ran init to the end, exit status {code}: {}",
                    verdict.unwrap_or_else(|e| e)
                ),
            );
        }
        Err(e) => tally.check(false, &format!("Linux fork: {e}")),
    }
    for vcpus in [1, 2] {
        let Some(plain) = plain.get(&vcpus) else {
            tally.check(false, &format!("Linux migration on {vcpus} vCPU(s): no plain run to compare with"));
            continue;
        };
        let opts = GuestOpts { vcpus, live: LiveOp::Migrate { after: 1 }, ..GuestOpts::default() };
        match run_guest(qemu, image, &kernel, &opts, &[]) {
            Ok((code, out)) => {
                let verdict = crate::linux::check_migration(&out, plain);
                tally.check(
                    code == 0 && verdict.is_ok(),
                    &format!(
                        "Linux migrated while it ran ({vcpus} vCPU(s)): its console (kernel and init) equals the plain run's, exit status {code}: {}",
                        verdict.unwrap_or_else(|e| e)
                    ),
                );
            }
            Err(e) => tally.check(false, &format!("Linux migration on {vcpus} vCPU(s): {e}")),
        }
    }
}

/// Hostile guest files, written to the target directory: a file name with commas runs as
/// written; every other file is refused by xtask before booting and, booted without xtask's
/// check, by the hypervisor itself, with the same message and [`EXIT_REFUSED`]; a guest with
/// data where the device tree used to go finds its data and a device tree at a1.
fn hostile_checks(qemu: &Qemu, image: &Path, hello: &Path) -> Result<crate::SuiteResult, String> {
    let mut tally = crate::SuiteResult::default();
    let dir = target_dir().join("hostile").join("riscv");
    let _ = std::fs::remove_dir_all(&dir);
    let hello_bytes = std::fs::read(hello).map_err(|e| format!("read {}: {e}", hello.display()))?;

    let commas = hostile::write(&dir, "riscv-hello,copy,addr=0x0", &hello_bytes)?;
    let (code, out) = run_guest(qemu, image, &commas, &GuestOpts::default(), &[])?;
    tally.check(
        code == HELLO_TEST_STATUS as i32 && out.contains("riscv-hello: exiting through SRST"),
        &format!(
            "a guest file named {:?} runs as written (exit status {code})",
            commas.file_name().unwrap_or_default()
        ),
    );

    let probe = hostile::write(&dir, "dtb-spot.elf", &hostile::riscv_probe())?;
    let (code, _) = run_guest(qemu, image, &probe, &GuestOpts::default(), &[])?;
    tally.check(
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
        let why = guest_refusal(&path, &GuestOpts::default())?.unwrap_or_default();
        let (code, _) = run_guest(qemu, image, &path, &GuestOpts::default(), &[])?;
        tally.check(
            why.contains(expect) && code == i32::from(EXIT_REFUSED),
            &format!("xtask refuses {name} before booting, exit status {code}: {why}"),
        );
        // The hypervisor on its own: staged without xtask's check.
        let stage = if bytes.is_empty() { Stage::HeaderOnly(0) } else { Stage::File(&path, &GuestOpts::default()) };
        let (code, out) = run_qemu(qemu_command(qemu, image, stage)?)?;
        let said = format!("guest file refused: {why}");
        tally.check(
            !why.is_empty() && code == i32::from(EXIT_REFUSED) && out.contains(&said),
            &format!("the hypervisor refuses {name} on its own with the same message, exit status {code}"),
        );
    }
    // Too large to stage: the hypervisor sees the header's size and refuses it.
    let (code, out) = run_qemu(qemu_command(qemu, image, Stage::HeaderOnly(MAX_FILE + 1))?)?;
    tally.check(
        code == i32::from(EXIT_REFUSED) && out.contains("guest file refused: the staged size"),
        &format!("the hypervisor refuses a staged size over {} MiB, exit status {code}", MAX_FILE >> 20),
    );
    Ok(tally)
}
