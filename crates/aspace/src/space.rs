//! The address space: regions over one nested table, and the frames it owns.

use crate::dirty::DirtyLog;
use crate::error::NoFrame;
use crate::error::*;
use crate::flush::{ForeignSpaceFlush, Pending, SpaceFlush};
use crate::frames::FrameRefs;
use crate::region::{Backend, HugePages, Region, RegionId, RegionLabel};
use crate::tlb::{Tlb, Tracked};
use crate::zeroed::ZeroPool;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use twostage_npt::{
    Format, FrameAllocator, GpaRange, GuestPhysAddr, HostPhysAddr, InvalidationOf, MapSize, MappingFlags, PageSize,
    PageTable, RangeError, TableOptions, FRAME_SIZE,
};

/// Bytes in the pages that anonymous regions are backed with.
pub(crate) const PAGE: u64 = FRAME_SIZE as u64;

/// Counters of what an address space has done (for dumps and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// Frames allocated for anonymous pages (first touch, populate, copy-on-write copies).
    pub frames_allocated: u64,
    /// Copy-on-write faults that copied a frame.
    pub cow_copies: u64,
    /// Copy-on-write faults where this space was the last holder and only regained the write right.
    pub cow_reuses: u64,
    /// Faults resolved in total.
    pub faults_resolved: u64,
    /// 2 MiB pages mapped by a first touch or populate (huge-page backing).
    pub huge_2m_mapped: u64,
    /// 1 GiB pages mapped by a first touch or populate.
    pub huge_1g_mapped: u64,
    /// Times a 2 MiB (or 1 GiB) page fitted but no aligned run of frames could be had: first
    /// touches (4 KiB was mapped instead), copy-on-write breaks of a 2 MiB page (split and 4 KiB
    /// copied instead) and migration copies of a whole 2 MiB block (4 KiB pages instead).
    pub huge_fallbacks: u64,
    /// Huge leaves of anonymous regions split by a copy-on-write break or a write under a
    /// write-protecting dirty log.
    pub huge_splits: u64,
    /// Copy-on-write breaks that copied a whole 2 MiB page into a new run (also counted in
    /// `cow_copies`).
    pub huge_cow_copies: u64,
    /// Huge leaves restored by [`AddressSpace::collapse_huge`].
    pub huge_collapses: u64,
}

/// A guest's physical address space: non-overlapping [`Region`]s over one nested
/// [`PageTable`], the data frames of its anonymous regions, and an optional dirty log.
///
/// `A` is cloned to give a fork its own table; all clones must reach the same host memory.
pub struct AddressSpace<F: Format, A: FrameAllocator + Clone> {
    /// The nested table; every change to it is counted (see [`crate::tlb`]).
    pub(crate) table: Tracked<PageTable<F, A>>,
    pub(crate) alloc: A,
    pub(crate) opts: TableOptions,
    /// The regions by start; every change to them is counted (see [`crate::tlb`]).
    pub(crate) regions: Tracked<BTreeMap<GuestPhysAddr, Region>>,
    pub(crate) next_id: u32,
    pub(crate) refs: FrameRefs,
    pub(crate) dirty: Option<DirtyLog>,
    pub(crate) stats: SpaceStats,
    /// What changes still owe: the table flush of changes whose token the space kept (failed
    /// operations, guest-memory writes) and the data frames awaiting an invalidation.
    pub(crate) pending: Pending<F>,
    /// Huge-page policy given to regions added from now on.
    pub(crate) huge: HugePages,
    /// Aligned blocks (level, base) seen holding a leaf: no huge page is tried there again
    /// (a hint that only ever withholds a huge page; cleared when a region goes).
    pub(crate) mixed: BTreeSet<(usize, GuestPhysAddr)>,
    /// Recent guest-memory translations, current while [`AddressSpace::changes`] is unchanged.
    pub(crate) tlb: Tlb,
    /// Zeroed frames ready for first touches (see [`crate::zeroed`]).
    pub(crate) zeroed: ZeroPool<A>,
}

impl<F: Format, A: FrameAllocator + Clone> AddressSpace<F, A> {
    /// An empty address space with a new table.
    pub fn new(alloc: A, opts: TableOptions) -> Result<Self, NewSpaceError> {
        Self::with_refs(alloc, opts, FrameRefs::new())
    }

    /// An empty address space whose frames are counted in `refs`, so that it can share frames
    /// with the other spaces counting in the same table (see [`AddressSpace::share_from`]).
    pub fn with_refs(alloc: A, opts: TableOptions, refs: FrameRefs) -> Result<Self, NewSpaceError> {
        let table = PageTable::new(alloc.clone(), opts)?;
        Ok(Self {
            table: Tracked::new(table),
            zeroed: ZeroPool::new(alloc.clone()),
            alloc,
            opts,
            regions: Tracked::new(BTreeMap::new()),
            next_id: 0,
            refs,
            dirty: None,
            stats: SpaceStats::default(),
            pending: Pending::new(),
            huge: HugePages::default(),
            mixed: BTreeSet::new(),
            tlb: Tlb::new(),
        })
    }

    /// Changes made to the table and the regions so far: a translation cached at one count is
    /// current while the count stays the same.
    #[inline]
    pub(crate) fn changes(&self) -> u64 {
        self.table.changes() + self.regions.changes()
    }

    /// The nested table (to load its root in an EPTP or hgatp, or to inspect it).
    pub fn table(&self) -> &PageTable<F, A> {
        &self.table
    }

    /// Root of the nested table.
    pub fn root(&self) -> HostPhysAddr {
        self.table.root()
    }

    /// The options the table was made with.
    pub fn options(&self) -> &TableOptions {
        &self.opts
    }

    /// The frame allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// The shared frame reference counts.
    pub fn frame_refs(&self) -> &FrameRefs {
        &self.refs
    }

    /// Counters.
    pub fn stats(&self) -> SpaceStats {
        self.stats
    }

    /// Every region, lowest address first.
    pub fn regions(&self) -> impl Iterator<Item = &Region> + '_ {
        self.regions.values()
    }

    /// The region with this id.
    pub fn region(&self, id: RegionId) -> Option<&Region> {
        self.regions.values().find(|r| r.id == id)
    }

    /// The region containing `gpa`.
    pub fn region_at(&self, gpa: GuestPhysAddr) -> Option<&Region> {
        let (_, r) = self.regions.range(..=gpa).next_back()?;
        r.range.contains(gpa).then_some(r)
    }

    pub(crate) fn key_of(&self, id: RegionId) -> Option<GuestPhysAddr> {
        self.regions.iter().find(|(_, r)| r.id == id).map(|(k, _)| *k)
    }

    /// Adds a region. A linear region is mapped at once (largest pages that fit); the others
    /// map nothing until they are touched.
    pub fn add_region(
        &mut self,
        name: &'static str,
        range: GpaRange,
        flags: MappingFlags,
        backend: Backend,
    ) -> Result<(RegionId, SpaceFlush<F>), AddRegionError> {
        if range.is_empty() || !range.start.is_aligned(PAGE) || !range.end.is_aligned(PAGE) {
            return Err(AddRegionError::Misaligned { range });
        }
        if F::GPA_BITS < 64 && range.end.as_u64() > (1u64 << F::GPA_BITS) {
            return Err(AddRegionError::OutOfRange { range, gpa_bits: F::GPA_BITS });
        }
        F::check_flags(flags, &self.opts)?;
        if let Some(existing) = self.overlapping(range) {
            return Err(AddRegionError::Overlap { name, range, existing });
        }
        let mut flush = SpaceFlush::none();
        if let Backend::Linear { host } = backend {
            if !host.is_aligned(PAGE) || host.checked_add(range.len()).is_none() {
                return Err(AddRegionError::BadHost { host });
            }
            let f = self.table.edit().map(range.start, host, range.len(), flags, MapSize::Largest)?;
            flush.add(f);
        }
        let id = RegionId(self.next_id);
        self.next_id += 1;
        self.regions.edit().insert(range.start, Region { id, name, range, flags, backend, huge: self.huge });
        // A linear region added while a dirty log runs over it is armed like the rest.
        if let Some(log_range) = self.dirty_log_range() {
            if matches!(backend, Backend::Linear { .. }) && log_range.overlaps(&range) {
                let r = GpaRange { start: range.start.max(log_range.start), end: range.end.min(log_range.end) };
                match self.arm_dirty_log(r) {
                    Ok(f) => flush = flush.merge(f),
                    Err(e) => {
                        // Could not arm (no frame to split): take the region back out. What was
                        // mapped and unmapped is invalidated with the next flush of this space.
                        if let Ok(f) = self.remove_region(id) {
                            flush = flush.merge(f);
                        }
                        self.defer(flush);
                        return Err(AddRegionError::DirtyLog(e));
                    }
                }
            }
        }
        Ok((id, flush))
    }

    /// The first region overlapping `range`.
    pub(crate) fn overlapping(&self, range: GpaRange) -> Option<RegionLabel> {
        // Only the last region starting before `range.end` can overlap, as regions never do.
        let (_, r) = self.regions.range(..range.end).next_back()?;
        r.range.overlaps(&range).then(|| RegionLabel::from(r))
    }

    /// Removes a region: unmaps it and, once the returned flush is carried out, frees the frames
    /// it owned (or drops its copy-on-write references).
    pub fn remove_region(&mut self, id: RegionId) -> Result<SpaceFlush<F>, RemoveRegionError> {
        let key = self.key_of(id).ok_or(RemoveRegionError::NoSuchRegion(id))?;
        let r = &self.regions[&key];
        let (range, owns) = (r.range, r.backend.owns_frames());
        let mut release = Vec::new();
        if owns {
            self.table.for_each_leaf(range.start, range.len(), |leaf| {
                release.push((leaf.gpa, leaf.hpa, leaf.size.bytes() / PAGE))
            });
        }
        let f = self.table.edit().unmap(range.start, range.len())?;
        self.regions.edit().remove(&key);
        self.mixed.retain(|(_, b)| !range.contains(*b));
        self.pending.release.append(&mut release);
        Ok(SpaceFlush::from_table(f))
    }

    /// Changes the rights of a region and of every page mapped in it. Pages shared
    /// copy-on-write, and pages the dirty log write-protects, stay read-only until written.
    ///
    /// On failure the region keeps its old rights record; leaves already changed stay changed,
    /// their invalidation left pending (see [`AddressSpace::flush_pending`]).
    pub fn protect_region(&mut self, id: RegionId, flags: MappingFlags) -> Result<SpaceFlush<F>, ProtectRegionError> {
        let key = self.key_of(id).ok_or(ProtectRegionError::NoSuchRegion(id))?;
        F::check_flags(flags, &self.opts)?;
        let region = self.regions.edit().get_mut(&key).ok_or(ProtectRegionError::NoSuchRegion(id))?;
        let (old, range) = (region.flags, region.range);
        region.flags = flags;
        self.reprotect(range).map_err(|e| {
            if let Some(r) = self.regions.edit().get_mut(&key) {
                r.flags = old;
            }
            ProtectRegionError::Protect(e)
        })
    }

    /// Gives every leaf in `range` (inside one or more regions) the rights it should have.
    ///
    /// Consecutive leaves that need the same rights are changed with one `protect` call; the
    /// region is looked up once per region, not per leaf. On failure the leaves already changed
    /// are left to the pending flush.
    pub(crate) fn reprotect(&mut self, range: GpaRange) -> Result<SpaceFlush<F>, RangeError> {
        // Runs of leaves to change: (start, end, rights).
        let mut runs: Vec<(GuestPhysAddr, GuestPhysAddr, MappingFlags)> = Vec::new();
        let mut region: Option<Region> = None;
        self.table.for_each_leaf(range.start, range.len(), |leaf| {
            if !region.as_ref().is_some_and(|r| r.range.contains(leaf.gpa)) {
                region = self.region_at(leaf.gpa).cloned();
            }
            let Some(r) = &region else { return };
            let want = self.effective_flags(r, leaf.hpa, leaf.gpa);
            if want == leaf.flags {
                return;
            }
            let end = leaf.gpa + leaf.size.bytes();
            match runs.last_mut() {
                Some((_, e, f)) if *e == leaf.gpa && *f == want => *e = end,
                _ => runs.push((leaf.gpa, end, want)),
            }
        });
        let mut flush = SpaceFlush::none();
        for (start, end, want) in runs {
            match self.table.edit().protect(start, end - start, want) {
                Ok(f) => flush.add(f),
                Err(e) => {
                    self.defer(flush);
                    return Err(e);
                }
            }
        }
        Ok(flush)
    }

    /// The rights a leaf of region `r` backed by `hpa` should carry now.
    pub(crate) fn effective_flags(&self, r: &Region, hpa: HostPhysAddr, gpa: GuestPhysAddr) -> MappingFlags {
        self.flags_for(r, gpa, r.backend.owns_frames() && self.refs.count(hpa) > 1)
    }

    /// The rights a leaf of region `r` at `gpa` should carry, knowing whether its frame is shared.
    pub(crate) fn flags_for(&self, r: &Region, gpa: GuestPhysAddr, shared: bool) -> MappingFlags {
        let mut flags = r.flags;
        if shared {
            flags.remove(MappingFlags::WRITE);
        }
        if let Some(log) = &self.dirty {
            if log.write_protects(gpa) && !log.is_dirty(gpa) {
                flags.remove(MappingFlags::WRITE);
            }
        }
        flags
    }

    /// Backs every untouched page of an anonymous region with a zeroed frame now (with huge
    /// pages where the region's [`HugePages`] policy and the allocator allow). If it stops (no
    /// frame), the pages backed so far stay, their invalidation left pending.
    pub fn populate(&mut self, id: RegionId) -> Result<SpaceFlush<F>, PopulateError> {
        let key = self.key_of(id).ok_or(PopulateError::NoSuchRegion(id))?;
        let r = self.regions[&key].clone();
        if !r.backend.owns_frames() {
            return Err(PopulateError::NotAnonymous(id));
        }
        // Leaves come in address order: walk the pages alongside them.
        let mut present = Vec::new();
        self.table.for_each_leaf(r.range.start, r.range.len(), |leaf| present.push(leaf.gpa));
        let mut present = present.into_iter().peekable();
        let mut flush = SpaceFlush::none();
        let mut gpa = r.range.start;
        while gpa < r.range.end {
            while present.next_if(|&p| p < gpa).is_some() {}
            if present.peek() != Some(&gpa) {
                match self.map_anon_page(&r, gpa) {
                    Ok(f) => flush.add(f),
                    Err(NoFrame) => {
                        self.defer(flush);
                        return Err(PopulateError::OutOfMemory { gpa });
                    }
                }
            }
            // Past the page just mapped (or found), which may be huge.
            let size = self.table.query(gpa).map_or(PAGE, |l| l.size.bytes());
            gpa = gpa.align_down(size) + size;
        }
        Ok(flush)
    }

    /// Maps untouched page `gpa` of anonymous region `r` with a new zeroed frame: a huge page
    /// covering it where one fits (see [`HugePages`]), else 4 KiB.
    pub(crate) fn map_anon_page(&mut self, r: &Region, gpa: GuestPhysAddr) -> Result<twostage_npt::Flush<F>, NoFrame> {
        if let Some(f) = self.map_huge_at(r, gpa) {
            return Ok(f);
        }
        self.map_new_frame(r, gpa, None)
    }

    /// Allocates a frame for page `gpa` of anonymous region `r`, fills it (zeroes, or copies
    /// from `copy_of`), registers it and maps it. On failure nothing is left allocated.
    pub(crate) fn map_new_frame(
        &mut self,
        r: &Region,
        gpa: GuestPhysAddr,
        copy_of: Option<HostPhysAddr>,
    ) -> Result<twostage_npt::Flush<F>, NoFrame> {
        // A first touch takes a frame zeroed ahead if one is ready (see `crate::zeroed`).
        let hpa = match copy_of.is_none().then(|| self.zeroed.take()).flatten() {
            Some(zeroed) => zeroed,
            None => {
                let hpa = self.alloc.allocate_frame().ok_or(NoFrame)?;
                self.fill_frame(hpa, copy_of);
                hpa
            }
        };
        self.refs.insert_new(hpa);
        // A new frame has one holder: it is private.
        let flags = self.flags_for(r, gpa, false);
        match self.table.edit().map(gpa, hpa, PAGE, flags, MapSize::Exactly(PageSize::Size4K)) {
            Ok(f) => {
                self.stats.frames_allocated += 1;
                Ok(f)
            }
            Err(_) => {
                self.refs.release_range(hpa, 1, |_, _| {});
                // SAFETY: `hpa` came from `allocate_frame` just above and was never mapped.
                unsafe { self.alloc.deallocate_frames(hpa, 1) };
                Err(NoFrame)
            }
        }
    }

    /// Zeroes a frame, or copies another frame into it.
    pub(crate) fn fill_frame(&self, hpa: HostPhysAddr, copy_of: Option<HostPhysAddr>) {
        let dst = self.alloc.phys_to_virt(hpa).as_ptr();
        match copy_of {
            // SAFETY: both frames are allocated (the allocator's promise makes `phys_to_virt`
            // valid for a whole frame); `dst` is a new frame no one else reaches, so they do
            // not overlap.
            Some(src) => unsafe {
                core::ptr::copy_nonoverlapping(self.alloc.phys_to_virt(src).as_ptr(), dst, FRAME_SIZE)
            },
            // SAFETY: `dst` is a whole allocated frame that only we reach.
            None => unsafe { core::ptr::write_bytes(dst, 0, FRAME_SIZE) },
        }
    }

    /// Carries out a flush: runs `invalidate` (on every CPU that may have the table loaded) for
    /// the token's table change merged with everything pending (see
    /// [`AddressSpace::flush_pending`]), then frees the retired table frames and releases the
    /// pending data frames that this invalidation covers.
    ///
    /// A token of another address space is refused and handed back, before anything is done.
    pub fn flush(
        &mut self,
        flush: SpaceFlush<F>,
        invalidate: impl FnOnce(&InvalidationOf<'_, F>),
    ) -> Result<(), ForeignSpaceFlush<F>> {
        if flush.table.as_ref().is_some_and(|t| t.root() != self.table.root()) {
            return Err(ForeignSpaceFlush::new(flush, self.table.root()));
        }
        let mut flush = flush;
        if let Some(d) = self.pending.table.take() {
            flush.add(d);
        }
        let Some(t) = flush.table else { return Ok(()) };
        let pending = &mut self.pending;
        let mut covered = Vec::new();
        self.table
            .edit_keeping_translations()
            .flush(t, |inv| {
                invalidate(inv);
                covered = pending.take_covered(inv);
            })
            .expect("the token's root was checked above");
        self.release_frames(&covered);
        Ok(())
    }

    /// Carries out what is pending and nothing else: the invalidation owed by the changes whose
    /// token the space kept, namely those of a failed operation (every operation that fails part
    /// way leaves its partial change here rather than in its error) and those of the
    /// [`crate::GuestMemory`] writes on the space (which may back a page or break copy-on-write,
    /// and have no token to return). Call it before resuming a vCPU after such a write or
    /// failure; any other [`AddressSpace::flush`] carries it out as well.
    pub fn flush_pending(&mut self, invalidate: impl FnOnce(&InvalidationOf<'_, F>)) {
        if self.pending.table.is_none() {
            // No change awaits an invalidation, and frames are released only by one.
            return;
        }
        self.flush(SpaceFlush::none(), invalidate).expect("an empty token belongs to every space");
    }

    /// Whether something awaits an invalidation: a change whose token the space kept, or data
    /// frames waiting for a flush that covers them (see [`AddressSpace::flush_pending`]).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Carries out a flush, and everything pending, without invalidating, and releases every
    /// pending frame: right only while no CPU has this table loaded and none holds a
    /// translation from it (a space being built, or one whose VM is stopped and whose context
    /// was invalidated as a whole since it last ran).
    pub fn flush_unloaded(&mut self, flush: SpaceFlush<F>) -> Result<(), ForeignSpaceFlush<F>> {
        self.flush(flush, |_| {})?;
        let all: Vec<(HostPhysAddr, u64)> = self.pending.release.drain(..).map(|(_, h, n)| (h, n)).collect();
        self.release_frames(&all);
        Ok(())
    }

    /// Drops one holder of each frame of each `(first, frames)` and frees what lost its last
    /// holder: a single frame, or a huge page's whole run once the last of its frames goes.
    pub(crate) fn release_frames(&mut self, frames: &[(HostPhysAddr, u64)]) {
        let alloc = &self.alloc;
        self.refs.release_all(frames, |base, n| {
            // SAFETY: `base..base + n` is one allocation of `n` frames from this allocator (or a
            // clone reaching the same memory): a frame from `allocate_frame`, or a run from
            // `allocate_frames(n, n)` registered whole with `insert_run`. Every frame of it just
            // lost its last holder, and an invalidation covering every page it was mapped at has
            // been carried out (or the table is unloaded).
            unsafe { alloc.deallocate_frames(base, n as usize) };
        });
    }

    /// Keeps the flush of a change whose token the caller will not get (a failed operation, a
    /// guest-memory write), for the next [`AddressSpace::flush`].
    pub(crate) fn defer(&mut self, f: SpaceFlush<F>) {
        let Some(f) = f.table else { return };
        self.pending.table = Some(match self.pending.table.take() {
            Some(d) => d.merge(f),
            None => f,
        });
    }

    /// Records that data frame `hpa`, mapped at `gpa`, was unmapped: it is released once an
    /// invalidation covering `gpa` has been carried out.
    pub(crate) fn retire(&mut self, gpa: GuestPhysAddr, hpa: HostPhysAddr) {
        self.pending.release.push((gpa, hpa, 1));
    }
}

impl<F: Format, A: FrameAllocator + Clone> Drop for AddressSpace<F, A> {
    fn drop(&mut self) {
        let mut owned = Vec::new();
        for r in self.regions.values().filter(|r| r.backend.owns_frames()) {
            self.table
                .for_each_leaf(r.range.start, r.range.len(), |leaf| owned.push((leaf.hpa, leaf.size.bytes() / PAGE)));
        }
        owned.extend(self.pending.release.drain(..).map(|(_, h, n)| (h, n)));
        self.release_frames(&owned);
        if let Some(d) = self.pending.table.take() {
            d.ignore(); // The table is going away; no CPU may have it loaded.
        }
        // The table frees its own frames when it drops.
    }
}
