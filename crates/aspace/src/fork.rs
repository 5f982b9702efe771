//! Copy-on-write fork of a whole address space, and copy-on-write sharing of one region.
#![forbid(unsafe_code)]

use crate::error::{ForkError, ShareError};
use crate::flush::Pending;
use crate::flush::SpaceFlush;
use crate::region::Backend;
use crate::space::{AddressSpace, SpaceStats, PAGE};
use crate::tlb::{Tlb, Tracked};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use twostage_npt::{Format, FrameAllocator, GpaRange, HostPhysAddr, MapSize, MappingFlags, PageSize};

impl<F: Format, A: FrameAllocator + Clone> AddressSpace<F, A> {
    /// A copy-on-write clone of the whole address space (VM fork, snapshot).
    ///
    /// The child gets the same regions (same ids). Linear regions map the same host memory in
    /// both (they are the caller's memory, not copied); MMIO regions are copied as
    /// descriptions. Every frame of an anonymous region becomes shared: mapped read-only in
    /// both spaces, its count raised; the first write on either side copies it. No byte of
    /// guest memory is copied here: one pass over the parent's tables
    /// ([`twostage_npt::PageTable::try_clone_protected`]) copies them table by table and
    /// write-protects the anonymous regions' pages on both sides; the frames' counts are then
    /// raised.
    ///
    /// The child's table was never loaded, so it needs no flush; the returned flush is the
    /// parent's (its pages lost the write right) and must be carried out before the parent's
    /// guest writes again. The child has no dirty log. On failure the parent is unchanged
    /// except for pages already write-protected (they regain the right on their next write
    /// fault; their invalidation is left pending, see [`AddressSpace::flush_pending`]) and the
    /// partial child is freed.
    pub fn fork(&mut self) -> Result<(Self, SpaceFlush<F>), ForkError> {
        let anon: Vec<(GpaRange, MappingFlags)> = self
            .regions
            .values()
            .filter(|r| r.backend.owns_frames())
            .map(|r| (r.range, r.flags.difference(MappingFlags::WRITE)))
            .collect();
        // One pass over the tables: the child's table is a copy of the parent's (time in
        // proportion to the tables), and every page of an anonymous region becomes read-only on
        // both sides as it is copied; the frames met are collected in runs for their counts.
        // Nothing has changed if this fails.
        let mut runs: Vec<(HostPhysAddr, u64)> = Vec::new();
        let (table, parent_flush) = self.table.edit().try_clone_protected(&anon, |leaf| {
            // A huge leaf holds one reference to each frame it maps.
            let frames = leaf.size.bytes() / PAGE;
            match runs.last_mut() {
                Some((h, n)) if h.checked_add(*n * PAGE) == Some(leaf.hpa) => *n += frames,
                _ => runs.push((leaf.hpa, frames)),
            }
        })?;
        for (first, n) in runs {
            self.refs.share_run(first, n);
        }
        let mut flush = SpaceFlush::none();
        flush.add(parent_flush);
        let mut child = Self {
            table: Tracked::new(table),
            alloc: self.alloc.clone(),
            opts: self.opts,
            regions: Tracked::new(BTreeMap::new()),
            next_id: self.next_id,
            refs: self.refs.clone(),
            dirty: None,
            stats: SpaceStats::default(),
            pending: Pending::new(),
            huge: self.huge,
            mixed: self.mixed.clone(),
            tlb: Tlb::new(),
            zeroed: crate::zeroed::ZeroPool::new(self.alloc.clone()),
        };
        for r in self.regions.edit().values_mut() {
            if r.backend.owns_frames() {
                r.backend = Backend::CopyOnWrite;
            }
            child.regions.edit().insert(r.range.start, r.clone());
        }
        // The copy carries the parent's dirty-log write protection of linear pages; the child
        // has no log, so its linear pages get their regions' rights back.
        if self.dirty.is_some() {
            let linear: Vec<GpaRange> = child
                .regions
                .values()
                .filter(|r| matches!(r.backend, Backend::Linear { .. }))
                .map(|r| r.range)
                .collect();
            for range in linear {
                match child.reprotect(range) {
                    Ok(f) => child.flush_unloaded(f).expect("the child's own token"), // Never loaded.
                    // The child (and the counts it holds) is dropped; the parent keeps its
                    // write-protected pages, which the flush covers and which regain the right
                    // on their next write fault.
                    Err(e) => {
                        self.defer(flush);
                        return Err(ForkError::Protect(e));
                    }
                }
            }
        }
        Ok((child, flush))
    }

    /// Adds to `self` a [`Backend::CopyOnWrite`] region at `dst` made of the frames of anonymous
    /// region `src_region` of `src`: both spaces then share those frames copy-on-write (a VM
    /// cloned from a template, a shared read-mostly image). Pages the source had not touched are
    /// demand-zero on both sides. Both spaces must count frames in the same [`crate::FrameRefs`]
    /// (make the second with [`AddressSpace::with_refs`]).
    ///
    /// Returns the new region and two flushes: `self`'s (new mappings) and `src`'s (its pages
    /// lost the write right); carry out both before either guest runs again. On failure `self`
    /// gets no region (the partial mapping's invalidation is left pending in `self`, see
    /// [`AddressSpace::flush_pending`]) and `src` keeps its rights.
    #[allow(clippy::type_complexity)]
    pub fn share_from(
        &mut self,
        name: &'static str,
        dst: twostage_npt::GuestPhysAddr,
        src: &mut Self,
        src_region: crate::RegionId,
    ) -> Result<(crate::RegionId, SpaceFlush<F>, SpaceFlush<F>), ShareError> {
        if !self.refs.same_table(&src.refs) {
            return Err(ShareError::DifferentFrameRefs);
        }
        let r = src.region(src_region).cloned().ok_or(ShareError::NoSuchRegion(src_region))?;
        if !r.backend.owns_frames() {
            return Err(ShareError::NotAnonymous(src_region));
        }
        let range = GpaRange::from_start_len(dst, r.range.len())
            .ok_or(ShareError::Add(crate::AddRegionError::OutOfRange { range: r.range, gpa_bits: F::GPA_BITS }))?;
        let (id, mut flush) = self.add_region(name, range, r.flags, Backend::CopyOnWrite)?;
        let mut leaves = Vec::new();
        src.table.for_each_leaf(r.range.start, r.range.len(), |leaf| leaves.push((leaf.gpa, leaf.hpa, leaf.size)));
        let ro = r.flags.difference(MappingFlags::WRITE);
        for (gpa, hpa, size) in leaves {
            let at = dst + (gpa - r.range.start);
            // A huge leaf is shared as 4 KiB pages (`dst` need not be aligned like the source);
            // each page holds one reference to its frame.
            match self.table.edit().map(at, hpa, size.bytes(), ro, MapSize::Exactly(PageSize::Size4K)) {
                Ok(f) => {
                    flush.add(f);
                    self.refs.share_run(hpa, size.bytes() / PAGE);
                }
                Err(e) => {
                    // Take the region out again: its flush releases the references taken so far.
                    if let Ok(f) = self.remove_region(id) {
                        flush = flush.merge(f);
                    }
                    self.defer(flush);
                    return Err(ShareError::Map(e));
                }
            }
        }
        if let Some(reg) = src.regions.edit().get_mut(&r.range.start) {
            reg.backend = Backend::CopyOnWrite;
        }
        // Now that the counts are above 1, the source's pages lose the write right. Protecting
        // whole 4 KiB leaves allocates nothing; should it fail anyway, undo the sharing.
        match src.reprotect(r.range) {
            Ok(src_flush) => Ok((id, flush, src_flush)),
            // `reprotect` left `src`'s partial change pending in `src`.
            Err(e) => {
                if let Ok(f) = self.remove_region(id) {
                    flush = flush.merge(f);
                }
                self.defer(flush);
                Err(ShareError::Protect(e))
            }
        }
    }
}
