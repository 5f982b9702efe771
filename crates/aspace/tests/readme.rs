//! The README's address-space example is the crate documentation's first example, which
//! `cargo test` compiles and runs as a doctest: this test keeps the two identical.

/// The first ```rust / ``` block after `heading` in `text`, each line passed through `strip`.
fn block(text: &str, heading: &str, strip: impl Fn(&str) -> &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().map(strip).collect();
    let h = lines.iter().position(|l| l.contains(heading)).expect("heading");
    let start = h + lines[h..].iter().position(|l| l.starts_with("```")).expect("opening fence") + 1;
    let len = lines[start..].iter().position(|l| l.starts_with("```")).expect("closing fence");
    lines[start..start + len].iter().map(|l| l.to_string()).collect()
}

#[test]
fn the_readme_example_is_the_compiled_one() {
    let readme = include_str!("../../../README.md");
    let lib = include_str!("../src/lib.rs");
    let heading = "The address space in a dozen lines";
    let in_readme = block(readme, heading, |l| l);
    let in_lib = block(lib, heading, |l| l.strip_prefix("//! ").or(l.strip_prefix("//!")).unwrap_or(l));
    assert!(in_readme.len() > 10);
    assert_eq!(in_readme, in_lib, "README.md and the crate docs (src/lib.rs) differ");
}
