//! The walker: every path through the table levels.
//!
//! Descents to one address (map, query and translation, remap, split, collapse, A/D updates) go
//! through [`PageTable::next_table`], [`PageTable::create_next_table`] and [`PageTable::table_at`].
//! Range walks (unmap, protect, A/D harvest, leaf listing, copy, freeing) go through
//! [`PageTable::walk`], which visits the entries of each table that overlap a range and asks a
//! [`Visitor`] what to do with each. The visitor is a generic parameter, so every walk is compiled
//! with its hooks inlined into the loops: no indirect call per entry.

use super::{leaf_at, Leaf, PageTable};
use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::flush::Flush;
use crate::format::{level_size, Format, Pte};
use crate::frame::FrameAllocator;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

/// Why a walk stopped above the level it was heading for.
pub(crate) enum Stop<'t> {
    /// The entry is not present.
    Empty,
    /// The entry maps a page.
    Leaf {
        /// The entry itself.
        entry: &'t AtomicU64,
        /// Its value when read.
        raw: u64,
    },
}

/// An entry met by a range walk, and the part of the range it covers.
pub(crate) struct At<'t> {
    /// The table holding the entry.
    pub table: HostPhysAddr,
    /// The table's level.
    pub level: usize,
    /// The entry's index in the table.
    pub idx: usize,
    /// The first address the entry covers.
    pub base: u64,
    /// The part of the walk's range inside the entry: `[start, end)`.
    pub start: u64,
    /// See `start`.
    pub end: u64,
    /// The entry itself.
    pub entry: &'t AtomicU64,
}

impl At<'_> {
    /// Whether the range covers the whole entry.
    #[inline(always)]
    pub fn whole(&self) -> bool {
        self.start == self.base && self.end == self.base + level_size(self.level)
    }
    /// The first address the entry covers.
    #[inline(always)]
    pub fn gpa(&self) -> GuestPhysAddr {
        GuestPhysAddr::new(self.base)
    }
}

/// What a range walk does after a hook.
pub(crate) enum Next {
    /// Go on with the next entry.
    Skip,
    /// Walk this table (one level down) first, then call [`Visitor::leave`].
    Descend(HostPhysAddr),
}

/// What a range walk does at each entry. Every hook is inlined into the walker's loops (the
/// visitor is a type parameter), so a hook that does nothing costs nothing.
pub(crate) trait Visitor<F: Format, A: FrameAllocator> {
    /// Whether to pass over the entry `raw` at `level` without a hook: a mask test for the hot
    /// loops. It must hold for absent entries at level 0 unless `leaf` checks them (above level 0
    /// the walker passes over absent entries anyway).
    #[inline(always)]
    fn skip(&self, raw: u64, level: usize) -> bool {
        let _ = level;
        !F::present(raw)
    }
    /// Bits of which a last-level entry with none set is skipped (implies [`Visitor::skip`]
    /// for it): lets the walker pass over eight such entries at a time. `None`: no such bits.
    #[inline(always)]
    fn leaf_interest(&self) -> Option<u64> {
        None
    }
    /// A leaf, of value `raw` when read. May replace it by a table (a split) and descend into it.
    /// At level 0 the answer is ignored.
    fn leaf(&mut self, pt: &PageTable<F, A>, at: &At<'_>, raw: u64) -> Next;
    /// A pointer to the table `child` (`at.level` is at least 1): descend (the default), or deal
    /// with the whole of it here (`at.whole()` says whether the range covers it) and skip.
    #[inline(always)]
    fn table(&mut self, pt: &PageTable<F, A>, at: &At<'_>, child: HostPhysAddr) -> Next {
        let _ = (pt, at);
        Next::Descend(child)
    }
    /// Back from walking `child`, the table below `at`.
    #[inline(always)]
    fn leave(&mut self, pt: &PageTable<F, A>, at: &At<'_>, child: HostPhysAddr) {
        let _ = (pt, at, child);
    }
}

/// One range walk: the table it walks and the range `[start, end)`.
struct Walk<'t, F: Format, A: FrameAllocator> {
    pt: &'t PageTable<F, A>,
    start: u64,
    end: u64,
}

impl<F: Format, A: FrameAllocator> Walk<'_, F, A> {
    /// Visits the entries of `table` (at `level`, first address `base`) that overlap the range.
    fn table<V: Visitor<F, A>>(&self, v: &mut V, table: HostPhysAddr, level: usize, base: u64) {
        if level == 0 {
            return self.leaf_table(v, table, base);
        }
        let span = level_size(level);
        for idx in covered::<F>(level, base, self.start, self.end) {
            let entry = self.pt.entry(table, idx);
            let raw = entry.load(Ordering::Acquire);
            if v.skip(raw, level) || !F::present(raw) {
                continue;
            }
            let b = base + idx as u64 * span;
            let (start, end) = (self.start.max(b), self.end.min(b + span));
            let at = At { table, level, idx, base: b, start, end, entry };
            let next =
                if F::is_leaf(raw, level) { v.leaf(self.pt, &at, raw) } else { v.table(self.pt, &at, F::address(raw)) };
            if let Next::Descend(child) = next {
                self.table(v, child, level - 1, b);
                v.leave(self.pt, &at, child);
            }
        }
    }

    /// The last level, where leaf tables dominate every walk: a loop over a slice of entries,
    /// with no table to tell apart.
    #[inline(always)]
    fn leaf_table<V: Visitor<F, A>>(&self, v: &mut V, table: HostPhysAddr, base: u64) {
        let span = level_size(0);
        let range = covered::<F>(0, base, self.start, self.end);
        let first = range.start;
        let entries = &self.pt.leaf_table(table)[range];
        let interest = v.leaf_interest();
        let mut visit = |k: usize, entry: &AtomicU64| {
            let raw = entry.load(Ordering::Acquire);
            if v.skip(raw, 0) {
                return;
            }
            let idx = first + k;
            let b = base + idx as u64 * span;
            let (start, end) = (self.start.max(b), self.end.min(b + span));
            v.leaf(self.pt, &At { table, level: 0, idx, base: b, start, end, entry }, raw);
        };
        match interest {
            // Eight entries (one cache line) at a time: a quick OR of them says whether any
            // needs a look (a harvest finds most entries without A and D).
            Some(mask) => {
                let chunks = entries.chunks_exact(8);
                let tail = chunks.remainder();
                for (c, chunk) in chunks.enumerate() {
                    let line: &[AtomicU64; 8] = chunk.try_into().expect("chunks of eight");
                    let any = line.iter().fold(0, |acc, e| acc | e.load(Ordering::Relaxed));
                    if any & mask == 0 {
                        continue;
                    }
                    for (j, entry) in line.iter().enumerate() {
                        visit(c * 8 + j, entry);
                    }
                }
                let done = entries.len() - tail.len();
                for (j, entry) in tail.iter().enumerate() {
                    visit(done + j, entry);
                }
            }
            None => {
                for (k, entry) in entries.iter().enumerate() {
                    visit(k, entry);
                }
            }
        }
    }
}

impl<F: Format, A: FrameAllocator> PageTable<F, A> {
    /// One step down: the table that `table`'s entry for `va` (at `level`) points at, or why
    /// there is none.
    #[inline]
    pub(crate) fn next_table(&self, table: HostPhysAddr, va: u64, level: usize) -> Result<HostPhysAddr, Stop<'_>> {
        let entry = self.entry(table, F::index(va, level));
        let raw = entry.load(Ordering::Acquire);
        if !F::present(raw) {
            return Err(Stop::Empty);
        }
        if F::is_leaf(raw, level) {
            return Err(Stop::Leaf { entry, raw });
        }
        if level == 0 {
            // A pointer below the last level (reserved; the engine never writes one).
            return Err(Stop::Empty);
        }
        Ok(F::address(raw))
    }

    /// Links a new, zeroed table (from `pool`) into `table`'s empty entry for `va` at `level`, and
    /// returns it.
    pub(crate) fn create_next_table(
        &self,
        table: HostPhysAddr,
        va: u64,
        level: usize,
        pool: &mut Vec<HostPhysAddr>,
        flush: &mut Flush<F>,
    ) -> HostPhysAddr {
        let new = self.new_table(pool);
        // Release: the zeroed table is visible before the pointer to it.
        self.entry(table, F::index(va, level)).store(F::encode_table(new), Ordering::Release);
        flush.note_table_linked();
        new
    }

    /// The table that holds the entry at `level` for `va`, walking down from the root.
    pub(crate) fn table_at(&self, va: u64, level: usize) -> Result<HostPhysAddr, Stop<'_>> {
        let mut table = self.root;
        for l in (level + 1..F::LEVELS).rev() {
            table = self.next_table(table, va, l)?;
        }
        Ok(table)
    }

    /// The leaf entry mapping `gpa`, its raw value and its level: a walk that tests masks and
    /// decodes nothing (the hot path of every query, translation and fault).
    #[inline]
    pub(crate) fn leaf_walk(&self, gpa: GuestPhysAddr) -> Option<(&AtomicU64, u64, usize)> {
        let va = gpa.as_u64();
        if va >> F::GPA_BITS != 0 {
            return None;
        }
        let mut table = self.root;
        for level in (0..F::LEVELS).rev() {
            match self.next_table(table, va, level) {
                Ok(next) => table = next,
                Err(Stop::Leaf { entry, raw }) => return Some((entry, raw, level)),
                Err(Stop::Empty) => return None,
            }
        }
        None
    }

    /// The leaf that maps `gpa`, if any.
    pub fn query(&self, gpa: GuestPhysAddr) -> Option<Leaf> {
        let (_, raw, level) = self.leaf_walk(gpa)?;
        match F::decode(raw, level) {
            Pte::Leaf(l) => Some(leaf_at(gpa.align_down(level_size(level)), level, &l)),
            _ => None,
        }
    }

    /// The host address `gpa` maps to, with the rights of its leaf.
    pub fn translate(&self, gpa: GuestPhysAddr) -> Option<(HostPhysAddr, crate::MappingFlags)> {
        let (_, raw, level) = self.leaf_walk(gpa)?;
        match F::decode(raw, level) {
            Pte::Leaf(l) => Some((l.hpa + gpa.offset_in(level_size(level)), l.flags)),
            _ => None,
        }
    }

    /// Walks the entries that overlap `[start, end)` (inside the guest-physical space), from the
    /// root down, with `v`.
    #[inline]
    pub(crate) fn walk<V: Visitor<F, A>>(&self, start: u64, end: u64, v: &mut V) {
        self.walk_under(self.root, F::LEVELS - 1, 0, start, end, v);
    }

    /// Walks the table `table` (at `level`, first address `base`) and everything below it, over
    /// the part of `[start, end)` inside it, with `v`.
    pub(crate) fn walk_under<V: Visitor<F, A>>(
        &self,
        table: HostPhysAddr,
        level: usize,
        base: u64,
        start: u64,
        end: u64,
        v: &mut V,
    ) {
        Walk { pt: self, start, end }.table(v, table, level, base);
    }

    /// Calls `f` for every leaf that overlaps `gpa..gpa+len`, in address order.
    pub fn for_each_leaf(&self, gpa: GuestPhysAddr, len: u64, f: impl FnMut(&Leaf)) {
        let end = gpa.as_u64().saturating_add(len).min(1 << F::GPA_BITS);
        self.walk(gpa.as_u64(), end, &mut Leaves(f));
    }

    /// Hands every table frame below `table` (at `level`, first address `base`) to `release`,
    /// children before their parent; `table` itself stays. A leaf table has nothing below it.
    pub(crate) fn release_below(
        &self,
        table: HostPhysAddr,
        level: usize,
        base: u64,
        release: impl FnMut(HostPhysAddr),
    ) {
        if level == 0 {
            return;
        }
        let end = base + level_size(level) * F::entries(level) as u64;
        self.walk_under(table, level, base, base, end, &mut Release(release));
    }
}

/// Lists leaves.
struct Leaves<G>(G);

impl<F: Format, A: FrameAllocator, G: FnMut(&Leaf)> Visitor<F, A> for Leaves<G> {
    #[inline(always)]
    fn leaf(&mut self, _: &PageTable<F, A>, at: &At<'_>, raw: u64) -> Next {
        if let Pte::Leaf(l) = F::decode(raw, at.level) {
            (self.0)(&leaf_at(at.gpa(), at.level, &l));
        }
        Next::Skip
    }
}

/// Releases table frames (frees or retires them), children first. Leaf tables are released
/// from the level above, without a look at their entries.
struct Release<R>(R);

impl<F: Format, A: FrameAllocator, R: FnMut(HostPhysAddr)> Visitor<F, A> for Release<R> {
    #[inline(always)]
    fn leaf(&mut self, _: &PageTable<F, A>, _: &At<'_>, _: u64) -> Next {
        Next::Skip
    }
    #[inline(always)]
    fn table(&mut self, _: &PageTable<F, A>, at: &At<'_>, child: HostPhysAddr) -> Next {
        if at.level == 1 {
            (self.0)(child);
            return Next::Skip;
        }
        Next::Descend(child)
    }
    #[inline(always)]
    fn leave(&mut self, _: &PageTable<F, A>, _: &At<'_>, child: HostPhysAddr) {
        (self.0)(child);
    }
}

/// The indices of the entries of a table at `level` whose first address is `base` that overlap
/// `[start, end)` (which must overlap the table).
#[inline]
pub(crate) fn covered<F: Format>(level: usize, base: u64, start: u64, end: u64) -> core::ops::Range<usize> {
    let span = level_size(level);
    let first = ((start.max(base) - base) / span) as usize;
    let last = (end - base).div_ceil(span).min(F::entries(level) as u64) as usize;
    first..last
}
