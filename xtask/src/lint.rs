//! `cargo xtask lint` (also the first step of `cargo xtask test`): formatting, clippy with
//! warnings as errors on the host and on both bare-metal targets, and rustdoc with warnings as
//! errors. The README's code blocks are compiled and run as doctests by the host tests
//! (twostage-aspace includes README.md as documentation under `cfg(doctest)`).

use crate::util;

/// The bare-metal images, each with its target; clippy and rustdoc reach the workspace crates
/// they depend on through them.
const IMAGES: [(&str, &str); 2] =
    [("twostage-riscv-hv", "riscv64gc-unknown-none-elf"), ("twostage-x86-hv", "x86_64-unknown-none")];

/// Runs every check; returns the names of those that failed.
pub fn lint() -> Result<Vec<String>, String> {
    for (_, target) in IMAGES {
        util::ensure_target(target)?;
    }
    // (name, cargo arguments, extra environment)
    type Step<'a> = (String, Vec<&'a str>, Option<(&'a str, &'a str)>);
    let mut steps: Vec<Step<'_>> = vec![
        ("rustfmt".into(), vec!["fmt", "--all", "--", "--check"], None),
        ("clippy (host)".into(), vec!["clippy", "--workspace", "--all-targets", "-j2", "--", "-D", "warnings"], None),
    ];
    for (pkg, target) in IMAGES {
        steps.push((
            format!("clippy ({target})"),
            vec!["clippy", "-p", pkg, "--target", target, "-j2", "--", "-D", "warnings"],
            None,
        ));
    }
    // The images are documented for their own targets: on the host their modules are gated off.
    let mut host_doc = vec!["doc", "--workspace", "--no-deps", "-j2"];
    for (pkg, _) in IMAGES {
        host_doc.extend(["--exclude", pkg]);
    }
    steps.push(("rustdoc (host)".into(), host_doc, Some(("RUSTDOCFLAGS", "-D warnings"))));
    for (pkg, target) in IMAGES {
        steps.push((
            format!("rustdoc ({target})"),
            vec!["doc", "-p", pkg, "--target", target, "--no-deps", "-j2"],
            Some(("RUSTDOCFLAGS", "-D warnings")),
        ));
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
