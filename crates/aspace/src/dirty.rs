//! Dirty logging (hardware or software D bits, or write protection) and accessed-bit harvesting.
#![forbid(unsafe_code)]

use crate::error::{BitmapAllocError, DirtyLogError};
use crate::flush::SpaceFlush;
use crate::space::{AddressSpace, PAGE};
use alloc::vec;
use alloc::vec::Vec;
use twostage_npt::{AdClear, AdMode, Format, FrameAllocator, GpaRange, GuestPhysAddr, PageSize};
use twostage_npt::{Family, FamilyKind};

/// How a dirty log learns of writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// The table's D bits: set by the CPU (EPT with A/D, Svadu) or by the fault handler when a
    /// store faults on D=0 (RISC-V Svade, [`AdMode::Software`] on a G-stage table). Huge pages in the range are split to 4 KiB when the
    /// log starts, so a D bit names one page.
    DirtyBits,
    /// Every page in the range is write-protected; the first write to a page faults, is logged
    /// and gets the write right back until the next harvest re-protects it.
    WriteProtect,
}

/// One bit per 4 KiB page of a guest-physical range.
#[derive(Clone, PartialEq, Eq)]
pub struct PageBitmap {
    start: GuestPhysAddr,
    pages: u64,
    words: Vec<u64>,
}

impl PageBitmap {
    /// All clear, covering `range` (page-aligned).
    ///
    /// # Panics
    /// If the bitmap cannot be allocated (one bit per 4 KiB page); see [`PageBitmap::try_new`].
    pub fn new(range: GpaRange) -> Self {
        let pages = range.len() / PAGE;
        Self { start: range.start, pages, words: vec![0; pages.div_ceil(64) as usize] }
    }

    /// All clear, covering `range` (page-aligned), or the error if the bitmap (one bit per 4 KiB
    /// page: 32 KiB per GiB) cannot be allocated.
    pub fn try_new(range: GpaRange) -> Result<Self, BitmapAllocError> {
        let pages = range.len() / PAGE;
        // Past `usize` the reservation reports the capacity overflow itself.
        let n = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        let mut words = Vec::new();
        words.try_reserve_exact(n).map_err(|source| BitmapAllocError { range, source })?;
        words.resize(n, 0);
        Ok(Self { start: range.start, pages, words })
    }

    /// The range covered.
    pub fn range(&self) -> GpaRange {
        GpaRange { start: self.start, end: self.start + self.pages * PAGE }
    }

    fn index(&self, gpa: GuestPhysAddr) -> Option<usize> {
        let off = gpa.as_u64().checked_sub(self.start.as_u64())? / PAGE;
        (off < self.pages).then_some(off as usize)
    }

    /// Sets the bit of the page containing `gpa` (ignored outside the range).
    pub fn set(&mut self, gpa: GuestPhysAddr) {
        if let Some(i) = self.index(gpa) {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// Clears the bit of the page containing `gpa` (ignored outside the range).
    pub(crate) fn unset(&mut self, gpa: GuestPhysAddr) {
        if let Some(i) = self.index(gpa) {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Sets the bits of every page of `[start, start + len)` inside the range.
    pub fn set_range(&mut self, start: GuestPhysAddr, len: u64) {
        let r = self.range();
        let lo = start.max(r.start);
        let hi = start.checked_add(len).unwrap_or(r.end).min(r.end);
        let mut p = lo.align_down(PAGE);
        while p < hi {
            self.set(p);
            p = p + PAGE;
        }
    }

    /// Whether the page containing `gpa` is set.
    pub fn get(&self, gpa: GuestPhysAddr) -> bool {
        self.index(gpa).is_some_and(|i| self.words[i / 64] & (1 << (i % 64)) != 0)
    }

    /// Number of pages set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The pages set, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = GuestPhysAddr> + '_ {
        self.words.iter().enumerate().flat_map(move |(wi, &w)| {
            (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| self.start + ((wi * 64 + b) as u64) * PAGE)
        })
    }

    /// The raw words (bit `i` of word `w` is page `start + (64 w + i) * 4 KiB`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    #[cfg(test)]
    fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }
}

impl core::fmt::Debug for PageBitmap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PageBitmap({:?}, {} of {} set)", self.range(), self.count(), self.pages)
    }
}

/// A running dirty log.
pub(crate) struct DirtyLog {
    pub(crate) mode: DirtyMode,
    /// Pages known dirty without the table's word: write-protect faults and hypervisor writes.
    pub(crate) soft: PageBitmap,
}

impl DirtyLog {
    pub(crate) fn range(&self) -> GpaRange {
        self.soft.range()
    }
    pub(crate) fn write_protects(&self, gpa: GuestPhysAddr) -> bool {
        self.mode == DirtyMode::WriteProtect && self.range().contains(gpa)
    }
    pub(crate) fn is_dirty(&self, gpa: GuestPhysAddr) -> bool {
        self.soft.get(gpa)
    }
    pub(crate) fn mark(&mut self, gpa: GuestPhysAddr) {
        self.soft.set(gpa);
    }
}

impl<F: Format, A: FrameAllocator + Clone> AddressSpace<F, A> {
    /// The mode a dirty log would use on this table.
    pub fn dirty_mode(&self) -> DirtyMode {
        match self.opts.ad {
            // The CPU sets D (EPT with EPTP bit 6, RISC-V Svadu).
            AdMode::Hardware if F::DIRTY != 0 => DirtyMode::DirtyBits,
            // RISC-V without Svadu faults on a store to a leaf with D = 0 (Privileged §4.3.2 step
            // 7 as applied to G-stage), and the fault handler sets D: D bits still tell. EPT
            // without A/D enabled neither sets nor checks D, so there only write protection works.
            AdMode::Software if F::DIRTY != 0 && <F::Family as Family>::KIND == FamilyKind::GStage => {
                DirtyMode::DirtyBits
            }
            _ => DirtyMode::WriteProtect,
        }
    }

    /// The range being logged, if any.
    pub fn dirty_log_range(&self) -> Option<GpaRange> {
        self.dirty.as_ref().map(DirtyLog::range)
    }

    /// Starts logging writes to `range` (page-aligned). Pages written from now on are reported
    /// by [`AddressSpace::harvest_dirty`].
    ///
    /// The log keeps a bitmap of the range (32 KiB per GiB); if it cannot be allocated the
    /// result is [`DirtyLogError::Bitmap`] and nothing changes. If arming fails part way the log
    /// stays on (pages already armed need it to be disarmed on their next write; stop it with
    /// [`AddressSpace::stop_dirty_log`]) and the partial change's invalidation is left pending.
    pub fn start_dirty_log(&mut self, range: GpaRange) -> Result<(DirtyMode, SpaceFlush<F>), DirtyLogError> {
        if let Some(log) = &self.dirty {
            return Err(DirtyLogError::AlreadyLogging { range: log.range() });
        }
        if range.is_empty() || !range.start.is_aligned(PAGE) || !range.end.is_aligned(PAGE) {
            return Err(DirtyLogError::Misaligned { range });
        }
        let soft = PageBitmap::try_new(range)?;
        let mode = self.dirty_mode();
        self.dirty = Some(DirtyLog { mode, soft });
        let flush = self.arm_dirty_log(range)?;
        Ok((mode, flush))
    }

    /// Arms the running log on `range` (inside the log's range): splits huge pages and clears D
    /// bits, or write-protects. Also used when a region is added while a log runs. On failure
    /// the partial change is left pending.
    pub(crate) fn arm_dirty_log(&mut self, range: GpaRange) -> Result<SpaceFlush<F>, DirtyLogError> {
        let Some(mode) = self.dirty.as_ref().map(|l| l.mode) else {
            return Ok(SpaceFlush::none());
        };
        let mut flush = SpaceFlush::none();
        match mode {
            DirtyMode::DirtyBits => {
                if let Err(e) = self.split_to_4k(range, &mut flush) {
                    self.defer(flush);
                    return Err(e);
                }
                flush.add(self.table.edit().take_accessed_dirty(range.start, range.len(), AdClear::Dirty, |_| {}));
            }
            DirtyMode::WriteProtect => flush = flush.merge(self.reprotect(range)?),
        }
        Ok(flush)
    }

    /// Splits every huge leaf overlapping `range` down to 4 KiB leaves.
    fn split_to_4k(&mut self, range: GpaRange, flush: &mut SpaceFlush<F>) -> Result<(), DirtyLogError> {
        loop {
            let mut huge = Vec::new();
            self.table.for_each_leaf(range.start, range.len(), |leaf| {
                if leaf.size != PageSize::Size4K {
                    huge.push(leaf.gpa);
                }
            });
            if huge.is_empty() {
                return Ok(());
            }
            for gpa in huge {
                match self.table.edit().split(gpa) {
                    Ok(f) => flush.add(f),
                    Err(e) => return Err(DirtyLogError::Split(e)),
                }
            }
        }
    }

    /// Returns the pages written since the log started or since the last harvest, and re-arms
    /// the log (clears D bits or write-protects the pages again). If re-protecting fails part
    /// way, the partial change is left pending and the pages not re-protected are reported
    /// again by the next harvest.
    pub fn harvest_dirty(&mut self) -> Result<(PageBitmap, SpaceFlush<F>), DirtyLogError> {
        let Some(log) = self.dirty.as_mut() else {
            return Err(DirtyLogError::NotLogging);
        };
        let mut bits = PageBitmap::try_new(log.range())?;
        core::mem::swap(&mut bits, &mut log.soft);
        let (mode, range) = (log.mode, log.range());
        let mut flush = SpaceFlush::none();
        match mode {
            DirtyMode::DirtyBits => {
                flush.add(self.table.edit().take_accessed_dirty(range.start, range.len(), AdClear::Dirty, |leaf| {
                    if leaf.dirty {
                        bits.set_range(leaf.gpa, leaf.size.bytes());
                    }
                }));
            }
            DirtyMode::WriteProtect => {
                for gpa in bits.iter() {
                    let Some(leaf) = self.table.query(gpa) else { continue };
                    let Some(r) = self.region_at(gpa) else { continue };
                    let want = self.effective_flags(r, leaf.hpa, gpa);
                    if want == leaf.flags {
                        continue;
                    }
                    match self.table.edit().protect(gpa, PAGE, want) {
                        Ok(f) => flush.add(f),
                        Err(e) => {
                            self.defer(flush);
                            // Not re-protected: report them again next time.
                            if let Some(log) = &mut self.dirty {
                                for p in bits.iter().filter(|&p| p >= gpa) {
                                    log.mark(p);
                                }
                            }
                            return Err(DirtyLogError::Table(e));
                        }
                    }
                }
            }
        }
        Ok((bits, flush))
    }

    /// Stops logging; write-protected pages get their rights back (those not reached when
    /// this fails get it on their next write fault; the partial change is left pending), and
    /// huge pages split for the log are restored where they are uniform again
    /// ([`AddressSpace::collapse_huge`]).
    pub fn stop_dirty_log(&mut self) -> Result<SpaceFlush<F>, DirtyLogError> {
        let Some(log) = self.dirty.take() else {
            return Err(DirtyLogError::NotLogging);
        };
        let flush = match log.mode {
            DirtyMode::DirtyBits => SpaceFlush::none(),
            DirtyMode::WriteProtect => self.reprotect(log.range())?,
        };
        let (_, collapsed) = self.collapse_huge(log.range());
        Ok(flush.merge(collapsed))
    }

    /// Reports the pages of `range` accessed since the last call (from the table's A bits) and
    /// clears their A bits, for reclaim. A huge leaf reports all its pages. Needs A bits kept by
    /// the CPU or by the fault handler (not [`AdMode::Preset`]).
    pub fn harvest_accessed(&mut self, range: GpaRange) -> Result<(PageBitmap, SpaceFlush<F>), BitmapAllocError> {
        let mut bits = PageBitmap::try_new(range)?;
        let f = self.table.edit().take_accessed_dirty(range.start, range.len(), AdClear::Accessed, |leaf| {
            if leaf.accessed {
                bits.set_range(leaf.gpa, leaf.size.bytes());
            }
        });
        Ok((bits, SpaceFlush::from_table(f)))
    }

    /// Records a write the hypervisor made on the guest's behalf.
    pub(crate) fn note_written(&mut self, gpa: GuestPhysAddr, len: u64) {
        if let Some(log) = &mut self.dirty {
            log.soft.set_range(gpa, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sets_ranges_clipped_to_its_own() {
        let r = GpaRange::from_start_len(GuestPhysAddr::new(0x10000), 70 * PAGE).unwrap();
        let mut b = PageBitmap::new(r);
        b.set(GuestPhysAddr::new(0x10fff));
        b.set(GuestPhysAddr::new(0xf000)); // below: ignored
        b.set_range(GuestPhysAddr::new(0x10000 + 63 * PAGE), 3 * PAGE); // crosses a word
        b.set_range(GuestPhysAddr::new(0x10000 + 69 * PAGE), 10 * PAGE); // runs past the end
        let got: Vec<u64> = b.iter().map(|g| (g.as_u64() - 0x10000) / PAGE).collect();
        assert_eq!(got, [0, 63, 64, 65, 69]);
        assert_eq!(b.count(), 5);
        assert!(b.get(GuestPhysAddr::new(0x10000 + 64 * PAGE + 5)));
        assert!(!b.get(GuestPhysAddr::new(0x10000 + 70 * PAGE)));
        b.clear();
        assert_eq!(b.count(), 0);
    }
}
