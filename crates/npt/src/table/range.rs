//! Range changes (unmap, protect) as visitors of the range walker, and the leaf rewrites they
//! share with remap and split.

use super::walker::{At, Next, Visitor};
use super::{check_range, stored_flags, PageTable, Plan, RangeError};
use super::{AdMode, RemapError, SplitError};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PageSize};
use crate::flags::MappingFlags;
use crate::flush::Flush;
use crate::format::{level_size, Format, LeafBits, Pte};
use crate::frame::FrameAllocator;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

/// What a range change does to each leaf wholly inside the range.
#[derive(Clone, Copy)]
enum Op {
    Unmap,
    Protect(MappingFlags),
}

/// Whether `new` keeps `old`'s frame, memory type and A/D bits and only adds rights: a hart that
/// cached `old` can only fault where `new` allows more (G-stage: [`crate::GvmaInvalidation::Local`]).
fn only_widens(old: &LeafBits, new: &LeafBits) -> bool {
    let other = |f: MappingFlags| f.difference(MappingFlags::RWX);
    new.hpa == old.hpa
        && new.flags.rights().contains(old.flags.rights())
        && other(new.flags) == other(old.flags)
        && (new.accessed || !old.accessed)
        && (new.dirty || !old.dirty)
}

/// The visitor of unmap and protect: a dry run counts the frames that splitting huge pages at the
/// edges takes; the real run splits them (from the pool), rewrites the leaves inside the range
/// and, for unmap, unlinks the tables it leaves empty (retired into `retired` until the flush).
struct Change<'p, F: Format> {
    op: Op,
    plan: Plan<'p, F>,
    retired: &'p mut Vec<HostPhysAddr>,
}

impl<F: Format, A: FrameAllocator> Visitor<F, A> for Change<'_, F> {
    #[inline(always)]
    fn leaf(&mut self, pt: &PageTable<F, A>, at: &At<'_>, raw: u64) -> Next {
        if at.whole() {
            if let Plan::Real { flush, .. } = &mut self.plan {
                let mut widened = false;
                let new = match (self.op, F::decode(raw, at.level)) {
                    (Op::Unmap, _) => 0,
                    (Op::Protect(flags), Pte::Leaf(leaf)) => {
                        let bits = pt.preset_ad(LeafBits { flags, ..leaf });
                        widened = only_widens(&leaf, &bits);
                        F::encode_leaf(&bits, at.level)
                    }
                    (Op::Protect(_), _) => raw,
                };
                if new != raw {
                    pt.store_leaf(at.table, at.idx, raw, new);
                    if widened {
                        flush.note_leaf_widened(at.gpa());
                    } else {
                        flush.note_leaf(at.gpa(), true);
                    }
                }
            }
            return Next::Skip;
        }
        // A huge leaf across an edge of the range: split it and walk the part inside.
        match &mut self.plan {
            Plan::Dry { needed, .. } => {
                *needed += split_tables(at.level, at.base, at.start, at.end);
                Next::Skip
            }
            Plan::Real { pool, flush } => {
                let Pte::Leaf(leaf) = F::decode(raw, at.level) else { unreachable!("the walker met a leaf") };
                Next::Descend(pt.split_leaf(at.table, at.idx, at.level, &leaf, pool, flush))
            }
        }
    }

    #[inline(always)]
    fn table(&mut self, pt: &PageTable<F, A>, at: &At<'_>, child: HostPhysAddr) -> Next {
        if !at.whole() {
            return Next::Descend(child);
        }
        match (self.op, &mut self.plan) {
            // A whole table inside the range: unlink it with one store, retire its subtree.
            (Op::Unmap, Plan::Real { flush, .. }) => {
                at.entry.store(0, Ordering::Release);
                pt.release_below(child, at.level - 1, at.base, |t| self.retired.push(t));
                self.retired.push(child);
                flush.note_nonleaf();
                Next::Skip
            }
            // A table wholly inside the range holds no leaf that straddles an edge: the dry run
            // (which only counts split frames) has nothing to find there.
            (_, Plan::Dry { .. }) => Next::Skip,
            (Op::Protect(_), Plan::Real { .. }) => Next::Descend(child),
        }
    }

    #[inline(always)]
    fn leave(&mut self, pt: &PageTable<F, A>, at: &At<'_>, child: HostPhysAddr) {
        // Unmap unlinks the tables it leaves with no valid entry.
        if let (Op::Unmap, Plan::Real { flush, .. }) = (self.op, &mut self.plan) {
            if (0..F::entries(at.level - 1)).all(|j| pt.entry(child, j).load(Ordering::Relaxed) == 0) {
                at.entry.store(0, Ordering::Release);
                self.retired.push(child);
                flush.note_nonleaf();
            }
        }
    }
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
        let mut dry = Change { op, plan: Plan::Dry { needed: 0, virt: [None; 6] }, retired: &mut Vec::new() };
        self.walk(start, end, &mut dry);
        let Plan::Dry { needed, .. } = dry.plan else { unreachable!() };
        let mut pool = self.fill_pool(needed).map_err(RangeError::OutOfFrames)?;
        let mut flush = Flush::new(self.root);
        // The walk reads the table while the visitor retires into the list, taken out meanwhile.
        let mut retired = core::mem::take(&mut self.retired);
        let plan = Plan::Real { pool: &mut pool, flush: &mut flush };
        self.walk(start, end, &mut Change { op, plan, retired: &mut retired });
        self.retired = retired;
        debug_assert!(pool.is_empty(), "split frames were miscounted");
        Ok(flush)
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
        &self,
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
    pub(super) fn slot_of(&self, va: u64, level: usize) -> (HostPhysAddr, usize) {
        match self.table_at(va, level) {
            Ok(table) => (table, F::index(va, level)),
            Err(_) => unreachable!("slot_of follows a path that query found"),
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
