//! Linux guests: a minimal kernel per architecture, built from Debian's `linux-source-6.1` with
//! an embedded initramfs holding `guests/linux/init.c` as `/init`, cached outside the clone.
//!
//! ```text
//! cargo xtask linux --arch riscv64|x86_64            build (or find) the kernel, print its path
//! cargo xtask linux --arch riscv64 --bare [--smp N]  boot it on bare QEMU (no hypervisor)
//! cargo xtask linux --arch x86_64 --bare             boot it on bare Bochs through GRUB
//! ```
//!
//! The cache is `$TWOSTAGE_CACHE`, else `/var/cache/twostage` as root, else
//! `$HOME/.cache/twostage`; under its `linux/` directory:
//! - `src-VERSION/linux-source-6.1/`: the extracted source tree (read-only; builds are out of tree),
//! - `obj-ARCH-CONFIGKEY/`: the kernel build tree of one configuration, reused so that a change to
//!   init.c relinks in seconds; only the newest one per architecture is kept,
//! - `ARCH-KEY/`: a finished kernel (`Image`, or `bzImage` and `vmlinux`), its `config`, `init`,
//!   `initramfs.list` and `info.txt`. KEY hashes what the kernel is made from (config fragment,
//!   init.c, the linux-source package version, this recipe), so a change rebuilds and an
//!   unchanged tree reuses it; a hit needs no package installed (the version is apt's candidate
//!   when the package is not installed). Entries are built under a temporary name and renamed
//!   into place, so an interrupted build never leaves a half-made one.
//!
//! The configuration is tinyconfig plus `guests/linux/ARCH.config`, made the way tinyconfig itself
//! is made: one `make allnoconfig` with tinyconfig's fragments and ours as `KCONFIG_ALLCONFIG`, so
//! every option neither names stays off (an olddefconfig pass would instead turn on the defaults
//! of everything the fragment makes visible: VT, input devices, all initrd decompressors, ...).
//! Every line of the fragment is checked against the result, so an option whose dependencies are
//! missing fails the build instead of silently vanishing.

use crate::{util, Arch};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The Debian package whose tarball is built, and the tarball.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The directory the tarball unpacks to.
const SOURCE_TOP: &str = "linux-source-6.1";
/// Part of every cache key: bump it when this file changes how a kernel is made in a way the
/// other hashed inputs do not show.
const RECIPE: &str = "twostage-linux recipe 1";
/// The initramfs: /init (the built init.c), a console node, a mount point for /proc.
const INITRAMFS_LIST: &str = "dir /dev 0755 0 0\nnod /dev/console 0600 0 0 c 5 1\ndir /proc 0755 0 0\n";
/// What `make tinyconfig` applies (ARCH is Kbuild's), in order; missing files are skipped.
const TINY_CONFIGS: &[&str] =
    &["kernel/configs/tiny-base.config", "kernel/configs/tiny.config", "arch/ARCH/configs/tiny.config"];
/// The line init.c prints when every check passed, and the prefix of its failure line.
const PASSED: &str = "twostage-linux: all checks passed";
const FAILED: &str = "twostage-linux: FAILED";
/// What Linux prints when it halts instead of powering off (x86 without ACPI).
const HALTED: &str = "reboot: System halted";
/// Finished kernels kept per architecture.
const KEEP_ENTRIES: usize = 4;
/// Wall-clock limit of a bare boot.
const BARE_TIMEOUT: Duration = Duration::from_secs(600);

/// How one architecture's kernel and init are made.
struct Recipe {
    /// The name used in cache entries and fragment file names.
    name: &'static str,
    /// Kbuild's ARCH and CROSS_COMPILE.
    make_arch: &'static str,
    cross_compile: &'static str,
    /// The make target and where it lands in the build tree.
    target: &'static str,
    image: &'static str,
    /// Further build-tree files copied into the cache entry.
    extra: &'static [&'static str],
    /// The C compiler and extra flags for init.c.
    cc: &'static str,
    cflags: &'static [&'static str],
    /// Packages this architecture needs besides the common ones, as (probe, package): a probe
    /// with a `/` is a file, otherwise a program on PATH.
    packages: &'static [(&'static str, &'static str)],
}

/// Packages every kernel build needs.
const COMMON_PACKAGES: &[(&str, &str)] = &[
    (SOURCE_TARBALL, SOURCE_PACKAGE),
    ("xz", "xz-utils"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("bc", "bc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("cpio", "cpio"),
    ("/usr/include/openssl/ssl.h", "libssl-dev"),
];

fn recipe(arch: Arch) -> Recipe {
    match arch {
        Arch::Riscv64 => Recipe {
            name: "riscv64",
            make_arch: "riscv",
            cross_compile: "riscv64-linux-gnu-",
            target: "Image",
            image: "arch/riscv/boot/Image",
            extra: &[],
            cc: "riscv64-linux-gnu-gcc",
            cflags: &[],
            packages: &[
                ("riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu"),
                ("/usr/riscv64-linux-gnu/lib/libc.a", "libc6-dev-riscv64-cross"),
            ],
        },
        Arch::X86_64 => Recipe {
            name: "x86_64",
            make_arch: "x86",
            cross_compile: "",
            target: "bzImage",
            image: "arch/x86/boot/bzImage",
            extra: &["vmlinux"],
            cc: "gcc",
            cflags: &["-DTWOSTAGE_SMALL"],
            packages: &[("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"), ("/usr/include/libelf.h", "libelf-dev")],
        },
    }
}

/// The cache root: `$TWOSTAGE_CACHE`, else `/var/cache/twostage` as root, else
/// `$HOME/.cache/twostage`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("TWOSTAGE_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.trim_ascii() == b"0").unwrap_or(false);
    match std::env::var_os("HOME") {
        Some(home) if !root => Path::new(&home).join(".cache/twostage"),
        _ => PathBuf::from("/var/cache/twostage"),
    }
}

fn present(probe: &str) -> bool {
    if probe.contains('/') {
        Path::new(probe).exists()
    } else {
        util::have(probe)
    }
}

/// Installs whatever of `packages` is missing, with one apt-get run.
fn ensure_packages(packages: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<&(&str, &str)> = packages.iter().filter(|(probe, _)| !present(probe)).collect();
    let Some((first, _)) = missing.first() else { return Ok(()) };
    let names: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    if first.contains('/') {
        util::ensure_file(first, &names)?;
    } else {
        util::ensure_apt(first, &names)?;
    }
    match missing.iter().find(|(probe, _)| !present(probe)) {
        Some((probe, package)) => Err(format!("{probe} still missing after installing {package}")),
        None => Ok(()),
    }
}

/// Runs a command and returns its standard output, trimmed; fails on a non-zero exit.
fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The version of linux-source-6.1: installed, else apt's candidate, else unknown.
fn source_version() -> Option<String> {
    let installed = Command::new("dpkg-query").args(["-W", "-f=${Status} ${Version}", SOURCE_PACKAGE]).output();
    if let Ok(out) = installed {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(v) = text.strip_prefix("install ok installed ") {
            return Some(v.trim().to_string());
        }
    }
    let policy = output(Command::new("apt-cache").args(["policy", SOURCE_PACKAGE])).unwrap_or_default();
    policy.lines().find_map(|l| l.trim().strip_prefix("Candidate: ")).filter(|v| *v != "(none)").map(str::to_string)
}

/// 64-bit FNV-1a over length-prefixed parts, as 16 hex digits.
fn hash(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), String> {
    fs::write(path, bytes).map_err(|e| format!("write {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))
}

fn remove_dir(path: &Path) {
    if path.exists() {
        if let Err(e) = fs::remove_dir_all(path) {
            eprintln!("linux: cannot remove {}: {e}", path.display());
        }
    }
}

/// An exclusive lock on a file, released when dropped (or when the process dies).
struct Lock(#[allow(dead_code)] fs::File);

fn lock(path: &Path) -> Result<Lock, String> {
    use std::os::fd::AsRawFd;
    unsafe extern "C" {
        fn flock(fd: i32, operation: i32) -> i32;
    }
    const LOCK_EX: i32 = 2;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: flock only reads its integer arguments; the descriptor stays open while `file` lives.
    if unsafe { flock(file.as_raw_fd(), LOCK_EX) } != 0 {
        return Err(format!("flock {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(Lock(file))
}

/// Runs `cmd` with its output appended to `log`; on failure shows the log's tail.
fn run_logged(cmd: &mut Command, log: &Path, what: &str) -> Result<(), String> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open {}: {e}", log.display()))?;
    let _ = writeln!(f, "+ {cmd:?}");
    let err = f.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
    let status =
        cmd.stdin(Stdio::null()).stdout(f).stderr(err).status().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("  {line}");
    }
    Err(format!("{what} failed ({status}); the whole log is {}", log.display()))
}

/// The extracted source tree for package `version`, unpacked on first use.
fn source_tree(dir: &Path, version: &str) -> Result<PathBuf, String> {
    let done = dir.join(format!("src-{version}"));
    let tree = done.join(SOURCE_TOP);
    if tree.join("Makefile").exists() {
        return Ok(tree);
    }
    let _lock = lock(&dir.join("lock-src"))?;
    if tree.join("Makefile").exists() {
        return Ok(tree);
    }
    let tmp = dir.join(format!("src-{version}.tmp{}", std::process::id()));
    remove_dir(&tmp);
    mkdir(&tmp)?;
    let start = Instant::now();
    eprintln!("linux: unpacking {SOURCE_TARBALL} into {}", done.display());
    let code = util::run(Command::new("tar").arg("-xf").arg(SOURCE_TARBALL).arg("-C").arg(&tmp))?;
    if code != 0 {
        remove_dir(&tmp);
        return Err(format!("unpacking {SOURCE_TARBALL} failed ({code})"));
    }
    remove_dir(&done);
    fs::rename(&tmp, &done).map_err(|e| format!("rename {} to {}: {e}", tmp.display(), done.display()))?;
    eprintln!("linux: unpacked in {:.0} s", start.elapsed().as_secs_f64());
    if tree.join("Makefile").exists() {
        Ok(tree)
    } else {
        Err(format!("{} has no Makefile after unpacking", tree.display()))
    }
}

/// The fragment's settings that the final .config lacks.
fn unmet(fragment: &str, config: &str) -> Vec<String> {
    let set: Vec<&str> = config.lines().collect();
    let mut missing = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("# ").and_then(|l| l.strip_suffix(" is not set")) {
            if set.iter().any(|l| l.starts_with(&format!("{name}="))) {
                missing.push(line.to_string());
            }
        } else if line.starts_with("CONFIG_") && !set.contains(&line) {
            missing.push(line.to_string());
        }
    }
    missing
}

/// The kernel for `arch`, from the cache or built now; returns the bootable image's path
/// (`Image` for RISC-V, `bzImage` for x86; x86 entries also hold the ELF `vmlinux`).
pub fn kernel(arch: Arch) -> Result<PathBuf, String> {
    let r = recipe(arch);
    let guest_dir = util::root().join("guests/linux");
    let fragment_path = guest_dir.join(format!("{}.config", r.name));
    let fragment = String::from_utf8(read(&fragment_path)?).map_err(|_| "config fragment is not UTF-8")?;
    let init_c = read(&guest_dir.join("init.c"))?;
    let cflags = r.cflags.join(" ");
    // The build tree depends on the configuration only; the entry on everything. The compilers
    // are Debian 12's and not part of the key, so that a cache restored onto a fresh machine is
    // used without installing anything.
    let keys = |version: &str| {
        let config_key = hash(&[RECIPE.as_bytes(), r.name.as_bytes(), version.as_bytes(), fragment.as_bytes()]);
        let key = hash(&[config_key.as_bytes(), init_c.as_slice(), cflags.as_bytes(), INITRAMFS_LIST.as_bytes()]);
        (config_key, key)
    };
    let dir = cache_root().join("linux");
    let file_name = Path::new(r.image).file_name().expect("image path has a file name");
    let image_of = |key: &str| dir.join(format!("{}-{key}", r.name)).join(file_name);

    // The package version: the installed one, else the one apt would install.
    if let Some(v) = source_version() {
        let image = image_of(&keys(&v).1);
        if image.exists() {
            println!("linux: cache hit: {}", image.display());
            return Ok(image);
        }
    }
    let mut packages = COMMON_PACKAGES.to_vec();
    packages.extend_from_slice(r.packages);
    ensure_packages(&packages)?;
    let version = source_version().ok_or("linux-source-6.1 is still not installed")?;
    let (config_key, key) = keys(&version);
    mkdir(&dir)?;
    let entry = dir.join(format!("{}-{key}", r.name));
    let image = image_of(&key);
    let _lock = lock(&dir.join(format!("lock-{}", r.name)))?;
    if image.exists() {
        println!("linux: cache hit: {}", image.display());
        return Ok(image);
    }
    println!("linux: cache miss: building {} (linux-source {version}) into {}", r.name, entry.display());
    let start = Instant::now();
    let src = source_tree(&dir, &version)?;
    let t_src = start.elapsed();

    // Keep only this configuration's build tree for the architecture.
    let obj = dir.join(format!("obj-{}-{config_key}", r.name));
    if let Ok(list) = fs::read_dir(&dir) {
        let prefix = format!("obj-{}-", r.name);
        for e in list.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && e.path() != obj {
                eprintln!("linux: removing the old build tree {}", e.path().display());
                remove_dir(&e.path());
            }
        }
    }
    let log = obj.join("twostage-build.log");
    let make = |args: &[&str]| {
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "10", "make", "-C"])
            .arg(&src)
            .arg(format!("O={}", obj.display()))
            .arg(format!("ARCH={}", r.make_arch))
            .args(args)
            .envs([
                ("KBUILD_BUILD_USER", "twostage"),
                ("KBUILD_BUILD_HOST", "twostage"),
                ("KBUILD_BUILD_VERSION", "1"),
                ("KBUILD_BUILD_TIMESTAMP", "2024-01-01"),
            ]);
        if !r.cross_compile.is_empty() {
            cmd.arg(format!("CROSS_COMPILE={}", r.cross_compile));
        }
        cmd
    };

    // The init and its initramfs list live in the build tree, at paths the configuration names.
    let stage = obj.join("twostage");
    let configured = obj.join("twostage-configured");
    if !configured.exists() {
        remove_dir(&obj);
    }
    mkdir(&stage)?;
    let t0 = Instant::now();
    let init = stage.join("init");
    let code = util::run(
        Command::new(r.cc)
            .args(["-static", "-O2", "-s", "-pthread", "-Wall", "-Wextra"])
            .args(r.cflags)
            .arg("-o")
            .arg(&init)
            .arg(guest_dir.join("init.c")),
    )?;
    if code != 0 {
        return Err(format!("compiling guests/linux/init.c with {} failed ({code})", r.cc));
    }
    let list = stage.join("initramfs.list");
    write(&list, format!("{INITRAMFS_LIST}file /init {} 0755 0 0\n", init.display()))?;
    let t_init = t0.elapsed();

    let t0 = Instant::now();
    if !configured.exists() {
        eprintln!("linux: configuring (tinyconfig + {}), log {}", fragment_path.display(), log.display());
        // tinyconfig is allnoconfig with kernel/configs/tiny-base.config, then tiny.config
        // merged; all of it and the fragment go into one allnoconfig, so every option neither
        // asks for stays off, including those that only the fragment's options make visible.
        let mut all = String::new();
        for part in TINY_CONFIGS.iter().map(|p| p.replace("ARCH", r.make_arch)) {
            if let Ok(text) = fs::read_to_string(src.join(&part)) {
                let _ = writeln!(all, "# {part}\n{text}");
            }
        }
        let _ = writeln!(all, "# {}\n{fragment}", fragment_path.display());
        let _ = writeln!(all, "CONFIG_INITRAMFS_SOURCE=\"{}\"", list.display());
        let allconfig = stage.join("allno.config");
        write(&allconfig, all)?;
        run_logged(make(&["allnoconfig"]).env("KCONFIG_ALLCONFIG", &allconfig), &log, "make allnoconfig")?;
        let config = String::from_utf8_lossy(&read(&obj.join(".config"))?).into_owned();
        let missing = unmet(&fragment, &config);
        if !missing.is_empty() {
            return Err(format!(
                "{} asks for settings the configuration does not have (unmet dependencies?): {}",
                fragment_path.display(),
                missing.join(", ")
            ));
        }
        write(&configured, "")?;
    }
    let t_config = t0.elapsed();

    let t0 = Instant::now();
    eprintln!("linux: nice -n 10 make -j2 {} (log {})", r.target, log.display());
    run_logged(&mut make(&["-j2", r.target]), &log, &format!("make {}", r.target))?;
    let t_make = t0.elapsed();

    let tmp = dir.join(format!("{}-{key}.tmp{}", r.name, std::process::id()));
    remove_dir(&tmp);
    mkdir(&tmp)?;
    let copy = |from: &Path, name: &str| {
        fs::copy(from, tmp.join(name)).map(drop).map_err(|e| format!("copy {}: {e}", from.display()))
    };
    copy(&obj.join(r.image), &file_name.to_string_lossy())?;
    for extra in r.extra {
        copy(&obj.join(extra), extra)?;
    }
    copy(&obj.join(".config"), "config")?;
    copy(&init, "init")?;
    copy(&list, "initramfs.list")?;
    let size = fs::metadata(obj.join(r.image)).map(|m| m.len()).unwrap_or(0);
    let mut info = String::new();
    let _ = writeln!(info, "arch: {}\nkey: {key}\nlinux-source: {version}", r.name);
    let kcc = output(Command::new(format!("{}gcc", r.cross_compile)).arg("--version")).unwrap_or_default();
    let _ = writeln!(info, "kernel compiler: {}", kcc.lines().next().unwrap_or(""));
    let _ = writeln!(info, "init: {} -static -O2 -s -pthread {cflags}", r.cc);
    let _ = writeln!(info, "{}: {size} bytes", file_name.to_string_lossy());
    let _ = writeln!(
        info,
        "seconds: source {:.0}, init {:.0}, config {:.0}, make {:.0}",
        t_src.as_secs_f64(),
        t_init.as_secs_f64(),
        t_config.as_secs_f64(),
        t_make.as_secs_f64()
    );
    write(&tmp.join("info.txt"), &info)?;
    if fs::rename(&tmp, &entry).is_err() {
        remove_dir(&tmp);
        if !image.exists() {
            return Err(format!("cannot move {} into place at {}", tmp.display(), entry.display()));
        }
    }
    prune_entries(&dir, r.name);
    println!(
        "linux: built {} ({size} bytes) in {:.0} s (source {:.0} s, init {:.0} s, config {:.0} s, make {:.0} s)",
        image.display(),
        start.elapsed().as_secs_f64(),
        t_src.as_secs_f64(),
        t_init.as_secs_f64(),
        t_config.as_secs_f64(),
        t_make.as_secs_f64()
    );
    Ok(image)
}

/// Keeps the [`KEEP_ENTRIES`] newest finished kernels of `arch` (older trees' kernels stay
/// usable after switching branches, without the cache growing without bound).
fn prune_entries(dir: &Path, arch: &str) {
    let prefix = format!("{arch}-");
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && !name.contains(".tmp")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, old) in entries.iter().skip(KEEP_ENTRIES) {
        eprintln!("linux: removing the old kernel {}", old.display());
        remove_dir(old);
    }
}

/// `cargo xtask linux`: builds (or finds) the kernel and prints its path; with `bare`, boots it
/// on the bare emulator and returns 0 if init.c's checks all passed and the machine powered off.
pub fn command(arch: Arch, bare: bool, smp: Option<u32>) -> Result<i32, String> {
    let image = kernel(arch)?;
    println!("{}", image.display());
    if !bare {
        return Ok(0);
    }
    match arch {
        Arch::Riscv64 => bare_riscv(&image, smp.unwrap_or(1)),
        Arch::X86_64 => bare_x86(&image),
    }
}

/// What a bare run printed and how it ended.
struct Run {
    output: String,
    code: i32,
    elapsed: Duration,
}

/// Runs `cmd` and echoes its console and its standard error when `echo`: its standard output, or the file `serial` when
/// given (Bochs writes COM1 to a file; its own standard output then goes to `bochs-stdout.log`
/// beside it). Stops it when it has not exited `grace` after init.c's final line, or after
/// [`BARE_TIMEOUT`].
fn run_console(mut cmd: Command, serial: Option<&Path>, grace: Duration, echo: bool) -> Result<Run, String> {
    eprintln!("+ {cmd:?}");
    let start = Instant::now();
    let stdout = match serial {
        Some(path) => {
            let log = path.with_file_name("bochs-stdout.log");
            Stdio::from(fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?)
        }
        None => Stdio::piped(),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(if echo { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = match serial {
        None => {
            let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stdout.read(&mut buf) {
                    let _ = tx.send(buf[..n].to_vec());
                }
            })
        }
        Some(path) => {
            let (path, stop) = (path.to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut at = 0;
                loop {
                    let last = stop.load(std::sync::atomic::Ordering::Relaxed);
                    if let Ok(bytes) = fs::read(&path) {
                        if bytes.len() > at {
                            let _ = tx.send(bytes[at..].to_vec());
                            at = bytes.len();
                        }
                    }
                    if last {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        }
    };
    let mut all = Vec::new();
    let mut out = std::io::stdout();
    let mut finished: Option<Instant> = None;
    let mut take = |all: &mut Vec<u8>| {
        while let Ok(bytes) = rx.try_recv() {
            if echo {
                let _ = out.write_all(&bytes);
                let _ = out.flush();
            }
            all.extend_from_slice(&bytes);
        }
    };
    let code = loop {
        take(&mut all);
        let text = String::from_utf8_lossy(&all);
        if finished.is_none() && (text.contains(PASSED) || text.contains(FAILED)) {
            finished = Some(Instant::now());
        }
        // A kernel that cannot power off halts: nothing more will come.
        let halted = finished.is_some() && text.contains(HALTED);
        match child.try_wait().map_err(|e| format!("waiting for the emulator: {e}"))? {
            Some(status) => break status.code().unwrap_or(128),
            None if halted || finished.is_some_and(|t| t.elapsed() > grace) || start.elapsed() > BARE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("linux: stopped the emulator after {:.0} s", start.elapsed().as_secs_f64());
                break 124;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = reader.join();
    take(&mut all);
    Ok(Run { output: String::from_utf8_lossy(&all).replace('\r', ""), code, elapsed: start.elapsed() })
}

/// Boots the RISC-V kernel on QEMU `virt` with OpenSBI and no hypervisor.
fn bare_riscv(image: &Path, smp: u32) -> Result<i32, String> {
    util::ensure_apt("qemu-system-riscv64", &["qemu-system-misc"])?;
    util::ensure_file("/usr/share/qemu/opensbi-riscv64-generic-fw_dynamic.bin", &["qemu-system-data"])?;
    let mut cmd = Command::new("qemu-system-riscv64");
    cmd.args(["-M", "virt", "-bios", "default", "-m", "128M", "-nographic", "-no-reboot", "-smp"])
        .arg(smp.to_string())
        .arg("-kernel")
        .arg(image);
    let run = run_console(cmd, None, Duration::from_secs(20), true)?;
    let ok = run.code == 0;
    Ok(verdict(&format!("riscv64 bare QEMU -smp {smp}"), &run, ok))
}

/// Boots the x86 kernel on Bochs through GRUB's `linux` command (no hypervisor).
fn bare_x86(image: &Path) -> Result<i32, String> {
    let bare = bare_x86_run(image, true)?;
    if let Some(ticks) = bare.ticks {
        println!("linux: {ticks} instructions (Bochs ticks) up to init.c's write to port 0xf4");
    }
    Ok(verdict("x86_64 bare Bochs", &bare.run, bare.halted))
}

/// What [`bare_x86_run`] saw.
pub struct BareX86 {
    run: Run,
    /// Whether the kernel halted after init.c's last line.
    pub halted: bool,
    /// Whether init.c passed and the kernel then halted.
    pub passed: bool,
    /// Bochs' tick count (one per emulated instruction, see [`crate::x86::ptime`]) when init.c
    /// reached its `outb` to port 0xf4: where a run under the hypervisor ends.
    pub ticks: Option<u64>,
}

impl BareX86 {
    /// Everything the kernel wrote to COM1 (carriage returns removed).
    pub fn console(&self) -> &str {
        &self.run.output
    }
}

/// The address of init.c's `outb` to port 0xf4 (`e6 f4`) in the `init` beside `image`, from
/// objdump's disassembly.
fn init_port_write(image: &Path) -> Option<u64> {
    let init = image.with_file_name("init");
    let out = Command::new("objdump").arg("-d").arg(&init).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut hits = text.lines().filter(|l| l.contains("e6 f4") && l.contains("out"));
    let line = hits.next()?;
    if hits.next().is_some() {
        return None;
    }
    u64::from_str_radix(line.split(':').next()?.trim(), 16).ok()
}

/// Boots the x86 kernel on Bochs through GRUB's `linux` command (no hypervisor); echoes COM1 when
/// `echo`. A linear breakpoint on init.c's write to port 0xf4 (ignored without a hypervisor) reads
/// Bochs' tick count there with `ptime`, then the run goes on. Without ACPI the kernel cannot
/// power Bochs off: it halts, and the run is stopped once it said so.
pub fn bare_x86_run(image: &Path, echo: bool) -> Result<BareX86, String> {
    util::ensure_apt("bochs", &["bochs", "bochsbios", "vgabios"])?;
    util::ensure_apt("grub-mkimage", &["grub-common", "grub-pc-bin"])?;
    util::ensure_apt("xorriso", &["xorriso", "mtools"])?;
    for (file, package) in [
        ("/usr/share/bochs/BIOS-bochs-latest", "bochsbios"),
        ("/usr/share/vgabios/vgabios.bin", "vgabios"),
        ("/usr/lib/grub/i386-pc/linux.mod", "grub-pc-bin"),
    ] {
        util::ensure_file(file, &[package])?;
    }
    let work = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::root().join("target"))
        .join("linux-x86-bare");
    let boot = work.join("iso_root/boot");
    mkdir(&boot)?;
    fs::copy(image, boot.join("bzImage")).map_err(|e| format!("copy {}: {e}", image.display()))?;
    let iso = crate::x86::grub_iso(
        &work,
        &work.join("iso_root"),
        "set timeout=0\nlinux /boot/bzImage\nboot\n",
        "linux",
        "linux.iso",
    )?;
    let serial = work.join("serial.log");
    let _ = fs::remove_file(&serial);
    let rc = work.join("cont.rc");
    let stop = init_port_write(image);
    if stop.is_none() {
        eprintln!("linux: no single `outb` to port 0xf4 in the init beside {}: no instruction count", image.display());
    }
    write(&rc, stop.map_or("c\nquit\n".to_string(), |at| format!("lb {at:#x}\nc\nptime\nd 1\nc\nquit\n")))?;
    let conf = work.join("bochsrc");
    write(
        &conf,
        format!(
            "megs: 128\n\
             display_library: rfb, options=\"timeout=0\"\n\
             sound: driver=dummy\n\
             speaker: enabled=0\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest, options=fastboot\n\
             vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
             cpu: model=corei7_skylake_x, count=1, ips=10000000, reset_on_triple_fault=0\n\
             boot: cdrom\n\
             ata0-master: type=cdrom, path={iso}, status=inserted\n\
             com1: enabled=1, mode=file, dev={serial}\n\
             clock: sync=none, time0=local\n\
             log: {log}\n\
             panic: action=fatal\n\
             error: action=report\n\
             info: action=ignore\n",
            iso = iso.display(),
            serial = serial.display(),
            log = work.join("bochs.log").display(),
        ),
    )?;
    let mut cmd = Command::new("bochs");
    cmd.arg("-q").arg("-f").arg(&conf).arg("-rc").arg(&rc).current_dir(&work);
    let run = run_console(cmd, Some(&serial), Duration::from_secs(10), echo)?;
    let halted = run.output.contains(HALTED) || run.output.contains("reboot: Power down");
    let console = fs::read(work.join("bochs-stdout.log")).unwrap_or_default();
    let ticks = stop.and_then(|_| crate::x86::ptime(&String::from_utf8_lossy(&console)));
    let passed = halted && run.output.contains(PASSED);
    Ok(BareX86 { run, halted, passed, ticks })
}

/// Prints whether a run passed (init.c's final line, and `ended` cleanly); returns the exit
/// status for xtask.
fn verdict(what: &str, run: &Run, ended: bool) -> i32 {
    let passed = run.output.contains(PASSED);
    println!(
        "linux: {what}: {} (init.c {}, machine {}, emulator exit {}, {:.1} s)",
        if passed && ended { "passed" } else { "FAILED" },
        if passed { "passed" } else { "did not pass" },
        if ended { "shut down" } else { "did not shut down" },
        run.code,
        run.elapsed.as_secs_f64()
    );
    if passed && ended {
        0
    } else {
        1
    }
}

/// init.c's lines in a console output (`twostage-linux: ...`, each with `prefix` before it, which
/// is removed), without the `times:` line: its wall-clock figures differ from run to run (and
/// include the time a paused guest waited), everything else init.c prints is deterministic.
pub fn init_lines(out: &str, prefix: &str) -> Vec<String> {
    out.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.strip_prefix(prefix))
        .filter(|l| l.starts_with("twostage-linux: ") && !l.starts_with("twostage-linux: times:"))
        .map(str::to_string)
        .collect()
}

/// The guest's own console lines in a run's output: from `Linux version` (or the start, when the
/// kernel's banner is not there) through `reboot: Power down`, without the lines the hypervisor
/// prints meanwhile (`migration: ...`), empty lines, and init's `times:` line (wall-clock
/// figures). Two runs of the same guest on as many vCPUs give the same lines.
pub fn guest_console(out: &str) -> Vec<String> {
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    let start = lines.iter().position(|l| l.starts_with("Linux version")).unwrap_or(0);
    lines[start..]
        .iter()
        .take_while(|l| !l.starts_with("reboot: Power down"))
        .filter(|l| !l.is_empty() && !l.starts_with("migration: ") && !l.starts_with("twostage-linux: times:"))
        .map(|l| l.to_string())
        .collect()
}

/// Checks a `--fork` run's console against the plain run's init lines `plain`: the fork line,
/// then only `[child] ` lines up to the child's end, whose init lines continue the ones before
/// the fork to init's end exactly as in `plain`; then the parent's, which do the same unprefixed;
/// the summary with copy-on-write breaks on both sides; and, once both VMs are released, every
/// frame back (`fork: both VMs released: free frames Z (at the fork: F free, VM 1 holding H)`:
/// Z = F + H). Returns the summary line.
pub fn check_fork(out: &str, plain: &[String]) -> Result<String, String> {
    let out = out.replace('\r', "");
    let fork_at = out.find("\nfork: VM 1 forked").ok_or("no `fork: VM 1 forked` line")?;
    let child_end = out.find("\nchild: guest reset:").ok_or("the child never ended")?;
    if child_end < fork_at {
        return Err("the child ended before the fork".into());
    }
    let (before, child, parent) = (&out[..fork_at], &out[fork_at + 1..child_end], &out[child_end + 1..]);
    let mut child_lines = child.lines().skip(1).filter(|l| !l.is_empty());
    if let Some(bad) = child_lines.find(|l| !l.starts_with("[child] ")) {
        return Err(format!("a line of the child's without its prefix: {bad:?}"));
    }
    let pre = init_lines(before, "");
    for (who, text, prefix) in [("child", child, "[child] "), ("parent", parent, "")] {
        let mut lines = pre.clone();
        lines.extend(init_lines(text, prefix));
        if lines != plain {
            return Err(format!("the {who}'s init lines differ from the plain run's: {lines:?}"));
        }
    }
    if parent.contains("[child] ") {
        return Err("a `[child] ` line after the child ended".into());
    }
    let summary = parent
        .lines()
        .find(|l| l.starts_with("fork: copy-on-write breaks: "))
        .ok_or("no `fork: copy-on-write breaks` summary")?;
    let numbers: Vec<u64> = summary.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    if !matches!(numbers[..], [p, c, _] if p > 0 && c > 0) {
        return Err(format!("both VMs must break copy-on-write pages: {summary:?}"));
    }
    let release = parent
        .lines()
        .find(|l| l.starts_with("fork: both VMs released: "))
        .ok_or("no `fork: both VMs released` line")?;
    let n: Vec<u64> = release.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    match n[..] {
        // The `1` of `VM 1` is the third number.
        [end, free, _, held] if free.checked_add(held) == Some(end) => Ok(summary.to_string()),
        _ => Err(format!("releasing both VMs did not give back every frame: {release:?}")),
    }
}

/// Checks a `--migrate` run's console against the plain run's init lines `plain`: the
/// `migration: rounds=R pages=P final=F` line with R >= 1 and P > 0, the release of the source
/// giving back exactly the frames it held (`migration: free frames A before, B with both copies,
/// C after VM 1 (holding H frames) was released`: C - B = H), and the same init lines. Returns
/// the migration line.
pub fn check_migration(out: &str, plain: &str) -> Result<String, String> {
    let line = out
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.starts_with("migration: rounds="))
        .ok_or("no `migration: rounds=` line")?;
    let field =
        |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.parse::<u64>().ok());
    match (field("rounds="), field("pages="), field("final=")) {
        (Some(r), Some(p), Some(_)) if r >= 1 && p > 0 => {}
        _ => return Err(format!("a migration line without rounds and pages: {line:?}")),
    }
    let frames =
        out.lines().find(|l| l.starts_with("migration: free frames ")).ok_or("no `migration: free frames` line")?;
    let n: Vec<u64> = frames.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    match n[..] {
        [_, both, after, _, held] if after.checked_sub(both) == Some(held) => {}
        // The `1` of `VM 1` is the fourth number.
        _ => return Err(format!("the source's release did not give back the frames it held: {frames:?}")),
    }
    let (moved, stayed) = (guest_console(out), guest_console(plain));
    if let Some(i) = (0..moved.len().max(stayed.len())).find(|&i| moved.get(i) != stayed.get(i)) {
        return Err(format!(
            "the migrated guest's console differs from the plain run's at its line {}: {:?} where the plain run has {:?}",
            i + 1,
            moved.get(i),
            stayed.get(i)
        ));
    }
    Ok(line.to_string())
}

#[cfg(test)]
mod tests {
    use super::{check_fork, check_migration, hash, init_lines, unmet};

    const PLAIN: &str = "Run /init as init process\r\ntwostage-linux: start (1 CPUs online, page size 4096)\n\
        twostage-linux: fill: ok (32 MiB)\ntwostage-linux: times: fill 3 ms\ntwostage-linux: all checks passed\n";

    fn plain() -> Vec<String> {
        init_lines(PLAIN, "")
    }

    #[test]
    fn init_lines_leave_out_times_and_other_lines() {
        assert_eq!(
            plain(),
            [
                "twostage-linux: start (1 CPUs online, page size 4096)",
                "twostage-linux: fill: ok (32 MiB)",
                "twostage-linux: all checks passed"
            ]
        );
    }

    #[test]
    fn fork_runs_are_checked_line_by_line() {
        let good = "twostage-linux: start (1 CPUs online, page size 4096)\n\nfork: VM 1 forked at ...\n\
            [child] twostage-linux: fill: ok (32 MiB)\n[child] twostage-linux: times: fill 9 ms\n\
            [child] twostage-linux: all checks passed\n\nchild: guest reset: type 0\n\
            twostage-linux: fill: ok (32 MiB)\ntwostage-linux: all checks passed\n\
            fork: copy-on-write breaks: parent 12 child 30; frames still shared at the end: 7\n\
            fork: both VMs released: free frames 1400 (at the fork: 1000 free, VM 1 holding 400)\n";
        assert!(check_fork(good, &plain()).unwrap().contains("parent 12 child 30"));
        let unprefixed = good.replace("[child] twostage-linux: fill", "twostage-linux: fill");
        assert!(check_fork(&unprefixed, &plain()).unwrap_err().contains("without its prefix"));
        let short = good.replace("[child] twostage-linux: all checks passed\n", "");
        assert!(check_fork(&short, &plain()).unwrap_err().contains("child's init lines differ"));
        let parent_short = good.replacen("twostage-linux: all checks passed\nfork:", "fork:", 1);
        assert!(check_fork(&parent_short, &plain()).unwrap_err().contains("parent's init lines differ"));
        let no_breaks = good.replace("child 30", "child 0");
        assert!(check_fork(&no_breaks, &plain()).is_err());
        let leak = good.replace("frames 1400", "frames 1399");
        assert!(check_fork(&leak, &plain()).unwrap_err().contains("every frame"));
        assert!(check_fork(PLAIN, &plain()).is_err());
    }

    #[test]
    fn migration_runs_need_their_line_and_the_same_console() {
        let good = format!(
            "{PLAIN}migration: rounds=3 pages=9000 final=12 (round pages: 8000 900 88)\n\
             migration: free frames 900 before, 700 with both copies, 905 after VM 1 (holding 205 frames) was released\n"
        );
        assert!(check_migration(&good, PLAIN).unwrap().starts_with("migration: rounds=3"));
        assert!(check_migration(PLAIN, PLAIN).unwrap_err().contains("no `migration"));
        let bad = good.replace("fill: ok (32 MiB)", "fill: FAILED");
        assert!(check_migration(&bad, PLAIN).unwrap_err().contains("differ"));
        // A kernel line, not only init's, must stay the same.
        let kernel = good.replace("Run /init as init process", "Run /init as init process (again)");
        assert!(check_migration(&kernel, PLAIN).unwrap_err().contains("line 1"));
        let empty = good.replace("pages=9000", "pages=0");
        assert!(check_migration(&empty, PLAIN).is_err());
        let leak = good.replace("905 after", "904 after");
        assert!(check_migration(&leak, PLAIN).unwrap_err().contains("give back"));
    }

    #[test]
    fn fragment_lines_missing_from_the_config_are_reported() {
        let config = "CONFIG_SMP=y\nCONFIG_NR_CPUS=8\n# CONFIG_VT is not set\nCONFIG_CMDLINE=\"earlycon\"\n";
        let fragment =
            "# comment\nCONFIG_SMP=y\nCONFIG_NR_CPUS=8\nCONFIG_CMDLINE=\"earlycon\"\n# CONFIG_VT is not set\n";
        assert!(unmet(fragment, config).is_empty());
        let fragment = "CONFIG_SMP=y\nCONFIG_FPU=y\nCONFIG_NR_CPUS=4\n# CONFIG_SMP is not set\n";
        assert_eq!(unmet(fragment, config), ["CONFIG_FPU=y", "CONFIG_NR_CPUS=4", "# CONFIG_SMP is not set"]);
    }

    #[test]
    fn hash_parts_are_length_prefixed() {
        assert_ne!(hash(&[b"ab", b"c"]), hash(&[b"a", b"bc"]));
        assert_eq!(hash(&[b"x"]), hash(&[b"x"]));
        assert_eq!(hash(&[b"x"]).len(), 16);
    }
}
