//! `cargo xtask bench`: the criterion suite side by side with axaddrspace, vm-memory and memcpy.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::util;

/// The table file the suite writes inside criterion's directory (see `bench/src/report.rs`).
const TABLE_FILE: &str = "twostage-table.md";

/// The cargo target directory: `CARGO_TARGET_DIR` if set, else `<workspace>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                util::root().join(d)
            }
        }
        None => util::root().join("target"),
    }
}

/// Runs `cargo bench -p twostage-bench` (release build, criterion), then prints the
/// side-by-side table it wrote and where the HTML report is. The environment variable
/// `TWOSTAGE_BENCH_GROUPS=map,query,...` runs only some groups (see `bench/benches/side_by_side.rs`).
pub fn bench() -> Result<i32, String> {
    let criterion = target_dir().join("criterion");
    let table = criterion.join(TABLE_FILE);
    let started = SystemTime::now();
    let args = ["bench", "-p", "twostage-bench", "-j", "2", "--bench", "side_by_side"];
    // Criterion and the table must agree on the directory whatever cargo decides.
    std::env::set_var("CRITERION_HOME", &criterion);
    let code = util::cargo(&args)?;
    if code != 0 {
        return Err(format!("cargo bench failed ({code})"));
    }
    let fresh = std::fs::metadata(&table).and_then(|m| m.modified()).map(|t| t >= started).unwrap_or(false);
    if !fresh {
        return Err(format!("the suite did not write {}", table.display()));
    }
    let text = std::fs::read_to_string(&table).map_err(|e| format!("{}: {e}", table.display()))?;
    println!("\n== twostage side by side (medians; ratio = anchor time / twostage time, above 1 = twostage faster)\n");
    println!("{text}");
    println!("table: {}", table.display());
    println!("criterion HTML report (plots per benchmark): {}", criterion.join("report/index.html").display());
    Ok(0)
}
