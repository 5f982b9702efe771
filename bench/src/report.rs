//! The side-by-side table: criterion's medians per row, the ratios, and the targets met or missed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What a row is compared with.
#[derive(Clone, Copy)]
pub enum Anchor {
    /// A measured anchor: its name and criterion id.
    Bench(&'static str, &'static str),
    /// No equivalent exists; the reason is printed instead.
    None(&'static str),
}

/// What a row must reach.
#[derive(Clone, Copy)]
pub enum Target {
    /// No target.
    None,
    /// The anchor takes at least this many times as long as twostage.
    Faster(f64),
    /// At least this percentage of memcpy's speed, and not slower than the anchor.
    PctMemcpy(f64),
    /// Not slower than the anchor (ratio at least 1).
    NotSlower,
    /// At least this percentage of memcpy's speed (no anchor to beat).
    PctMemcpyOnly(f64),
    /// A median under this many nanoseconds.
    UnderNs(f64),
}

/// One line of the table.
#[derive(Clone, Copy)]
pub struct Row {
    /// What is measured.
    pub what: &'static str,
    /// twostage's criterion id (`group/function[/parameter]`).
    pub ts: &'static str,
    /// The anchor.
    pub anchor: Anchor,
    /// memcpy of the same bytes, for copies.
    pub memcpy: Option<&'static str>,
    /// Operations per criterion iteration (faults, queries), to print a time per operation.
    pub per: u64,
    /// Bytes per iteration, to print a bandwidth (0: none).
    pub bytes: u64,
    /// The target.
    pub target: Target,
}

const fn row(what: &'static str, ts: &'static str, anchor: Anchor, target: Target) -> Row {
    Row { what, ts, anchor, memcpy: None, per: 1, bytes: 0, target }
}

const AX: &str = "axaddrspace";
const NO_GVA: &str = "none: vm-memory and axaddrspace do not walk guest page tables";

macro_rules! copies {
    ($dir:literal, $mdir:literal, $what:literal, $anchor:expr, $t_small:expr, $t_big:expr) => {
        copies!($dir, "twostage", $mdir, $what, $anchor, $t_small, $t_big)
    };
    ($dir:literal, $fun:literal, $mdir:literal, $what:literal, $anchor:expr, $t_small:expr, $t_big:expr) => {
        [
            copy_row(
                concat!($what, " 8 B"),
                concat!($dir, "/", $fun, "/8B"),
                $anchor,
                concat!($mdir, "/memcpy/8B"),
                8,
                $t_small,
            ),
            copy_row(
                concat!($what, " 4 KiB"),
                concat!($dir, "/", $fun, "/4K"),
                $anchor,
                concat!($mdir, "/memcpy/4K"),
                4096,
                $t_big.0,
            ),
            copy_row(
                concat!($what, " 64 KiB"),
                concat!($dir, "/", $fun, "/64K"),
                $anchor,
                concat!($mdir, "/memcpy/64K"),
                65536,
                $t_big.1,
            ),
            copy_row(
                concat!($what, " 1 MiB"),
                concat!($dir, "/", $fun, "/1M"),
                $anchor,
                concat!($mdir, "/memcpy/1M"),
                1 << 20,
                $t_big.1,
            ),
        ]
    };
}

const fn copy_row(
    what: &'static str,
    ts: &'static str,
    anchor: Anchor,
    memcpy: &'static str,
    bytes: u64,
    target: Target,
) -> Row {
    Row { what, ts, anchor, memcpy: Some(memcpy), per: 1, bytes, target }
}

/// Every row, in print order.
pub fn rows() -> Vec<Row> {
    let mut v = vec![
        row("map 1 GiB, 2 MiB pages", "map_1g_2M/twostage", Anchor::Bench(AX, "map_1g_2M/axaddrspace"), Target::None),
        row(
            "map 1 GiB, 4 KiB pages only",
            "map_1g_4K/twostage",
            Anchor::Bench(AX, "map_1g_4K/axaddrspace"),
            Target::Faster(3.0),
        ),
        row(
            "unmap 1 GiB, 2 MiB pages",
            "unmap_1g_2M/twostage",
            Anchor::Bench(AX, "unmap_1g_2M/axaddrspace"),
            Target::None,
        ),
        row(
            "unmap 1 GiB, 4 KiB pages",
            "unmap_1g_4K/twostage",
            Anchor::Bench(AX, "unmap_1g_4K/axaddrspace"),
            Target::None,
        ),
        Row {
            per: 65536,
            ..row(
                "demand fault (256 MiB, one per 4 KiB page), frames zeroed ahead by prepare_zeroed",
                "faults_256m/twostage-prepared",
                Anchor::Bench(AX, "faults_256m/axaddrspace"),
                Target::Faster(3.0),
            )
        },
        Row {
            per: 65536,
            ..row(
                "  (the preparation itself, off the fault path: prepare_zeroed, per frame)",
                "faults_256m/prepare",
                Anchor::None("none: axaddrspace zeroes in the fault"),
                Target::None,
            )
        },
        Row {
            per: 65536,
            ..row(
                "  (same faults, no frame prepared: each fault zeroes, like axaddrspace)",
                "faults_256m/twostage",
                Anchor::Bench(AX, "faults_256m/axaddrspace"),
                Target::None,
            )
        },
        Row {
            per: 65536,
            ..row(
                "  (prepared faults against axaddrspace as shipped: frames not zeroed)",
                "faults_256m/twostage-prepared",
                Anchor::Bench("axaddrspace, no zeroing", "faults_256m/axaddrspace-unzeroed"),
                Target::None,
            )
        },
        row("populate 256 MiB", "populate_256m/twostage", Anchor::Bench(AX, "populate_256m/axaddrspace"), Target::None),
        Row {
            per: crate::engine::QUERIES as u64,
            ..row(
                "query/translate, random GPA in populated 256 MiB",
                "query_256m/twostage",
                Anchor::Bench(AX, "query_256m/axaddrspace"),
                Target::Faster(3.0),
            )
        },
    ];
    let vmm_r = Anchor::Bench("vm-memory", "");
    v.extend(copies!(
        "gpa_read",
        "gpa_read",
        "GPA read",
        vmm_r,
        Target::NotSlower,
        (Target::NotSlower, Target::PctMemcpy(90.0))
    ));
    v.extend(copies!(
        "gpa_write",
        "gpa_write",
        "GPA write",
        vmm_r,
        Target::NotSlower,
        (Target::NotSlower, Target::PctMemcpy(90.0))
    ));
    // The same copies into a populated demand-zero region (frames from the allocator, one at a
    // time, reached through the nested table) against vm-memory's one contiguous mapping:
    // unlike backing, shown for what a guest's anonymous RAM costs.
    let vmm_dz = Anchor::Bench("vm-memory (contiguous)", "");
    v.extend(copies!(
        "gpa_read",
        "twostage-dz",
        "gpa_read",
        "GPA read, demand-zero region",
        vmm_dz,
        Target::None,
        (Target::None, Target::None)
    ));
    v.extend(copies!(
        "gpa_write",
        "twostage-dz",
        "gpa_write",
        "GPA write, demand-zero region",
        vmm_dz,
        Target::None,
        (Target::None, Target::None)
    ));
    let none = Anchor::None(NO_GVA);
    let gva = (Target::PctMemcpyOnly(80.0), Target::PctMemcpyOnly(80.0));
    v.extend(copies!("gva_x86_read", "gpa_read", "GVA read, x86-64 4-level", none, Target::None, gva));
    v.extend(copies!("gva_x86_write", "gpa_write", "GVA write, x86-64 4-level", none, Target::None, gva));
    v.extend(copies!("gva_sv39_read", "gpa_read", "GVA read, Sv39", none, Target::None, gva));
    v.extend(copies!("gva_sv39_write", "gpa_write", "GVA write, Sv39", none, Target::None, gva));
    v.push(row(
        "fork of a populated 1 GiB space (vs copying 1 GiB)",
        "fork_1g/twostage",
        Anchor::Bench("memcpy 1 GiB", "fork_1g/memcpy"),
        Target::Faster(50.0),
    ));
    v.push(row(
        "  (the same, 2 MiB backing: the default)",
        "fork_1g/twostage-2m",
        Anchor::Bench("memcpy 1 GiB", "fork_1g/memcpy"),
        Target::Faster(50.0),
    ));
    v.push(row(
        "dirty-log harvest of 1 GiB, 1% written",
        "harvest_1g/twostage",
        Anchor::None("none: axaddrspace 0.6.0 has no dirty log"),
        Target::UnderNs(2.5e5),
    ));
    v.push(row(
        "  (engine walk alone: take_accessed_dirty)",
        "harvest_1g/twostage-engine",
        Anchor::None("none"),
        Target::UnderNs(2.5e5),
    ));
    v
}

/// The anchor id of a copy row: vm-memory's function at the same group and size.
fn anchor_id(r: &Row) -> Option<String> {
    match r.anchor {
        Anchor::Bench(_, "") => Some(r.ts.replace("/twostage/", "/vm-memory/").replace("/twostage-dz/", "/vm-memory/")),
        Anchor::Bench(_, id) => Some(id.to_string()),
        Anchor::None(_) => None,
    }
}

/// Median in nanoseconds of benchmark `id`, from criterion's `new/estimates.json`, if that was
/// written at or after `since` (older figures come from an earlier run and are not shown).
pub fn median_ns(dir: &Path, id: &str, since: SystemTime) -> Option<f64> {
    let path = dir.join(id).join("new/estimates.json");
    if std::fs::metadata(&path).and_then(|m| m.modified()).ok()? < since {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let after = &text[text.find("\"median\"")?..];
    let pe = &after[after.find("\"point_estimate\"")? + "\"point_estimate\"".len()..];
    let num: String = pe
        .trim_start_matches([':', ' '])
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    num.parse().ok()
}

/// A duration in the unit that suits it.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.1} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

fn fmt_value(r: &Row, ns: f64) -> String {
    if r.per > 1 {
        format!("{} each ({:.1} M/s)", fmt_ns(ns / r.per as f64), r.per as f64 / ns * 1e3)
    } else if r.bytes >= 4096 {
        format!("{} ({:.1} GB/s)", fmt_ns(ns), r.bytes as f64 / ns)
    } else {
        fmt_ns(ns)
    }
}

/// The table as Markdown from the figures written since `since`, and how many targets were met
/// and missed.
pub fn table(dir: &Path, since: SystemTime) -> (String, u32, u32) {
    let mut out = String::new();
    let (mut met, mut missed) = (0, 0);
    out.push_str("| measurement | twostage (median) | anchor | anchor (median) | anchor ÷ twostage | % of memcpy | target | met |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in rows() {
        let ts = median_ns(dir, r.ts, since);
        let (aname, an) = match r.anchor {
            Anchor::Bench(name, _) => (name.to_string(), anchor_id(&r).and_then(|id| median_ns(dir, &id, since))),
            Anchor::None(why) => (why.to_string(), None),
        };
        let mc = r.memcpy.and_then(|id| median_ns(dir, id, since));
        let ratio = ts.zip(an).map(|(t, a)| a / t);
        let pct = ts.zip(mc).map(|(t, m)| m / t * 100.0);
        let (target, ok) = match r.target {
            Target::None => (String::new(), None),
            Target::Faster(x) => (format!("≥ {x}x"), ratio.map(|q| q >= x)),
            Target::PctMemcpy(p) => {
                (format!("≥ {p}% of memcpy, ≥ 1x"), pct.zip(ratio).map(|(q, k)| q >= p && k >= 1.0))
            }
            Target::NotSlower => ("≥ 1x".to_string(), ratio.map(|q| q >= 1.0)),
            Target::PctMemcpyOnly(p) => (format!("≥ {p}% of memcpy"), pct.map(|q| q >= p)),
            Target::UnderNs(n) => (format!("< {}", fmt_ns(n)), ts.map(|t| t < n)),
        };
        let verdict = match ok {
            Some(true) => {
                met += 1;
                "met"
            }
            Some(false) => {
                missed += 1;
                "**missed**"
            }
            None if target.is_empty() => "",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.what,
            ts.map(|t| fmt_value(&r, t)).unwrap_or_else(|| "not measured".into()),
            aname,
            an.map(|a| fmt_value(&r, a)).unwrap_or_else(|| if matches!(r.anchor, Anchor::None(_)) {
                "—".into()
            } else {
                "not measured".into()
            }),
            ratio.map(|q| format!("{q:.2}x")).unwrap_or_else(|| "—".into()),
            pct.map(|p| format!("{p:.0}%")).unwrap_or_else(|| "—".into()),
            target,
            verdict,
        );
    }
    (out, met, missed)
}

/// Where criterion writes: `CRITERION_HOME`, else `<target dir>/criterion` found from this
/// executable's path (`<target>/release/deps/<bench>`).
pub fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let exe = std::env::current_exe().expect("own path");
    exe.ancestors().nth(3).map(|t| t.join("criterion")).unwrap_or_else(|| PathBuf::from("target/criterion"))
}

/// File the table is written to, inside the criterion directory.
pub const TABLE_FILE: &str = "twostage-table.md";

/// Writes the table of the run that started at `since` next to criterion's report and prints
/// it. Rows this run did not measure (a group left out) say "not measured".
pub fn write(dir: &Path, since: SystemTime) -> std::io::Result<PathBuf> {
    let (t, met, missed) = table(dir, since);
    let path = dir.join(TABLE_FILE);
    let text = format!("{t}\ntargets: {met} met, {missed} missed\n");
    std::fs::write(&path, &text)?;
    println!("\n{text}");
    Ok(path)
}
