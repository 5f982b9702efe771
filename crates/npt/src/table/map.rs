//! Mapping: page by page from the largest size that fits, with a cursor that keeps the last
//! table, and 4 KiB runs written straight into a leaf table's slice of entries.

use super::walker::Stop;
use super::{check_range, stored_flags, MapError, MapSize, PageTable, Plan, RangeProblem};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PageSize};
use crate::flags::MappingFlags;
use crate::flush::Flush;
use crate::format::{level_size, Format, LeafBits};
use crate::frame::FrameAllocator;
use core::sync::atomic::Ordering;

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

        // One 4 KiB page whose last-level table exists (a demand fault's common case): one
        // descent, no dry run, no frame to set aside. Anything else takes the general way.
        if len == PageSize::Size4K.bytes() && matches!(size, MapSize::Largest | MapSize::Exactly(PageSize::Size4K)) {
            match self.table_at(gpa.as_u64(), 0) {
                Ok(table) => {
                    let entry = self.entry(table, F::index(gpa.as_u64(), 0));
                    if F::present(entry.load(Ordering::Acquire)) {
                        return Err(MapError::AlreadyMapped { gpa });
                    }
                    let (accessed, dirty) = F::initial_ad(flags, self.opts.ad);
                    let leaf = LeafBits { hpa, flags, accessed, dirty };
                    entry.store(F::encode_leaf(&leaf, 0), Ordering::Release);
                    let mut flush = Flush::new(self.root);
                    flush.note_leaf(gpa, false);
                    return Ok(flush);
                }
                Err(Stop::Leaf { .. }) => return Err(MapError::AlreadyMapped { gpa }),
                Err(Stop::Empty) => {}
            }
        }

        let mut dry = Plan::Dry { needed: 0, virt: [None; 6] };
        self.map_pages(gpa, hpa, len, flags, size, &mut dry)?;
        let Plan::Dry { needed, .. } = dry else { unreachable!() };
        let mut pool = self.fill_pool(needed).map_err(MapError::OutOfFrames)?;
        let mut flush = Flush::new(self.root);
        let done = self.map_pages(gpa, hpa, len, flags, size, &mut Plan::Real { pool: &mut pool, flush: &mut flush });
        debug_assert!(done.is_ok() && pool.is_empty(), "the dry run and the real run disagree");
        Ok(flush)
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
}
