//! # twostage-bench: twostage side by side with axaddrspace, vm-memory and memcpy
//!
//! Key pieces:
//! - [`ram::BenchRam`]: the host RAM and frame allocator every side uses (twostage's tables and
//!   data frames, page-table-generic's tables and axaddrspace's data frames alike).
//! - [`anchor`]: axaddrspace 0.6.0 wired to a page-table-generic 0.9.1 table in the EPT format.
//! - [`engine`], [`copy`], [`gva`], [`space`]: the criterion groups, one per row of the table.
//! - [`report`]: reads criterion's estimates and writes the side-by-side table.
//!
//! `cargo xtask bench` runs `cargo bench -p twostage-bench` and prints the table. The crate is a
//! workspace member but not a default one: a bare `cargo test` never builds it.
//!
//! ## Safety model
//! The only unsafe code is the fake host RAM (a heap block reached through raw pointers, with a
//! `// SAFETY:` note for each use) and the frame-allocator promises made over it.
#![warn(missing_docs)]

pub mod anchor;
pub mod copy;
pub mod engine;
pub mod gva;
pub mod ram;
pub mod report;
pub mod space;

use std::sync::OnceLock;

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// Bytes of host RAM the shared [`ram()`] holds: a populated 1 GiB address space for the fork
/// and harvest rows, with room for tables and the 256 MiB regions of the other rows.
pub const RAM_BYTES: usize = (GIB + 768 * MIB) as usize;

/// The host RAM shared by every group (made and touched on first use).
pub fn ram() -> &'static ram::BenchRam {
    static RAM: OnceLock<&'static ram::BenchRam> = OnceLock::new();
    RAM.get_or_init(|| ram::BenchRam::leak(RAM_BYTES))
}

/// A small deterministic generator (xorshift64*), so that every side sees the same addresses.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (`seed` 0 is replaced by a fixed constant).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0; the tiny modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `count` distinct page numbers in `0..pages`, in random order.
pub fn random_pages(seed: u64, pages: u64, count: usize) -> Vec<u64> {
    assert!(count as u64 <= pages);
    let mut rng = Rng::new(seed);
    let mut seen = std::collections::HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let p = rng.below(pages);
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

/// `count` random offsets at which `size` bytes fit in `0..span`, aligned to 8 bytes.
pub fn random_offsets(seed: u64, span: u64, size: u64, count: usize) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    (0..count).map(|_| rng.below((span - size) / 8 + 1) * 8).collect()
}

/// What the CPU does when a guest writes `gpa` through the 4-level EPT at `root`: walk to the
/// leaf and set its accessed and dirty flags (bits 8 and 9 of a leaf, Intel SDM Vol. 3C 29.3.5)
/// with a locked OR. The benchmarks use it to dirty pages as a running guest would, through the
/// table's memory and not through the library under test.
pub fn cpu_write(ram: &ram::BenchRam, root: u64, gpa: u64) {
    // Bits 51:12 of an EPT entry hold the next table or the page (Intel SDM Vol. 3C 29.3.2).
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    // Bit 7 of a PDE/PDPTE marks a page (Intel SDM Vol. 3C 29.3.2, Table 29-4).
    const PS: u64 = 1 << 7;
    const AD: u64 = (1 << 8) | (1 << 9);
    let mut table = root;
    for level in (0..4).rev() {
        let idx = (gpa >> (12 + 9 * level)) & 511;
        let p = ram.ptr(table + idx * 8).cast::<u64>();
        // SAFETY: `p` is an 8-byte-aligned entry inside a table frame of the bench RAM, which
        // the table under test only touches with atomics as well.
        let entry = unsafe { std::sync::atomic::AtomicU64::from_ptr(p) };
        let v = entry.load(std::sync::atomic::Ordering::Acquire);
        assert!(v & 7 != 0, "guest write to unmapped {gpa:#x}");
        if level == 0 || v & PS != 0 {
            entry.fetch_or(AD, std::sync::atomic::Ordering::AcqRel);
            return;
        }
        table = v & ADDR;
    }
}
