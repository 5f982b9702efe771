//! The guest's software TLB ([`GuestTlb`]) never serves a translation the guest has fenced
//! away or that a change of the address space made void: random guest-virtual copies through
//! one long-lived `GuestTlb`, interleaved with guest page-table changes (remap, not present,
//! read-only, 2 MiB page remapped) each followed by the guest's fence (by address or all), with
//! paging-mode changes and with address-space changes (fork); every copy is checked against the
//! uncached free functions, which walk the guest's tables afresh.

mod common;
use common::*;
use twostage_aspace::guest::{GuestTlb, X86Cpu};
use twostage_aspace::*;
use twostage_npt::{Access, AdMode, GuestVirtAddr, MappingFlags, Sv39x4};

type Space = AddressSpace<Sv39x4, Ram>;

const CPU: X86Cpu = X86Cpu { maxphyaddr: 52, page_1g: true };
const PAGE: u64 = 4096;
/// Guest-virtual pages: 32 at `VA` (4 KiB pages), and a 2 MiB page at `VA_2M`.
const VA: u64 = 0x40_0000;
const PAGES: u64 = 32;
const VA_2M: u64 = 0x60_0000;
/// Data pages the 4 KiB pages point into: 64 at `DATA`; two 2 MiB data areas.
const DATA: u64 = 0x10_0000;
const DATA_PAGES: u64 = 64;
const BIG: [u64; 2] = [0x20_0000, 0x40_0000];
/// Tables: root, then one per level below it.
const T0: u64 = 0x1000;

#[derive(Clone, Copy, PartialEq)]
enum Arch {
    X86,
    Sv39,
}

impl Arch {
    fn levels(self) -> u64 {
        match self {
            Arch::X86 => 4,
            Arch::Sv39 => 3,
        }
    }
    /// A pointer to the table at `gpa` (x86: P|RW|US|A, SDM Vol. 3A 4.5; Sv39: V, Privileged §4.3.1).
    fn table(self, gpa: u64) -> u64 {
        match self {
            Arch::X86 => gpa | 1 | 2 | 4 | 1 << 5,
            Arch::Sv39 => (gpa >> 12) << 10 | 1,
        }
    }
    /// A leaf for `gpa` at `level` (1 = 2 MiB), writable or not, A and D set.
    fn leaf(self, gpa: u64, level: u64, writable: bool) -> u64 {
        match self {
            Arch::X86 => gpa | 1 | u64::from(writable) << 1 | 1 << 5 | 1 << 6 | if level > 0 { 1 << 7 } else { 0 },
            Arch::Sv39 => (gpa >> 12) << 10 | 1 | 2 | u64::from(writable) << 2 | 1 << 6 | 1 << 7,
        }
    }
    fn paging(self, root: u64, wp: bool) -> GuestPaging {
        match self {
            Arch::X86 => {
                GuestPaging::x86_64(1 << 31 | u64::from(wp) << 16 | 1, root, 1 << 5, 1 << 8 | 1 << 10, CPU).unwrap()
            }
            // With MXR off and SUM on (bit 18): `wp` has no RISC-V meaning; use SUM instead.
            Arch::Sv39 => GuestPaging::riscv(8 << 60 | root >> 12, u64::from(wp) << 18).unwrap(),
        }
    }
}

fn put(s: &mut Space, at: u64, v: u64) {
    s.write(gpa(at), &v.to_le_bytes()).unwrap();
    s.flush_pending(|_| {});
}

/// Builds the tables: returns (address of PT entry 0 for `VA`, address of the PD entry for `VA_2M`).
/// A second page table (mapping the other half of the data pages) follows the first, unused.
fn build(s: &mut Space, arch: Arch) -> (u64, u64) {
    let mut table = T0;
    for level in (2..arch.levels()).rev() {
        let child = table + PAGE;
        put(s, table + ((VA >> (12 + 9 * level)) & 511) * 8, arch.table(child));
        table = child;
    }
    // `table` is the PD now.
    let pt = table + PAGE;
    put(s, table + ((VA >> 21) & 511) * 8, arch.table(pt));
    let pde_2m = table + ((VA_2M >> 21) & 511) * 8;
    put(s, pde_2m, arch.leaf(BIG[0], 1, true));
    let pte0 = pt + ((VA >> 12) & 511) * 8;
    for i in 0..PAGES {
        put(s, pte0 + i * 8, arch.leaf(DATA + i * PAGE, 0, true));
        put(s, pte0 + PAGE + i * 8, arch.leaf(DATA + (PAGES + i) * PAGE, 0, true));
    }
    (pte0, pde_2m)
}

fn space(ram: &Ram) -> Space {
    let mut s: Space = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (_, f) = s.add_region("ram", range(0, 0x80_0000), MappingFlags::RWX, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    // Fill the data pages with recognisable bytes.
    for p in 0..DATA_PAGES {
        let bytes: Vec<u8> = (0..PAGE).map(|i| (p * 7 + i / 8) as u8).collect();
        s.write(gpa(DATA + p * PAGE), &bytes).unwrap();
    }
    for (k, &b) in BIG.iter().enumerate() {
        s.write(gpa(b + 0x1_0000), &[0xb0 + k as u8; 64]).unwrap();
    }
    s.flush_pending(|_| {});
    s
}

/// A random span in the mapped guest-virtual pages (and now and then just past them).
fn span(rng: &mut Rng) -> (u64, usize) {
    let len = match rng.below(3) {
        0 => 8,
        1 => 1 + rng.below(PAGE),
        _ => 1 + rng.below(3 * PAGE),
    } as usize;
    let start = if rng.below(4) == 0 {
        VA_2M + rng.below(0x20_0000 - len as u64)
    } else {
        VA + rng.below(PAGES * PAGE + PAGE / 2)
    };
    (start, len)
}

/// The bytes a write at `start` may reach: every data page, and the 2 MiB areas' bytes under it.
fn snapshot(s: &mut Space, start: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; (DATA_PAGES * PAGE) as usize];
    s.read(gpa(DATA), &mut out).unwrap();
    if start >= VA_2M {
        for b in BIG {
            let mut w = vec![0u8; len];
            s.read(gpa(b + (start - VA_2M)), &mut w).unwrap();
            out.extend(w);
        }
    }
    out
}

/// Reads and writes through `tlb` agree with the uncached walk on `s` (same bytes, same error).
fn check_copy(s: &mut Space, tlb: &mut GuestTlb, paging: &GuestPaging, rng: &mut Rng) {
    let (start, len) = span(rng);
    let mut mem = &mut *s;
    if rng.below(3) == 0 {
        let buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let cached = tlb.copy_to(&mut mem, paging, GuestVirtAddr::new(start), &buf);
        let after_cached = snapshot(mem, start, len);
        // The same write, walked afresh, must find every byte already in place (the buffer is
        // random, so a byte the cached write put elsewhere shows) and fail the same way.
        let uncached = copy_to_guest_va(&mut mem, paging, GuestVirtAddr::new(start), &buf);
        assert_eq!(cached, uncached, "write at {start:#x}+{len}");
        assert!(
            snapshot(mem, start, len) == after_cached,
            "write at {start:#x}+{len} landed elsewhere than the fresh walk says"
        );
        mem.flush_pending(|_| {});
    } else {
        let mut a = vec![0u8; len];
        let mut b = vec![0u8; len];
        let ra = tlb.copy_from(&mut mem, paging, GuestVirtAddr::new(start), &mut a);
        let rb = copy_from_guest_va(&mut mem, paging, GuestVirtAddr::new(start), &mut b);
        assert_eq!(ra, rb, "read at {start:#x}+{len}");
        if ra.is_ok() {
            assert!(a == b, "read at {start:#x}+{len}: the cached translation gave other bytes");
        }
        for acc in [Access::Read, Access::Write] {
            let va = GuestVirtAddr::new(start);
            assert_eq!(
                tlb.translate(&mut mem, paging, va, acc).map(|t| t.gpa),
                translate_gva(&mut mem, paging, va, acc).map(|t| t.gpa)
            );
        }
    }
}

fn run(arch: Arch, seed: u64) {
    let ram = ram(4096);
    let mut s = space(&ram);
    let (mut pte0, pde_2m) = build(&mut s, arch);
    let mut wp = true;
    let mut paging = arch.paging(T0, wp);
    let mut tlb = GuestTlb::new();
    let mut rng = Rng(seed);
    for step in 0..3000 {
        match rng.below(10) {
            // A 4 KiB page changes (another frame, not present, read-only), then the guest fences.
            0 | 1 => {
                let i = rng.below(PAGES);
                let e = match rng.below(4) {
                    0 => 0,
                    1 => arch.leaf(DATA + rng.below(DATA_PAGES) * PAGE, 0, false),
                    _ => arch.leaf(DATA + rng.below(DATA_PAGES) * PAGE, 0, true),
                };
                put(&mut s, pte0 + i * 8, e);
                if rng.below(2) == 0 {
                    tlb.flush_va(GuestVirtAddr::new(VA + i * PAGE + rng.below(PAGE)));
                } else {
                    tlb.flush_all();
                }
            }
            // The 2 MiB page moves or loses its write right; the fence names another 4 KiB of it.
            2 => {
                let e = arch.leaf(BIG[rng.below(2) as usize], 1, rng.below(2) == 0);
                put(&mut s, pde_2m, e);
                tlb.flush_va(GuestVirtAddr::new(VA_2M + rng.below(512) * PAGE));
            }
            // The page directory's pointer switches to the other page table (a non-leaf change),
            // fenced page by page (x86: INVLPG of each page also drops the paging-structure
            // caches, SDM Vol. 3A 4.10.4.1; RISC-V needs SFENCE.VMA without an address here).
            3 if step % 3 == 0 => {
                let pd_entry = pde_2m - ((VA_2M >> 21) & 511) * 8 + ((VA >> 21) & 511) * 8;
                let pts = [pte0 & !(PAGE - 1), (pte0 & !(PAGE - 1)) + PAGE];
                let now = u64::from(s.read_obj::<u64>(gpa(pd_entry)).unwrap() == arch.table(pts[0]));
                put(&mut s, pd_entry, arch.table(pts[now as usize]));
                pte0 = pts[now as usize] + ((VA >> 12) & 511) * 8;
                if arch == Arch::X86 {
                    for i in 0..PAGES {
                        tlb.flush_va(GuestVirtAddr::new(VA + i * PAGE));
                    }
                } else {
                    tlb.flush_all();
                }
            }
            // The paging mode changes (x86 CR0.WP, RISC-V SUM): the cache notices by itself.
            3 if step % 7 == 0 => {
                wp = !wp;
                paging = arch.paging(T0, wp);
            }
            // Fork: the child's tables then differ from the parent's (a PTE changes in the child
            // only, with no fence: the cache must notice the other space by itself).
            4 if step % 5 == 0 => {
                let (mut child, f) = s.fork().unwrap();
                let parent_flush = f;
                s.flush_unloaded(parent_flush).unwrap();
                let i = rng.below(PAGES);
                check_copy(&mut s, &mut tlb, &paging, &mut rng);
                put(&mut child, pte0 + i * 8, arch.leaf(DATA + rng.below(DATA_PAGES) * PAGE, 0, true));
                for _ in 0..4 {
                    check_copy(&mut child, &mut tlb, &paging, &mut rng);
                }
                // Back to the parent: its own entries are gone too (another space).
                check_copy(&mut s, &mut tlb, &paging, &mut rng);
            }
            _ => check_copy(&mut s, &mut tlb, &paging, &mut rng),
        }
    }
}

#[test]
fn x86_cached_copies_match_fresh_walks() {
    for seed in [1, 2, 3] {
        run(Arch::X86, 0x9e37_79b9 * seed);
    }
}

#[test]
fn sv39_cached_copies_match_fresh_walks() {
    for seed in [1, 2, 3] {
        run(Arch::Sv39, 0x5851_f42d * seed);
    }
}

/// Without a fence the cache keeps the old translation (as a processor may): the test above
/// would therefore fail if a fence were not honoured. Here: the stale value is served until the
/// fence, then the new one.
#[test]
fn a_pte_change_is_seen_after_the_fence_and_only_then_required() {
    let ram = ram(4096);
    let mut s = space(&ram);
    let (pte0, pde_2m) = build(&mut s, Arch::X86);
    let paging = Arch::X86.paging(T0, true);
    let mut tlb = GuestTlb::new();
    let mut mem = &mut s;
    let at = GuestVirtAddr::new(VA + 0x10);
    assert_eq!(tlb.translate(&mut mem, &paging, at, Access::Read).unwrap().gpa, gpa(DATA + 0x10));
    put(&mut s, pte0, Arch::X86.leaf(DATA + 5 * PAGE, 0, true));
    let mut mem = &mut s;
    // Stale until the fence (allowed), fresh after it (required).
    assert_eq!(tlb.translate(&mut mem, &paging, at, Access::Read).unwrap().gpa, gpa(DATA + 0x10));
    tlb.flush_va(at);
    assert_eq!(tlb.translate(&mut mem, &paging, at, Access::Read).unwrap().gpa, gpa(DATA + 5 * PAGE + 0x10));
    // A 2 MiB page: translated through its last 4 KiB, moved, fenced by its first address.
    let last = GuestVirtAddr::new(VA_2M + 0x1f_f008);
    assert_eq!(tlb.translate(&mut mem, &paging, last, Access::Read).unwrap().gpa, gpa(BIG[0] + 0x1f_f008));
    put(&mut s, pde_2m, Arch::X86.leaf(BIG[1], 1, true));
    let mut mem = &mut s;
    tlb.flush_va(GuestVirtAddr::new(VA_2M));
    assert_eq!(tlb.translate(&mut mem, &paging, last, Access::Read).unwrap().gpa, gpa(BIG[1] + 0x1f_f008));
    // A read-only entry cached for reads never lets a write through.
    put(&mut s, pte0 + 8, Arch::X86.leaf(DATA + 9 * PAGE, 0, false));
    let mut mem = &mut s;
    tlb.flush_all();
    let ro = GuestVirtAddr::new(VA + PAGE);
    tlb.translate(&mut mem, &paging, ro, Access::Read).unwrap();
    assert!(tlb.copy_to(&mut mem, &paging, ro, &[1; 8]).is_err());
}

/// Memory with no epoch (a bare table) keeps nothing from one call to the next.
#[test]
fn memory_without_an_epoch_is_walked_every_time() {
    let ram = ram(4096);
    let mut s = space(&ram);
    let (pte0, _) = build(&mut s, Arch::Sv39);
    let paging = Arch::Sv39.paging(T0, false);
    let mut tlb = GuestTlb::new();
    struct NoEpoch<'a>(&'a mut Space);
    impl GuestMemory for NoEpoch<'_> {
        fn read_as(&mut self, g: twostage_npt::GuestPhysAddr, b: &mut [u8], a: Access) -> Result<(), GuestMemError> {
            self.0.read_as(g, b, a)
        }
        fn write(&mut self, g: twostage_npt::GuestPhysAddr, b: &[u8]) -> Result<(), GuestMemError> {
            GuestMemory::write(self.0, g, b)
        }
        fn compare_exchange_u64(
            &mut self,
            g: twostage_npt::GuestPhysAddr,
            c: u64,
            n: u64,
        ) -> Result<Result<u64, u64>, GuestMemError> {
            self.0.compare_exchange_u64(g, c, n)
        }
    }
    let at = GuestVirtAddr::new(VA + 0x20);
    assert_eq!(tlb.translate(&mut NoEpoch(&mut s), &paging, at, Access::Read).unwrap().gpa, gpa(DATA + 0x20));
    put(&mut s, pte0, Arch::Sv39.leaf(DATA + 3 * PAGE, 0, true));
    assert_eq!(
        tlb.translate(&mut NoEpoch(&mut s), &paging, at, Access::Read).unwrap().gpa,
        gpa(DATA + 3 * PAGE + 0x20)
    );
}

/// A page hint never outlives a change of the space: after a copy-on-write break moved the page
/// to a new frame, or a region was removed and another put in its place, the same hint reads the
/// new memory (and an unmapped page is an error again).
#[test]
fn a_page_hint_follows_the_space_changes() {
    let ram = ram(4096);
    let mut s = space(&ram);
    let at = gpa(DATA + 0x18);
    let mut hint = PageHint::default();
    // The same through `read_hinted` (a span's hint, as a `GuestTlb` keeps them): every read
    // gives what a plain read gives, twice (the second from the hint the first left).
    let mut span_hint = PageHint::default();
    let hinted = |s: &mut Space, hint: &mut PageHint| -> Result<u64, GuestMemError> {
        let mut plain = [0u8; 8];
        let want = s.read(at, &mut plain).map(|()| u64::from_le_bytes(plain));
        for _ in 0..2 {
            let mut b = [0u8; 8];
            let got = s.read_hinted(at, &mut b, hint).map(|()| u64::from_le_bytes(b));
            assert_eq!(got, want, "a hinted read gave what the space no longer holds");
        }
        want
    };
    let first = s.read_obj::<u64>(at).unwrap();
    assert_eq!(s.read_u64_hinted(at, &mut hint).unwrap(), first);
    assert_eq!(hinted(&mut s, &mut span_hint).unwrap(), first);
    // Fork: the page is shared; the parent's write gives it a private copy in a new frame.
    let (child, f) = s.fork().unwrap();
    s.flush_unloaded(f).unwrap();
    assert_eq!(s.read_u64_hinted(at, &mut hint).unwrap(), first);
    s.write(at, &0x1122_3344_5566_7788u64.to_le_bytes()).unwrap();
    s.flush_pending(|_| {});
    assert_eq!(s.read_u64_hinted(at, &mut hint).unwrap(), 0x1122_3344_5566_7788);
    assert_eq!(hinted(&mut s, &mut span_hint).unwrap(), 0x1122_3344_5566_7788);
    drop(child);
    // The region goes, another takes its place with other bytes.
    let id = s.regions().next().unwrap().id();
    let f = s.remove_region(id).unwrap();
    s.flush_unloaded(f).unwrap();
    assert!(s.read_u64_hinted(at, &mut hint).is_err(), "nothing mapped there any more");
    assert!(hinted(&mut s, &mut span_hint).is_err());
    let (_, f) = s.add_region("ram2", range(0, 0x80_0000), MappingFlags::RWX, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    assert_eq!(s.read_u64_hinted(at, &mut hint).unwrap(), 0, "a fresh demand-zero page");
    s.write(at, &5u64.to_le_bytes()).unwrap();
    s.flush_pending(|_| {});
    assert_eq!(s.read_u64_hinted(at, &mut hint).unwrap(), 5);
    assert_eq!(hinted(&mut s, &mut span_hint).unwrap(), 5);
}

/// A translation through a cached leaf table (the second page of a copy, or a page under a table
/// a `GuestTlb` holds) checks the entry as a full walk does: hostile and refusing leaves give the
/// same result as a fresh walk from the root.
#[test]
fn entries_under_a_cached_table_are_checked_like_a_full_walk() {
    for arch in [Arch::X86, Arch::Sv39] {
        let base = |a: Arch| a.leaf(DATA + 3 * PAGE, 0, true);
        let b = base(arch);
        let variants: Vec<u64> = match arch {
            // x86 (EFER.NXE = 0 here, so bit 63 is reserved): not present, XD, bit 51 with
            // MAXPHYADDR 36, read-only, user page (supervisor access: fine; SMAP off), A clear.
            Arch::X86 => vec![0, b | 1 << 63, b & !(1 << 1), b | 1 << 2, b & !(1 << 5), b & !(1 << 6)],
            // Sv39: reserved bits 60:54, N, PBMT without Svpbmt, W without R, a pointer (R=X=0),
            // U page for the supervisor (SUM off), A clear, D clear.
            Arch::Sv39 => vec![
                b | 1 << 55,
                b | 1 << 63,
                b | 1 << 61,
                b & !(1 << 1),
                b & !0b1110,
                b | 1 << 4,
                b & !(1 << 6),
                b & !(1 << 7),
            ],
        };
        for (k, &v) in variants.iter().enumerate() {
            let ram = ram(4096);
            let mut s = space(&ram);
            let (pte0, _) = build(&mut s, arch);
            put(&mut s, pte0 + 8, v);
            let paging = arch.paging(T0, false);
            for access in [Access::Read, Access::Write] {
                // The reference: a fresh walk from the root, on a fork (A/D updates stay there).
                let (mut fresh, f) = s.fork().unwrap();
                s.flush_unloaded(f).unwrap();
                let want =
                    translate_gva(&mut &mut fresh, &paging, GuestVirtAddr::new(VA + PAGE), access).map(|t| t.gpa);
                // The entry as the walk left it (x86 sets A and D; Sv39 here does not update).
                let want_pte = fresh.read_obj::<u64>(gpa(pte0 + 8)).unwrap();
                drop(fresh);
                let (mut a, f) = s.fork().unwrap();
                s.flush_unloaded(f).unwrap();
                let mut tlb = GuestTlb::new();
                let mut mem = &mut a;
                tlb.translate(&mut mem, &paging, GuestVirtAddr::new(VA + 8), access).unwrap();
                let got = tlb.translate(&mut mem, &paging, GuestVirtAddr::new(VA + PAGE), access).map(|t| t.gpa);
                let name = if arch == Arch::X86 { "x86" } else { "sv39" };
                assert_eq!(got, want, "{name} variant {k}, {access:?}, through a GuestTlb");
                assert_eq!(
                    a.read_obj::<u64>(gpa(pte0 + 8)).unwrap(),
                    want_pte,
                    "{name} variant {k}: A/D as a walk sets them"
                );
                // The same inside one copy of the free functions (page 0, then page 1).
                let (mut c, f) = s.fork().unwrap();
                s.flush_unloaded(f).unwrap();
                let mut buf = [0u8; 16];
                let mut mem = &mut c;
                let r = match access {
                    Access::Write => copy_to_guest_va(&mut mem, &paging, GuestVirtAddr::new(VA + PAGE - 8), &buf),
                    _ => copy_from_guest_va(&mut mem, &paging, GuestVirtAddr::new(VA + PAGE - 8), &mut buf),
                };
                assert_eq!(r.is_ok(), want.is_ok(), "variant {k}, {access:?}, in one copy");
                if let (Err(e), Err(w)) = (r, want) {
                    assert_eq!(e, w, "variant {k}, {access:?}, in one copy");
                }
            }
        }
    }
}

/// `tlb`'s read of `len` bytes at `start` equals a fresh walk's (bytes and error); the bytes.
fn same_read(s: &mut Space, tlb: &mut GuestTlb, paging: &GuestPaging, start: u64, len: usize) -> Option<Vec<u8>> {
    let mut mem = &mut *s;
    let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
    let ra = tlb.copy_from(&mut mem, paging, GuestVirtAddr::new(start), &mut a);
    let rb = copy_from_guest_va(&mut mem, paging, GuestVirtAddr::new(start), &mut b);
    assert_eq!(ra, rb, "read at {start:#x}+{len}");
    ra.ok().map(|()| {
        assert!(a == b, "read at {start:#x}+{len}: the cached host address gave other bytes");
        a
    })
}

/// The host addresses a `GuestTlb` keeps for its pages never outlive a change of the space:
/// each read below is made twice through the cache (the second from the host address the first
/// left in the entries) and compared with a fresh walk, across a copy-on-write break (by the
/// hypervisor, and by a write through the cache), a dirty log's write protection (a write
/// through the cache is logged), a region removed and a linear region of other host memory put
/// in its place, and a protection change. Writes through the cache never use a host address: a
/// shared page is copied first (the fork's copy keeps its bytes).
#[test]
fn host_addresses_in_entries_follow_every_space_change() {
    for arch in [Arch::X86, Arch::Sv39] {
        let ram = ram(4096);
        let mut s: Space = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
        let (_, f) = s.add_region("tables", range(0, DATA), MappingFlags::RWX, Backend::DemandZero).unwrap();
        s.flush_unloaded(f).unwrap();
        let (data, f) =
            s.add_region("data", range(DATA, 0x80_0000 - DATA), MappingFlags::RW, Backend::DemandZero).unwrap();
        s.flush_unloaded(f).unwrap();
        // Backed from the last page down: pages that follow each other in guest-physical
        // memory are not in frames that follow each other in host memory.
        for p in (0..DATA_PAGES).rev() {
            let bytes: Vec<u8> = (0..PAGE).map(|i| (p * 7 + i / 8) as u8).collect();
            s.write(gpa(DATA + p * PAGE), &bytes).unwrap();
        }
        s.flush_pending(|_| {});
        build(&mut s, arch);
        let paging = arch.paging(T0, false);
        let mut tlb = GuestTlb::new();
        // Words in two pages (so that their entries learn their host addresses), then two
        // pages and a bit over them, and a word in another page.
        let spans = [
            (VA + PAGE + 0x10, 8),
            (VA + 2 * PAGE + 0x20, 8),
            (VA + 0x7f8, 2 * PAGE as usize + 100),
            (VA + 3 * PAGE + 0x10, 8),
        ];
        let reads = |s: &mut Space, tlb: &mut GuestTlb| -> Vec<Option<Vec<u8>>> {
            let mut out = Vec::new();
            for (start, len) in spans {
                let first = same_read(s, tlb, &paging, start, len);
                assert_eq!(same_read(s, tlb, &paging, start, len), first, "the second read (host address)");
                out.push(first);
            }
            out
        };
        let before = reads(&mut s, &mut tlb);
        assert!(before.iter().all(Option::is_some));

        // A write in place by guest-physical address (no change of the space): seen at once.
        s.write(gpa(DATA + 0x800), &[0x11; 16]).unwrap();
        s.flush_pending(|_| {});
        assert_eq!(&reads(&mut s, &mut tlb)[2].as_ref().unwrap()[8..24], &[0x11; 16]);

        // Fork, then the parent's hypervisor write breaks the sharing: the parent reads its new
        // frame, the child (through the same cache) the old bytes.
        let (mut child, f) = s.fork().unwrap();
        s.flush_unloaded(f).unwrap();
        let shared = reads(&mut s, &mut tlb);
        s.write(gpa(DATA + 0x800), &[0x22; 16]).unwrap();
        s.flush_pending(|_| {});
        assert_eq!(&reads(&mut s, &mut tlb)[2].as_ref().unwrap()[8..24], &[0x22; 16]);
        assert_eq!(reads(&mut child, &mut tlb), shared, "the fork keeps the bytes of before");
        // A write through the cache to a page still shared: copied first, the child unchanged.
        let reads_parent = reads(&mut s, &mut tlb);
        tlb.copy_to(&mut &mut s, &paging, GuestVirtAddr::new(VA + PAGE + 0x100), &[0x33; 32]).unwrap();
        s.flush_pending(|_| {});
        let after = reads(&mut s, &mut tlb);
        assert_ne!(after, reads_parent);
        assert_eq!(reads(&mut child, &mut tlb), shared, "a write through the cache reached a shared frame");
        drop(child);

        // The dirty log write-protects the data: a write through the cache is logged.
        let (_, f) = s.start_dirty_log(range(DATA, 0x80_0000 - DATA)).unwrap();
        s.flush_unloaded(f).unwrap();
        reads(&mut s, &mut tlb);
        tlb.copy_to(&mut &mut s, &paging, GuestVirtAddr::new(VA + 2 * PAGE + 8), &[0x44; 8]).unwrap();
        s.flush_pending(|_| {});
        let (bits, f) = s.harvest_dirty().unwrap();
        s.flush_unloaded(f).unwrap();
        assert!(bits.get(gpa(DATA + 2 * PAGE)), "a write through the cache missed the dirty log");
        assert_eq!(&reads(&mut s, &mut tlb)[2].as_ref().unwrap()[0x1810..0x1818], &[0x44; 8]);
        let f = s.stop_dirty_log().unwrap();
        s.flush_unloaded(f).unwrap();

        // Read-only data: reads still served, a write through the cache refused.
        let f = s.protect_region(data, MappingFlags::READ).unwrap();
        s.flush_unloaded(f).unwrap();
        reads(&mut s, &mut tlb);
        assert!(tlb.copy_to(&mut &mut s, &paging, GuestVirtAddr::new(VA), &[1; 8]).is_err());

        // The region goes: every read fails as a fresh walk's does.
        reads(&mut s, &mut tlb);
        let f = s.remove_region(data).unwrap();
        s.flush_unloaded(f).unwrap();
        assert!(reads(&mut s, &mut tlb).iter().all(Option::is_none));

        // Other host memory in its place (a linear region): its bytes, not the old frames'.
        let host = twostage_npt::FrameAllocator::allocate_frames(&*ram, 1024, 512).unwrap();
        ram.write_bytes(host.as_u64(), &vec![0x5a; 64 * PAGE as usize]);
        let (_, f) = s.add_region("pass", range(DATA, 4 << 20), MappingFlags::RW, Backend::Linear { host }).unwrap();
        s.flush_unloaded(f).unwrap();
        for r in reads(&mut s, &mut tlb) {
            assert!(r.unwrap().iter().all(|&b| b == 0x5a));
        }
    }
}

/// An entry dropped by a fence stays dropped however many fences follow (the cache's count of
/// fences wraps in its entries' tags: every tag is cleared then).
#[test]
fn no_entry_comes_back_after_many_fences() {
    let ram = ram(4096);
    let mut s = space(&ram);
    let (pte0, _) = build(&mut s, Arch::X86);
    let paging = Arch::X86.paging(T0, true);
    let at = GuestVirtAddr::new(VA + 0x40);
    for fences in [1, 126, 127, 128, 129, 255, 300] {
        let mut tlb = GuestTlb::new();
        put(&mut s, pte0, Arch::X86.leaf(DATA, 0, true));
        assert_eq!(tlb.translate(&mut &mut s, &paging, at, Access::Read).unwrap().gpa, gpa(DATA + 0x40));
        put(&mut s, pte0, Arch::X86.leaf(DATA + 7 * PAGE, 0, true));
        // The space changed (the PTE write): the next use drops everything anyway; pass the
        // change first, so that only the fences below decide.
        let other = GuestVirtAddr::new(VA + 5 * PAGE);
        tlb.translate(&mut &mut s, &paging, other, Access::Read).unwrap();
        for _ in 0..fences {
            tlb.flush_all();
        }
        assert_eq!(
            tlb.translate(&mut &mut s, &paging, at, Access::Read).unwrap().gpa,
            gpa(DATA + 7 * PAGE + 0x40),
            "after {fences} fences"
        );
    }
}
