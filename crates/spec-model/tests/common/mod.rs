//! Hand-built tables in a SparseMem, shared by the model's tests.
#![allow(dead_code, reason = "each test file uses a different subset")]

use twostage_spec_model::{Hpa, SparseMem};

/// Host memory size for tests: 1 GiB (sparse).
pub const MEM: u64 = 1 << 30;

/// EPT non-leaf entry rights (R/W/X).
pub const EPT_RWX: u64 = 0b111;
/// EPT leaf memory type WB (bits 5:3 = 6).
pub const EPT_WB: u64 = 6 << 3;
/// EPT bit 7.
pub const EPT_LARGE: u64 = 1 << 7;

/// RISC-V PTE bits.
pub const V: u64 = 1;
pub const R: u64 = 1 << 1;
pub const W: u64 = 1 << 2;
pub const X: u64 = 1 << 3;
pub const U: u64 = 1 << 4;
pub const A: u64 = 1 << 6;
pub const D: u64 = 1 << 7;

/// RISC-V PTE for physical address `pa` with flags.
pub fn rv_pte(pa: u64, flags: u64) -> u64 {
    (pa >> 12) << 10 | flags
}

pub struct Tables {
    pub mem: SparseMem,
    next: u64,
}

impl Tables {
    pub fn new() -> Self {
        Self { mem: SparseMem::new(MEM), next: 0x0010_0000 }
    }

    /// A zeroed frame of `size` bytes aligned to `size` (SparseMem reads unwritten words as 0).
    pub fn frame(&mut self, size: u64) -> u64 {
        let a = self.next.next_multiple_of(size);
        self.next = a + size;
        a
    }

    /// The first address not yet handed out by [`Tables::frame`].
    pub fn next_free(&self) -> u64 {
        self.next
    }

    /// Installs an EPT leaf entry `leaf` at `leaf_level` for `gpa` under `root` (a `levels`-level
    /// structure), creating RWX non-leaf entries as needed. Returns the leaf entry's address.
    pub fn ept_map(&mut self, root: u64, levels: u8, gpa: u64, leaf_level: u8, leaf: u64) -> Hpa {
        let mut table = root;
        for level in (leaf_level + 1..levels).rev() {
            let pa = Hpa(table + ((gpa >> (12 + 9 * level)) & 511) * 8);
            let mut e = self.mem.peek(pa).unwrap();
            if e & 7 == 0 {
                e = self.frame(4096) | EPT_RWX;
                self.mem.poke(pa, e);
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        let pa = Hpa(table + ((gpa >> (12 + 9 * leaf_level)) & 511) * 8);
        self.mem.poke(pa, leaf);
        pa
    }

    /// Address of the EPT entry at `level` for `gpa` (following existing entries).
    pub fn ept_entry(&self, root: u64, levels: u8, gpa: u64, level: u8) -> Hpa {
        let mut table = root;
        for l in (level + 1..levels).rev() {
            let e = self.mem.peek(Hpa(table + ((gpa >> (12 + 9 * l)) & 511) * 8)).unwrap();
            table = e & 0x000f_ffff_ffff_f000;
        }
        Hpa(table + ((gpa >> (12 + 9 * level)) & 511) * 8)
    }

    /// Installs a RISC-V leaf PTE for `addr` under `root` (`levels` levels; the root index has
    /// `root_bits` bits: 11 for G-stage, 9 for VS-stage). Table addresses live in the space the
    /// PTEs name; they are written at `addr + to_host`. Returns the leaf PTE's table address
    /// (in that space).
    #[allow(clippy::too_many_arguments, reason = "a test helper mirroring the PTE fields")]
    pub fn rv_map(
        &mut self,
        root: u64,
        levels: u8,
        root_bits: u32,
        addr: u64,
        leaf_level: u8,
        leaf: u64,
        to_host: u64,
    ) -> u64 {
        let index = |level: u8| {
            let bits = if level == levels - 1 { root_bits } else { 9 };
            (addr >> (12 + 9 * level as u32)) & ((1 << bits) - 1)
        };
        let mut table = root;
        for level in (leaf_level + 1..levels).rev() {
            let pa = table + index(level) * 8;
            let mut e = self.mem.peek(Hpa(pa + to_host)).unwrap();
            if e & V == 0 {
                let t = self.frame(4096) - to_host;
                e = rv_pte(t, V);
                self.mem.poke(Hpa(pa + to_host), e);
            }
            table = ((e >> 10) & ((1 << 44) - 1)) << 12;
        }
        let pa = table + index(leaf_level) * 8;
        self.mem.poke(Hpa(pa + to_host), leaf);
        pa
    }
}
