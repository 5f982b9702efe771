//! [`GuestTlb`]: the guest's own translations (guest-virtual page to guest-physical page, with
//! the accesses already allowed), kept from one guest-virtual copy to the next as a processor's
//! TLB and paging-structure caches keep them (Intel SDM Vol. 3A 4.10; RISC-V Privileged §4.3.2
//! and the SFENCE.VMA section), and dropped when the guest fences.
#![forbid(unsafe_code)]

use super::{CachedTable, GuestPaging, Translation};
use crate::mem::{GuestMemory, MemoryEpoch, PageHint};
use alloc::boxed::Box;
use alloc::vec;
use twostage_npt::{Access, GuestPhysAddr, GuestVirtAddr};

use super::GuestVaError;

/// Page translations kept: [`SETS`] sets of [`WAYS`] (chosen by a hash of the guest-virtual
/// page number; a new entry replaces a void one, else one chosen round-robin). A set's eight
/// tags fill one 64-byte cache line.
const WAYS: usize = 8;
const SETS: usize = 512;
/// Tables kept whose entries map a guest page (indexed by the 2 MiB the address lies in).
pub(crate) const TABLES: usize = 256;

/// One page translation's tag: the guest-virtual 4 KiB page (bits 63:12) | the stamp it was
/// made under (bits 11:5, see [`STAMPS`]) | the accesses the walk allowed (`R`, `W`, `X` at
/// bits 4:2) | the level of the guest's page that held it (bits 1:0). The tags of a set share
/// one cache line, apart from what a hit then needs ([`Entry`]), so that a lookup reads little.
type Tag = u64;

/// What a tag's hit gives: the guest-physical 4 KiB page the guest-virtual page translated to,
/// and the hypervisor's address of that page for reading (0: not known), from a [`PageHint`] the
/// memory made at the entries' epoch.
#[derive(Clone, Copy, Default)]
struct Entry {
    gpa: u64,
    host: u64,
}

const R: u64 = 1;
const W: u64 = 2;
const X: u64 = 4;
/// Stamps a tag can hold (1..STAMPS; 0 is never current): when the count wraps, every tag is
/// cleared.
const STAMPS: u64 = 128;
const STAMP_SHIFT: u32 = 5;
const RIGHTS_SHIFT: u32 = 2;

#[inline]
fn tag_stamp(t: Tag) -> u64 {
    (t >> STAMP_SHIFT) & (STAMPS - 1)
}

fn access_bit(access: Access) -> u64 {
    match access {
        Access::Read => R,
        Access::Write => W,
        Access::Execute => X,
    }
}

/// The guest's translations kept across guest-virtual copies: a software TLB of one vCPU.
///
/// The free functions ([`super::copy_from_guest_va`], [`super::copy_to_guest_va`],
/// [`super::translate_gva`]) walk the guest's tables afresh on every call. A hypervisor that
/// copies through guest-virtual addresses often (instruction emulation, paravirtual devices
/// handed guest-virtual buffers) keeps one `GuestTlb` per vCPU and calls
/// [`GuestTlb::copy_from`] / [`GuestTlb::copy_to`] / [`GuestTlb::translate`]: a page translated
/// before is reached with a compare, and a page whose table was read before costs one entry read.
///
/// # What keeps it true
/// An entry is only what a walk found with every entry allowing the access, the A bits set and,
/// for a write, the D bit set (x86: set by the walk, as the processor does; RISC-V: set, or
/// updated by the walk when the mode says the hart updates them). It is used only while
///
/// - the paging mode is the one it was made under (any change of root, mode or rights
///   controls — CR3, CR0.WP, CR4.SMEP/SMAP, EFER.NXE, vsatp, SUM, MXR, user/supervisor —
///   drops every entry), and
/// - the memory's [`MemoryEpoch`] is the one it was made under (the address space changed no
///   guest-physical translation since: a region swapped under the guest cannot leave entries
///   read from the old memory). Memory that has no epoch (such as [`crate::TableMemory`]) keeps
///   nothing from one call to the next.
///
/// Like a processor's TLB it does **not** notice the guest rewriting its own page tables: the
/// architectures let a processor keep using the old translation until the guest fences, and
/// every guest fences after such a change. So the hypervisor must tell the cache about each fence
/// the guest makes on this vCPU:
///
/// - x86: [`GuestTlb::flush_all`] on every MOV to CR3 (even of the same value), INVPCID and
///   INVVPID-equivalent events (a VPID flush the hypervisor makes for the guest), and any
///   change of CR0.PG/CR4.PGE; [`GuestTlb::flush_va`] on INVLPG (SDM Vol. 3A 4.10.4.1). That
///   needs CR3-load exiting and INVLPG exiting on (SDM Vol. 3C 25.6.2), or the cache dropped at
///   every VM entry.
/// - RISC-V: [`GuestTlb::flush_va`] on SFENCE.VMA/HFENCE.VVMA with an address,
///   [`GuestTlb::flush_all`] on one without (or with only an ASID: the cache keeps no ASIDs);
///   the guest's SFENCE.VMA traps only with hstatus.VTVM = 1 (Privileged, "Hypervisor Status
///   Register"), so without it drop the cache at every entry into the guest. Remote fences
///   (SBI RFENCE) reach each target vCPU's cache the same way.
///
/// A hypervisor that traps none of these keeps the cache for the handling of one exit and calls
/// [`GuestTlb::flush_all`] before resuming the guest: the guest cannot fence while its vCPU is
/// stopped, so within one exit the entries are exactly what the processor could still use.
pub struct GuestTlb {
    tags: Box<[[Tag; WAYS]]>,
    entries: Box<[[Entry; WAYS]]>,
    /// Round-robin victim choice.
    next_victim: usize,
    tables: Box<[Option<CachedTable>]>,
    /// Entries made under another stamp are void.
    stamp: u64,
    /// The paging mode and memory epoch the entries were made under.
    paging: Option<GuestPaging>,
    epoch: Option<MemoryEpoch>,
}

impl Default for GuestTlb {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestTlb {
    /// An empty cache (about 100 KiB on the heap: 32 KiB of tags, 64 KiB of entries).
    pub fn new() -> Self {
        Self {
            tags: vec![[0; WAYS]; SETS].into_boxed_slice(),
            entries: vec![[Entry::default(); WAYS]; SETS].into_boxed_slice(),
            next_victim: 0,
            tables: vec![None; TABLES].into_boxed_slice(),
            stamp: 1,
            paging: None,
            epoch: None,
        }
    }

    /// Drops every translation: for a guest fence of everything (x86 MOV to CR3, RISC-V
    /// SFENCE.VMA/HFENCE.VVMA without an address).
    pub fn flush_all(&mut self) {
        self.stamp += 1;
        if self.stamp == STAMPS {
            self.tags.fill([0; WAYS]);
            self.stamp = 1;
        }
        self.tables.fill(None);
    }

    /// Drops the translations of the guest page holding `gva` (of whatever size), and every
    /// cached table (x86 INVLPG drops all paging-structure caches, SDM Vol. 3A 4.10.4.1; RISC-V
    /// SFENCE.VMA with an address need not order non-leaf changes, but dropping them is allowed).
    pub fn flush_va(&mut self, gva: GuestVirtAddr) {
        let v = gva.as_u64();
        for t in self.tags.iter_mut().flatten() {
            let size = 1u64 << (12 + 9 * (*t & 3));
            if (*t & !0xfff) & !(size - 1) == v & !(size - 1) {
                *t = 0;
            }
        }
        self.tables.fill(None);
    }

    /// Starts a use under `paging` over `mem`: drops everything if the mode or the memory's
    /// epoch changed, or if the memory has no epoch.
    pub(crate) fn begin<M: GuestMemory + ?Sized>(&mut self, mem: &M, paging: &GuestPaging) {
        let epoch = mem.epoch();
        if epoch.is_none() || epoch != self.epoch || self.paging.as_ref() != Some(paging) {
            self.flush_all();
            self.epoch = epoch;
            self.paging = Some(*paging);
        }
    }

    #[inline]
    fn set(gva: u64) -> usize {
        // Fibonacci hashing of the page number: neighbouring pages land in unrelated sets.
        ((gva >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SETS.trailing_zeros())) as usize
    }

    /// The set and way of the current entry of the 4 KiB page of `gva` allowing `access`.
    #[inline]
    fn find(&self, gva: u64, access: Access) -> Option<(usize, usize)> {
        let set = Self::set(gva);
        let key = gva & !0xfff | self.stamp << STAMP_SHIFT;
        let want = access_bit(access) << RIGHTS_SHIFT;
        // The page, the stamp and the right wanted, in one compare per way.
        let mask = !0xfff | (STAMPS - 1) << STAMP_SHIFT | want;
        let tags = &self.tags[set];
        (0..WAYS).find(|&w| tags[w] & mask == key | want).map(|w| (set, w & (WAYS - 1)))
    }

    /// The cached translation of `gva` for `access`, if any.
    #[inline]
    pub(crate) fn lookup(&self, gva: u64, access: Access) -> Option<Translation> {
        let off = gva & 0xfff;
        self.find(gva, access).map(|(s, w)| Translation {
            gpa: GuestPhysAddr::new(self.entries[s][w].gpa | off),
            page_remaining: 0x1000 - off,
        })
    }

    /// Remembers that `gva` translated to `t` for `access` through a leaf at `level` (0 = a
    /// 4 KiB page), from a walk that settled (every A bit, and D for a write, set in the
    /// guest's entries).
    pub(crate) fn insert(&mut self, gva: u64, access: Access, t: Translation, level: u32) {
        let va = gva & !0xfff | u64::from(level.min(3));
        let gpa = t.gpa.as_u64() & !0xfff;
        let stamp = self.stamp;
        let set = Self::set(gva);
        let tags = &mut self.tags[set];
        let ident = !0xfff | (STAMPS - 1) << STAMP_SHIFT | 3;
        let key = va | stamp << STAMP_SHIFT;
        // The page's own entry (adding a right), else a void one, else a victim.
        let mut void = None;
        let mut own = None;
        for (w, &t) in tags.iter().enumerate() {
            if t & ident == key {
                own = Some(w);
                break;
            }
            if void.is_none() && tag_stamp(t) != stamp {
                void = Some(w);
            }
        }
        let way = match own.or(void) {
            Some(w) => w & (WAYS - 1),
            None => {
                self.next_victim = (self.next_victim + 1) % WAYS;
                self.next_victim
            }
        };
        let e = &mut self.entries[set][way];
        let same = tags[way] & ident == key && e.gpa == gpa;
        let rights = if same { (tags[way] >> RIGHTS_SHIFT) & 7 } else { 0 } | access_bit(access);
        let host = if same { e.host } else { 0 };
        tags[way] = key | rights << RIGHTS_SHIFT;
        *e = Entry { gpa, host };
    }

    /// The current entry of the 4 KiB page of `gva` allowing `access`.
    #[inline]
    fn entry(&mut self, gva: u64, access: Access) -> Option<&mut Entry> {
        self.find(gva, access).map(|(s, w)| &mut self.entries[s][w])
    }

    /// The cached tables (for the walkers' [`super::WalkCache`]).
    pub(crate) fn tables(&mut self) -> &mut [Option<CachedTable>] {
        &mut self.tables
    }

    /// A guest-virtual read through the page entries and their host addresses: `None` (before
    /// any byte moves) if a page is not cached or the span is not one guest-physical run, so
    /// that the general way must do it. The pages' translations are looked up first, so
    /// nothing moves unless all are there. A span whose
    /// entries all know their host addresses, following each other, is one hinted read (one
    /// copy: the memory checks the hint against its epoch); otherwise one read that fills a
    /// hint, whose host addresses go into the entries.
    fn read_run<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gva: GuestVirtAddr,
        buf: &mut [u8],
    ) -> Option<Result<(), GuestVaError>> {
        let epoch = self.epoch?;
        let len = buf.len() as u64;
        let v = gva.as_u64();
        // (first gpa, first host or 0 if some page's is not known, bytes)
        let mut run: Option<(u64, u64, u64)> = None;
        let mut off = 0u64;
        while off < len {
            let va = v.wrapping_add(off);
            // A page not cached: the general way (a walk, remembered); the host address is
            // learnt on a later read.
            let e = self.entry(va, Access::Read)?;
            let (gpa, host) = (e.gpa, e.host);
            let po = va & 0xfff;
            let chunk = (0x1000 - po).min(len - off);
            // (The host view of a page need not be 4 KiB-aligned: offsets are added.)
            let (gpa, host) = (gpa | po, if host == 0 { 0 } else { host + po });
            run = match run {
                None => Some((gpa, host, chunk)),
                Some((g, h, c)) if g.wrapping_add(c) == gpa => {
                    let joined = h != 0 && host != 0 && h.wrapping_add(c) == host;
                    Some((g, if joined { h } else { 0 }, c + chunk))
                }
                Some(_) => return None,
            };
            off += chunk;
        }
        let Some((g, h, c)) = run else { return Some(Ok(())) };
        let fail = |error: crate::GuestMemError| {
            let at = GuestVirtAddr::new(v.wrapping_add(error.gpa().as_u64().wrapping_sub(g).min(c.saturating_sub(1))));
            Some(Err(GuestVaError::Memory { gva: at, access: Access::Read, gpa: error.gpa(), error }))
        };
        if h != 0 {
            // Every page's host address known, following each other: one copy.
            let po = g & 0xfff;
            let mut hint = PageHint::joined(epoch, g - po, (h - po) as usize, (po + c + 0xfff) & !0xfff);
            return match mem.read_hinted(GuestPhysAddr::new(g), buf, &mut hint) {
                Ok(()) => Some(Ok(())),
                Err(e) => fail(e),
            };
        }
        // Some host addresses not known, or not following each other: each run of pages whose
        // addresses are known and follow each other is one copy; at the first page not known,
        // the rest is one read, and the hint it leaves gives the host addresses of the pages it
        // covers (so a span read again learns its pages one run at a time).
        let mut off = 0u64;
        while off < len {
            let (mut rh, mut rn) = (0u64, 0u64);
            while off + rn < len {
                let va = v.wrapping_add(off + rn);
                let po = va & 0xfff;
                let host = match self.entry(va, Access::Read) {
                    Some(e) if e.host != 0 => e.host + po,
                    _ => break,
                };
                if rn == 0 {
                    rh = host;
                } else if rh.wrapping_add(rn) != host {
                    break;
                }
                rn += (0x1000 - po).min(len - off - rn);
            }
            let (o, gpa) = (off as usize, g + off);
            if rn > 0 {
                let po = gpa & 0xfff;
                let mut hint = PageHint::joined(epoch, gpa - po, (rh - po) as usize, (po + rn + 0xfff) & !0xfff);
                if let Err(e) = mem.read_hinted(GuestPhysAddr::new(gpa), &mut buf[o..o + rn as usize], &mut hint) {
                    return fail(e);
                }
                off += rn;
                continue;
            }
            let mut hint = PageHint::default();
            if let Err(e) = mem.read_hinted(GuestPhysAddr::new(gpa), &mut buf[o..], &mut hint) {
                return fail(e);
            }
            while off < len {
                let va = v.wrapping_add(off);
                if let (Some(host), Some(e)) = (hint.host_of(epoch, (g + off) & !0xfff), self.entry(va, Access::Read)) {
                    e.host = host as u64;
                }
                off += (0x1000 - (va & 0xfff)).min(len - off);
            }
        }
        Some(Ok(()))
    }

    /// Translates `gva` for `access` (see [`super::translate_gva`]), through the cache.
    pub fn translate<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        paging: &GuestPaging,
        gva: GuestVirtAddr,
        access: Access,
    ) -> Result<Translation, super::GuestVaError> {
        self.begin(mem, paging);
        super::translate_through(mem, paging, gva, access, self)
    }

    /// Reads guest memory at a guest-virtual address (see [`super::copy_from_guest_va`]),
    /// through the cache.
    pub fn copy_from<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        paging: &GuestPaging,
        gva: GuestVirtAddr,
        buf: &mut [u8],
    ) -> Result<(), super::GuestVaError> {
        self.begin(mem, paging);
        if let Some(r) = self.read_run(mem, gva, buf) {
            return r;
        }
        super::read_va_as(mem, paging, gva, buf, Access::Read, Some(self))
    }

    /// Writes guest memory at a guest-virtual address (see [`super::copy_to_guest_va`]),
    /// through the cache. Every page is translated (for writing) before any byte is written.
    pub fn copy_to<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        paging: &GuestPaging,
        gva: GuestVirtAddr,
        buf: &[u8],
    ) -> Result<(), super::GuestVaError> {
        self.begin(mem, paging);
        super::write_va(mem, paging, gva, buf, Some(self))
    }
}
