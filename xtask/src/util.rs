//! Shared helpers: running commands, locating the workspace, installing what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command to completion, echoing it; returns its exit code (signals count as 128).
pub fn run(cmd: &mut Command) -> Result<i32, String> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    Ok(status.code().unwrap_or(128))
}

/// Runs `cargo ARGS` in the workspace root with the same toolchain as this xtask.
pub fn cargo(args: &[&str]) -> Result<i32, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args).current_dir(root()))
}

/// Whether `prog` is found on PATH.
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Adds a rustup target if the active toolchain lacks it.
pub fn ensure_target(target: &str) -> Result<(), String> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("rustup: {e}"))?;
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    match run(Command::new("rustup").args(["target", "add", target]).current_dir(root()))? {
        0 => Ok(()),
        c => Err(format!("rustup target add {target} failed ({c})")),
    }
}

/// `apt-get update` then `apt-get install` of `packages`. Needs root, as on CI.
fn apt_install(packages: &[&str]) -> Result<(), String> {
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    if run(Command::new("apt-get").arg("update").envs(env))? != 0 {
        return Err("apt-get update failed".into());
    }
    match run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends"]).args(packages).envs(env))? {
        0 => Ok(()),
        c => Err(format!("apt-get install {} failed ({c})", packages.join(" "))),
    }
}

/// Installs Debian `packages` when `present()` says what they provide is missing, and checks that
/// it is there afterwards; `what` names it in messages.
fn ensure_installed(what: &str, present: impl Fn() -> bool, packages: &[&str]) -> Result<(), String> {
    if present() {
        return Ok(());
    }
    eprintln!("{what} is missing: installing {}", packages.join(" "));
    apt_install(packages)?;
    if present() {
        Ok(())
    } else {
        Err(format!("{what} still missing after installing {}", packages.join(" ")))
    }
}

/// Installs Debian packages when `probe` (a program name) is missing.
pub fn ensure_apt(probe: &str, packages: &[&str]) -> Result<(), String> {
    ensure_installed(probe, || have(probe), packages)
}

/// Installs Debian packages when `file` (for packages that install no program: firmware, BIOS
/// images, GRUB modules) is missing.
pub fn ensure_file(file: &str, packages: &[&str]) -> Result<(), String> {
    ensure_installed(file, || Path::new(file).exists(), packages)
}

/// Parses the last `N passed, M failed` line of a suite's console output (the harness adds
/// `, K skipped`).
pub fn parse_tally(output: &str) -> Option<crate::SuiteResult> {
    output.lines().rev().find_map(|line| {
        let line = line.trim();
        let (p, rest) = line.split_once(" passed, ")?;
        let (f, skipped) = match rest.split_once(" failed, ") {
            Some((f, s)) => (f, s.strip_suffix(" skipped")?.parse().ok()?),
            None => (rest.strip_suffix(" failed")?, 0),
        };
        let p = p.rsplit(' ').next()?;
        Some(crate::SuiteResult { passed: p.parse().ok()?, failed: f.parse().ok()?, skipped })
    })
}

#[cfg(test)]
mod tests {
    use super::parse_tally;

    #[test]
    fn tally_lines_with_and_without_skips() {
        let t = parse_tally("ok 1 - a\n3 passed, 1 failed\n").unwrap();
        assert_eq!((t.passed, t.failed, t.skipped), (3, 1, 0));
        let t = parse_tally("TAP version 13\n1..9\n7 passed, 0 failed, 2 skipped\ntwostage-exit: 0\n").unwrap();
        assert_eq!((t.passed, t.failed, t.skipped), (7, 0, 2));
        assert!(parse_tally("no tally here").is_none());
    }
}
