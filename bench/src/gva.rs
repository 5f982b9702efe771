//! GVA copy rows: guest memory through the guest's own page tables (x86-64 4-level and Sv39).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use twostage_aspace::guest::{GuestPaging, GuestTlb};
use twostage_aspace::GuestMemory;
use twostage_npt::{GuestPhysAddr, GuestVirtAddr};

use crate::copy::{copy_group, Dir, COPY_SPAN, SIZES};
use crate::engine::GPA_BASE;
use crate::space::{ts_linear, Space};
use crate::{ram, random_offsets, MIB};

/// Guest-virtual base of the mapped data (1 GiB-aligned, canonical for x86-64 and Sv39).
pub const GVA_BASE: u64 = 0x10_0000_0000;
/// Offsets cycled through by each row (the same seeds as the GPA rows).
const OFFSETS: usize = 1024;

/// The guest paging formats measured.
#[derive(Clone, Copy)]
pub enum Guest {
    /// x86-64 4-level paging (Intel SDM Vol. 3A 4.5).
    X86,
    /// RISC-V Sv39 (RISC-V Privileged §4.4).
    Sv39,
}

impl Guest {
    fn label(self) -> &'static str {
        match self {
            Guest::X86 => "x86",
            Guest::Sv39 => "sv39",
        }
    }
    fn levels(self) -> usize {
        match self {
            Guest::X86 => 4,
            Guest::Sv39 => 3,
        }
    }
    /// A non-leaf entry pointing at the table at `gpa`.
    fn table_entry(self, gpa: u64) -> u64 {
        match self {
            // P | R/W | A (Intel SDM Vol. 3A 4.5, Table 4-15/4-17/4-19); A preset so that the
            // walker's accessed-flag update is a no-op after setup, as on a warmed-up guest.
            Guest::X86 => gpa | 1 | 1 << 1 | 1 << 5,
            // V only: a pointer to the next level (RISC-V Privileged §4.3.1: R=W=X=0); PPN at 10.
            Guest::Sv39 => (gpa >> 12) << 10 | 1,
        }
    }
    /// A 4 KiB leaf for the page at `gpa`, readable and writable, accessed and dirty.
    fn leaf_entry(self, gpa: u64) -> u64 {
        match self {
            // P | R/W | A | D (Intel SDM Vol. 3A 4.5, Table 4-20).
            Guest::X86 => gpa | 1 | 1 << 1 | 1 << 5 | 1 << 6,
            // V | R | W | A | D (RISC-V Privileged §4.3.1); A and D preset (Svade would fault).
            Guest::Sv39 => (gpa >> 12) << 10 | 1 | 1 << 1 | 1 << 2 | 1 << 6 | 1 << 7,
        }
    }
    /// The registers that select this paging with its root at `root`.
    fn paging(self, root: u64) -> GuestPaging {
        match self {
            // CR0 = PE | WP | PG, CR4 = PAE, EFER = LME | LMA (Intel SDM Vol. 3A 2.5, 2.2.1).
            Guest::X86 => GuestPaging::x86_64(
                1 | 1 << 16 | 1 << 31,
                root,
                1 << 5,
                1 << 8 | 1 << 10,
                twostage_aspace::guest::X86Cpu { maxphyaddr: 52, page_1g: true },
            )
            .expect("long mode"),
            // vsatp.MODE = 8 (Sv39), PPN = root >> 12 (RISC-V Privileged §4.1.11).
            Guest::Sv39 => GuestPaging::riscv(8 << 60 | root >> 12, 0).expect("Sv39"),
        }
    }
}

/// Writes page tables into guest memory after the data, mapping `GVA_BASE..+COPY_SPAN` to
/// `GPA_BASE..+COPY_SPAN` with 4 KiB pages. Returns the root's guest-physical address.
fn build_tables(space: &mut Space, guest: Guest) -> u64 {
    let mut next = GPA_BASE + COPY_SPAN;
    let mut alloc = || {
        let t = next;
        next += 4096;
        t
    };
    let put = |space: &mut Space, gpa: u64, entries: &[u64; 512]| {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        space.write(GuestPhysAddr::new(gpa), &bytes).expect("table write");
        space.flush_pending(|_| {});
    };
    let root = alloc();
    // Single-entry tables down to the one that holds the page-directory entries.
    let mut table = root;
    for level in (2..guest.levels()).rev() {
        let child = alloc();
        let mut e = [0u64; 512];
        e[((GVA_BASE >> (12 + 9 * level)) & 511) as usize] = guest.table_entry(child);
        put(space, table, &e);
        table = child;
    }
    // Level 1: one entry per 2 MiB, each pointing at a page table of 512 leaves.
    let mut pd = [0u64; 512];
    for i in 0..(COPY_SPAN >> 21) {
        let pt = alloc();
        let mut leaves = [0u64; 512];
        for (j, l) in leaves.iter_mut().enumerate() {
            *l = guest.leaf_entry(GPA_BASE + (i << 21) + ((j as u64) << 12));
        }
        put(space, pt, &leaves);
        pd[(((GVA_BASE >> 21) + i) & 511) as usize] = guest.table_entry(pt);
    }
    put(space, table, &pd);
    root
}

/// Writes the guest tables of x86-64 (`x86`) or Sv39 into `space` (`COPY_SPAN + 2 MiB` of guest
/// RAM from `GPA_BASE`) and returns the paging that uses them.
pub fn install(space: &mut Space, x86: bool) -> GuestPaging {
    let guest = if x86 { Guest::X86 } else { Guest::Sv39 };
    let root = build_tables(space, guest);
    guest.paging(root)
}

/// GVA copies of every size, both directions, x86-64 4-level and Sv39. The limit is the GPA
/// rows' memcpy at the same offsets; neither anchor walks guest page tables. Like the GPA rows,
/// the guest RAM is one linear region over contiguous bench RAM (the memcpy's kind of memory);
/// the copies go through one [`GuestTlb`] kept across them, as a vCPU keeps it between the
/// guest's fences (the guest here changes no table, so it never fences).
pub fn gva_copies(c: &mut Criterion) {
    let ram = ram();
    // Data, then room for the guest's tables.
    let mut space = ts_linear(ram, COPY_SPAN + 2 * MIB).0;
    for guest in [Guest::X86, Guest::Sv39] {
        let root = build_tables(&mut space, guest);
        let paging = guest.paging(root);
        for dir in [Dir::Read, Dir::Write] {
            for (label, size) in SIZES {
                let offs = random_offsets(0xc0c0 ^ size, COPY_SPAN, size, OFFSETS);
                let mut g = copy_group(c, &format!("gva_{}_{}", guest.label(), dir.label()), size);
                let mut buf = vec![0x5au8; size as usize];
                g.bench_function(BenchmarkId::new("twostage", label), |b| {
                    let mut i = 0;
                    let mut mem = &mut space;
                    let mut tlb = GuestTlb::new();
                    b.iter(|| {
                        let gva = GuestVirtAddr::new(GVA_BASE + black_box(offs[i % OFFSETS]));
                        i += 1;
                        match dir {
                            Dir::Read => tlb.copy_from(&mut mem, &paging, gva, &mut buf).expect("read"),
                            Dir::Write => tlb.copy_to(&mut mem, &paging, gva, &buf).expect("write"),
                        }
                        black_box(&buf);
                    })
                });
                g.finish();
            }
        }
    }
}
