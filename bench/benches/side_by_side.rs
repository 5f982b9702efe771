//! The criterion suite: every row of the side-by-side table, then the table itself.
//!
//! `cargo bench -p twostage-bench [-- FILTER]`; the table lands in
//! `<target>/criterion/twostage-table.md`, the HTML report in `<target>/criterion/report/index.html`.

use criterion::Criterion;
use twostage_bench::{copy, engine, gva, report, space};

fn main() {
    let started = std::time::SystemTime::now();
    let dir = report::criterion_dir();
    // Criterion and the table read the same directory.
    std::env::set_var("CRITERION_HOME", &dir);
    let mut c = Criterion::default().configure_from_args();
    // TWOSTAGE_BENCH_GROUPS=map,query,... runs only the groups whose names start with one of
    // these (criterion's own filter still runs every group's setup, which for fork populates
    // 1 GiB: too slow under a profiler).
    let only = std::env::var("TWOSTAGE_BENCH_GROUPS").ok();
    let want = |group: &str| only.as_deref().is_none_or(|v| v.split(',').any(|p| group.starts_with(p.trim())));
    type Group = (&'static str, fn(&mut Criterion));
    let groups: [Group; 8] = [
        ("map", engine::map_unmap),
        ("query", engine::query),
        ("faults", space::faults_populate),
        ("gpa", copy::gpa_copies),
        ("gva", gva::gva_copies),
        ("fork", space::fork),
        ("harvest-engine", engine::harvest_engine),
        ("harvest", space::harvest),
    ];
    for (name, run) in groups {
        if want(name) {
            run(&mut c);
        }
    }
    c.final_summary();
    if want("faults") {
        // Counts, not times: what 2 MiB backing saves a guest that touches its RAM.
        // 2 MiB first: its runs come from RAM no row has used yet.
        let ram = space::touch_ram();
        let huge = space::faults_per_gib(ram, twostage_aspace::HugePages::Size2M);
        let small = space::faults_per_gib(ram, twostage_aspace::HugePages::Never);
        println!("nested page faults per GiB touched: {huge} with 2 MiB backing, {small} with 4 KiB pages");
    }
    match report::write(&dir, started) {
        Ok(path) => println!("table written to {}", path.display()),
        Err(e) => eprintln!("cannot write the table in {}: {e}", dir.display()),
    }
}
