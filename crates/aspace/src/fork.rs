//! Copy-on-write fork of a whole address space, and copy-on-write sharing of one region.

use crate::error::{Failed, ForkError, ShareError};
use crate::flush::SpaceFlush;
use crate::region::{Backend, Region};
use crate::space::{AddressSpace, PAGE};
use alloc::vec::Vec;
use twostage_npt::{Format, FrameAllocator, GpaRange, MapSize, MappingFlags, PageSize};

impl<F: Format, A: FrameAllocator + Clone> AddressSpace<F, A> {
    /// A copy-on-write clone of the whole address space (VM fork, snapshot).
    ///
    /// The child gets the same regions (same ids). Linear regions map the same host memory in
    /// both (they are the caller's memory, not copied); MMIO regions are copied as
    /// descriptions. Every frame of an anonymous region becomes shared: mapped read-only in
    /// both spaces, its count raised; the first write on either side copies it. No byte of
    /// guest memory is copied here: the cost is one mapping per populated page plus the
    /// parent's write-protection.
    ///
    /// The child's table was never loaded, so it needs no flush; the returned flush is the
    /// parent's (its pages lost the write right) and must be carried out before the parent's
    /// guest writes again. The child has no dirty log. On failure the parent is unchanged
    /// except for pages already write-protected (covered by the flush in the error; they regain
    /// the right on their next write fault) and the partial child is freed.
    pub fn fork(&mut self) -> Result<(Self, SpaceFlush<F>), Failed<ForkError, F>> {
        let fail = |error| Failed { error, flush: SpaceFlush::none() };
        let mut child = Self::with_refs(self.alloc.clone(), self.opts, self.refs.clone())
            .map_err(|crate::error::NewSpaceError::OutOfFrames(e)| fail(ForkError::OutOfFrames(e)))?;
        child.next_id = self.next_id;
        for r in self.regions.values() {
            match r.backend {
                Backend::Mmio => {}
                Backend::Linear { host } => {
                    child
                        .table
                        .map(r.range.start, host, r.range.len(), r.flags, MapSize::Largest)
                        .map_err(|e| fail(ForkError::Map(e)))?
                        .ignore(); // The child's table is not loaded anywhere yet.
                }
                Backend::DemandZero | Backend::CopyOnWrite => {
                    child.share_pages(self, r).map_err(|e| fail(ForkError::Map(e)))?;
                }
            }
            let mut cr = r.clone();
            if cr.backend.owns_frames() {
                cr.backend = Backend::CopyOnWrite;
            }
            child.regions.insert(r.range.start, cr);
        }
        // Every shared frame now has a count above 1: drop the parent's write rights.
        let mut flush = SpaceFlush::none();
        let mut anon: Vec<GpaRange> = Vec::new();
        for r in self.regions.values_mut().filter(|r| r.backend.owns_frames()) {
            r.backend = Backend::CopyOnWrite;
            anon.push(r.range);
        }
        for range in anon {
            match self.reprotect(range) {
                Ok(f) => flush = flush.merge(f),
                Err(e) => {
                    return Err(Failed { error: ForkError::Protect(e.error), flush: flush.merge(e.flush) });
                }
            }
        }
        Ok((child, flush))
    }

    /// Maps into `self` (a table no CPU has loaded) every frame `src` has in region `r`,
    /// read-only and shared (the count is raised per page as it is mapped, so a failure leaves
    /// `self` consistent: its drop releases exactly what it mapped).
    fn share_pages(&mut self, src: &Self, r: &Region) -> Result<(), twostage_npt::MapError> {
        let mut leaves = Vec::new();
        src.table.for_each_leaf(r.range.start, r.range.len(), |leaf| leaves.push(*leaf));
        let ro = r.flags.difference(MappingFlags::WRITE);
        for leaf in leaves {
            self.table.map(leaf.gpa, leaf.hpa, PAGE, ro, MapSize::Exactly(PageSize::Size4K))?.ignore();
            self.refs.share(leaf.hpa);
        }
        for (&gpa, &hpa) in src.parked.range(r.range.start..r.range.end) {
            self.table.map(gpa, hpa, PAGE, ro, MapSize::Exactly(PageSize::Size4K))?.ignore();
            self.refs.share(hpa);
        }
        Ok(())
    }

    /// Adds to `self` a [`Backend::CopyOnWrite`] region at `dst` made of the frames of anonymous
    /// region `src_region` of `src`: both spaces then share those frames copy-on-write (a VM
    /// cloned from a template, a shared read-mostly image). Pages the source had not touched are
    /// demand-zero on both sides. Both spaces must count frames in the same [`crate::FrameRefs`]
    /// (make the second with [`AddressSpace::with_refs`]).
    ///
    /// Returns the new region and two flushes: `self`'s (new mappings) and `src`'s (its pages
    /// lost the write right); carry out both before either guest runs again. On failure `self`
    /// gets no region (the error's flush covers the partial mapping) and `src` is unchanged.
    #[allow(clippy::type_complexity)]
    pub fn share_from(
        &mut self,
        name: &'static str,
        dst: twostage_npt::GuestPhysAddr,
        src: &mut Self,
        src_region: crate::RegionId,
    ) -> Result<(crate::RegionId, SpaceFlush<F>, SpaceFlush<F>), Failed<ShareError, F>> {
        let fail = |error| Failed { error, flush: SpaceFlush::none() };
        if !self.refs.same_table(&src.refs) {
            return Err(fail(ShareError::DifferentFrameRefs));
        }
        let r = src.region(src_region).cloned().ok_or(fail(ShareError::NoSuchRegion(src_region)))?;
        if !r.backend.owns_frames() {
            return Err(fail(ShareError::NotAnonymous(src_region)));
        }
        let range = GpaRange::from_start_len(dst, r.range.len()).ok_or(fail(ShareError::Add(
            crate::AddRegionError::OutOfRange { range: r.range, gpa_bits: F::GPA_BITS },
        )))?;
        let (id, mut flush) =
            self.add_region(name, range, r.flags, Backend::CopyOnWrite).map_err(|e| fail(ShareError::Add(e)))?;
        let mut leaves = Vec::new();
        src.table.for_each_leaf(r.range.start, r.range.len(), |leaf| leaves.push((leaf.gpa, leaf.hpa)));
        leaves.extend(src.parked.range(r.range.start..r.range.end).map(|(g, h)| (*g, *h)));
        let ro = r.flags.difference(MappingFlags::WRITE);
        for (gpa, hpa) in leaves {
            let at = dst + (gpa - r.range.start);
            match self.table.map(at, hpa, PAGE, ro, MapSize::Exactly(PageSize::Size4K)) {
                Ok(f) => {
                    flush.add(f);
                    self.refs.share(hpa);
                }
                Err(e) => {
                    // Take the region out again: its flush releases the references taken so far.
                    if let Ok(f) = self.remove_region(id) {
                        flush = flush.merge(f);
                    }
                    return Err(Failed { error: ShareError::Map(e), flush });
                }
            }
        }
        if let Some(reg) = src.regions.get_mut(&r.range.start) {
            reg.backend = Backend::CopyOnWrite;
        }
        // Now that the counts are above 1, the source's pages lose the write right. Protecting
        // whole 4 KiB leaves allocates nothing; should it fail anyway, undo the sharing.
        match src.reprotect(r.range) {
            Ok(src_flush) => Ok((id, flush, src_flush)),
            Err(e) => {
                if let Some(t) = e.flush.table {
                    src.defer(t);
                }
                if let Ok(f) = self.remove_region(id) {
                    flush = flush.merge(f);
                }
                Err(Failed { error: ShareError::Protect(e.error), flush })
            }
        }
    }
}
