//! Nested page fault resolution: one entry point from a fault to a typed outcome.

use crate::dirty::DirtyMode;
use crate::error::NoFrame;
use crate::flush::SpaceFlush;
use crate::region::{Backend, Region, RegionId};
use crate::space::{AddressSpace, PAGE};
use twostage_npt::{
    Access, Format, FrameAllocator, GuestPhysAddr, HostPhysAddr, Leaf, MappingFlags, NestedPageFaultInfo, PageSize,
};

/// What a nested page fault turned out to be.
#[must_use = "a resolved fault carries a flush that must be carried out before the guest resumes"]
pub enum FaultOutcome<F: Format> {
    /// The page now allows the access; carry out the flush, then resume the guest at the same
    /// instruction.
    Resolved {
        /// The invalidation (and frame release) the change needs.
        flush: SpaceFlush<F>,
    },
    /// The address is in an MMIO region: emulate the access with the device model.
    Mmio {
        /// The faulting address.
        gpa: GuestPhysAddr,
        /// What the guest tried.
        access: Access,
        /// The MMIO region.
        region: RegionId,
    },
    /// The region exists but forbids this access; the hypervisor decides (inject, kill, log).
    Violation {
        /// The faulting address.
        gpa: GuestPhysAddr,
        /// What the guest tried.
        access: Access,
        /// The region's rights.
        rights: MappingFlags,
        /// The region.
        region: RegionId,
    },
    /// No frame (for data or for a table) could be had.
    OutOfMemory {
        /// The faulting address.
        gpa: GuestPhysAddr,
    },
    /// No region covers the address.
    Unmapped {
        /// The faulting address.
        gpa: GuestPhysAddr,
        /// What the guest tried.
        access: Access,
    },
}

impl<F: Format> core::fmt::Debug for FaultOutcome<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Resolved { flush } => write!(f, "Resolved({flush:?})"),
            Self::Mmio { gpa, access, region } => write!(f, "Mmio({access} at {gpa:?}, region #{})", region.as_u32()),
            Self::Violation { gpa, access, rights, region } => {
                write!(f, "Violation({access} at {gpa:?}, region #{} allows {rights:?})", region.as_u32())
            }
            Self::OutOfMemory { gpa } => write!(f, "OutOfMemory({gpa:?})"),
            Self::Unmapped { gpa, access } => write!(f, "Unmapped({access} at {gpa:?})"),
        }
    }
}

impl<F: Format, A: FrameAllocator + Clone> AddressSpace<F, A> {
    /// Resolves a nested page fault (EPT violation, G-stage guest-page fault).
    ///
    /// Demand-zero pages are allocated and zeroed; a write to a copy-on-write page copies it (or,
    /// for its last holder, only restores the write right); a write to a page the dirty log
    /// write-protects is logged and the right restored; missing software A/D bits are set; a fault
    /// on a page that already allows the access (a stale translation: another vCPU resolved it
    /// and flushed first) is `Resolved` with nothing to do.
    pub fn handle_fault(&mut self, info: NestedPageFaultInfo) -> FaultOutcome<F> {
        self.resolve(info.fault_guest_paddr, info.access())
    }

    /// [`AddressSpace::handle_fault`] for one access.
    pub fn resolve(&mut self, gpa: GuestPhysAddr, access: Access) -> FaultOutcome<F> {
        let Some(r) = self.region_at(gpa).cloned() else {
            return FaultOutcome::Unmapped { gpa, access };
        };
        if !r.flags.allows(access) {
            return FaultOutcome::Violation { gpa, access, rights: r.flags.rights(), region: r.id };
        }
        let page = gpa.align_down(PAGE);
        let out = match r.backend {
            Backend::Mmio => return FaultOutcome::Mmio { gpa, access, region: r.id },
            Backend::Linear { .. } => self.resolve_linear(&r, page, access),
            Backend::DemandZero | Backend::CopyOnWrite => self.resolve_anon(&r, page, access),
        };
        match out {
            Ok(flush) => {
                if access == Access::Write {
                    if let Some(log) = &mut self.dirty {
                        log.mark(page);
                    }
                }
                self.stats.faults_resolved += 1;
                FaultOutcome::Resolved { flush }
            }
            Err(NoFrame) => FaultOutcome::OutOfMemory { gpa },
        }
    }

    fn resolve_linear(&mut self, r: &Region, page: GuestPhysAddr, access: Access) -> Result<SpaceFlush<F>, NoFrame> {
        let Some(leaf) = self.table.query(page) else {
            // A linear page is always mapped; if it is not (a failed split left a hole), map it back.
            let hpa = r.linear_hpa(page).ok_or(NoFrame)?;
            let flags = self.effective_flags(r, hpa, page);
            let f = self.table.edit().map(page, hpa, PAGE, flags, twostage_npt::MapSize::Exactly(PageSize::Size4K))?;
            return Ok(SpaceFlush::from_table(f));
        };
        if leaf.flags.allows(access) {
            return self.touch(&leaf, page, access);
        }
        // The region allows it, the leaf does not: the dirty log write-protected it (or rights
        // were raised). Give this 4 KiB page the region's rights (a huge leaf is split).
        let mut want = r.flags;
        if access == Access::Write {
            if let Some(log) = &mut self.dirty {
                log.mark(page);
            }
        } else {
            want = self.effective_flags(r, leaf.hpa, page);
        }
        let f = self.table.edit().protect(page, PAGE, want)?;
        Ok(SpaceFlush::from_table(f))
    }

    fn resolve_anon(&mut self, r: &Region, page: GuestPhysAddr, access: Access) -> Result<SpaceFlush<F>, NoFrame> {
        let Some(leaf) = self.table.query(page) else {
            if access == Access::Write {
                if let Some(log) = &mut self.dirty {
                    log.mark(page);
                }
            }
            return self.map_anon_page(r, page).map(SpaceFlush::from_table);
        };
        if leaf.flags.allows(access) {
            return self.touch(&leaf, page, access);
        }
        if access != Access::Write {
            let want = self.effective_flags(r, leaf.hpa, page);
            let f = self.table.edit().protect(page, PAGE, want)?;
            return Ok(SpaceFlush::from_table(f));
        }
        if let Some(log) = &mut self.dirty {
            log.mark(page);
        }
        if leaf.size != PageSize::Size4K {
            return self.write_huge(r, page, &leaf);
        }
        self.write_4k(r, page, leaf.hpa)
    }

    /// A write fault on a read-only huge leaf of an anonymous region: if no frame of it is shared
    /// and no write-protecting dirty log covers it, the whole leaf gets the write right back;
    /// if it is a shared 2 MiB leaf, the region's policy allows 2 MiB pages and a free aligned
    /// run can be had, the whole page is copied into it ([`AddressSpace::copy_huge_leaf`]);
    /// otherwise it is split down to 4 KiB around `page` and only that page is copied (or made
    /// writable).
    fn write_huge(&mut self, r: &Region, page: GuestPhysAddr, leaf: &Leaf) -> Result<SpaceFlush<F>, NoFrame> {
        let protecting = self.protects(leaf);
        if !protecting && self.refs.max_count(leaf.hpa, leaf.size.bytes() / PAGE) <= 1 {
            if r.backend == Backend::CopyOnWrite {
                self.stats.cow_reuses += 1;
            }
            let want = self.flags_for(r, leaf.gpa, false);
            let f = self.table.edit().protect(leaf.gpa, leaf.size.bytes(), want)?;
            return Ok(SpaceFlush::from_table(f));
        }
        if !protecting {
            if let Some(f) = self.copy_huge_leaf(r, leaf) {
                return Ok(f);
            }
        }
        let mut flush = SpaceFlush::none();
        if self.split_around(page, &mut flush).is_err() {
            self.defer(flush);
            return Err(NoFrame);
        }
        let Some(small) = self.table.query(page) else {
            self.defer(flush);
            return Err(NoFrame);
        };
        match self.write_4k(r, page, small.hpa) {
            Ok(f) => Ok(flush.merge(f)),
            Err(e) => {
                self.defer(flush);
                Err(e)
            }
        }
    }

    /// A write fault on read-only 4 KiB page `page` (frame `hpa`) of an anonymous region: a
    /// private copy if the frame is shared, else the write right back.
    fn write_4k(&mut self, r: &Region, page: GuestPhysAddr, hpa: HostPhysAddr) -> Result<SpaceFlush<F>, NoFrame> {
        let holders = self.refs.frame_count(hpa);
        if holders > 1 {
            self.break_cow(r, page, hpa)
        } else {
            if r.backend == Backend::CopyOnWrite && holders == 1 {
                self.stats.cow_reuses += 1;
            }
            let want = self.flags_for(r, page, false);
            let f = self.table.edit().protect(page, PAGE, want)?;
            Ok(SpaceFlush::from_table(f))
        }
    }

    /// Gives page `page` a private copy of its shared frame, for a write about to happen. A
    /// huge leaf covering `page` is split down to 4 KiB first; if the page's own frame turns
    /// out not to be shared (`old` was a huge leaf's base, which speaks for the whole leaf), the
    /// page only gets the write right back.
    pub(crate) fn break_cow(
        &mut self,
        r: &Region,
        page: GuestPhysAddr,
        old: HostPhysAddr,
    ) -> Result<SpaceFlush<F>, NoFrame> {
        let mut flush = SpaceFlush::none();
        let old = match self.table.query(page) {
            Some(l) if l.size != PageSize::Size4K => {
                if !self.protects(&l) && self.refs.max_count(l.hpa, l.size.bytes() / PAGE) > 1 {
                    if let Some(f) = self.copy_huge_leaf(r, &l) {
                        if let Some(log) = &mut self.dirty {
                            log.mark(page);
                        }
                        return Ok(f);
                    }
                }
                if self.split_around(page, &mut flush).is_err() {
                    self.defer(flush);
                    return Err(NoFrame);
                }
                l.translate(page)
            }
            Some(l) => l.hpa,
            None => old,
        };
        if self.refs.frame_count(old) <= 1 {
            // The last holder: the write right back (the write that follows is logged now, so
            // that a write-protecting log lets it through).
            if let Some(log) = &mut self.dirty {
                log.mark(page);
            }
            let want = self.flags_for(r, page, false);
            return match self.table.edit().protect(page, PAGE, want) {
                Ok(f) => {
                    self.stats.cow_reuses += 1;
                    flush.add(f);
                    Ok(flush)
                }
                Err(_) => {
                    self.defer(flush);
                    Err(NoFrame)
                }
            };
        }
        let Some(new) = self.alloc.allocate_frame() else {
            self.defer(flush);
            return Err(NoFrame);
        };
        self.fill_frame(new, Some(old));
        self.refs.insert_new(new);
        let flags = self.flags_for(r, page, false);
        // In place (same size, A/D kept, nothing allocated): it cannot fail half way.
        match self.table.edit().remap(page, new, flags) {
            Ok(f) => {
                self.stats.frames_allocated += 1;
                self.stats.cow_copies += 1;
                self.retire(page, old);
                flush.add(f);
                Ok(flush)
            }
            Err(_) => {
                self.refs.release_range(new, 1, |_, _| {});
                // SAFETY: `new` came from `allocate_frame` above and was never mapped.
                unsafe { self.alloc.deallocate_frames(new, 1) };
                self.defer(flush);
                Err(NoFrame)
            }
        }
    }

    /// Whether a write-protecting dirty log covers any of `leaf` (its pages must then be
    /// tracked, and made writable, one by one).
    fn protects(&self, leaf: &Leaf) -> bool {
        self.dirty.as_ref().is_some_and(|l| l.mode == DirtyMode::WriteProtect && l.range().overlaps(&leaf.range()))
    }

    /// Copy-on-write of a whole shared 2 MiB leaf: if the region's [`crate::HugePages`] policy
    /// allows 2 MiB pages and the allocator has a free aligned run of 512 frames, copies the
    /// page into it and points the leaf at it, writable (one fault and one copy instead of up
    /// to 512 of each); the old frames lose this holder once the flush has run. `None`
    /// (nothing changed) otherwise: the caller splits and copies 4 KiB (see the `huge` module).
    fn copy_huge_leaf(&mut self, r: &Region, leaf: &Leaf) -> Option<SpaceFlush<F>> {
        if leaf.size != PageSize::Size2M || !r.huge.allows(PageSize::Size2M) || !r.backend.owns_frames() {
            return None;
        }
        let n = leaf.size.bytes() / PAGE;
        let Some(new) = self.alloc.allocate_frames(n as usize, n as usize) else {
            self.stats.huge_fallbacks += 1;
            return None;
        };
        for i in 0..n {
            self.fill_frame(new + i * PAGE, Some(leaf.hpa + i * PAGE));
        }
        self.refs.insert_run(new, n);
        let flags = self.flags_for(r, leaf.gpa, false);
        // In place (same size, A/D kept, nothing allocated).
        match self.table.edit().remap(leaf.gpa, new, flags) {
            Ok(f) => {
                self.stats.frames_allocated += n;
                self.stats.cow_copies += 1;
                self.stats.huge_cow_copies += 1;
                self.pending.release.push((leaf.gpa, leaf.hpa, n));
                Some(SpaceFlush::from_table(f))
            }
            Err(_) => {
                let alloc = &self.alloc;
                self.refs.release_range(new, n, |b, count| {
                    // SAFETY: the run registered just above, never mapped: its last frame was
                    // just released, so it is handed back whole, once.
                    unsafe { alloc.deallocate_frames(b, count as usize) }
                });
                None
            }
        }
    }

    /// The leaf already allows the access: set software A/D bits if they are missing (RISC-V
    /// Svade faults on A=0, or D=0 for a store). Otherwise the guest used a stale cached entry:
    /// on EPT the violation itself removed it (Intel SDM Vol. 3C 29.4.3.1); on RISC-V a
    /// guest-page fault invalidates nothing, so the outcome carries the fence the hart needs
    /// ([`twostage_npt::PageTable::stale_fault_flush`]), or the guest would fault forever.
    fn touch(
        &mut self,
        leaf: &twostage_npt::Leaf,
        page: GuestPhysAddr,
        access: Access,
    ) -> Result<SpaceFlush<F>, NoFrame> {
        let needs = !leaf.accessed || (access == Access::Write && !leaf.dirty);
        if !needs {
            return Ok(SpaceFlush::from_table(self.table.stale_fault_flush(page)));
        }
        match self.table.edit().set_accessed_dirty(page, access) {
            Ok(f) => Ok(SpaceFlush::from_table(f)),
            // Not tracked (`AdMode::Preset`: the engine keeps A set, and D set on every
            // writable leaf, so this leaf already allows the access) or gone: only the stale
            // entry, if any, needs removing.
            Err(_) => Ok(SpaceFlush::from_table(self.table.stale_fault_flush(page))),
        }
    }
}
