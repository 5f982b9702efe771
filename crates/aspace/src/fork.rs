//! Copy-on-write fork of a whole address space, and copy-on-write sharing of one region.

use crate::error::{Failed, ForkError};
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
}
