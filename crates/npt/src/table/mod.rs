//! The generic nested page-table engine: one implementation for every [`Format`].

mod dump;
mod error;
mod range;

pub use dump::TableDump;
pub use error::*;
pub use range::AdClear;

use crate::addr::{GpaRange, GuestPhysAddr, HostPhysAddr, PageSize};
use crate::flags::MappingFlags;
use crate::flush::{Flush, ForeignFlush, InvalidationOf};
use crate::format::{level_size, Format, LeafBits, Pte};
use crate::frame::{FrameAllocator, FRAME_SIZE};
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering};

/// How accessed/dirty bits of leaves are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdMode {
    /// The CPU sets them (EPTP bit 6 on; RISC-V with hardware A/D updating): leaves start clear.
    Hardware,
    /// Leaves start clear and the hypervisor sets them when the guest faults on them (RISC-V
    /// Svade behaviour), through [`PageTable::set_accessed_dirty`].
    Software,
    /// Nobody tracks them: leaves start with A set, and D set when writable, so that hardware
    /// which faults on clear bits never does.
    Preset,
}

/// A set of page sizes, as a bit per level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSizes(u8);

impl PageSizes {
    /// 4 KiB pages only.
    pub const SIZE_4K_ONLY: Self = Self(1);
    /// Every size from 4 KiB to 512 GiB (the format narrows it down).
    pub const ALL: Self = Self(0b1111);

    /// The set with exactly `sizes`; 4 KiB is always included.
    pub fn from_sizes(sizes: &[PageSize]) -> Self {
        Self(sizes.iter().fold(1, |m, s| m | 1 << s.level()))
    }
    /// Whether `size` is in the set.
    pub const fn contains(self, size: PageSize) -> bool {
        self.0 & (1 << size.level()) != 0
    }
    /// The set with `size` added.
    pub const fn with(self, size: PageSize) -> Self {
        Self(self.0 | 1 << size.level())
    }
    /// The set with `size` removed (4 KiB stays).
    pub const fn without(self, size: PageSize) -> Self {
        Self((self.0 & !(1 << size.level())) | 1)
    }
    pub(crate) const fn bits(self) -> u8 {
        self.0
    }
}

/// What a table may use, decided by the CPU's capabilities (see
/// [`crate::EptCapabilities::table_options`]) and the hypervisor's choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableOptions {
    /// Leaf sizes the CPU offers (intersected with the format's).
    pub leaf_sizes: PageSizes,
    /// How accessed/dirty bits are kept.
    pub ad: AdMode,
    /// Whether execute-only leaves may be made (always on RISC-V; EPT needs the capability).
    pub execute_only: bool,
    /// MAXPHYADDR: host-physical addresses must lie below `2^max_phys_bits`. Bits above it in an
    /// EPT entry are reserved and make the walk fail with an EPT misconfiguration (Intel SDM
    /// Vol. 3C §29.3.3.1). Narrowed to [`Format::MAX_PHYS_BITS`] by [`PageTable::new`].
    pub max_phys_bits: u8,
}

impl TableOptions {
    /// Everything the format allows: every leaf size, hardware A/D, execute-only, host addresses
    /// as wide as the entry's address field.
    pub fn for_format<F: Format>() -> Self {
        Self {
            leaf_sizes: PageSizes(F::LEAF_LEVELS),
            ad: AdMode::Hardware,
            execute_only: true,
            max_phys_bits: F::MAX_PHYS_BITS,
        }
    }
}

/// How large the pages of a new mapping should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapSize {
    /// The largest page that the alignment of both addresses and the remaining length allow.
    Largest,
    /// Exactly this size (addresses and length must be multiples of it).
    Exactly(PageSize),
}

/// One leaf of a table: a page and how it is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Guest-physical base of the page.
    pub gpa: GuestPhysAddr,
    /// Host-physical base of the page.
    pub hpa: HostPhysAddr,
    /// Page size.
    pub size: PageSize,
    /// Rights and attributes.
    pub flags: MappingFlags,
    /// Accessed bit.
    pub accessed: bool,
    /// Dirty bit.
    pub dirty: bool,
}

impl Leaf {
    /// The host-physical address that `gpa` (inside this leaf) translates to.
    pub fn translate(&self, gpa: GuestPhysAddr) -> HostPhysAddr {
        self.hpa + (gpa - self.gpa)
    }
    /// The guest range this leaf covers.
    pub fn range(&self) -> GpaRange {
        GpaRange { start: self.gpa, end: self.gpa + self.size.bytes() }
    }
}

/// A nested page table of format `F` whose table frames come from `A`.
///
/// Every change returns a [`Flush`] that must be carried out (with [`PageTable::flush`]) on every
/// CPU that may have the table loaded. Table frames unlinked by a change are *retired*, not freed:
/// hardware may still walk them until the flush, so they go back to the allocator in `flush` (or
/// when the table is dropped). All table frames are freed on drop.
///
/// Entries are read and written as 64-bit atomics because the hardware walks them concurrently
/// and sets A/D bits with locked read-modify-writes. Changes need `&mut self`: one writer at a
/// time, which the address-space layer's lock provides.
pub struct PageTable<F: Format, A: FrameAllocator> {
    alloc: A,
    root: HostPhysAddr,
    opts: TableOptions,
    frames: usize,
    retired: Vec<HostPhysAddr>,
    folds: Vec<range::Fold>,
    _format: PhantomData<fn() -> F>,
}

/// Where the frames for a change come from: counted first, then taken from a pool filled before
/// anything was changed, so that a change either completes or leaves the table as it was.
pub(crate) enum Plan<'p, F: Format> {
    /// Count the frames needed and check for conflicts; change nothing.
    Dry { needed: usize, virt: [Option<u64>; 6] },
    /// Make the change with frames from `pool`, recording what to invalidate in `flush`.
    Real { pool: &'p mut Vec<HostPhysAddr>, flush: &'p mut Flush<F> },
}

/// A mapping request being carried out: `gpa..gpa+len` to `hpa..hpa+len` with `flags`.
#[derive(Clone, Copy)]
struct Run {
    gpa: u64,
    hpa: u64,
    len: u64,
    flags: MappingFlags,
}

pub(crate) enum Step {
    /// A table sits where the leaf should go: try a smaller page.
    Descend,
    /// Something is already mapped at this address.
    Conflict(GuestPhysAddr),
}

impl<F: Format, A: FrameAllocator> PageTable<F, A> {
    /// An empty table. The root is `F::ROOT_FRAMES` frames, aligned to its size.
    pub fn new(alloc: A, opts: TableOptions) -> Result<Self, OutOfFrames> {
        let opts = TableOptions {
            leaf_sizes: PageSizes(opts.leaf_sizes.bits() & F::LEAF_LEVELS | 1),
            max_phys_bits: opts.max_phys_bits.min(F::MAX_PHYS_BITS),
            ..opts
        };
        let root =
            alloc.allocate_frames(F::ROOT_FRAMES, F::ROOT_FRAMES).ok_or(OutOfFrames { needed: F::ROOT_FRAMES })?;
        check_frame(root, F::ROOT_FRAMES, opts.max_phys_bits);
        let table = Self {
            alloc,
            root,
            opts,
            frames: F::ROOT_FRAMES,
            retired: Vec::new(),
            folds: Vec::new(),
            _format: PhantomData,
        };
        table.zero_frames(root, F::ROOT_FRAMES);
        Ok(table)
    }

    /// Host-physical address of the root table (for the EPTP or hgatp).
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// The options the table was made with (leaf sizes narrowed to the format's).
    pub fn options(&self) -> &TableOptions {
        &self.opts
    }

    /// The frame allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// Frames the table holds now, including the root and retired frames awaiting a flush.
    pub fn table_frames(&self) -> usize {
        self.frames
    }

    fn zero_frames(&self, base: HostPhysAddr, count: usize) {
        let p = self.alloc.phys_to_virt(base).as_ptr();
        // SAFETY: `base..base+count` frames were just allocated to this table and are not linked
        // anywhere yet; the allocator promises the window covers them contiguously.
        unsafe { core::ptr::write_bytes(p, 0, count * FRAME_SIZE) };
    }

    /// The entry `idx` of the table at `table` (which has `F::entries(level)` entries).
    pub(crate) fn entry(&self, table: HostPhysAddr, idx: usize) -> &AtomicU64 {
        let base = self.alloc.phys_to_virt(table).as_ptr().cast::<AtomicU64>();
        // SAFETY: `table` is a table frame owned by this PageTable (the root or a frame linked
        // from it, never freed while linked), so the allocator's window to it is valid; callers
        // pass `idx < F::entries(level)`, which stays within the table's frames; entries are
        // 8-byte aligned within a 4 KiB-aligned frame, and only atomics touch them.
        unsafe { &*base.add(idx) }
    }

    /// The 512 entries of a level-0 table owned by this table.
    fn leaf_table(&self, table: HostPhysAddr) -> &[AtomicU64] {
        let base = self.alloc.phys_to_virt(table).as_ptr().cast::<AtomicU64>();
        // SAFETY: as for `entry`: a table frame owned by this PageTable holds 512 aligned
        // entries, touched only through atomics, valid while the table is borrowed.
        unsafe { core::slice::from_raw_parts(base, F::entries(0)) }
    }

    pub(crate) fn new_table(&self, plan_pool: &mut Vec<HostPhysAddr>) -> HostPhysAddr {
        let frame = plan_pool.pop().expect("frames were counted before the change");
        self.zero_frames(frame, 1);
        frame
    }

    /// Fills a pool with `needed` frames, or hands back what it got and reports the shortfall.
    pub(crate) fn fill_pool(&mut self, needed: usize) -> Result<Vec<HostPhysAddr>, OutOfFrames> {
        let mut pool = Vec::with_capacity(needed);
        for _ in 0..needed {
            match self.alloc.allocate_frame() {
                Some(f) => {
                    check_frame(f, 1, self.opts.max_phys_bits);
                    pool.push(f)
                }
                None => {
                    for f in pool {
                        // SAFETY: allocated just above as one frame, never linked or shared.
                        unsafe { self.alloc.deallocate_frames(f, 1) };
                    }
                    return Err(OutOfFrames { needed });
                }
            }
        }
        self.frames += needed;
        Ok(pool)
    }

    /// Unlinked table frames wait here until the next flush.
    pub(crate) fn retire(&mut self, table: HostPhysAddr) {
        self.retired.push(table);
    }

    /// Maps `gpa..gpa+len` to `hpa..hpa+len` with `flags`.
    ///
    /// Either the whole range is mapped or, on error, nothing changed. Pages already mapped in
    /// the range are an error ([`MapError::AlreadyMapped`]); use `protect` or `unmap` first.
    pub fn map(
        &mut self,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        len: u64,
        flags: MappingFlags,
        size: MapSize,
    ) -> Result<Flush<F>, MapError> {
        let align = match size {
            MapSize::Largest => PageSize::Size4K.bytes(),
            MapSize::Exactly(s) => {
                if !self.opts.leaf_sizes.contains(s) {
                    return Err(MapError::UnsupportedPageSize(s));
                }
                s.bytes()
            }
        };
        check_range::<F>(gpa, len, align).map_err(|problem| MapError::BadGuestRange { gpa, len, problem })?;
        if !hpa.is_aligned(align) || hpa.checked_add(len).is_none() {
            let problem = if hpa.is_aligned(align) { RangeProblem::OutOfRange } else { RangeProblem::Unaligned };
            return Err(MapError::BadHostRange { hpa, len, problem });
        }
        self.check_host(hpa, len)?;
        F::check_flags(flags, &self.opts).map_err(|reason| MapError::BadFlags { flags, reason })?;
        let flags = stored_flags::<F>(flags);

        let mut dry = Plan::Dry { needed: 0, virt: [None; 6] };
        self.map_pages(gpa, hpa, len, flags, size, &mut dry)?;
        let Plan::Dry { needed, .. } = dry else { unreachable!() };
        let mut pool = self.fill_pool(needed).map_err(MapError::OutOfFrames)?;
        let mut flush = Flush::new(self.root);
        let done = self.map_pages(gpa, hpa, len, flags, size, &mut Plan::Real { pool: &mut pool, flush: &mut flush });
        debug_assert!(done.is_ok() && pool.is_empty(), "the dry run and the real run disagree");
        Ok(flush)
    }

    /// Whether `hpa..hpa+len` lies below MAXPHYADDR.
    pub(crate) fn check_host(&self, hpa: HostPhysAddr, len: u64) -> Result<(), BeyondMaxPhys> {
        let limit = 1u64 << self.opts.max_phys_bits;
        if hpa.as_u64() >= limit || limit - hpa.as_u64() < len {
            let first = HostPhysAddr::new_truncate(hpa.as_u64().max(limit));
            return Err(BeyondMaxPhys { hpa: first, max_phys_bits: self.opts.max_phys_bits });
        }
        Ok(())
    }

    fn map_pages(
        &mut self,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        len: u64,
        flags: MappingFlags,
        size: MapSize,
        plan: &mut Plan<'_, F>,
    ) -> Result<(), MapError> {
        let mut off = 0;
        let mut cursor = None;
        while off < len {
            let (va, pa) = (gpa.as_u64() + off, hpa.as_u64() + off);
            let mut level = match size {
                MapSize::Exactly(s) => s.level(),
                MapSize::Largest => self.largest_level(va, pa, len - off),
            };
            loop {
                match self.map_one(va, pa, level, flags, plan, &mut cursor) {
                    Ok(()) => break,
                    Err(Step::Descend) if size == MapSize::Largest && level > 0 => {
                        level = (0..level).rev().find(|&l| self.level_allowed(l)).unwrap_or(0);
                    }
                    Err(Step::Descend) => return Err(MapError::AlreadyMapped { gpa: GuestPhysAddr::new(va) }),
                    Err(Step::Conflict(at)) => return Err(MapError::AlreadyMapped { gpa: at }),
                }
            }
            off += level_size(level);
            if level == 0 {
                // The rest of this leaf table takes 4 KiB pages too (no address inside it is
                // 2 MiB-aligned): fill its entries in a tight loop.
                // Only when the cursor holds the table of the page just mapped (a dry run that
                // met a missing table returns before the cursor moves).
                match cursor {
                    // A dry run inside a leaf table that does not exist yet: its other pages are
                    // free and need no further table; skip to the end of the table.
                    Some((0, key, None)) if key == (gpa.as_u64() + off - PageSize::Size4K.bytes()) >> 21 => {
                        let table_end = ((gpa.as_u64() + off - PageSize::Size4K.bytes()) | (level_size(1) - 1)) + 1;
                        off = (table_end - gpa.as_u64()).min(len);
                    }
                    Some((0, key, Some(table))) if key == (gpa.as_u64() + off - PageSize::Size4K.bytes()) >> 21 => {
                        let run = Run { gpa: gpa.as_u64(), hpa: hpa.as_u64(), len, flags };
                        off = self.fill_run(table, &run, off, plan);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Writes 4 KiB leaves into `table` from `gpa + off` until the range or the table ends, or an
    /// entry is present (the page-by-page path then reports the conflict). Returns the new offset.
    fn fill_run(&self, table: HostPhysAddr, run: &Run, mut off: u64, plan: &mut Plan<'_, F>) -> u64 {
        let Run { gpa, hpa, len, flags } = *run;
        let (accessed, dirty) = F::initial_ad(flags, self.opts.ad);
        let entries = self.leaf_table(table);
        while off < len && (gpa + off) & (level_size(1) - 1) != 0 {
            let va = gpa + off;
            let entry = &entries[F::index(va, 0)];
            if F::present(entry.load(Ordering::Acquire)) {
                break;
            }
            if let Plan::Real { flush, .. } = plan {
                let leaf = LeafBits { hpa: HostPhysAddr::new_truncate(hpa + off), flags, accessed, dirty };
                entry.store(F::encode_leaf(&leaf, 0), Ordering::Release);
                flush.note_leaf(GuestPhysAddr::new(va), false);
            }
            off += PageSize::Size4K.bytes();
        }
        off
    }

    fn level_allowed(&self, level: usize) -> bool {
        self.opts.leaf_sizes.bits() & (1 << level) != 0
    }

    fn largest_level(&self, va: u64, pa: u64, remaining: u64) -> usize {
        (0..F::LEVELS.min(4))
            .rev()
            .find(|&l| {
                let s = level_size(l);
                self.level_allowed(l) && (va | pa) & (s - 1) == 0 && remaining >= s
            })
            .unwrap_or(0)
    }

    /// Maps one page at `level`. `cursor` remembers the last table that held a leaf entry (its
    /// level, the key of the block it covers, its address), so that a run of pages in one table
    /// does not walk from the root for each page.
    fn map_one(
        &mut self,
        va: u64,
        pa: u64,
        level: usize,
        flags: MappingFlags,
        plan: &mut Plan<'_, F>,
        cursor: &mut Option<(usize, u64, Option<HostPhysAddr>)>,
    ) -> Result<(), Step> {
        let key = va >> (12 + 9 * (level + 1));
        let mut table = self.root;
        let mut l = F::LEVELS - 1;
        match *cursor {
            Some((cl, ck, Some(ct))) if cl == level && ck == key => {
                table = ct;
                l = level;
            }
            // A dry run already counted the missing table that holds this entry: nothing below
            // it exists, so nothing can conflict and nothing more is needed.
            Some((cl, ck, None)) if cl == level && ck == key => return Ok(()),
            _ => {}
        }
        while l > level {
            match self.next_table(table, va, l) {
                Ok(next) => table = next,
                Err(Stop::Leaf { .. }) => return Err(Step::Conflict(GuestPhysAddr::new(va))),
                Err(Stop::Empty) => match plan {
                    Plan::Dry { needed, virt } => {
                        // Tables at levels l-1 ..= level are missing; one table at level m covers
                        // level_size(m + 1). Addresses only grow, so one memo per level suffices.
                        for (m, memo) in virt.iter_mut().enumerate().take(l).skip(level) {
                            let key = va >> (12 + 9 * (m + 1));
                            if *memo != Some(key) {
                                *needed += 1;
                                *memo = Some(key);
                            }
                        }
                        // The rest of this (virtual, empty) table needs nothing more.
                        *cursor = Some((level, key, None));
                        return Ok(());
                    }
                    Plan::Real { pool, flush } => table = self.create_next_table(table, va, l, pool, flush),
                },
            }
            l -= 1;
        }
        *cursor = Some((level, key, Some(table)));
        let idx = F::index(va, level);
        let entry = self.entry(table, idx);
        let raw = entry.load(Ordering::Acquire);
        if F::present(raw) {
            return Err(if level == 0 || F::is_leaf(raw, level) {
                Step::Conflict(GuestPhysAddr::new(va))
            } else {
                Step::Descend
            });
        }
        if let Plan::Real { flush, .. } = plan {
            let (accessed, dirty) = F::initial_ad(flags, self.opts.ad);
            let leaf = LeafBits { hpa: HostPhysAddr::new_truncate(pa), flags, accessed, dirty };
            entry.store(F::encode_leaf(&leaf, level), Ordering::Release);
            flush.note_leaf(GuestPhysAddr::new(va), false);
        }
        Ok(())
    }

    /// The leaf that maps `gpa`, if any.
    pub fn query(&self, gpa: GuestPhysAddr) -> Option<Leaf> {
        let (_, raw, level) = self.leaf_walk(gpa)?;
        match F::decode(raw, level) {
            Pte::Leaf(l) => Some(leaf_at(gpa.align_down(level_size(level)), level, &l)),
            _ => None,
        }
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

    // The walker: every descent through the levels (map, query and translation, remap, split,
    // collapse, A/D updates) goes through `next_table`, `create_next_table` and `table_at`; the
    // range walks (unmap, protect, harvest, copy, leaf listing, free) visit the entries of one
    // table at a time with `covered`, and descend with the pointer they have just read.

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

    /// The host address `gpa` maps to, with the rights of its leaf.
    pub fn translate(&self, gpa: GuestPhysAddr) -> Option<(HostPhysAddr, MappingFlags)> {
        let (_, raw, level) = self.leaf_walk(gpa)?;
        match F::decode(raw, level) {
            Pte::Leaf(l) => Some((l.hpa + gpa.offset_in(level_size(level)), l.flags)),
            _ => None,
        }
    }

    /// Calls `f` for every leaf that overlaps `gpa..gpa+len`, in address order.
    pub fn for_each_leaf(&self, gpa: GuestPhysAddr, len: u64, mut f: impl FnMut(&Leaf)) {
        let end = gpa.as_u64().saturating_add(len).min(1 << F::GPA_BITS);
        self.leaves_in(self.root, F::LEVELS - 1, 0, gpa.as_u64(), end, &mut f);
    }

    fn leaves_in(&self, table: HostPhysAddr, level: usize, base: u64, start: u64, end: u64, f: &mut dyn FnMut(&Leaf)) {
        let span = level_size(level);
        for i in covered::<F>(level, base, start, end) {
            let b = base + i as u64 * span;
            let raw = self.entry(table, i).load(Ordering::Acquire);
            if !F::present(raw) {
                continue;
            }
            match F::decode(raw, level) {
                Pte::Invalid => {}
                Pte::Leaf(l) => f(&leaf_at(GuestPhysAddr::new(b), level, &l)),
                Pte::Table(next) => self.leaves_in(next, level - 1, b, start, end, f),
            }
        }
    }

    /// A copy of the table with every entry as it is now (leaves, rights and A/D bits), in new
    /// table frames from the same allocator: the first half of a copy-on-write fork, costing
    /// time in proportion to the tables, not to the memory they map. Nothing is allocated if
    /// any frame is missing.
    pub fn try_clone(&self) -> Result<Self, OutOfFrames>
    where
        A: Clone,
    {
        let mut flush = Flush::new(self.root);
        let copy = self.clone_with(&[], &mut |_| {}, &mut flush)?;
        debug_assert!(flush.is_empty(), "a plain copy changes nothing in the original");
        Ok(copy)
    }

    /// Copies the table; leaves inside one of `ranges` get that range's flags in the copy and in
    /// `self` (changes noted in `flush`) and are reported to `f`. Allocates everything first.
    fn clone_with(
        &self,
        ranges: &[(GpaRange, MappingFlags)],
        f: &mut dyn FnMut(&Leaf),
        flush: &mut Flush<F>,
    ) -> Result<Self, OutOfFrames>
    where
        A: Clone,
    {
        let live = self.frames - self.retired.len() - F::ROOT_FRAMES;
        let mut child = Self::new(self.alloc.clone(), self.opts)?;
        let mut pool = child.fill_pool(live).map_err(|e| OutOfFrames { needed: e.needed + F::ROOT_FRAMES })?;
        let mut ctx = CloneCtx { ranges, hint: 0, flush, f, pool: &mut pool };
        child.copy_tree(self, self.root, child.root, F::LEVELS - 1, 0, &mut ctx);
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
        mut f: impl FnMut(&Leaf),
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
        let child = self.clone_with(&stored, &mut f, &mut flush).map_err(CloneError::OutOfFrames)?;
        Ok((child, flush))
    }

    /// Copies the table `from` of `src` (level `level`, first address `base`) into `to`.
    fn copy_tree(
        &self,
        src: &Self,
        from: HostPhysAddr,
        to: HostPhysAddr,
        level: usize,
        base: u64,
        ctx: &mut CloneCtx<'_, F>,
    ) {
        let span = level_size(level);
        for i in 0..F::entries(level) {
            let entry = src.entry(from, i);
            let raw = entry.load(Ordering::Acquire);
            if !F::present(raw) {
                continue;
            }
            let b = base + i as u64 * span;
            if level > 0 && !F::is_leaf(raw, level) {
                let next = self.new_table(ctx.pool);
                self.copy_tree(src, F::address(raw), next, level - 1, b, ctx);
                self.entry(to, i).store(F::encode_table(next), Ordering::Relaxed);
                continue;
            }
            let new = match (ctx.range_flags(b), F::decode(raw, level)) {
                (Some(flags), Pte::Leaf(leaf)) => {
                    let bits = src.preset_ad(LeafBits { flags, ..leaf });
                    let new = F::encode_leaf(&bits, level);
                    if new != raw {
                        src.store_leaf(from, i, raw, new);
                        ctx.flush.note_leaf(GuestPhysAddr::new(b), true);
                    }
                    (ctx.f)(&leaf_at(GuestPhysAddr::new(b), level, &bits));
                    new
                }
                _ => raw,
            };
            self.entry(to, i).store(new, Ordering::Relaxed);
        }
    }

    /// Carries out `flush` through `invalidate` (which must run the invalidation on every CPU
    /// that may have this table loaded), then frees the table frames that changes retired.
    ///
    /// A token of another table is refused before anything runs, and handed back inside the
    /// error ([`ForeignFlush::into_token`]).
    pub fn flush(
        &mut self,
        flush: Flush<F>,
        invalidate: impl FnOnce(&InvalidationOf<'_, F>),
    ) -> Result<(), ForeignFlush<F>> {
        if flush.root() != self.root {
            return Err(ForeignFlush::new(flush, self.root));
        }
        invalidate(&flush.invalidation());
        // Retired table frames (and the children of collapsed huge pages) may still be reached
        // through paging-structure caches until an invalidation of the whole table: a token that
        // retired one always asks for that, but it may have been dropped, and a by-address
        // HFENCE.GVMA does not cover them. Only a whole-table invalidation releases them.
        if flush.covers_whole_table() {
            self.fold_late_accessed_dirty();
            self.free_retired();
        }
        Ok(())
    }

    fn free_retired(&mut self) {
        for frame in core::mem::take(&mut self.retired) {
            // SAFETY: a retired frame was allocated by this table as one frame, has been unlinked,
            // and the invalidation that could still reach it has just been carried out.
            unsafe { self.alloc.deallocate_frames(frame, 1) };
            self.frames -= 1;
        }
    }

    /// A text map of the table: runs of leaves with their sizes, addresses and rights.
    pub fn dump(&self) -> TableDump<'_, F, A> {
        TableDump::new(self)
    }

    fn free_subtree(&mut self, table: HostPhysAddr, level: usize) {
        if level == 0 {
            return;
        }
        for i in 0..F::entries(level) {
            if let Pte::Table(next) = F::decode(self.entry(table, i).load(Ordering::Relaxed), level) {
                self.free_subtree(next, level - 1);
                // SAFETY: `next` is a table frame this table allocated as one frame; the table is
                // being dropped, so no CPU may use it any more (the owner's duty, see Drop).
                unsafe { self.alloc.deallocate_frames(next, 1) };
                self.frames -= 1;
            }
        }
    }
}

impl<F: Format, A: FrameAllocator> Drop for PageTable<F, A> {
    /// Frees every table frame. The owner must have stopped every CPU from using the table
    /// (unloaded the EPTP / hgatp and invalidated) before dropping it.
    fn drop(&mut self) {
        self.folds.clear();
        self.free_retired();
        self.free_subtree(self.root, F::LEVELS - 1);
        // SAFETY: the root was allocated as ROOT_FRAMES frames in `new`.
        unsafe { self.alloc.deallocate_frames(self.root, F::ROOT_FRAMES) };
        self.frames -= F::ROOT_FRAMES;
        debug_assert_eq!(self.frames, 0, "table frame accounting is off");
    }
}

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

/// The indices of the entries of a table at `level` whose first address is `base` that overlap
/// `[start, end)` (which must overlap the table).
#[inline]
pub(crate) fn covered<F: Format>(level: usize, base: u64, start: u64, end: u64) -> core::ops::Range<usize> {
    let span = level_size(level);
    let first = ((start.max(base) - base) / span) as usize;
    let last = (end - base).div_ceil(span).min(F::entries(level) as u64) as usize;
    first..last
}

pub(crate) fn leaf_at(gpa: GuestPhysAddr, level: usize, l: &LeafBits) -> Leaf {
    Leaf {
        gpa,
        hpa: l.hpa,
        size: PageSize::from_level(level).expect("leaves sit at levels 0..=3"),
        flags: l.flags,
        accessed: l.accessed,
        dirty: l.dirty,
    }
}

/// The flags as the table will store them (memory-type flags dropped where not encoded).
pub(crate) fn stored_flags<F: Format>(flags: MappingFlags) -> MappingFlags {
    let mut f = flags.rights();
    if F::ENCODES_MEMORY_TYPE {
        f |= flags & (MappingFlags::DEVICE | MappingFlags::UNCACHED);
        if f.contains(MappingFlags::DEVICE) {
            f.remove(MappingFlags::UNCACHED);
        }
    }
    f
}

/// A table frame above MAXPHYADDR breaks the [`FrameAllocator`] contract: the hardware would
/// fail the walk with a misconfiguration. It is a bug in the allocator, not a condition to
/// recover from (and cheap to check: once per frame, outside every loop over entries).
#[track_caller]
fn check_frame(frame: HostPhysAddr, count: usize, max_phys_bits: u8) {
    let end = frame.as_u64() + (count * FRAME_SIZE) as u64;
    assert!(
        end <= 1u64 << max_phys_bits,
        "FrameAllocator contract broken: frame {frame:?} lies beyond MAXPHYADDR ({max_phys_bits} bits)"
    );
}

pub(crate) fn check_range<F: Format>(gpa: GuestPhysAddr, len: u64, align: u64) -> Result<(), RangeProblem> {
    if len == 0 {
        return Err(RangeProblem::Empty);
    }
    if !gpa.is_aligned(align) || !len.is_multiple_of(align) {
        return Err(RangeProblem::Unaligned);
    }
    match gpa.as_u64().checked_add(len) {
        Some(end) if end <= 1u64 << F::GPA_BITS => Ok(()),
        _ => Err(RangeProblem::OutOfRange),
    }
}

struct CloneCtx<'c, F: Format> {
    ranges: &'c [(GpaRange, MappingFlags)],
    hint: usize,
    flush: &'c mut Flush<F>,
    f: &'c mut dyn FnMut(&Leaf),
    /// Frames for the copy's tables, allocated before anything was copied.
    pool: &'c mut Vec<HostPhysAddr>,
}

impl<F: Format> CloneCtx<'_, F> {
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
