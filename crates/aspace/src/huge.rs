//! Huge-page backing of anonymous regions (THP-like): a first touch maps a whole 2 MiB or
//! 1 GiB page where one fits; copy-on-write and dirty logging split only the huge page they
//! must; [`AddressSpace::collapse_huge`] restores huge pages.
//!
//! # Frames
//! A huge page is one allocation of 512 (or 262,144) frames, `allocate_frames(n, n)`, registered
//! in [`crate::FrameRefs`] as a run: each frame keeps its own count, and the run is freed whole,
//! once, when its last frame loses its last holder. A huge leaf holds one reference to each
//! frame it maps and is retired as one pending entry (its base, its frames).
//!
//! # Copy-on-write: copy the whole 2 MiB page, else split and copy 4 KiB
//! A write to a shared 2 MiB page copies the whole page into a free aligned run of 512 frames
//! and maps it in place, writable (one fault, one copy, and the copy is still a 2 MiB page),
//! when the region's [`HugePages`] policy allows 2 MiB pages and the allocator has a run.
//! Otherwise (policy [`HugePages::Never`], no free run, a 1 GiB page, or a write-protecting
//! dirty log over it, which needs 4 KiB granularity) it splits the page (down to 4 KiB around
//! the written page) and copies only the 4 KiB written, as Linux does for transparent huge
//! pages since 5.8; the other 511 pages stay shared until written. Measured (a child of a
//! fork of 4 MiB of 2 MiB pages, the `huge_cow` tests): writing every page costs 2 faults and
//! 2 copies instead of 1,024 of each, and keeps 2 MiB pages; writing one page per 2 MiB costs
//! 512 frames per page written instead of 1. Fewer exits for a guest that goes on using the
//! memory it forked, more memory for one that writes sparsely: choose per region with the
//! policy. When no frame of a huge page is shared any more (its last co-holder went, or copied
//! it), a write only restores the write right on the whole huge leaf.
//! [`AddressSpace::collapse_huge`] brings a split huge leaf back once its 4 KiB pages are
//! again one run, private, with the same rights.
//!
//! # Dirty logging
//! No huge page is mapped in a range a dirty log covers. A log that starts over huge pages
//! splits them (D bits) or write-protects them whole, and the first write into one splits it
//! (the write right is given back to 4 KiB only). [`AddressSpace::stop_dirty_log`] collapses
//! what it can again.

use crate::flush::SpaceFlush;
use crate::region::HugePages;
use crate::region::{Backend, Region, RegionId};
use crate::space::{AddressSpace, PAGE};
use alloc::vec::Vec;
use twostage_npt::{Flush, Format, FrameAllocator, GpaRange, GuestPhysAddr, MapSize, PageSize, SplitError};

impl<F: Format, A: FrameAllocator + Clone> AddressSpace<F, A> {
    /// Sets the huge-page policy of the anonymous regions added from now on (the default is
    /// [`HugePages::Size2M`]). Regions already there keep theirs
    /// (see [`AddressSpace::set_region_huge_pages`]).
    pub fn set_huge_pages(&mut self, policy: HugePages) {
        self.huge = policy;
    }

    /// The policy regions added from now on get.
    pub fn huge_pages(&self) -> HugePages {
        self.huge
    }

    /// Sets the huge-page policy of one region; returns the old one, or `None` if there is no
    /// such region. Pages already mapped stay as they are.
    pub fn set_region_huge_pages(&mut self, id: RegionId, policy: HugePages) -> Option<HugePages> {
        let key = self.key_of(id)?;
        let r = self.regions.edit().get_mut(&key)?;
        Some(core::mem::replace(&mut r.huge, policy))
    }

    /// The largest huge page that may back a first touch at `gpa` of anonymous region `r`:
    /// its aligned block lies wholly in `r`, the table and the policy allow the size, no dirty
    /// log covers the block and no leaf is mapped in it yet.
    fn huge_block(&mut self, r: &Region, gpa: GuestPhysAddr) -> Option<(GuestPhysAddr, PageSize)> {
        if !r.backend.owns_frames() {
            return None;
        }
        let mut found = None;
        // From 2 MiB up: a block holding a leaf rules out every block containing it.
        for size in [PageSize::Size2M, PageSize::Size1G] {
            if !r.huge.allows(size) || !self.opts.leaf_sizes.contains(size) {
                break;
            }
            let base = gpa.align_down(size.bytes());
            let block = GpaRange::from_start_len(base, size.bytes())?;
            if base < r.range.start || block.end > r.range.end {
                break;
            }
            if self.dirty_log_range().is_some_and(|l| l.overlaps(&block)) {
                break;
            }
            let key = (size.level(), base);
            if self.mixed.contains(&key) {
                break;
            }
            let mut any = false;
            self.table.for_each_leaf(base, size.bytes(), |_| any = true);
            if any {
                self.mixed.insert(key);
                break;
            }
            found = Some((base, size));
        }
        found
    }

    /// Maps a zeroed huge page over untouched `gpa` of anonymous region `r` if one fits and an
    /// aligned run of frames can be had; `None` (nothing changed) otherwise.
    pub(crate) fn map_huge_at(&mut self, r: &Region, gpa: GuestPhysAddr) -> Option<Flush<F>> {
        let (base, size) = self.huge_block(r, gpa)?;
        let n = size.bytes() / PAGE;
        let Some(hpa) = self.alloc.allocate_frames(n as usize, n as usize) else {
            self.stats.huge_fallbacks += 1;
            return None;
        };
        let dst = self.alloc.phys_to_virt(hpa).as_ptr();
        // SAFETY: `hpa` is a new allocation of `n` frames that only we reach, and the allocator
        // promises `phys_to_virt(base)` reaches all of them contiguously.
        unsafe { core::ptr::write_bytes(dst, 0, size.bytes() as usize) };
        self.refs.insert_run(hpa, n);
        let flags = self.flags_for(r, base, false);
        match self.table.edit().map(base, hpa, size.bytes(), flags, MapSize::Exactly(size)) {
            Ok(f) => {
                self.stats.frames_allocated += n;
                match size {
                    PageSize::Size2M => self.stats.huge_2m_mapped += 1,
                    _ => self.stats.huge_1g_mapped += 1,
                }
                Some(f)
            }
            Err(_) => {
                let alloc = &self.alloc;
                self.refs.release_range(hpa, n, |b, count| {
                    // SAFETY: the run registered just above, never mapped: its last frame was
                    // just released, so it is handed back whole, once.
                    unsafe { alloc.deallocate_frames(b, count as usize) }
                });
                None
            }
        }
    }

    /// Splits the huge leaf covering `page` (if any) down to a 4 KiB leaf at `page`.
    pub(crate) fn split_around(&mut self, page: GuestPhysAddr, flush: &mut SpaceFlush<F>) -> Result<(), SplitError> {
        while let Some(leaf) = self.table.query(page).filter(|l| l.size != PageSize::Size4K) {
            flush.add(self.table.edit().split(leaf.gpa)?);
            if self.region_at(page).is_some_and(|r| r.backend.owns_frames()) {
                self.stats.huge_splits += 1;
            }
        }
        Ok(())
    }

    /// Restores huge leaves in `range` where 512 leaves of the next size down are uniform again:
    /// the same rights, contiguous host frames from an aligned base and, in an anonymous region,
    /// one huge-page run (so that the new leaf's frames are counted and freed as one) whose policy
    /// allows the size. Blocks that a dirty log covers, or that cross a region's edge, are left
    /// alone. Returns how many huge leaves were made, and the flush (the old tables are retired
    /// until it is carried out). Nothing is allocated, so it cannot fail.
    pub fn collapse_huge(&mut self, range: GpaRange) -> (u64, SpaceFlush<F>) {
        let mut flush = SpaceFlush::none();
        let mut made = 0;
        for size in [PageSize::Size2M, PageSize::Size1G] {
            if !self.opts.leaf_sizes.contains(size) {
                continue;
            }
            let mut bases = Vec::new();
            let mut region: Option<Region> = None;
            let mut next = range.start.align_up(size.bytes());
            while let Some(block) = next.and_then(|b| GpaRange::from_start_len(b, size.bytes())) {
                if block.end > range.end {
                    break;
                }
                next = Some(block.end);
                if !region.as_ref().is_some_and(|r| r.range.contains(block.start)) {
                    region = self.region_at(block.start).cloned();
                }
                let Some(r) = &region else { continue };
                let fits = block.end <= r.range.end && r.backend != Backend::Mmio;
                let allowed = !r.backend.owns_frames() || r.huge.allows(size);
                if fits && allowed && !self.dirty_log_range().is_some_and(|l| l.overlaps(&block)) {
                    bases.push((block.start, r.backend.owns_frames()));
                }
            }
            for (base, anon) in bases {
                // Only a table of 512 uniform leaves of the size below collapses; an anonymous
                // block must also be one run.
                let Some(first) = self.table.query(base) else { continue };
                if first.size.bytes() >= size.bytes() {
                    continue;
                }
                if anon && !self.refs.in_one_run(first.hpa, size.bytes() / PAGE) {
                    continue;
                }
                if let Ok(f) = self.table.edit().collapse(base, size) {
                    flush.add(f);
                    made += 1;
                    self.mixed.remove(&(size.level(), base));
                }
            }
        }
        self.stats.huge_collapses += made;
        (made, flush)
    }
}
