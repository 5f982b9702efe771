//! `cargo xtask lint` (also the first step of `cargo xtask test`): formatting, clippy with
//! warnings as errors on the host and on both bare-metal targets, and rustdoc with warnings as
//! errors. The README's code blocks are compiled and run as doctests by the host tests
//! (twostage-aspace includes README.md as documentation under `cfg(doctest)`).

use crate::util;

/// The bare-metal images with their target, and the workspace crates that build for real only on
/// that target (empty elsewhere): clippy reaches them through the image, rustdoc needs each named.
const IMAGES: [(&str, &str, &[&str]); 2] = [
    ("twostage-riscv-hv", "riscv64gc-unknown-none-elf", &["twostage-hv-riscv", "twostage-scenarios-riscv"]),
    ("twostage-x86-hv", "x86_64-unknown-none", &["twostage-hv-x86", "twostage-scenarios-x86"]),
];

/// Runs every check; returns the names of those that failed.
pub fn lint() -> Result<Vec<String>, String> {
    for (_, target, _) in IMAGES {
        util::ensure_target(target)?;
    }
    // (name, cargo arguments, extra environment)
    type Step<'a> = (String, Vec<&'a str>, Option<(&'a str, &'a str)>);
    let mut steps: Vec<Step<'_>> = vec![
        ("rustfmt".into(), vec!["fmt", "--all", "--", "--check"], None),
        ("clippy (host)".into(), vec!["clippy", "--workspace", "--all-targets", "-j2", "--", "-D", "warnings"], None),
    ];
    for (pkg, target, _) in IMAGES {
        steps.push((
            format!("clippy ({target})"),
            vec!["clippy", "-p", pkg, "--target", target, "-j2", "--", "-D", "warnings"],
            None,
        ));
    }
    // The bare-metal crates are documented for their own targets: on the host they are gated off.
    let mut host_doc = vec!["doc", "--workspace", "--no-deps", "-j2"];
    for (pkg, _, crates) in IMAGES {
        host_doc.extend(["--exclude", pkg]);
        crates.iter().for_each(|c| host_doc.extend(["--exclude", c]));
    }
    steps.push(("rustdoc (host)".into(), host_doc, Some(("RUSTDOCFLAGS", "-D warnings"))));
    for (pkg, target, crates) in IMAGES {
        let mut args = vec!["doc", "-p", pkg, "--target", target, "--no-deps", "-j2"];
        crates.iter().for_each(|c| args.extend(["-p", c]));
        steps.push((format!("rustdoc ({target})"), args, Some(("RUSTDOCFLAGS", "-D warnings"))));
    }
    let mut failed = Vec::new();
    for (name, args, env) in steps {
        println!("== lint: {name}: cargo {}", args.join(" "));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(&args).current_dir(util::root());
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        if util::run(&mut cmd)? != 0 {
            failed.push(format!("lint: {name}"));
        }
    }
    Ok(failed)
}
