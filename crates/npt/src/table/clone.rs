//! Copying a table (the first half of a copy-on-write fork) as a visitor of the range walker.

use super::walker::{At, Next, Visitor};
use super::{check_range, leaf_at, stored_flags, CloneError, Leaf, OutOfFrames, PageTable};
use crate::addr::{GpaRange, HostPhysAddr, PageSize};
use crate::flags::MappingFlags;
use crate::flush::Flush;
use crate::format::{Format, LeafBits, Pte};
use crate::frame::FrameAllocator;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

/// The visitor of a copy: walks the source and builds the same tree in `dst`.
struct Copy<'c, F: Format, A: FrameAllocator, G> {
    dst: &'c PageTable<F, A>,
    /// The copy's table that matches the source table being walked.
    cur: HostPhysAddr,
    /// The copy's tables that match the source tables above it, by level.
    up: [HostPhysAddr; 6],
    ranges: &'c [(GpaRange, MappingFlags)],
    hint: usize,
    flush: &'c mut Flush<F>,
    f: G,
    /// Frames for the copy's tables, allocated before anything was copied.
    pool: &'c mut Vec<HostPhysAddr>,
}

impl<F: Format, A: FrameAllocator, G: FnMut(&Leaf)> Visitor<F, A> for Copy<'_, F, A, G> {
    #[inline(always)]
    fn leaf(&mut self, src: &PageTable<F, A>, at: &At<'_>, raw: u64) -> Next {
        let new = match (self.range_flags(at.base), F::decode(raw, at.level)) {
            (Some(flags), Pte::Leaf(leaf)) => {
                let bits = src.preset_ad(LeafBits { flags, ..leaf });
                let new = F::encode_leaf(&bits, at.level);
                if new != raw {
                    src.store_leaf(at.table, at.idx, raw, new);
                    self.flush.note_leaf(at.gpa(), true);
                }
                (self.f)(&leaf_at(at.gpa(), at.level, &bits));
                new
            }
            _ => raw,
        };
        self.dst.entry(self.cur, at.idx).store(new, Ordering::Relaxed);
        Next::Skip
    }

    #[inline(always)]
    fn table(&mut self, _: &PageTable<F, A>, at: &At<'_>, child: HostPhysAddr) -> Next {
        self.up[at.level] = self.cur;
        self.cur = self.dst.new_table(self.pool);
        Next::Descend(child)
    }

    #[inline(always)]
    fn leave(&mut self, _: &PageTable<F, A>, at: &At<'_>, _: HostPhysAddr) {
        let copy = self.cur;
        self.cur = self.up[at.level];
        // The copy is not loaded anywhere yet: no ordering needed.
        self.dst.entry(self.cur, at.idx).store(F::encode_table(copy), Ordering::Relaxed);
    }
}

impl<F: Format, A: FrameAllocator, G> Copy<'_, F, A, G> {
    /// The flags of the range holding `gpa`, if any (the last match is tried first: leaves come
    /// in address order).
    fn range_flags(&mut self, gpa: u64) -> Option<MappingFlags> {
        let inside = |r: &GpaRange| r.start.as_u64() <= gpa && gpa < r.end.as_u64();
        if let Some((r, fl)) = self.ranges.get(self.hint) {
            if inside(r) {
                return Some(*fl);
            }
        }
        let i = self.ranges.iter().position(|(r, _)| inside(r))?;
        self.hint = i;
        Some(self.ranges[i].1)
    }
}

impl<F: Format, A: FrameAllocator> PageTable<F, A> {
    /// A copy of the table with every entry as it is now (leaves, rights and A/D bits), in new
    /// table frames from the same allocator: the first half of a copy-on-write fork, costing
    /// time in proportion to the tables, not to the memory they map. Nothing is allocated if
    /// any frame is missing.
    pub fn try_clone(&self) -> Result<Self, OutOfFrames>
    where
        A: Clone,
    {
        let mut flush = Flush::new(self.root);
        let copy = self.clone_with(&[], |_| {}, &mut flush)?;
        debug_assert!(flush.is_empty(), "a plain copy changes nothing in the original");
        Ok(copy)
    }

    /// Copies the table; leaves inside one of `ranges` get that range's flags in the copy and in
    /// `self` (changes noted in `flush`) and are reported to `f`. Allocates everything first.
    fn clone_with(
        &self,
        ranges: &[(GpaRange, MappingFlags)],
        f: impl FnMut(&Leaf),
        flush: &mut Flush<F>,
    ) -> Result<Self, OutOfFrames>
    where
        A: Clone,
    {
        let live = self.frames - self.retired.len() - F::ROOT_FRAMES;
        let mut child = Self::new(self.alloc.clone(), self.opts)?;
        let mut pool = child.fill_pool(live).map_err(|e| OutOfFrames { needed: e.needed + F::ROOT_FRAMES })?;
        let top = [child.root; 6];
        let mut copy = Copy { dst: &child, cur: child.root, up: top, ranges, hint: 0, flush, f, pool: &mut pool };
        self.walk(0, 1 << F::GPA_BITS, &mut copy);
        debug_assert!(pool.is_empty(), "live table count is off");
        Ok(child)
    }

    /// [`PageTable::try_clone`] and a protect in one pass, the whole of a copy-on-write fork of
    /// the tables: every leaf inside one of `ranges` gets that range's flags (A/D kept) in both
    /// the copy and `self`, and is reported to `f` (with its new flags) once. Leaves outside the
    /// ranges are copied as they are. Returns the copy (never loaded: it needs no flush) and the
    /// flush `self` needs. Nothing changes in `self` if the request is refused or a frame is
    /// missing; ranges must not cut through a huge page (split it first).
    pub fn try_clone_protected(
        &mut self,
        ranges: &[(GpaRange, MappingFlags)],
        f: impl FnMut(&Leaf),
    ) -> Result<(Self, Flush<F>), CloneError>
    where
        A: Clone,
    {
        let mut stored = Vec::with_capacity(ranges.len());
        for &(r, flags) in ranges {
            check_range::<F>(r.start, r.len(), PageSize::Size4K.bytes()).map_err(|problem| CloneError::BadRange {
                gpa: r.start,
                len: r.len(),
                problem,
            })?;
            F::check_flags(flags, &self.opts).map_err(|reason| CloneError::BadFlags { flags, reason })?;
            for edge in [r.start, r.end - PageSize::Size4K.bytes()] {
                if let Some(l) = self.query(edge) {
                    if l.gpa < r.start || l.range().end > r.end {
                        return Err(CloneError::CutsHugePage { gpa: l.gpa, size: l.size });
                    }
                }
            }
            stored.push((r, stored_flags::<F>(flags)));
        }
        let mut flush = Flush::new(self.root);
        let child = self.clone_with(&stored, f, &mut flush).map_err(CloneError::OutOfFrames)?;
        Ok((child, flush))
    }
}
