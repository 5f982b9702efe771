//! Accessed and dirty bits: the harvest (a visitor of the range walker), software A/D updates,
//! and collapse, which folds the bits of the leaves it replaces.

use super::walker::{At, Next, Visitor};
use super::{leaf_at, AdError, AdMode, CollapseError, Leaf, NotCollapsible, PageTable};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PageSize};
use crate::flags::Access;
use crate::flush::Flush;
use crate::format::{level_size, Format, LeafBits, Pte};
use crate::frame::FrameAllocator;
use core::sync::atomic::Ordering;

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

/// The visitor of an accessed/dirty harvest: the bits to clear, the flush the clearing needs,
/// and where the leaves are reported.
struct Harvest<'w, F: Format, G> {
    mask: u64,
    flush: &'w mut Flush<F>,
    f: G,
}

impl<F: Format, A: FrameAllocator, G: FnMut(&Leaf)> Visitor<F, A> for Harvest<'_, F, G> {
    /// Leaf tables dominate: a mask test passes over clean and empty entries without decoding.
    #[inline(always)]
    fn skip(&self, raw: u64, level: usize) -> bool {
        raw & (F::ACCESSED | F::DIRTY) == 0 && (level == 0 || !F::present(raw) || F::is_leaf(raw, level))
    }

    #[inline(always)]
    fn leaf_interest(&self) -> Option<u64> {
        // A last-level entry with neither bit is skipped by `skip` above.
        Some(F::ACCESSED | F::DIRTY)
    }

    #[inline(always)]
    fn leaf(&mut self, _: &PageTable<F, A>, at: &At<'_>, raw: u64) -> Next {
        match F::decode(raw, at.level) {
            Pte::Leaf(l) if l.accessed || l.dirty => {
                let old = if self.mask != 0 {
                    at.entry.fetch_and(!self.mask, Ordering::AcqRel)
                } else {
                    at.entry.load(Ordering::Acquire)
                };
                if let Pte::Leaf(l) = F::decode(old, at.level) {
                    (self.f)(&leaf_at(at.gpa(), at.level, &l));
                }
                if old & self.mask != 0 {
                    // A cached translation still says "dirty": the CPU would not set D again.
                    self.flush.note_leaf(at.gpa(), true);
                }
            }
            _ => {}
        }
        Next::Skip
    }
}

impl<F: Format, A: FrameAllocator> PageTable<F, A> {
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
        f: impl FnMut(&Leaf),
    ) -> Flush<F> {
        let mask = match clear {
            AdClear::None => 0,
            AdClear::Accessed => F::ACCESSED,
            AdClear::Dirty => F::DIRTY,
            AdClear::Both => F::ACCESSED | F::DIRTY,
        };
        let mut flush = Flush::new(self.root);
        let end = gpa.as_u64().saturating_add(len).min(1 << F::GPA_BITS);
        self.walk(gpa.as_u64(), end, &mut Harvest { mask, flush: &mut flush, f });
        flush
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
    /// non-leaf change, fence with rs1 = x0). Only on the faulting hart
    /// ([`crate::GvmaInvalidation::Local`]): nothing changed for the others.
    pub fn stale_fault_flush(&self, gpa: GuestPhysAddr) -> Flush<F> {
        let _ = gpa;
        let mut f = Flush::new(self.root);
        f.note_stale();
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
            flush.note_leaf_widened(leaf.gpa);
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
