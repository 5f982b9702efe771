//! Range operations: unmap, protect, split, collapse, and accessed/dirty bits.

use super::{check_range, covered, leaf_at, stored_flags, Leaf, PageTable, Plan, RangeError};
use super::{AdError, AdMode, CollapseError, NotCollapsible, RemapError, SplitError};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PageSize};
use crate::flags::{Access, MappingFlags};
use crate::flush::{Family, FamilyKind, Flush};
use crate::format::{level_size, Format, LeafBits, Pte};
use crate::frame::FrameAllocator;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

/// What a range walk does to each leaf wholly inside the range.
#[derive(Clone, Copy)]
enum Op {
    Unmap,
    Protect(MappingFlags),
}

/// A range walk: what to do to `[start, end)`, and where its frames come from. (Children see the
/// same bounds: each level clamps them to the entries it covers.)
struct RangeWalk<'p, F: Format> {
    start: u64,
    end: u64,
    op: Op,
    plan: Plan<'p, F>,
}

/// An accessed/dirty walk over `[start, end)`: the bits to clear, the flush the clearing needs,
/// and where the leaves are reported.
struct AdWalk<'w, F: Format> {
    start: u64,
    end: u64,
    mask: u64,
    flush: &'w mut Flush<F>,
    f: &'w mut dyn FnMut(&Leaf),
}

/// Which accessed/dirty bits `take_accessed_dirty` clears in the leaves it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdClear {
    /// Clear nothing (just look).
    None,
    /// Clear the accessed bit (reclaim scans).
    Accessed,
    /// Clear the dirty bit (dirty logging).
    Dirty,
    /// Clear both.
    Both,
}

impl<F: Format, A: FrameAllocator> PageTable<F, A> {
    /// Unmaps every page in `gpa..gpa+len` (4 KiB-aligned). Holes are fine. A huge page that
    /// straddles an edge is split first; tables left empty are unlinked and retired.
    pub fn unmap(&mut self, gpa: GuestPhysAddr, len: u64) -> Result<Flush<F>, RangeError> {
        self.range_op(gpa, len, Op::Unmap)
    }

    /// Gives every page in `gpa..gpa+len` the rights and attributes `flags`, keeping A/D bits.
    /// Holes are skipped; huge pages straddling an edge are split first.
    pub fn protect(&mut self, gpa: GuestPhysAddr, len: u64, flags: MappingFlags) -> Result<Flush<F>, RangeError> {
        F::check_flags(flags, &self.opts).map_err(|reason| RangeError::BadFlags { flags, reason })?;
        self.range_op(gpa, len, Op::Protect(stored_flags::<F>(flags)))
    }

    fn range_op(&mut self, gpa: GuestPhysAddr, len: u64, op: Op) -> Result<Flush<F>, RangeError> {
        check_range::<F>(gpa, len, PageSize::Size4K.bytes()).map_err(|problem| RangeError::BadRange {
            gpa,
            len,
            problem,
        })?;
        let (start, end) = (gpa.as_u64(), gpa.as_u64() + len);
        let top = F::LEVELS - 1;
        let mut dry = RangeWalk { start, end, op, plan: Plan::Dry { needed: 0, virt: [None; 6] } };
        self.walk_range(self.root, top, 0, &mut dry);
        let Plan::Dry { needed, .. } = dry.plan else { unreachable!() };
        let mut pool = self.fill_pool(needed).map_err(RangeError::OutOfFrames)?;
        let mut flush = Flush::new(self.root);
        let plan = Plan::Real { pool: &mut pool, flush: &mut flush };
        self.walk_range(self.root, top, 0, &mut RangeWalk { start, end, op, plan });
        debug_assert!(pool.is_empty(), "split frames were miscounted");
        Ok(flush)
    }

    /// Applies `w.op` to `[w.start, w.end)` within the table at `table` (level `level`, first
    /// address `base`). Returns whether the table is left with no valid entry.
    fn walk_range(&mut self, table: HostPhysAddr, level: usize, base: u64, w: &mut RangeWalk<'_, F>) -> bool {
        let (start, end, op) = (w.start, w.end, w.op);
        let span = level_size(level);
        for i in covered::<F>(level, base, start, end) {
            let b = base + i as u64 * span;
            let (s, e) = (start.max(b), end.min(b + span));
            let raw = self.entry(table, i).load(Ordering::Acquire);
            match F::decode(raw, level) {
                Pte::Invalid => {}
                Pte::Leaf(leaf) if s == b && e == b + span => {
                    if let Plan::Real { flush, .. } = &mut w.plan {
                        let new = match op {
                            Op::Unmap => 0,
                            Op::Protect(flags) => F::encode_leaf(&self.preset_ad(LeafBits { flags, ..leaf }), level),
                        };
                        if new != raw {
                            self.store_leaf(table, i, raw, new);
                            flush.note_leaf(GuestPhysAddr::new(b), true);
                        }
                    }
                }
                Pte::Leaf(leaf) => {
                    let child = match &mut w.plan {
                        Plan::Dry { needed, .. } => {
                            *needed += split_tables(level, b, s, e);
                            None
                        }
                        Plan::Real { pool, flush } => Some(self.split_leaf(table, i, level, &leaf, pool, flush)),
                    };
                    if let Some(child) = child {
                        self.walk_range(child, level - 1, b, w);
                    }
                }
                // A whole table inside the range: unlink it with one store, retire its subtree.
                Pte::Table(child) if matches!(op, Op::Unmap) && s == b && e == b + span => {
                    if let Plan::Real { flush, .. } = &mut w.plan {
                        self.entry(table, i).store(0, Ordering::Release);
                        self.retire_subtree(child, level - 1);
                        flush.note_nonleaf();
                    }
                }
                // A table wholly inside the range holds no leaf that straddles an edge: the dry
                // run (which only counts split frames) has nothing to find there.
                Pte::Table(_) if matches!(w.plan, Plan::Dry { .. }) && s == b && e == b + span => {}
                Pte::Table(child) => {
                    let empty = self.walk_range(child, level - 1, b, w);
                    if let (Op::Unmap, true, Plan::Real { flush, .. }) = (op, empty, &mut w.plan) {
                        self.entry(table, i).store(0, Ordering::Release);
                        self.retire(child);
                        flush.note_nonleaf();
                    }
                }
            }
        }
        matches!(op, Op::Unmap)
            && matches!(w.plan, Plan::Real { .. })
            && (0..F::entries(level)).all(|j| self.entry(table, j).load(Ordering::Relaxed) == 0)
    }

    /// Under [`AdMode::Preset`] a leaf keeps A set, and D set whenever it is writable, also when a
    /// change makes it writable (otherwise RISC-V hardware without A/D updating would fault on
    /// every store, with nobody to set the bit).
    pub(crate) fn preset_ad(&self, leaf: LeafBits) -> LeafBits {
        match self.opts.ad {
            AdMode::Preset => {
                LeafBits { accessed: true, dirty: leaf.dirty || leaf.flags.contains(MappingFlags::WRITE), ..leaf }
            }
            AdMode::Hardware | AdMode::Software => leaf,
        }
    }

    /// Retires `table` (at `level`) and every table below it.
    fn retire_subtree(&mut self, table: HostPhysAddr, level: usize) {
        if level > 0 {
            for j in 0..F::entries(level) {
                let raw = self.entry(table, j).load(Ordering::Relaxed);
                if F::present(raw) && !F::is_leaf(raw, level) {
                    self.retire_subtree(F::address(raw), level - 1);
                }
            }
        }
        self.retire(table);
    }

    /// Replaces a leaf entry, keeping A/D bits the hardware may have set since it was read.
    pub(crate) fn store_leaf(&self, table: HostPhysAddr, idx: usize, old: u64, new: u64) {
        let entry = self.entry(table, idx);
        if new == 0 {
            entry.store(0, Ordering::Release);
            return;
        }
        let ad = F::ACCESSED | F::DIRTY;
        let mut cur = old;
        loop {
            let want = new | (cur & ad);
            match entry.compare_exchange(cur, want, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                // Only the hardware changes an entry behind our back, and only its A/D bits.
                Err(now) => cur = now,
            }
        }
    }

    /// Replaces the leaf at `table[idx]` (level `level`) by a table of 512 leaves one
    /// level down that map the same memory with the same bits. Returns the new table.
    fn split_leaf(
        &mut self,
        table: HostPhysAddr,
        idx: usize,
        level: usize,
        leaf: &LeafBits,
        pool: &mut Vec<HostPhysAddr>,
        flush: &mut Flush<F>,
    ) -> HostPhysAddr {
        let child = self.new_table(pool);
        let entry = self.entry(table, idx);
        // The hardware may set A/D in the huge leaf at any moment until the table pointer
        // replaces it, with a locked read-modify-write (Intel SDM Vol. 3C §29.3.5; RISC-V
        // Privileged spec, "Virtual Address Translation Process": the A/D update is atomic with
        // the check of the PTE). So the pointer goes in with a compare-exchange over the exact leaf
        // value the children were built from: if the bits changed meanwhile the exchange fails and
        // the children are rebuilt from the new value. Once the pointer is in, a walk reaches the
        // children and sets the bits there. Nothing but the hardware changes the entry (we hold
        // `&mut self`), and only its A/D bits.
        let mut cur = entry.load(Ordering::Acquire);
        loop {
            let now = match F::decode(cur, level) {
                Pte::Leaf(l) => l,
                _ => *leaf,
            };
            let sub = level_size(level - 1);
            for j in 0..512u64 {
                let l = LeafBits { hpa: now.hpa + j * sub, ..now };
                self.entry(child, j as usize).store(F::encode_leaf(&l, level - 1), Ordering::Relaxed);
            }
            // Release: the children are visible before the pointer to them.
            match entry.compare_exchange(cur, F::encode_table(child), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
        // A leaf became a pointer to a table: a non-leaf change. EPT: the huge leaf may be cached
        // (INVEPT, as for any change of a present entry). G-stage: a fence by address covers leaf
        // entries only (RISC-V Privileged spec, "Supervisor Memory-Management Fence Instruction"
        // commentary: after modifying a non-leaf PTE, use rs1 = x0): fence the whole VMID.
        flush.note_nonleaf();
        child
    }

    /// Points the leaf whose base is `gpa` at `hpa` with `flags`, in place: same size, A/D bits
    /// kept, nothing allocated, so it cannot fail half way (copy-on-write breaking swaps a frame
    /// this way). `hpa` must be aligned to the leaf's size.
    pub fn remap(
        &mut self,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        flags: MappingFlags,
    ) -> Result<Flush<F>, RemapError> {
        F::check_flags(flags, &self.opts).map_err(|reason| RemapError::BadFlags { flags, reason })?;
        let leaf = self.query(gpa).ok_or(RemapError::NotMapped(gpa))?;
        if leaf.gpa != gpa {
            return Err(RemapError::NotLeafBase { gpa, size: leaf.size });
        }
        if !hpa.is_aligned(leaf.size.bytes()) {
            return Err(RemapError::Unaligned { hpa, size: leaf.size });
        }
        self.check_host(hpa, leaf.size.bytes())?;
        let level = leaf.size.level();
        let (table, idx) = self.slot_of(gpa.as_u64(), level);
        let raw = self.entry(table, idx).load(Ordering::Acquire);
        let bits = self.preset_ad(LeafBits {
            hpa,
            flags: stored_flags::<F>(flags),
            accessed: leaf.accessed,
            dirty: leaf.dirty,
        });
        let new = F::encode_leaf(&bits, level);
        let mut flush = Flush::new(self.root);
        if new != raw {
            self.store_leaf(table, idx, raw, new);
            flush.note_leaf(gpa, true);
        }
        Ok(flush)
    }

    /// Splits the huge page that maps `gpa` into pages one level smaller.
    pub fn split(&mut self, gpa: GuestPhysAddr) -> Result<Flush<F>, SplitError> {
        let leaf = self.query(gpa).ok_or(SplitError::NotMapped(gpa))?;
        let level = leaf.size.level();
        if level == 0 {
            return Err(SplitError::AlreadySmallest(gpa));
        }
        let smaller = PageSize::from_level(level - 1).expect("level >= 1");
        if !self.opts.leaf_sizes.contains(smaller) {
            return Err(SplitError::UnsupportedPageSize(smaller));
        }
        let (table, idx) = self.slot_of(leaf.gpa.as_u64(), level);
        let mut pool = self.fill_pool(1).map_err(SplitError::OutOfFrames)?;
        let mut flush = Flush::new(self.root);
        let bits = LeafBits { hpa: leaf.hpa, flags: leaf.flags, accessed: leaf.accessed, dirty: leaf.dirty };
        self.split_leaf(table, idx, level, &bits, &mut pool, &mut flush);
        Ok(flush)
    }

    /// The table and index holding the entry at `level` for `va` (the path must exist).
    fn slot_of(&self, va: u64, level: usize) -> (HostPhysAddr, usize) {
        match self.table_at(va, level) {
            Ok(table) => (table, F::index(va, level)),
            Err(_) => unreachable!("slot_of follows a path that query found"),
        }
    }

    /// Replaces the table under the `size`-sized entry covering `gpa` by one `size` leaf, when all
    /// its entries are leaves with the same flags mapping contiguous host memory from a
    /// `size`-aligned base. A/D bits are the OR of the leaves'. The table frame is retired.
    pub fn collapse(&mut self, gpa: GuestPhysAddr, size: PageSize) -> Result<Flush<F>, CollapseError> {
        let level = size.level();
        if level == 0 || !self.opts.leaf_sizes.contains(size) {
            return Err(CollapseError::UnsupportedPageSize(size));
        }
        if gpa.as_u64() >> F::GPA_BITS != 0 {
            return Err(CollapseError::OutOfRange(gpa));
        }
        let base = gpa.align_down(size.bytes());
        let not = |reason| CollapseError::NotCollapsible { gpa: base, reason };
        let table = self.table_at(base.as_u64(), level).map_err(|_| not(NotCollapsible::NotATable))?;
        let idx = F::index(base.as_u64(), level);
        let pointer = self.entry(table, idx).load(Ordering::Acquire);
        let Pte::Table(child) = F::decode(pointer, level) else {
            return Err(not(NotCollapsible::NotATable));
        };
        let sub = level_size(level - 1);
        let mut first: Option<LeafBits> = None;
        for j in 0..512u64 {
            let Pte::Leaf(l) = F::decode(self.entry(child, j as usize).load(Ordering::Acquire), level - 1) else {
                return Err(not(NotCollapsible::NotAllLeaves));
            };
            let f = *first.get_or_insert(l);
            if !f.hpa.is_aligned(size.bytes()) || l.hpa.as_u64() != f.hpa.as_u64() + j * sub {
                return Err(not(NotCollapsible::NotContiguous));
            }
            if l.flags != f.flags {
                return Err(not(NotCollapsible::MixedFlags));
            }
        }
        let f = first.expect("512 leaves were read");
        // The collapse cannot fail from here on. With hardware-managed bits, a walk that began
        // before the new leaf is in (or a paging-structure cache that still points at the old
        // table) may set A/D in the children until the invalidation has run: the hardware sets
        // them with locked read-modify-writes (Intel SDM Vol. 3C §29.3.5; RISC-V Privileged spec,
        // "Virtual Address Translation Process"). So each child's bits are *taken* with
        // `fetch_and` (read and cleared in one atomic step: none set before it is missed, none
        // is counted twice), and what the children gain after that is folded into the leaf that
        // maps them once the flush has run (`fold_late_accessed_dirty`), when no walk can reach
        // them any more. A write is thus reported by the next harvest at the latest, never lost.
        // Clearing the bits of a live child is harmless: a CPU holding a translation with D set
        // keeps writing without setting it again, and that D is already in the new leaf.
        let ad = F::ACCESSED | F::DIRTY;
        let hardware = self.opts.ad == AdMode::Hardware;
        let mut bits = 0;
        for j in 0..512 {
            let e = self.entry(child, j);
            bits |= if hardware { e.fetch_and(!ad, Ordering::AcqRel) } else { e.load(Ordering::Acquire) } & ad;
        }
        let leaf = LeafBits { accessed: bits & F::ACCESSED != 0, dirty: bits & F::DIRTY != 0, ..f };
        let new = F::encode_leaf(&leaf, level);
        let entry = self.entry(table, idx);
        let mut cur = pointer;
        // The EPT hardware may set the accessed flag of the non-leaf entry meanwhile (§29.3.5);
        // nothing else changes it.
        while let Err(seen) = entry.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
            cur = seen;
        }
        self.retire(child);
        if hardware {
            self.folds.push(Fold { table: child, level: level - 1, gpa: base.as_u64() });
        }
        let mut flush = Flush::new(self.root);
        flush.note_nonleaf();
        Ok(flush)
    }

    /// Reports every leaf overlapping `gpa..gpa+len` whose accessed or dirty bit is set (as it
    /// was before clearing) and clears the bits `clear` names in it, atomically against the
    /// hardware setting them. A huge leaf straddling the range is reported and cleared whole:
    /// split such pages first to track at 4 KiB.
    pub fn take_accessed_dirty(
        &mut self,
        gpa: GuestPhysAddr,
        len: u64,
        clear: AdClear,
        mut f: impl FnMut(&Leaf),
    ) -> Flush<F> {
        let mask = match clear {
            AdClear::None => 0,
            AdClear::Accessed => F::ACCESSED,
            AdClear::Dirty => F::DIRTY,
            AdClear::Both => F::ACCESSED | F::DIRTY,
        };
        let mut flush = Flush::new(self.root);
        let end = gpa.as_u64().saturating_add(len).min(1 << F::GPA_BITS);
        let mut w = AdWalk { start: gpa.as_u64(), end, mask, flush: &mut flush, f: &mut f };
        self.ad_walk(self.root, F::LEVELS - 1, 0, &mut w);
        flush
    }

    fn ad_walk(&self, table: HostPhysAddr, level: usize, base: u64, w: &mut AdWalk<'_, F>) {
        let (start, end, mask) = (w.start, w.end, w.mask);
        let span = level_size(level);
        for i in covered::<F>(level, base, start, end) {
            let b = base + i as u64 * span;
            let entry = self.entry(table, i);
            let raw = entry.load(Ordering::Acquire);
            // Leaf tables dominate: a mask test skips clean and empty entries without decoding.
            if raw & (F::ACCESSED | F::DIRTY) == 0 && (level == 0 || !F::present(raw) || F::is_leaf(raw, level)) {
                continue;
            }
            match F::decode(raw, level) {
                Pte::Invalid => {}
                Pte::Table(next) => self.ad_walk(next, level - 1, b, w),
                Pte::Leaf(l) if l.accessed || l.dirty => {
                    let old = if mask != 0 {
                        entry.fetch_and(!mask, Ordering::AcqRel)
                    } else {
                        entry.load(Ordering::Acquire)
                    };
                    if let Pte::Leaf(l) = F::decode(old, level) {
                        (w.f)(&leaf_at(GuestPhysAddr::new(b), level, &l));
                    }
                    if old & mask != 0 {
                        // A cached translation still says "dirty": the CPU would not set D again.
                        w.flush.note_leaf(GuestPhysAddr::new(b), true);
                    }
                }
                Pte::Leaf(_) => {}
            }
        }
    }

    /// The invalidation owed after a nested page fault at `gpa` whose leaf already allows the
    /// access: the faulting CPU used a stale cached entry.
    ///
    /// EPT: nothing; the EPT violation itself invalidated the mappings used for the faulting
    /// address (Intel SDM Vol. 3C 29.4.3.1, "Operations that invalidate cached mappings").
    /// G-stage: a guest-page fault invalidates nothing, so the hart would fault again forever on
    /// the same cached entry; the token asks for HFENCE.GVMA for the whole VMID, because the stale
    /// entry may be a cached invalid non-leaf entry, which a by-address fence need not remove
    /// (RISC-V Privileged spec, "Supervisor Memory-Management Fence Instruction": after a
    /// non-leaf change, fence with rs1 = x0).
    pub fn stale_fault_flush(&self, gpa: GuestPhysAddr) -> Flush<F> {
        let _ = gpa;
        let mut f = Flush::new(self.root);
        if <F::Family as Family>::KIND == FamilyKind::GStage {
            f.note_nonleaf();
        }
        f
    }

    /// Sets the accessed bit (and dirty for a write) of the leaf mapping `gpa`: what the
    /// hypervisor does when a guest faults on a clear A/D bit under [`AdMode::Software`].
    pub fn set_accessed_dirty(&mut self, gpa: GuestPhysAddr, access: Access) -> Result<Flush<F>, AdError> {
        if self.opts.ad == AdMode::Preset {
            return Err(AdError::NotTracked);
        }
        let leaf = self.query(gpa).ok_or(AdError::NotMapped(gpa))?;
        let level = leaf.size.level();
        let (table, idx) = self.slot_of(leaf.gpa.as_u64(), level);
        let bits = if access == Access::Write { F::ACCESSED | F::DIRTY } else { F::ACCESSED };
        let old = self.entry(table, idx).fetch_or(bits, Ordering::AcqRel);
        let mut flush = Flush::new(self.root);
        if old & bits != bits {
            flush.note_leaf(leaf.gpa, true);
        }
        Ok(flush)
    }
}

/// A table unlinked by `collapse` whose leaves the hardware may still mark accessed or dirty
/// until the flush; their bits are then folded into the leaves that map the same addresses.
pub(crate) struct Fold {
    table: HostPhysAddr,
    /// Level of the leaves in `table`.
    level: usize,
    /// Guest-physical address of the first.
    gpa: u64,
}

impl<F: Format, A: FrameAllocator> PageTable<F, A> {
    /// Called by `flush` once the invalidation has run (so no walk reaches a retired table any
    /// more) and before retired frames are freed: ORs the A/D bits that the hardware set in the
    /// leaves of collapsed tables after `collapse` took them into the leaf mapping each address
    /// now. Over-reporting is harmless; a page remapped or unmapped since keeps or loses the bits
    /// as its change did.
    pub(crate) fn fold_late_accessed_dirty(&mut self) {
        let ad = F::ACCESSED | F::DIRTY;
        for fold in core::mem::take(&mut self.folds) {
            let span = level_size(fold.level);
            for j in 0..512 {
                let bits = self.entry(fold.table, j).load(Ordering::Acquire) & ad;
                if bits == 0 {
                    continue;
                }
                if let Some((entry, _, _)) = self.leaf_walk(GuestPhysAddr::new(fold.gpa + j as u64 * span)) {
                    entry.fetch_or(bits, Ordering::AcqRel);
                }
            }
        }
    }
}

/// Tables needed to split a `level` leaf at `b` so that `[s, e)` (partly inside it) is made of
/// whole leaves.
fn split_tables(level: usize, b: u64, s: u64, e: u64) -> usize {
    let sub = level_size(level - 1);
    let mut n = 1;
    let first = (s - b) / sub;
    let last = (e - 1 - b) / sub;
    let cs = b + first * sub;
    let ce = b + last * sub;
    if first == last {
        if s != cs || e != cs + sub {
            n += split_tables(level - 1, cs, s, e);
        }
    } else {
        if s != cs {
            n += split_tables(level - 1, cs, s, cs + sub);
        }
        if e != ce + sub {
            n += split_tables(level - 1, ce, ce, e);
        }
    }
    n
}
