//! The generic nested page-table engine: one implementation for every [`Format`].

mod ad;
mod clone;
mod dump;
mod error;
mod map;
mod range;
mod walker;

pub use ad::AdClear;
pub use dump::TableDump;
pub use error::*;

use crate::addr::{GpaRange, GuestPhysAddr, HostPhysAddr, PageSize};
use crate::flags::MappingFlags;
use crate::flush::{Flush, ForeignFlush, InvalidationOf};
use crate::format::{Format, LeafBits};
use crate::frame::{FrameAllocator, FRAME_SIZE};
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::sync::atomic::AtomicU64;

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
    folds: Vec<ad::Fold>,
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

    /// Whether `hpa..hpa+len` lies below MAXPHYADDR.
    pub(crate) fn check_host(&self, hpa: HostPhysAddr, len: u64) -> Result<(), BeyondMaxPhys> {
        let limit = 1u64 << self.opts.max_phys_bits;
        if hpa.as_u64() >= limit || limit - hpa.as_u64() < len {
            let first = HostPhysAddr::new_truncate(hpa.as_u64().max(limit));
            return Err(BeyondMaxPhys { hpa: first, max_phys_bits: self.opts.max_phys_bits });
        }
        Ok(())
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
}

impl<F: Format, A: FrameAllocator> Drop for PageTable<F, A> {
    /// Frees every table frame. The owner must have stopped every CPU from using the table
    /// (unloaded the EPTP / hgatp and invalidated) before dropping it.
    fn drop(&mut self) {
        self.folds.clear();
        self.free_retired();
        let (alloc, mut freed) = (&self.alloc, 0);
        self.release_below(self.root, F::LEVELS - 1, 0, |table| {
            // SAFETY: `table` is a table frame this table allocated as one frame; the table is
            // being dropped, so no CPU may use it any more (the owner's duty, see above).
            unsafe { alloc.deallocate_frames(table, 1) };
            freed += 1;
        });
        self.frames -= freed;
        // SAFETY: the root was allocated as ROOT_FRAMES frames in `new`.
        unsafe { self.alloc.deallocate_frames(self.root, F::ROOT_FRAMES) };
        self.frames -= F::ROOT_FRAMES;
        debug_assert_eq!(self.frames, 0, "table frame accounting is off");
    }
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
