//! The criterion suite: every row of the side-by-side table, then the table itself.
//!
//! `cargo bench -p twostage-bench [-- FILTER]`; the table lands in
//! `<target>/criterion/twostage-table.md`, the HTML report in `<target>/criterion/report/index.html`.

use criterion::Criterion;
use twostage_bench::{copy, engine, gva, report, space};

fn main() {
    let dir = report::criterion_dir();
    // Criterion and the table read the same directory.
    std::env::set_var("CRITERION_HOME", &dir);
    let mut c = Criterion::default().configure_from_args();
    engine::map_unmap(&mut c);
    engine::query(&mut c);
    space::faults_populate(&mut c);
    copy::gpa_copies(&mut c);
    gva::gva_copies(&mut c);
    space::fork(&mut c);
    engine::harvest_engine(&mut c);
    space::harvest(&mut c);
    c.final_summary();
    match report::write(&dir) {
        Ok(path) => println!("table written to {}", path.display()),
        Err(e) => eprintln!("cannot write the table in {}: {e}", dir.display()),
    }
}
