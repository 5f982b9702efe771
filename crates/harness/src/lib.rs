//! # twostage-harness: the scenario harness of the bare-metal images
//!
//! Both hypervisor images (RISC-V under QEMU, x86 under Bochs) prove twostage on emulated
//! hardware by running scenarios: a guest is made to touch memory and the scenario checks what
//! the hardware and twostage did. This crate is the one harness they share.
//!
//! Key types:
//! - [`Scenario`]: a name, the capabilities it needs ([`Platform::Need`]) and a body.
//! - [`Platform`]: what the machine offers; a scenario whose needs are not all met is not run and
//!   is reported as `# SKIP` with the platform's reason, so a skip always says why.
//! - [`run`]: runs a list of scenarios in order and prints TAP (Test Anything Protocol, version 13):
//!   `1..N`, then `ok K - name`, `ok K - name # SKIP reason` or `not ok K - name: reason` per
//!   scenario, and a closing `P passed, F failed, S skipped` line that `cargo xtask test` reads.
//! - [`XorShift64Star`]: the seeded generator of the scenarios that generate random guests.
//!
//! Scenarios are numbered by their position in the list the image hands over: no number is
//! written anywhere by hand. The crate has no unsafe code and no dependencies; it is tested on
//! the host like any library.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

use alloc::string::String;
use core::fmt::{self, Write};

/// What one scenario's body concluded when every check held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Pass {
    /// Nothing more to say.
    #[default]
    Plain,
    /// A one-line summary printed after the name (a measured figure, the mode chosen, ...).
    With(String),
}

/// A scenario's verdict: `Err` carries the check that failed, printed after `not ok`.
pub type Verdict = Result<Pass, String>;

/// The machine a suite runs on, as far as scenarios care.
pub trait Platform {
    /// One capability a scenario may need (an EPT feature, an hgatp mode, hardware A/D updating).
    type Need: Copy + fmt::Debug + 'static;

    /// `None` when the platform offers `need`; otherwise why not, printed after `# SKIP`.
    fn lacks(&self, need: Self::Need) -> Option<String>;
}

/// One scenario: what it is called, what it needs, and what it does.
pub struct Scenario<P: Platform> {
    /// The name printed on its TAP line.
    pub name: &'static str,
    /// Capabilities without which the scenario cannot show anything: it is skipped, with the
    /// platform's reason, when one is missing.
    pub needs: &'static [P::Need],
    /// The body; it gets the platform mutably (the VM, the vCPU, the frame pool).
    pub body: fn(&mut P) -> Verdict,
}

impl<P: Platform> Scenario<P> {
    /// A scenario with no needs.
    pub const fn new(name: &'static str, body: fn(&mut P) -> Verdict) -> Self {
        Self { name, needs: &[], body }
    }

    /// A scenario that needs each of `needs`.
    pub const fn needing(name: &'static str, needs: &'static [P::Need], body: fn(&mut P) -> Verdict) -> Self {
        Self { name, needs, body }
    }
}

/// What a run counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Scenarios that ran and passed.
    pub passed: u32,
    /// Scenarios that ran and failed.
    pub failed: u32,
    /// Scenarios not run because the platform lacks something they need.
    pub skipped: u32,
}

impl Tally {
    /// The exit status a suite should end with: 0 only when nothing failed and something ran.
    pub fn exit_status(&self) -> u32 {
        if self.failed == 0 && self.passed > 0 {
            0
        } else {
            1
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} passed, {} failed, {} skipped", self.passed, self.failed, self.skipped)
    }
}

/// Fails the enclosing scenario with a formatted message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(::alloc::format!($($arg)*));
        }
    };
}

/// Extension for results inside scenario bodies: turns any displayable error into a scenario
/// failure that says what was being done.
pub trait Context<T> {
    /// `Err(e)` becomes `Err("{what}: {e}")`.
    fn context(self, what: &str) -> Result<T, String>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Result<T, String> {
        self.map_err(|e| alloc::format!("{what}: {e}"))
    }
}

/// Runs `scenarios` in order on `platform`, printing TAP to `out`; returns the tally.
///
/// A scenario whose needs are not all met is skipped (its body is not called). Output errors are
/// ignored: a console that drops characters must not change what the suite concludes.
pub fn run<P: Platform>(platform: &mut P, scenarios: &[Scenario<P>], out: &mut impl Write) -> Tally {
    let mut tally = Tally::default();
    let _ = writeln!(out, "TAP version 13");
    let _ = writeln!(out, "1..{}", scenarios.len());
    for (i, s) in scenarios.iter().enumerate() {
        let n = i + 1;
        if let Some(why) = s.needs.iter().find_map(|&need| platform.lacks(need)) {
            tally.skipped += 1;
            let _ = writeln!(out, "ok {n} - {} # SKIP {why}", s.name);
            continue;
        }
        match (s.body)(platform) {
            Ok(Pass::Plain) => {
                tally.passed += 1;
                let _ = writeln!(out, "ok {n} - {}", s.name);
            }
            Ok(Pass::With(summary)) => {
                tally.passed += 1;
                let _ = writeln!(out, "ok {n} - {}: {summary}", s.name);
            }
            Err(why) => {
                tally.failed += 1;
                let _ = writeln!(out, "not ok {n} - {}: {why}", s.name);
            }
        }
    }
    let _ = writeln!(out, "{tally}");
    tally
}

/// The seeded pseudo-random generator of the scenarios that generate guests: xorshift64*
/// (Marsaglia's xorshift with Vigna's multiplier, S. Vigna, "An experimental exploration of
/// Marsaglia's xorshift generators, scrambled", 2016). The same seed gives the same sequence on
/// every machine, so a failing case can be replayed from its seed.
#[derive(Clone, Debug)]
pub struct XorShift64Star(u64);

impl XorShift64Star {
    /// A generator started from `seed` (zero, which xorshift cannot leave, is replaced by a fixed
    /// odd constant).
    pub const fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `bound` (a bound of 0 counts as 1), by remainder: the bias is below
    /// `bound / 2^64`, negligible for the bounds scenarios use.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Need {
        HugePages,
        AccessedDirty,
    }

    #[derive(Default)]
    struct Machine {
        huge: bool,
        calls: Vec<&'static str>,
    }

    impl Platform for Machine {
        type Need = Need;
        fn lacks(&self, need: Need) -> Option<String> {
            match need {
                Need::HugePages if !self.huge => Some("no 2 MiB pages on this CPU".to_string()),
                Need::HugePages => None,
                Need::AccessedDirty => Some("the hart does not update A/D bits".to_string()),
            }
        }
    }

    fn passes(m: &mut Machine) -> Verdict {
        m.calls.push("passes");
        Ok(Pass::Plain)
    }
    fn summarizes(m: &mut Machine) -> Verdict {
        m.calls.push("summarizes");
        Ok(Pass::With("3 faults".to_string()))
    }
    fn fails(m: &mut Machine) -> Verdict {
        m.calls.push("fails");
        ensure!(1 + 1 == 3, "arithmetic says {}", 1 + 1);
        Ok(Pass::Plain)
    }
    fn needs_ad(m: &mut Machine) -> Verdict {
        m.calls.push("needs_ad");
        Ok(Pass::Plain)
    }

    const SUITE: &[Scenario<Machine>] = &[
        Scenario::new("plain", passes),
        Scenario::needing("huge", &[Need::HugePages], summarizes),
        Scenario::new("broken", fails),
        Scenario::needing("a/d", &[Need::HugePages, Need::AccessedDirty], needs_ad),
    ];

    #[test]
    fn tap_lines_numbered_by_position_and_skips_say_why() {
        let mut m = Machine { huge: true, ..Default::default() };
        let mut out = String::new();
        let t = run(&mut m, SUITE, &mut out);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "TAP version 13",
                "1..4",
                "ok 1 - plain",
                "ok 2 - huge: 3 faults",
                "not ok 3 - broken: arithmetic says 2",
                "ok 4 - a/d # SKIP the hart does not update A/D bits",
                "2 passed, 1 failed, 1 skipped",
            ]
        );
        assert_eq!(t, Tally { passed: 2, failed: 1, skipped: 1 });
        assert_eq!(t.exit_status(), 1);
        // A skipped scenario's body never runs.
        assert_eq!(m.calls, ["passes", "summarizes", "fails"]);
    }

    #[test]
    fn the_first_missing_need_is_the_reason() {
        let mut m = Machine::default();
        let mut out = String::new();
        let t = run(&mut m, &SUITE[1..2], &mut out);
        assert!(out.contains("ok 1 - huge # SKIP no 2 MiB pages on this CPU"), "{out}");
        assert_eq!(t, Tally { passed: 0, failed: 0, skipped: 1 });
        // Nothing ran: a suite of skips alone does not pass.
        assert_eq!(t.exit_status(), 1);
    }

    #[test]
    fn context_names_what_was_being_done() {
        let r: Result<(), &str> = Err("out of frames");
        assert_eq!(r.context("mapping the guest"), Err("mapping the guest: out of frames".to_string()));
    }

    #[test]
    fn xorshift_is_reproducible_and_bounded() {
        let (mut a, mut b) = (XorShift64Star::new(7), XorShift64Star::new(7));
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        // Seed 1: x = 1 ^ (1 << 25) = 0x2000001 after the three shifts, times the multiplier.
        assert_eq!(XorShift64Star::new(1).next_u64(), 0x2000001u64.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut r = XorShift64Star::new(1);
        assert!((0..1000).all(|_| r.below(10) < 10));
        assert_eq!(XorShift64Star::new(0).next_u64(), XorShift64Star::new(0x9e37_79b9_7f4a_7c15).next_u64());
    }
}
