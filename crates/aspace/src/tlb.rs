//! The address space's translation cache: guest page → host frame and the rights to use it,
//! for guest-memory accesses (by guest-physical address, and the guest page-table reads of
//! guest-virtual copies), so that a repeated access to a page costs a compare instead of a
//! region lookup and a nested-table walk.
//!
//! Soundness rests on one rule, enforced by the types: the nested table and the region map sit
//! in [`Tracked`] fields, which give out `&mut` only through [`Tracked::edit`], and every
//! `edit` counts one change. An entry records the space's change count when it was made and is
//! used only while the count is unchanged: any map, unmap, protect, fault resolution, populate,
//! fork, copy-on-write break, dirty-log start, harvest or stop, region add, remove or
//! protection change makes every entry stale at once, before the change itself is made. Only
//! [`Tracked::edit_keeping_translations`] changes a field without counting, for the one
//! operation that changes no translation (carrying out a flush: it frees table frames that
//! earlier, counted, changes unlinked).
//!
//! Entries are made by any guest-memory access, including reads under `&AddressSpace` (several
//! vCPUs may read at once through [`crate::SharedAddressSpace`]), so each slot is a small
//! sequence lock over atomics: a lookup that overlaps a fill of its slot sees the sequence
//! change and misses, and two fills of one slot never interleave (the second gives up). A
//! change (under `&mut`) never touches the slots: counting it is enough. A data frame an entry
//! names stays allocated while the entry is current: frames are released only after the
//! unmapping change that made the entry stale.

use crate::region::{Backend, Region};
use crate::space::PAGE;
use alloc::boxed::Box;
use core::ops::Deref;
use core::sync::atomic::{fence, AtomicU64, Ordering};
use twostage_npt::{GuestPhysAddr, HostPhysAddr};

/// A field whose changes are counted (see the module documentation).
pub(crate) struct Tracked<T> {
    inner: T,
    changes: u64,
}

impl<T> Tracked<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self { inner, changes: 0 }
    }

    /// Mutable access: counts a change, so that every cached translation becomes stale.
    #[inline]
    pub(crate) fn edit(&mut self) -> &mut T {
        self.changes += 1;
        &mut self.inner
    }

    /// Mutable access for an operation that changes no guest-physical translation and no
    /// right (carrying out a flush, which frees table frames already unlinked).
    #[inline]
    pub(crate) fn edit_keeping_translations(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Changes counted so far.
    #[inline]
    pub(crate) fn changes(&self) -> u64 {
        self.changes
    }
}

impl<T> Deref for Tracked<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.inner
    }
}

/// The region allows reads.
pub(crate) const R: u64 = 1 << 0;
/// The region allows writes.
pub(crate) const W: u64 = 1 << 1;
/// The region allows execution.
pub(crate) const X: u64 = 1 << 2;
/// The frame may be written in place with no change to the space: a linear region's host
/// memory, or an anonymous page whose leaf is writable (hence private: shared frames are
/// mapped read-only in every holder, and so are pages the dirty log write-protects).
pub(crate) const DIRECT_WRITE: u64 = 1 << 3;
/// The entry holds a translation.
const VALID: u64 = 1 << 4;

/// `N` words behind a sequence lock: written only while `seq` is odd (by the filler that made it
/// odd), read consistently only if `seq` is the same even value before and after.
struct SeqSlot<const N: usize> {
    seq: AtomicU64,
    words: [AtomicU64; N],
}

impl<const N: usize> SeqSlot<N> {
    fn new() -> Self {
        Self { seq: AtomicU64::new(0), words: core::array::from_fn(|_| AtomicU64::new(0)) }
    }

    /// The words of the last complete fill (all zero if none), or `None` if a fill overlaps.
    #[inline]
    fn load(&self) -> Option<[u64; N]> {
        let seq = self.seq.load(Ordering::Acquire);
        let words = core::array::from_fn(|i| self.words[i].load(Ordering::Relaxed));
        // Pairs with the filler's release fence: if any word above came from a fill that
        // overlapped, the odd sequence it stored first is visible below.
        fence(Ordering::Acquire);
        (seq & 1 == 0 && self.seq.load(Ordering::Relaxed) == seq).then_some(words)
    }

    /// Replaces the words, unless another fill is under way (then nothing happens).
    #[inline]
    fn store(&self, words: [u64; N]) {
        let seq = self.seq.load(Ordering::Relaxed);
        if seq & 1 != 0 || self.seq.compare_exchange(seq, seq + 1, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        // The odd sequence is visible before any of the new words (see `load`).
        fence(Ordering::Release);
        for (w, v) in self.words.iter().zip(words) {
            w.store(v, Ordering::Relaxed);
        }
        self.seq.store(seq + 2, Ordering::Release);
    }
}

const SLOTS: usize = 512;

/// The region last used, as [`Tlb::region`] gives it.
#[derive(Clone, Copy)]
pub(crate) struct CachedRegion {
    /// First byte.
    pub(crate) start: u64,
    /// Past the last byte.
    pub(crate) end: u64,
    /// The cache rights of its pages (`R`, `W`, `X`; `DIRECT_WRITE` for a linear region).
    pub(crate) bits: u64,
    /// A linear region's host address for `start`.
    pub(crate) linear: Option<HostPhysAddr>,
}

impl CachedRegion {
    /// Whether `gpa..gpa+len` (not overflowing) lies inside and the region allows `need`.
    #[inline]
    pub(crate) fn covers(&self, gpa: u64, end: u64, need: u64) -> bool {
        self.start <= gpa && end <= self.end && self.bits & need == need
    }
}

/// Set in a region entry's bits for a linear region.
const LINEAR: u64 = 1 << 5;

/// The space's translation cache: a direct-mapped cache of [`SLOTS`] page translations of
/// anonymous regions (16 KiB, on the heap so that moving an address space stays cheap), and the
/// region last used (a linear region's pages need no other translation).
pub(crate) struct Tlb {
    /// This cache's number, unique in the process (the space's identity in a
    /// [`crate::MemoryEpoch`]: a space's heap cache never moves while it lives).
    id: u64,
    /// Guest page address | rights bits | [`VALID`]; change count when made; frame address.
    pages: Box<[SeqSlot<3>]>,
    /// Start, end, rights bits (| [`LINEAR`]), linear host base, change count when made.
    region: SeqSlot<5>,
}

impl Tlb {
    pub(crate) fn new() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Self { id, pages: (0..SLOTS).map(|_| SeqSlot::new()).collect(), region: SeqSlot::new() }
    }

    /// This cache's number, unique in the process.
    #[inline]
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    #[inline]
    fn slot(&self, page: u64) -> &SeqSlot<3> {
        &self.pages[((page >> 12) as usize) % SLOTS]
    }

    /// The frame holding the page of `gpa` if a current entry (made at change count `gen`)
    /// has every right in `need`.
    #[inline]
    pub(crate) fn lookup(&self, gpa: GuestPhysAddr, need: u64, gen: u64) -> Option<HostPhysAddr> {
        let page = gpa.as_u64() & !(PAGE - 1);
        let [tag, made, hpa] = self.slot(page).load()?;
        // Made at this count (nothing changed since), for this page, with the rights needed.
        (made == gen && tag & (!(PAGE - 1) | VALID | need) == page | VALID | need).then_some(HostPhysAddr::new(hpa))
    }

    /// Remembers that page `page` (4 KiB-aligned) is in frame `hpa` with the rights `bits`, as
    /// of change count `gen` (the caller translated it with nothing changed since). Skipped if
    /// another fill of the slot is under way.
    #[inline]
    pub(crate) fn insert(&self, page: GuestPhysAddr, hpa: HostPhysAddr, bits: u64, gen: u64) {
        debug_assert!(page.is_aligned(PAGE) && hpa.is_aligned(PAGE));
        let page = page.as_u64();
        let slot = self.slot(page);
        // A current entry for another page stays: with more pages in use than slots (random
        // accesses over a large guest), replacing on every miss would make every access a miss
        // that also pays a fill; keeping the first ones serves those at least. Every change
        // of the space voids them all, so they are never kept for long on a changing guest.
        if let Some([tag, made, _]) = slot.load() {
            if made == gen && tag & VALID != 0 && tag & !(PAGE - 1) != page {
                return;
            }
        }
        slot.store([page | VALID | bits, gen, hpa.as_u64()]);
    }

    /// The region last remembered, if it is current at change count `gen`.
    #[inline]
    pub(crate) fn region(&self, gen: u64) -> Option<CachedRegion> {
        let [start, end, bits, host, made] = self.region.load()?;
        (made == gen && bits & VALID != 0).then_some(CachedRegion {
            start,
            end,
            bits,
            linear: (bits & LINEAR != 0).then_some(HostPhysAddr::new(host)),
        })
    }

    /// Remembers region `r` (not MMIO) with the cache rights `bits`, as of change count `gen`.
    #[inline]
    pub(crate) fn remember_region(&self, r: &Region, bits: u64, gen: u64) {
        let (linear, host) = match r.backend {
            Backend::Linear { host } => (LINEAR, host.as_u64()),
            _ => (0, 0),
        };
        self.region.store([r.range.start.as_u64(), r.range.end.as_u64(), bits | linear | VALID, host, gen]);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// Threads filling and reading the same slot at once never see a torn entry: every hit
    /// gives the frame that was stored with that page.
    #[test]
    fn concurrent_fills_never_tear() {
        let tlb = Tlb::new();
        // Pages 4 KiB apart by SLOTS pages all land in slot 0.
        let page = |k: u64| GuestPhysAddr::new(k * SLOTS as u64 * PAGE);
        let frame = |k: u64| HostPhysAddr::new((k + 1) * 0x10_0000);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let tlb = &tlb;
                s.spawn(move || {
                    let mut hits = 0u64;
                    for i in 0..20_000u64 {
                        let k = (i * 7 + t) % 16;
                        if i % 2 == 0 {
                            tlb.insert(page(k), frame(k), R, 1);
                        } else if let Some(h) = tlb.lookup(page(k), R, 1) {
                            assert_eq!(h, frame(k), "a torn or foreign entry for page {k}");
                            hits += 1;
                        }
                        // An entry made at another count is never served.
                        assert_eq!(tlb.lookup(page(k), R, 2), None);
                    }
                    std::hint::black_box(hits);
                });
            }
        });
    }

    #[test]
    fn rights_and_counts_decide_hits() {
        let tlb = Tlb::new();
        let p = GuestPhysAddr::new(0x4000_0000);
        tlb.insert(p, HostPhysAddr::new(0x8000), R | X, 5);
        assert_eq!(tlb.lookup(p + 0x123, R, 5), Some(HostPhysAddr::new(0x8000)));
        assert_eq!(tlb.lookup(p, W, 5), None, "no write right");
        assert_eq!(tlb.lookup(p, DIRECT_WRITE, 5), None);
        assert_eq!(tlb.lookup(p, R, 6), None, "stale after a change");
        assert_eq!(tlb.lookup(p + PAGE, R, 5), None, "another page");
    }
}
