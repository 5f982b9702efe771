//! x86: build the GRUB ISO and boot it in Bochs (owned by the x86 image work).
//!
//! The hypervisor (`images/x86-hv`) is a multiboot (v1) ELF64 kernel; GRUB loads it from an
//! El Torito ISO, together with an optional guest as a multiboot module. Bochs runs headless
//! (rfb display with `timeout=0`); the hypervisor reports on COM1 (a file) and ends the run with
//! a `twostage-exit: N` line followed by a magic breakpoint, which the rc file answers with `ptime`
//! (Bochs' tick count, read back from its console output: see [`ptime`]) and `quit`.
//!
//! When a guest is given, GRUB's kernel command line says so (`guest=/boot/guest.elf`): if GRUB
//! cannot load the module (a file larger than the machine's free memory is dropped), the
//! hypervisor refuses to run rather than run its scenario suite instead. Before building the ISO,
//! xtask runs the hypervisor's own checks on the file (`twostage_baremetal::multiboot::plan_guest`
//! with the guest RAM of `hypervisor/x86/src/mbguest.rs`) and refuses a file that would not fit the
//! Bochs machine's memory; a refusal, by xtask or by the hypervisor, names the problem and ends
//! with [`EXIT_REFUSED`].

use crate::{hostile, util};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use twostage_baremetal::elf::EXIT_REFUSED;
use twostage_baremetal::multiboot::{self, find_header};

/// The Bochs CPU models the suite runs on: one with EPT A/D bits, one without.
const SUITE_CPUS: [(&str, &str); 2] =
    [("x86_64 skylake_x (Bochs)", "corei7_skylake_x"), ("x86_64 sandy_bridge (Bochs)", "corei7_sandy_bridge_2600k")];
/// The model `cargo xtask run --arch x86_64` uses when `--cpu` is not given.
const DEFAULT_CPU: &str = "corei7_skylake_x";
/// Wall-clock limit of one Bochs run.
const BOCHS_TIMEOUT: Duration = Duration::from_secs(300);
/// The line the hypervisor prints just before it stops Bochs.
const EXIT_PREFIX: &str = "twostage-exit: ";
/// The Bochs machine's memory, in MiB.
const BOCHS_MEGS: u64 = 128;
/// The largest guest file accepted: GRUB must load it beside the hypervisor (a few MiB from 1 MiB
/// up) and leave the hypervisor enough frames for the guest's RAM and tables.
const MAX_GUEST: u64 = 64 << 20;
/// The multiboot guest RAM without `mem=` (hypervisor/x86/src/mbguest.rs: DEFAULT_RAM).
const GUEST_RAM: u64 = 16 << 20;
/// Where GRUB puts the guest module on the ISO, also named on the kernel command line.
const GUEST_ON_ISO: &str = "/boot/guest.elf";

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

/// How a guest is started: `--mem`, `--append`, `--initrd` and the CPU properties of `--cpu` of
/// `cargo xtask run`.
///
/// They reach the hypervisor on its own GRUB command line: `guest=/boot/guest.elf mem=BYTES
/// [cpu=hypervisor=off] [initrd=/boot/initrd] -- 'APPEND'`; everything after ` -- ` is the Linux
/// guest's command line, and the initrd is GRUB's second module.
#[derive(Clone, Debug, Default)]
pub struct GuestOptions {
    /// Guest RAM in bytes (multiboot guests booted without it, as the hostile checks do, get
    /// [`GUEST_RAM`]).
    pub mem: u64,
    /// The Linux command line.
    pub append: String,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// `--cpu ...,hypervisor=off`: the guest's CPUID.1:ECX bit 31 (hypervisor present) is left
    /// clear, as on the bare processor; false (the default) sets it.
    pub hypervisor_off: bool,
}

impl GuestOptions {
    /// The hypervisor's own arguments for these options, after `guest=FILE`.
    fn hv_args(&self) -> String {
        let mut args = format!("mem={}", self.mem);
        if self.hypervisor_off {
            args.push_str(" cpu=hypervisor=off");
        }
        args
    }
}

/// What `--cpu` asks for: `[MODEL][,PROPERTY=on|off]...`, as QEMU's `-cpu MODEL,hypervisor=off`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuChoice {
    /// The Bochs CPU model (`cpu: model=`), [`DEFAULT_CPU`] when none is named.
    pub model: Option<String>,
    /// `hypervisor=on|off`: the guest's CPUID.1:ECX bit 31; `None` when not given (on).
    pub hypervisor: Option<bool>,
}

/// Parses `--cpu`: a Bochs model, then comma-separated properties; the only property is
/// `hypervisor=on|off`. A value without `=` first is the model (it may be left out:
/// `--cpu hypervisor=off`). Anything else is refused with the reason, before anything is built.
pub fn parse_cpu(s: &str) -> Result<CpuChoice, String> {
    let mut choice = CpuChoice::default();
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            None if i == 0 && !part.is_empty() => choice.model = Some(part.to_string()),
            None if i == 0 => {}
            Some(("hypervisor", "on")) => choice.hypervisor = Some(true),
            Some(("hypervisor", "off")) => choice.hypervisor = Some(false),
            Some(("hypervisor", v)) => return Err(format!("--cpu {s:?}: hypervisor={v}: the value is on or off")),
            _ if part.is_empty() => return Err(format!("--cpu {s:?}: an empty property")),
            _ => {
                return Err(format!(
                    "--cpu {s:?}: unknown CPU property {part:?}: give a Bochs model, then at most hypervisor=on|off \
                     (e.g. --cpu corei7_skylake_x,hypervisor=off)"
                ))
            }
        }
    }
    Ok(choice)
}

/// Default guest RAM: 128 MiB.
pub const DEFAULT_MEM: u64 = 128 << 20;

/// Parses `--mem`: a number of bytes with an optional K, M or G suffix, from 32 MiB (a Linux
/// kernel decompresses at 16 MiB and needs about 28 MiB more) to 1 GiB (the hypervisor's frame
/// allocator and the Bochs machine).
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("--mem {s:?}: not a size (use e.g. 128M or 1G)"))?;
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).ok_or(format!("--mem {s:?}: too large"))?;
    if !(32 << 20..=1 << 30).contains(&bytes) || bytes % 4096 != 0 {
        return Err(format!("--mem {s:?}: guest RAM must be a multiple of 4 KiB from 32M to 1G"));
    }
    Ok(bytes)
}

/// The guest module an ISO carries.
#[derive(Clone, Copy)]
enum IsoGuest<'a> {
    /// None: the hypervisor runs its scenario suite.
    Nothing,
    /// This file, as a multiboot module, with `guest=` on the kernel command line.
    File(&'a Path),
    /// This file with these options (a Linux guest).
    WithOptions(&'a Path, &'a GuestOptions),
    /// This multiboot file with these options' RAM (`mem=` on the kernel command line) and CPU
    /// properties.
    Multiboot(&'a Path, &'a GuestOptions),
    /// A `module` line for a file the ISO does not hold, with `guest=` on the kernel command line:
    /// what the hypervisor sees when GRUB cannot load the file (one larger than free memory).
    Missing,
}

/// Makes a GRUB El Torito ISO in `work` holding the hypervisor and `guest`.
fn build_iso(work: &Path, hv: &Path, guest: IsoGuest<'_>) -> Result<PathBuf, String> {
    let root = work.join("iso_root");
    let boot = root.join("boot");
    std::fs::create_dir_all(&boot).map_err(|e| format!("mkdir {}: {e}", boot.display()))?;
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).map(drop).map_err(|e| format!("copy {} -> {}: {e}", from.display(), to.display()))
    };
    copy(hv, &boot.join("hv.elf"))?;
    let guest_file = root.join(GUEST_ON_ISO.trim_start_matches('/'));
    let _ = std::fs::remove_file(&guest_file);
    let mut cfg = String::from("set timeout=0\n");
    match guest {
        IsoGuest::Nothing => cfg.push_str("multiboot /boot/hv.elf\n"),
        IsoGuest::File(_) | IsoGuest::Missing => {
            if let IsoGuest::File(g) = guest {
                copy(g, &guest_file)?;
            }
            cfg.push_str(&format!("multiboot /boot/hv.elf guest={GUEST_ON_ISO}\nmodule {GUEST_ON_ISO} guest\n"));
        }
        IsoGuest::Multiboot(g, o) => {
            copy(g, &guest_file)?;
            cfg.push_str(&format!(
                "multiboot /boot/hv.elf guest={GUEST_ON_ISO} {}\nmodule {GUEST_ON_ISO} guest\n",
                o.hv_args()
            ));
        }
        IsoGuest::WithOptions(g, o) => {
            copy(g, &guest_file)?;
            let mut line = format!("multiboot /boot/hv.elf guest={GUEST_ON_ISO} {}", o.hv_args());
            if o.initrd.is_some() {
                line.push_str(" initrd=/boot/initrd");
            }
            // GRUB keeps a single-quoted word as it is (no variables, no escapes).
            line.push_str(&format!(" -- '{}'\nmodule {GUEST_ON_ISO} guest\n", o.append));
            if let Some(i) = &o.initrd {
                copy(i, &root.join("boot/initrd"))?;
                line.push_str("module /boot/initrd initrd\n");
            }
            cfg.push_str(&line);
        }
    }
    cfg.push_str("boot\n");
    grub_iso(work, &root, &cfg, "multiboot", "twostage-x86.iso")
}

/// A bootable El Torito ISO from the tree `root` (whose `boot/` holds the files `cfg` loads):
/// GRUB's core image with `cfg` built in and the GRUB module `loader` (`multiboot` or `linux`).
pub fn grub_iso(work: &Path, root: &Path, cfg: &str, loader: &str, name: &str) -> Result<PathBuf, String> {
    let early = work.join("early.cfg");
    std::fs::write(&early, cfg).map_err(|e| format!("write {}: {e}", early.display()))?;
    let core = root.join("boot/core.img");
    let code = util::run(
        Command::new("grub-mkimage")
            .args(["-O", "i386-pc-eltorito", "-p", "/boot/grub", "-c"])
            .arg(&early)
            .arg("-o")
            .arg(&core)
            .args(["biosdisk", "iso9660", loader, "normal", "configfile"]),
    )?;
    if code != 0 {
        return Err(format!("grub-mkimage failed ({code})"));
    }
    let iso = work.join(name);
    let code = util::run(
        Command::new("xorriso")
            .args(["-as", "mkisofs", "-quiet", "-o"])
            .arg(&iso)
            .args(["-b", "boot/core.img", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"])
            .arg(root)
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
    /// Bochs' simulated time when the run ended (see [`ptime`]).
    ticks: Option<u64>,
}

/// Boots `iso` in Bochs with CPU `model`; streams COM1 to stdout when `echo`.
fn run_bochs(work: &Path, iso: &Path, model: &str, echo: bool) -> Result<BochsRun, String> {
    run_bochs_megs(work, iso, model, echo, BOCHS_MEGS)
}

/// [`run_bochs`] with `megs` MiB of machine memory.
fn run_bochs_megs(work: &Path, iso: &Path, model: &str, echo: bool, megs: u64) -> Result<BochsRun, String> {
    let serial = work.join(format!("serial-{model}.log"));
    let rc = work.join("cont.rc");
    let conf = work.join(format!("bochsrc-{model}"));
    let console = work.join(format!("bochs-stdout-{model}.log"));
    let _ = std::fs::remove_file(&serial);
    std::fs::write(&rc, "c\nptime\nquit\n").map_err(|e| format!("write {}: {e}", rc.display()))?;
    let bochsrc = format!(
        "megs: {megs}\n\
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
        .stdout(std::fs::File::create(&console).map_err(|e| format!("create {}: {e}", console.display()))?)
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
    let ticks = std::fs::read(&console).ok().and_then(|b| ptime(&String::from_utf8_lossy(&b)));
    Ok(BochsRun { serial: text, code, timed_out, ticks })
}

/// The tick count of the Bochs debugger's `ptime` command in its console output. With `clock:
/// sync=none` Bochs' simulated time advances one tick per emulated instruction (and skips ahead
/// while the CPU halts), so it is the instruction count of the run.
pub fn ptime(console: &str) -> Option<u64> {
    console.lines().find_map(|l| l.trim().strip_prefix("ptime: ")?.trim().parse().ok())
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

/// The hypervisor's checks on a guest file (hypervisor/x86/src/mbguest.rs), run before building
/// the ISO, plus the size GRUB can load in the Bochs machine: `Ok(Some(message))` when the file
/// would be refused, `Ok(None)` when it would run, `Err` when it cannot be read.
pub fn guest_refusal(path: &Path) -> Result<Option<String>, String> {
    guest_refusal_in(path, GUEST_RAM)
}

/// [`guest_refusal`] for a guest with `ram` bytes of RAM (`--mem`).
fn guest_refusal_in(path: &Path, ram: u64) -> Result<Option<String>, String> {
    let len = std::fs::metadata(path).map_err(|e| format!("guest file {}: {e}", path.display()))?.len();
    if len > MAX_GUEST {
        return Ok(Some(format!(
            "the file is {len} bytes ({} MiB): GRUB must load it into the Bochs machine's {BOCHS_MEGS} MiB beside \
             the hypervisor and the frames it needs, so at most {} MiB is accepted",
            len >> 20,
            MAX_GUEST >> 20
        )));
    }
    let file = std::fs::read(path).map_err(|e| format!("guest file {}: {e}", path.display()))?;
    if let Err(e) = twostage_baremetal::pvh::has_pvh_note(&file) {
        return Ok(Some(e.to_string()));
    }
    Ok(multiboot::plan_guest(&file, ram).err().map(|e| e.to_string()))
}

/// How a Linux kernel is entered: through the boot protocol (a bzImage) or its PVH note (an ELF
/// `vmlinux`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxEntry {
    /// `twostage_baremetal::linux_x86::plan_bzimage`.
    BzImage,
    /// `twostage_baremetal::pvh::plan_pvh`.
    Pvh,
}

/// [`guest_refusal`] for a Linux kernel with `opts`: the same checks as the hypervisor's for that
/// entry, plus the command line GRUB can carry.
pub fn linux_refusal(file: &[u8], opts: &GuestOptions, entry: LinuxEntry) -> Result<Option<String>, String> {
    use twostage_baremetal::linux_x86::{e820_map, plan_bzimage};
    if opts.append.contains(['\'', '\n', '\r']) {
        return Ok(Some("the command line (--append) may not hold a single quote or a line break".into()));
    }
    let initrd_len = match &opts.initrd {
        Some(i) => std::fs::metadata(i).map_err(|e| format!("initrd {}: {e}", i.display()))?.len(),
        None => 0,
    };
    let ram = 0..opts.mem;
    let (e820, n) = e820_map(std::slice::from_ref(&ram), &[]);
    let (map, cmdline) = (&e820[..n], opts.append.as_bytes());
    Ok(match entry {
        LinuxEntry::BzImage => plan_bzimage(file, opts.mem, map, cmdline, initrd_len).err().map(|e| e.to_string()),
        LinuxEntry::Pvh => {
            twostage_baremetal::pvh::plan_pvh(file, opts.mem, map, cmdline, initrd_len).err().map(|e| e.to_string())
        }
    })
}

/// Boots `iso` on the default CPU model: the hypervisor's exit status and the serial log.
fn boot(work: &Path, iso: &Path, echo: bool) -> Result<(Option<i32>, String), String> {
    let r = run_bochs(work, iso, DEFAULT_CPU, echo)?;
    if r.timed_out {
        return Err(format!("bochs did not finish within {}s", BOCHS_TIMEOUT.as_secs()));
    }
    Ok((exit_status(&r.serial), r.serial))
}

/// `cargo xtask run --arch x86_64 [--guest FILE] [--cpu [MODEL][,hypervisor=on|off]]` (`cpu` the
/// model, the properties already in `opts`).
///
/// Without a guest the hypervisor runs its bundled guest and prints what the memory subsystem
/// did; with one, the guest's COM1 output appears on stdout and the exit status is the value the
/// guest wrote to I/O port 0xf4, or [`EXIT_REFUSED`] for a file xtask or the hypervisor refused.
pub fn run(guest: Option<&Path>, cpu: Option<&str>, opts: &GuestOptions) -> Result<i32, String> {
    if guest.is_none() && opts.hypervisor_off {
        return Err("--cpu ...,hypervisor=off is for a guest (--guest FILE or --linux): the bundled scenario suite \
                    runs its own guests"
            .into());
    }
    let mut linux = false;
    let mut megs = BOCHS_MEGS;
    if let Some(g) = guest {
        let file = std::fs::read(g).map_err(|e| format!("guest file {}: {e}", g.display()))?;
        let pvh = twostage_baremetal::pvh::has_pvh_note(&file) == Ok(true);
        linux = twostage_baremetal::linux_x86::is_bzimage(&file) || pvh;
        let why = if pvh {
            linux_refusal(&file, opts, LinuxEntry::Pvh)?
        } else if linux {
            linux_refusal(&file, opts, LinuxEntry::BzImage)?
        } else {
            guest_refusal_in(g, opts.mem)?
        };
        if let Some(why) = why {
            eprintln!("xtask: guest file {} refused: {why}", g.display());
            return Ok(i32::from(EXIT_REFUSED));
        }
        // The guest's RAM comes from the hypervisor's frames: the machine holds it, the modules
        // GRUB loads, and 64 MiB for the hypervisor, its tables and GRUB.
        let initrd = opts.initrd.as_ref().and_then(|i| std::fs::metadata(i).ok()).map_or(0, |m| m.len());
        megs = megs.max((opts.mem >> 20) + ((file.len() as u64 + initrd) >> 20) + 64);
    }
    ensure_tools()?;
    let hv = build_hv()?;
    let work = work_dir(if guest.is_some() { "guest" } else { "bundled" })?;
    let iso_guest = match guest {
        Some(g) if linux => IsoGuest::WithOptions(g, opts),
        Some(g) => IsoGuest::Multiboot(g, opts),
        None => IsoGuest::Nothing,
    };
    let iso = build_iso(&work, &hv, iso_guest)?;
    let model = cpu.unwrap_or(DEFAULT_CPU);
    let start = Instant::now();
    let r = run_bochs_megs(&work, &iso, model, true, megs)?;
    if linux {
        println!("xtask: Linux under the hypervisor: {:.1} s wall time in Bochs", start.elapsed().as_secs_f64());
    }
    if r.timed_out {
        return Err(format!("bochs did not finish within {}s", BOCHS_TIMEOUT.as_secs()));
    }
    match exit_status(&r.serial) {
        Some(s) => Ok(s),
        None => Err(format!("the hypervisor never reported an exit status (bochs exited with {})", r.code)),
    }
}

/// Prints the end of a serial log, after a failed check.
fn print_tail(serial: &str) {
    let lines: Vec<&str> = serial.lines().collect();
    for l in &lines[lines.len().saturating_sub(6)..] {
        println!("    | {l}");
    }
}

/// Runs guests/x86-hello through [`run`]'s path and checks its exit status (it exits with 0x31
/// after reading a non-empty memory map); then the hostile guest files, written to the target
/// directory. xtask refuses each before booting (no emulator time); a few are also booted without
/// xtask's check, which the hypervisor must refuse on its own with the same message and
/// [`EXIT_REFUSED`]: a module GRUB did not load, an empty module, x86 code labelled RISC-V, a file
/// without a multiboot header. A probe guest with data where the multiboot information used to go
/// must find it intact.
fn hello_check(hv: &Path) -> Result<crate::SuiteResult, String> {
    const HELLO_STATUS: i32 = 0x31;
    let mut tally = crate::SuiteResult::default();
    let hello = build_hello()?;
    let work = work_dir("hello")?;
    let iso = build_iso(&work, hv, IsoGuest::File(&hello))?;
    let (status, serial) = boot(&work, &iso, false)?;
    let ok = status == Some(HELLO_STATUS) && serial.contains("x86-hello:");
    tally.check(ok, &format!("x86-hello guest exits with status {HELLO_STATUS:#x} (got {status:?})"));
    // --mem reaches a multiboot guest: 64 MiB of RAM is 0x9fc00 bytes below 1 MiB and 63 MiB above,
    // in the memory map it walks.
    let sixty_four = GuestOptions { mem: 64 << 20, ..Default::default() };
    let iso = build_iso(&work, hv, IsoGuest::Multiboot(&hello, &sixty_four))?;
    let (status, serial) = boot(&work, &iso, false)?;
    let ok = status == Some(HELLO_STATUS) && serial.contains("0x03f9fc00 bytes available");
    if !ok {
        print_tail(&serial);
    }
    tally.check(ok, &format!("x86-hello sees the 64 MiB of RAM --mem 64M gives it (status {status:?})"));

    let dir = target_dir().join("hostile").join("x86");
    let _ = std::fs::remove_dir_all(&dir);
    let hello_bytes = std::fs::read(&hello).map_err(|e| format!("read {}: {e}", hello.display()))?;
    let header = find_header(&hello_bytes).map_err(|e| format!("x86-hello: {e}"))?.offset;
    let no_header = {
        let mut f = hello_bytes.clone();
        f[header..header + 4].fill(0);
        f
    };
    let bad_checksum = {
        let mut f = hello_bytes.clone();
        f[header + 8] ^= 1;
        f
    };
    // 200 MiB: sparse, so writing it costs nothing.
    let huge = dir.join("huge-200MiB.elf");
    hostile::write(&dir, "huge-200MiB.elf", &hello_bytes)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&huge)
        .and_then(|f| f.set_len(200 << 20))
        .map_err(|e| format!("{}: {e}", huge.display()))?;
    let mut files: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("huge-200MiB.elf", None, "at most 64 MiB is accepted"),
        (
            "labelled-riscv.elf",
            Some(hostile::relabel(hello_bytes.clone(), hostile::EM_RISCV)),
            "RISC-V (e_machine 243)",
        ),
        (
            "labelled-arm.elf",
            Some(hostile::relabel(hello_bytes.clone(), hostile::EM_ARM)),
            "ARM (32-bit) (e_machine 40)",
        ),
        ("empty", Some(Vec::new()), "the file is empty"),
        ("no-multiboot-header.elf", Some(no_header), "no multiboot header"),
        ("bad-checksum.elf", Some(bad_checksum), "has a bad checksum"),
    ];
    for (name, bytes) in hostile::x86_refused() {
        let expect = match name {
            "no-segment.elf" => "no loadable segment",
            "overlap.elf" => "overlap in guest memory",
            _ => "lies outside guest RAM",
        };
        files.push((name, Some(bytes), expect));
    }
    let mut whys = std::collections::HashMap::new();
    for (name, bytes, expect) in files {
        let path = match bytes {
            Some(b) => hostile::write(&dir, name, &b)?,
            None => huge.clone(),
        };
        let why = guest_refusal(&path)?.unwrap_or_default();
        tally.check(why.contains(expect), &format!("xtask refuses {name} before booting: {why}"));
        whys.insert(name, (path, why));
    }
    // The hypervisor on its own.
    let work = work_dir("hostile")?;
    let missing = format!("GRUB was asked to load {GUEST_ON_ISO} as the guest");
    let boots: [(&str, IsoGuest<'_>, String); 4] = [
        ("a guest module GRUB did not load", IsoGuest::Missing, missing),
        ("an empty guest module", IsoGuest::File(&whys["empty"].0), whys["empty"].1.clone()),
        (
            "x86 code labelled RISC-V",
            IsoGuest::File(&whys["labelled-riscv.elf"].0),
            whys["labelled-riscv.elf"].1.clone(),
        ),
        (
            "a file without a multiboot header",
            IsoGuest::File(&whys["no-multiboot-header.elf"].0),
            whys["no-multiboot-header.elf"].1.clone(),
        ),
    ];
    for (what, guest, why) in boots {
        let iso = build_iso(&work, hv, guest)?;
        let (status, serial) = boot(&work, &iso, false)?;
        let said = format!("guest file refused: {why}");
        let ok = status == Some(i32::from(EXIT_REFUSED)) && !why.is_empty() && serial.contains(&said);
        tally.check(ok, &format!("the hypervisor refuses {what} on its own, exit status {status:?}"));
        if !ok {
            print_tail(&serial);
        }
    }
    let probe = hostile::write(&dir, "info-spot.elf", &hostile::x86_probe())?;
    let iso = build_iso(&work, hv, IsoGuest::File(&probe))?;
    let (status, serial) = boot(&work, &iso, false)?;
    if status != Some(hostile::PROBE_OK) {
        print_tail(&serial);
    }
    tally.check(
        status == Some(hostile::PROBE_OK),
        &format!(
            "a guest with data where the multiboot information used to go keeps it (exit status {status:?}, expected \
             {})",
            hostile::PROBE_OK
        ),
    );
    Ok(tally)
}

/// The project's Linux guest (`cargo xtask linux`) under the hypervisor on skylake_x: init.c's
/// all-checks-passed line and the status 0 it writes to port 0xf4.
fn linux_check(hv: &Path) -> Result<crate::SuiteResult, String> {
    let mut tally = crate::SuiteResult::default();
    let kernel = crate::linux::kernel(crate::Arch::X86_64)?;
    // CPUID's hypervisor bit clear (`--cpu hypervisor=off`): the guest takes the paths it takes
    // on bare Bochs, so that the consoles can be compared; the PVH run below keeps the default.
    let opts =
        GuestOptions { mem: DEFAULT_MEM, append: GRUB_LINUX_ARGS.into(), hypervisor_off: true, ..Default::default() };
    let work = work_dir("linux")?;
    let iso = build_iso(&work, hv, IsoGuest::WithOptions(&kernel, &opts))?;
    let size = std::fs::metadata(&kernel).map_err(|e| format!("{}: {e}", kernel.display()))?.len();
    let start = Instant::now();
    let r = run_bochs_megs(&work, &iso, DEFAULT_CPU, false, (DEFAULT_MEM >> 20) + (size >> 20) + 64)?;
    let status = exit_status(&r.serial);
    let ok = !r.timed_out
        && status == Some(0)
        && r.serial.contains("twostage-linux: all checks passed")
        && r.serial.contains("(cpu=hypervisor=off)");
    if !ok {
        print_tail(&r.serial);
    }
    tally.check(
        ok,
        &format!(
            "Linux ({}) runs init.c to the end under the hypervisor with CPUID's hypervisor bit clear (--cpu \
             hypervisor=off), status {status:?}, {:.1} s in Bochs",
            kernel.display(),
            start.elapsed().as_secs_f64()
        ),
    );
    // The cost: the same kernel on bare Bochs (GRUB `linux`), stopped at the same point.
    let bare = crate::linux::bare_x86_run(&kernel, false)?;
    tally.check(bare.passed, "the same Linux passes init.c on bare Bochs (GRUB `linux`, no hypervisor)");
    let diff = console_difference(bare.console(), &r.serial);
    if let Some((_, b, h)) = &diff {
        println!("    | bare:       {b}\n    | hypervisor: {h}");
    }
    tally.check(
        diff.is_none(),
        &format!(
            "its console under the hypervisor is the bare one's, line for line, apart from {} documented kinds of \
             line (first difference: {:?})",
            CONSOLE_ALLOWED.len(),
            diff.as_ref().map(|d| d.0)
        ),
    );
    match (r.ticks, bare.ticks) {
        (Some(n), Some(m)) if m > 0 => {
            println!("linux x86: {n} instructions under the hypervisor, {m} bare ({:.2} x)", n as f64 / m as f64)
        }
        (n, m) => println!("linux x86: no instruction count (Bochs ptime: {n:?} under the hypervisor, {m:?} bare)"),
    }
    pvh_check(hv, &kernel.with_file_name("vmlinux"), &mut tally)?;
    Ok(tally)
}

/// The same kernel's ELF `vmlinux` started through its PVH note (no boot loader code in the
/// guest), then hostile variants of its note: xtask refuses each before booting, and the
/// hypervisor refuses two on its own with the same message and [`EXIT_REFUSED`].
fn pvh_check(hv: &Path, vmlinux: &Path, tally: &mut crate::SuiteResult) -> Result<(), String> {
    let opts = GuestOptions { mem: DEFAULT_MEM, append: GRUB_LINUX_ARGS.into(), ..Default::default() };
    let file = std::fs::read(vmlinux).map_err(|e| format!("{}: {e}", vmlinux.display()))?;
    let work = work_dir("pvh")?;
    let iso = build_iso(&work, hv, IsoGuest::WithOptions(vmlinux, &opts))?;
    let start = Instant::now();
    let r = run_bochs_megs(&work, &iso, DEFAULT_CPU, false, (DEFAULT_MEM >> 20) + (file.len() as u64 >> 20) + 64)?;
    let status = exit_status(&r.serial);
    // The default: the hypervisor bit set, which Linux reads when it finds the PMU's counters
    // not behaving (its bare-metal wording is "Broken PMU hardware detected").
    let ok = !r.timed_out
        && status == Some(0)
        && r.serial.contains("twostage x86-hv: PVH entry at ")
        && r.serial.contains("PMU not available due to virtualization")
        && r.serial.contains("twostage-linux: all checks passed");
    if !ok {
        print_tail(&r.serial);
    }
    tally.check(
        ok,
        &format!(
            "the same Linux as an ELF vmlinux through its PVH entry, told by CPUID that it runs under a hypervisor \
             (the default), runs init.c to the end, status {status:?}, {:.1} s in Bochs",
            start.elapsed().as_secs_f64()
        ),
    );
    // The Xen note of type 18 with an 8-byte descriptor: namesz 4, descsz 8, type 18, "Xen\0".
    let header: Vec<u8> = [4u32, 8, 18].iter().flat_map(|w| w.to_le_bytes()).chain(*b"Xen\0").collect();
    let note = file.windows(header.len()).position(|w| w == header).ok_or("vmlinux has no PVH entry note")?;
    // The PT_NOTE program header that holds it (ELF64: e_phoff at 0x20, e_phnum at 0x38).
    let word = |at: usize, n: usize| file[at..at + n].iter().rev().fold(0u64, |v, &b| (v << 8) | u64::from(b));
    let (phoff, phnum) = (word(0x20, 8) as usize, word(0x38, 2) as usize);
    let ph = (0..phnum)
        .map(|i| phoff + 56 * i)
        .find(|&at| word(at, 4) == 4 && (word(at + 8, 8)..word(at + 8, 8) + word(at + 32, 8)).contains(&(note as u64)))
        .ok_or("vmlinux: no PT_NOTE segment holds the PVH note")?;
    let patched = |at: usize, bytes: &[u8]| {
        let mut f = file.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let seg_off = word(ph + 8, 8);
    let dir = target_dir().join("hostile").join("x86-pvh");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "pvh-truncated-note.elf",
            patched(ph + 32, &(note as u64 - seg_off + 20).to_le_bytes()),
            "runs past the segment's end",
        ),
        ("pvh-misaligned-note.elf", patched(ph + 8, &(seg_off + 2).to_le_bytes()), "not on a 4-byte boundary"),
        ("pvh-entry-outside.elf", patched(note + 16, &0x10u64.to_le_bytes()), "lies in no loadable segment"),
    ];
    let mut refused = Vec::new();
    for (name, bytes, expect) in cases {
        let path = hostile::write(&dir, name, &bytes)?;
        let why = linux_refusal(&bytes, &opts, LinuxEntry::Pvh)?.or(guest_refusal(&path)?).unwrap_or_default();
        tally.check(why.contains(expect), &format!("xtask refuses {name} before booting: {why}"));
        refused.push((name, path, why));
    }
    for (name, path, why) in refused.iter().filter(|c| c.0 != "pvh-misaligned-note.elf") {
        let iso = build_iso(&work, hv, IsoGuest::File(path))?;
        let megs = BOCHS_MEGS + (file.len() as u64 >> 20);
        let r = run_bochs_megs(&work, &iso, DEFAULT_CPU, false, megs)?;
        let status = exit_status(&r.serial);
        let ok = status == Some(i32::from(EXIT_REFUSED))
            && !why.is_empty()
            && r.serial.contains(&format!("guest file refused: {why}"));
        if !ok {
            print_tail(&r.serial);
        }
        tally.check(ok, &format!("the hypervisor refuses {name} on its own, exit status {status:?}"));
    }
    Ok(())
}

/// The command line GRUB's `linux` command gives the bare kernel (it puts the image's path first);
/// the run under the hypervisor is given the same, so that the two consoles can be compared.
pub const GRUB_LINUX_ARGS: &str = "BOOT_IMAGE=/boot/bzImage";

/// Console lines that may differ between the kernel on bare Bochs and under the hypervisor: a
/// line starting with the first string and holding the second may be on either side, or on
/// neither; the third says why. Every other line must be the same, in the same order.
///
/// The run compared is the one with CPUID's hypervisor bit clear (`--cpu hypervisor=off`), so
/// Linux reads the microcode revision, GDS state and PMU as on the bare machine: none of those
/// lines is allowed to differ.
pub const CONSOLE_ALLOWED: &[(&str, &str, &str)] = &[
    // Measured times, and the switch to the TSC clocksource, a work item run a second after
    // boot, that races init.c's checks.
    ("sched_clock: Marking stable ", "", TIMING),
    ("clocksource: tsc: mask: ", "", TIMING),
    ("clocksource: Switched to clocksource tsc", "", TIMING),
    ("twostage-linux: times: ", "", TIMING),
    // The bare kernel halts after init.c ends; under the hypervisor the run ends at init.c's
    // write to port 0xf4, just before.
    ("reboot: System halted", "", "the bare run goes on to the halt"),
];
const TIMING: &str = "times";

/// The hypervisor's own lines around the guest's console.
const HV_LINES: &[&str] =
    &["twostage x86-hv: ", "host frames: ", "nested page faults: ", "guest-exit-status: ", "twostage-exit: "];

/// A console line without its printk timestamp (`[    0.123456] `).
fn untimed(line: &str) -> &str {
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((stamp, text)) = rest.split_once("] ") {
            if stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.') {
                return text;
            }
        }
    }
    line
}

/// The lines of a console the comparison looks at: untimed, without the hypervisor's own lines
/// and the [`CONSOLE_ALLOWED`] ones.
fn compared_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .map(untimed)
        .filter(|l| !HV_LINES.iter().any(|p| l.starts_with(p)))
        .filter(|l| !CONSOLE_ALLOWED.iter().any(|(start, has, _)| l.starts_with(start) && l.contains(has)))
        .collect()
}

/// Compares the consoles of the bare kernel and of the same kernel under the hypervisor: `None`
/// when they agree apart from [`CONSOLE_ALLOWED`], else the first line where they part (its
/// number among the compared lines, the bare line, the hypervisor's line).
pub fn console_difference(bare: &str, hv: &str) -> Option<(usize, String, String)> {
    let (a, b) = (compared_lines(bare), compared_lines(hv));
    let n = a.len().max(b.len());
    (0..n).find(|&i| a.get(i) != b.get(i)).map(|i| {
        let show = |l: Option<&&str>| l.map_or("(no line)".to_string(), |l| l.to_string());
        (i + 1, show(a.get(i)), show(b.get(i)))
    })
}

/// The x86 scenario suites under Bochs, one per CPU model, then the x86-hello guest run.
pub fn test_suites() -> Vec<(&'static str, Result<crate::SuiteResult, String>)> {
    let hv = ensure_tools().and_then(|()| build_hv());
    let iso = hv.clone().and_then(|hv| {
        let work = work_dir("suite")?;
        Ok((work.clone(), build_iso(&work, &hv, IsoGuest::Nothing)?))
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
    out.push(("x86_64 multiboot guests (Bochs)", hv.clone().and_then(|hv| hello_check(&hv))));
    out.push(("x86_64 Linux under the hypervisor (Bochs)", hv.and_then(|hv| linux_check(&hv))));
    out
}

#[cfg(test)]
mod tests {
    use super::exit_status;

    #[test]
    fn consoles_are_compared_line_for_line_apart_from_the_allowed_lines() {
        let bare =
            "[    0.000000] Linux version 6.1\n[    0.000000] BIOS-e820: [mem 0x0000000007ff0000-0x0000000007ffffff] \
                    ACPI data\n[    0.000000] last_pfn = 0x7ff0 max_arch_pfn = 0x400000000\n[Firmware Bug]: \
                    TSC_DEADLINE disabled due to Errata; please update microcode to version: 0x2000065 (or \
                    later)\nAPIC: Switch to symmetric I/O mode setup\ntwostage-linux: all checks passed\n[    9.1] \
                    reboot: System halted\n";
        let hv = "twostage x86-hv: booted\n[    0.000000] Linux version 6.1\n[    0.000000] BIOS-e820: [mem \
                  0x0000000007ff0000-0x0000000007ffffff] ACPI data\n[    0.000000] last_pfn = 0x7ff0 max_arch_pfn = \
                  0x400000000\n[Firmware Bug]: TSC_DEADLINE disabled due to Errata; please update microcode to \
                  version: 0x2000065 (or later)\nAPIC: Switch to symmetric I/O mode setup\n[    1.2] clocksource: \
                  Switched to clocksource tsc\ntwostage-linux: all checks passed\nnested page faults: 40 for 80 MiB \
                  touched (MMIO exits apart: 0)\ntwostage-exit: 0\n";
        assert_eq!(super::console_difference(bare, hv), None);
        // What the hypervisor bit changes is compared (the run has it clear): a guest that took
        // the hypervisor's path differs.
        let told = hv.replace(
            "[Firmware Bug]: TSC_DEADLINE disabled due to Errata; please update microcode to version: 0x2000065 (or \
             later)",
            "TSC deadline timer available",
        );
        assert_eq!(super::console_difference(bare, &told).map(|d| d.0), Some(4));
        let pmu = |s: &str| format!("{s}Performance Events: PEBS fmt0-, Skylake events, 32-deep LBR, Broken PMU\n");
        let virt = "Performance Events: PEBS fmt0-, Skylake events, PMU not available due to virtualization\n";
        assert!(super::console_difference(&pmu(bare), &format!("{hv}{virt}")).is_some());
        // A line that is not allowed to differ: the interrupt mode.
        let other = hv.replace("symmetric I/O", "virtual wire");
        let d = super::console_difference(bare, &other).expect("a difference");
        assert_eq!(d.0, 5);
        assert!(d.2.contains("virtual wire"));
        // The memory map and what follows from it must be the same: the guest has the machine's
        // ACPI area at the bare machine's place.
        let no_acpi = hv.replace("last_pfn = 0x7ff0", "last_pfn = 0x8000");
        assert_eq!(super::console_difference(bare, &no_acpi).map(|d| d.0), Some(3));
        // A line missing on one side.
        let short = hv.replace("twostage-linux: all checks passed\n", "");
        assert_eq!(super::console_difference(bare, &short).map(|d| d.2), Some("(no line)".into()));
    }

    #[test]
    fn cpu_takes_a_model_and_the_hypervisor_property() {
        use super::{parse_cpu, CpuChoice};
        let model = |m: &str| Some(m.to_string());
        assert_eq!(
            parse_cpu("corei7_sandy_bridge_2600k"),
            Ok(CpuChoice { model: model("corei7_sandy_bridge_2600k"), hypervisor: None })
        );
        assert_eq!(
            parse_cpu("corei7_skylake_x,hypervisor=off"),
            Ok(CpuChoice { model: model("corei7_skylake_x"), hypervisor: Some(false) })
        );
        assert_eq!(parse_cpu("hypervisor=off"), Ok(CpuChoice { model: None, hypervisor: Some(false) }));
        assert_eq!(parse_cpu(",hypervisor=on"), Ok(CpuChoice { model: None, hypervisor: Some(true) }));
        for (bad, says) in [
            ("corei7_skylake_x,hypervisor=no", "the value is on or off"),
            ("corei7_skylake_x,pmu=off", "unknown CPU property \"pmu=off\""),
            ("corei7_skylake_x,hypervisor", "unknown CPU property \"hypervisor\""),
            ("hypervisor=off,corei7_skylake_x", "unknown CPU property \"corei7_skylake_x\""),
            ("corei7_skylake_x,,hypervisor=off", "an empty property"),
        ] {
            let e = parse_cpu(bad).unwrap_err();
            assert!(e.contains(says) && e.starts_with("--cpu "), "{bad}: {e}");
        }
        // The hypervisor's command line gets the property only when it is off.
        let on = super::GuestOptions { mem: 64 << 20, ..Default::default() };
        assert_eq!(on.hv_args(), "mem=67108864");
        let off = super::GuestOptions { hypervisor_off: true, ..on };
        assert_eq!(off.hv_args(), "mem=67108864 cpu=hypervisor=off");
    }

    #[test]
    fn exit_status_is_the_last_report() {
        let log = "guest-exit-status: 49\ntwostage-exit: 49\n";
        assert_eq!(exit_status(log), Some(49));
        assert_eq!(exit_status("twostage-exit: 1\nnoise\ntwostage-exit: 0\n"), Some(0));
        assert_eq!(exit_status("PANIC: boom\n"), None);
        assert_eq!(exit_status("twostage-exit: x\n"), None);
    }

    #[test]
    fn ptime_reads_the_debugger_tick_count() {
        assert_eq!(super::ptime("(0) Magic breakpoint\nptime: 1234567\n"), Some(1234567));
        assert_eq!(super::ptime("nothing\n"), None);
    }
}
