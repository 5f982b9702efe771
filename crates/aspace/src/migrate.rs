//! Live migration of an address space into a fresh one by dirty logging (pre-copy, as KVM
//! hypervisors do it): copy everything once while the guest runs, then copy what it dirtied,
//! round after round, then pause it and copy the rest.
//!
//! # Protocol
//! 1. [`Migration::start`] makes the destination: the same regions (ids, names, ranges, rights,
//!    huge-page policy), with anonymous (demand-zero and copy-on-write) regions demand-zero and
//!    empty, MMIO as MMIO, and linear regions mapping the same host range (see below). It
//!    starts dirty logging on the source over the span of its anonymous regions and returns the
//!    source's flush: carry it out before the guest runs on.
//! 2. [`Migration::round`], as often as wanted while the guest runs: the first copies every
//!    page populated in the source, each later one the pages the previous round's harvest
//!    found dirty. Each round ends with a harvest of the source's dirty log, and returns that
//!    harvest's flush: carry it out before the next round. [`Round::dirty`] says how many pages
//!    the next round will copy (stop when it is small, or after a round limit).
//! 3. Pause every vCPU of the source, carry out the last flush, then [`Migration::finish`]:
//!    copies the pages still owed, harvests once more and copies those, stops dirty logging.
//!    Then move the vCPU and device state, run the guest in the destination and drop the
//!    source (or [`Migration::abandon`] at any point before, and drop the destination).
//!
//! ```
//! use std::sync::Arc;
//! use twostage_aspace::migrate::Migration;
//! use twostage_aspace::{AddressSpace, Backend, GuestMemory};
//! use twostage_npt::testing::HostRam; // fake host RAM; a hypervisor passes its own allocator
//! use twostage_npt::{GpaRange, GuestPhysAddr, MappingFlags, Sv39x4, TableOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ram = Arc::new(HostRam::new(2048));
//! let mut a = AddressSpace::<Sv39x4, _>::new(ram.clone(), TableOptions::for_format::<Sv39x4>())?;
//! let gpa = GuestPhysAddr::new;
//! let range = GpaRange::from_start_len(gpa(0x8000_0000), 4 << 20).unwrap();
//! let (_, f) = a.add_region("ram", range, MappingFlags::RWX, Backend::DemandZero)?;
//! a.flush_unloaded(f)?;
//! a.write_obj(gpa(0x8000_0000), &1u64)?;
//! a.flush_pending(|_| {});
//!
//! let (mut m, mut b, f) = Migration::start(&mut a, ram.clone())?;
//! a.flush(f, |_inv| { /* HFENCE.GVMA or INVEPT on A's harts */ })?;
//! loop {
//!     a.write_obj(gpa(0x8000_2000), &2u64)?; // the guest runs on in A
//!     a.flush_pending(|_| {});
//!     let (round, f) = m.round(&mut a, &mut b)?;
//!     a.flush(f, |_inv| { /* before the next round */ })?;
//!     if round.dirty <= 1 || m.rounds() == 5 {
//!         break;
//!     }
//! }
//! // Pause A's vCPUs, then:
//! let (last, f) = m.finish(&mut a, &mut b)?;
//! a.flush(f, |_| {})?;
//! println!("migration: rounds={} final={}", last.number, last.pages);
//! assert_eq!(b.read_obj::<u64>(gpa(0x8000_2000))?, 2); // run the guest in B, drop A
//! # Ok(()) }
//! ```
//!
//! # Why the pages harvested are copied by the next round
//! A harvest clears the D bits it read (or write-protects the pages again), but until its
//! invalidation has run a vCPU may still write through a cached translation that already has
//! D set (or the write right), and leave no trace in the log. Such a page was dirty when
//! harvested, so it is in the set the harvest returned; copying that set only after the
//! caller carried out the harvest's flush (the next call) copies those writes too. Writes
//! after the flush set D in the table (or fault) and are found by the next harvest.
//!
//! # What the destination gets
//! Only pages populated in the source are copied, and a page that reads as zero is not copied
//! into a destination that does not have it yet (a demand-zero page reads as zero): pages the
//! guest never wrote cost no frame. Where every page of an aligned 2 MiB block inside a region
//! is copied in one round and the destination has none of it yet, the block gets one 2 MiB
//! page (one aligned run of 512 frames, if the region's [`crate::HugePages`] policy allows it
//! and the allocator has one), so huge-page backing survives a migration, including the pages
//! the source's dirty log split to 4 KiB; otherwise 4 KiB pages (a source's 1 GiB page comes
//! out as 2 MiB pages). A page copied again by a later round is overwritten in place. Under
//! software A/D (RISC-V without Svadu) the copied pages get A and D set, so the moved guest
//! takes no extra exit per page. The destination is never loaded during the migration: its
//! changes are carried out at once, without invalidation.
//!
//! # Linear regions
//! A linear region is the caller's host memory (passthrough RAM, a device page), which the
//! address space never allocates or frees. The destination maps the same host range, as
//! [`AddressSpace::fork`] does: both spaces reach the same bytes, so there is nothing to copy
//! and nothing to get wrong, and the source, dropped after the migration, frees none of it.
//! This is sound for a migration within one host (the only kind a frame allocator can serve);
//! a hypervisor moving a VM to other memory must give the destination its own linear regions.
//!
//! # Failures
//! Every error is typed and loses nothing. If the destination runs out of frames in a round,
//! the pages copied so far stay copied (the destination is consistent: every page it has is
//! mapped, counted and holds the source's bytes as of its copy), the pages not copied stay
//! owed, and no harvest was made: call [`Migration::round`] again (after freeing memory), or
//! abandon. The source is changed only by its dirty log.
//!
//! # Frames
//! The destination's allocator must reach the same host memory as the source's (a clone of it,
//! or another handle on the same RAM): the copy reads the source's frames through the source's
//! allocator and writes the destination's through the destination's. The destination counts
//! its frames in its own [`crate::FrameRefs`]; dropping both spaces returns every frame.

use crate::dirty::{DirtyMode, PageBitmap};
use crate::error::{AddRegionError, BitmapAllocError, DirtyLogError, NewSpaceError};
use crate::flush::SpaceFlush;
use crate::region::{Backend, Region, RegionId};
use crate::space::{AddressSpace, PAGE};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::error::Error;
use core::fmt;
use twostage_npt::{
    Access, AdMode, Format, FrameAllocator, GpaRange, GuestPhysAddr, HostPhysAddr, MapSize, MappingFlags, PageSize,
    FRAME_SIZE,
};

/// Bytes in the huge pages a migration rebuilds in the destination.
const BLOCK: u64 = PageSize::Size2M.bytes();

/// What one round (or the final copy) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// 1 for the first round, counting up; [`Migration::finish`] reports the round after the
    /// last [`Migration::round`].
    pub number: u32,
    /// Whether this is [`Migration::finish`]'s copy (the guest paused).
    pub last: bool,
    /// 4 KiB pages copied into the destination (a 2 MiB page counts 512).
    pub pages: u64,
    /// Bytes copied (`pages` × 4 KiB).
    pub bytes: u64,
    /// 2 MiB pages mapped in the destination by this round.
    pub huge_pages: u64,
    /// Pages owed that read as zero and that the destination did not have: left unpopulated
    /// (they read as zero there too).
    pub zero_pages: u64,
    /// Pages found dirty by this round's harvest, which the next call copies (0 after
    /// [`Migration::finish`]).
    pub dirty: u64,
}

/// Why a migration step failed. Nothing is lost: see each variant.
#[derive(Debug)]
pub enum MigrateError {
    /// The source already runs a dirty log (one per address space); nothing was changed.
    SourceLogging {
        /// The running log's range.
        range: GpaRange,
    },
    /// No frame for the destination's root table; nothing was changed.
    NewSpace(NewSpaceError),
    /// A region could not be added to the destination; nothing was changed.
    AddRegion(AddRegionError),
    /// Starting, harvesting or stopping the source's dirty log failed (a huge page split found
    /// no frame). Starting: the source's log is stopped again, its partial change pending in
    /// the source. Harvesting: the pages not re-armed are reported again by the next round.
    DirtyLog(DirtyLogError),
    /// The bitmap of pages owed could not be allocated; nothing was changed.
    Bitmap(BitmapAllocError),
    /// The destination ran out of frames (for data or a table) while copying `gpa`. The pages
    /// copied so far stay copied, the rest stay owed, no harvest was made: retry the round, or
    /// abandon.
    OutOfFrames {
        /// The page that found no frame.
        gpa: GuestPhysAddr,
        /// Pages copied by this call before it.
        copied: u64,
    },
    /// The spaces passed are not the source and destination this migration was started with.
    WrongSpace,
    /// A region of the source was added, removed or changed since the start (the migration
    /// copies a fixed layout); abandon it and start again.
    SourceChanged {
        /// The first region found different (in the source, or as it was at the start).
        region: RegionId,
    },
    /// The source's dirty log was stopped or replaced behind the migration's back: writes may
    /// have gone unseen, so the migration cannot finish; abandon it and start again.
    LogLost,
    /// [`Migration::finish`] failed: `cause` says why. The migration is handed back unfinished
    /// (the source still logs, the pages owed are still owed): call `finish` again, or
    /// [`Migration::abandon`].
    Unfinished {
        /// What went wrong.
        cause: Box<MigrateError>,
        /// The migration, to retry or abandon.
        migration: Box<Migration>,
    },
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SourceLogging { range } => write!(f, "the source already logs dirty pages in {range}"),
            Self::NewSpace(e) => write!(f, "cannot make the destination space: {e}"),
            Self::AddRegion(e) => write!(f, "cannot add a region to the destination: {e}"),
            Self::DirtyLog(e) => write!(f, "the source's dirty log failed: {e}"),
            Self::Bitmap(e) => write!(f, "{e}"),
            Self::OutOfFrames { gpa, copied } => {
                write!(f, "the destination ran out of frames copying {gpa:?} (after {copied} pages)")
            }
            Self::WrongSpace => f.write_str("not the source and destination of this migration"),
            Self::SourceChanged { region } => {
                write!(f, "region #{} of the source changed during the migration", region.as_u32())
            }
            Self::LogLost => f.write_str("the source's dirty log was stopped during the migration"),
            Self::Unfinished { cause, .. } => write!(f, "finishing the migration failed: {cause}"),
        }
    }
}

impl Error for MigrateError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::NewSpace(e) => Some(e),
            Self::AddRegion(e) => Some(e),
            Self::DirtyLog(e) => Some(e),
            Self::Bitmap(e) => Some(e),
            Self::Unfinished { cause, .. } => Some(&**cause),
            _ => None,
        }
    }
}

impl From<DirtyLogError> for MigrateError {
    fn from(e: DirtyLogError) -> Self {
        Self::DirtyLog(e)
    }
}

impl From<BitmapAllocError> for MigrateError {
    fn from(e: BitmapAllocError) -> Self {
        Self::Bitmap(e)
    }
}

/// A source region as the migration saw it at the start.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    id: RegionId,
    range: GpaRange,
    flags: MappingFlags,
    /// Anonymous (demand-zero or copy-on-write: a fork of the source may turn one into the
    /// other), linear at this host address, or MMIO.
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Anon,
    Linear(HostPhysAddr),
    Mmio,
}

impl Seen {
    fn of(r: &Region) -> Self {
        let kind = match r.backend {
            Backend::DemandZero | Backend::CopyOnWrite => Kind::Anon,
            Backend::Linear { host } => Kind::Linear(host),
            Backend::Mmio => Kind::Mmio,
        };
        Self { id: r.id, range: r.range, flags: r.flags, kind }
    }
}

/// A live migration of one address space into another (see the [module](self) documentation).
#[derive(Debug)]
pub struct Migration {
    src_root: HostPhysAddr,
    dst_root: HostPhysAddr,
    layout: Vec<Seen>,
    /// The source's dirty-log range (the span of its anonymous regions), if it has any.
    log: Option<GpaRange>,
    mode: Option<DirtyMode>,
    /// Pages owed: `None` before the first round (every populated page is owed), else the pages
    /// the last harvest found dirty, less those copied since.
    owed: Option<PageBitmap>,
    /// Rounds completed.
    rounds: u32,
}

impl Migration {
    /// Starts migrating `src` into a new, empty address space whose tables and frames come from
    /// `alloc` (which must reach the same host memory as `src`'s allocator). Returns the
    /// migration, the destination and `src`'s flush (dirty logging armed): carry it out before
    /// the first round.
    #[allow(clippy::type_complexity)]
    pub fn start<F: Format, A: FrameAllocator + Clone>(
        src: &mut AddressSpace<F, A>,
        alloc: A,
    ) -> Result<(Migration, AddressSpace<F, A>, SpaceFlush<F>), MigrateError> {
        if let Some(range) = src.dirty_log_range() {
            return Err(MigrateError::SourceLogging { range });
        }
        let mut dst = AddressSpace::new(alloc, src.opts).map_err(MigrateError::NewSpace)?;
        dst.set_huge_pages(src.huge_pages());
        let regions: Vec<Region> = src.regions().cloned().collect();
        for r in &regions {
            let backend = match r.backend {
                Backend::DemandZero | Backend::CopyOnWrite => Backend::DemandZero,
                other => other,
            };
            // The same id as in the source, so the hypervisor's region ids stay valid.
            dst.next_id = r.id.0;
            let (id, f) = dst.add_region(r.name, r.range, r.flags, backend).map_err(MigrateError::AddRegion)?;
            debug_assert_eq!(id, r.id);
            dst.flush_unloaded(f).expect("the destination's own token");
            dst.set_region_huge_pages(id, r.huge);
        }
        dst.next_id = src.next_id;
        let anon = regions.iter().filter(|r| r.backend.owns_frames());
        let log = anon.map(|r| r.range).reduce(|a, b| GpaRange { start: a.start.min(b.start), end: a.end.max(b.end) });
        let (mode, flush) = match log {
            None => (None, SpaceFlush::none()),
            Some(range) => match src.start_dirty_log(range) {
                Ok((mode, f)) => (Some(mode), f),
                Err(e) => {
                    // Arming may have failed part way with the log on: take it off again (its
                    // partial change stays pending in the source).
                    if src.dirty_log_range().is_some() {
                        if let Ok(f) = src.stop_dirty_log() {
                            src.defer(f);
                        }
                    }
                    return Err(MigrateError::DirtyLog(e));
                }
            },
        };
        let m = Migration {
            src_root: src.root(),
            dst_root: dst.root(),
            layout: regions.iter().map(Seen::of).collect(),
            log,
            mode,
            owed: None,
            rounds: 0,
        };
        Ok((m, dst, flush))
    }

    /// How the source's dirty log learns of writes (`None` if it has no anonymous region, so
    /// nothing to log).
    pub fn dirty_mode(&self) -> Option<DirtyMode> {
        self.mode
    }

    /// Rounds completed so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Pages the next round will copy (`None` before the first round, which copies every
    /// populated page).
    pub fn owed(&self) -> Option<u64> {
        self.owed.as_ref().map(PageBitmap::count)
    }

    /// One pre-copy round while the guest runs: copies the pages owed (every populated page on
    /// the first round, else those the previous round's harvest found dirty), then harvests
    /// the source's dirty log. Returns what was done and the harvest's flush of `src`: carry it
    /// out before the next call (see the [module](self) documentation for why).
    pub fn round<F: Format, A: FrameAllocator + Clone>(
        &mut self,
        src: &mut AddressSpace<F, A>,
        dst: &mut AddressSpace<F, A>,
    ) -> Result<(Round, SpaceFlush<F>), MigrateError> {
        self.check(src, dst)?;
        let mut round = Round { number: self.rounds + 1, ..Round::default() };
        self.copy_owed(src, dst, &mut round)?;
        let flush = self.harvest(src)?;
        round.dirty = self.owed().unwrap_or(0);
        self.rounds += 1;
        Ok((round, flush))
    }

    /// The last copy, with every vCPU of the source paused and the previous round's flush
    /// carried out: copies the pages owed, harvests once more and copies those, and stops
    /// dirty logging on the source. Returns what was done and the source's flush. On failure
    /// the migration comes back in [`MigrateError::Unfinished`], to retry or abandon.
    pub fn finish<F: Format, A: FrameAllocator + Clone>(
        mut self,
        src: &mut AddressSpace<F, A>,
        dst: &mut AddressSpace<F, A>,
    ) -> Result<(Round, SpaceFlush<F>), MigrateError> {
        let mut round = Round { number: self.rounds + 1, last: true, ..Round::default() };
        let mut flush = SpaceFlush::none();
        let result = (|| -> Result<(), MigrateError> {
            self.check(src, dst)?;
            self.copy_owed(src, dst, &mut round)?;
            // The guest is paused: what this harvest finds can be copied at once.
            flush = core::mem::replace(&mut flush, SpaceFlush::none()).merge(self.harvest(src)?);
            self.copy_owed(src, dst, &mut round)?;
            if self.log.is_some() {
                // Everything is copied. Stopping turns the log off even if giving the pages
                // their write right back fails part way (no frame to split a huge page): those
                // get it on their next write fault, and the partial change is pending in the
                // source, carried out with its next flush. So that is no failure here.
                if let Ok(f) = src.stop_dirty_log() {
                    flush = core::mem::replace(&mut flush, SpaceFlush::none()).merge(f);
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok((round, flush)),
            Err(cause) => {
                // What changed in the source (a harvest) is owed by its next flush.
                src.defer(flush);
                Err(MigrateError::Unfinished { cause: Box::new(cause), migration: Box::new(self) })
            }
        }
    }

    /// Gives up: stops dirty logging on the source and returns its flush. Drop the destination.
    pub fn abandon<F: Format, A: FrameAllocator + Clone>(
        self,
        src: &mut AddressSpace<F, A>,
    ) -> Result<SpaceFlush<F>, MigrateError> {
        if src.root() != self.src_root {
            return Err(MigrateError::WrongSpace);
        }
        match self.log {
            Some(range) if src.dirty_log_range() == Some(range) => Ok(src.stop_dirty_log()?),
            _ => Ok(SpaceFlush::none()),
        }
    }

    /// The spaces are this migration's, the source's layout and log are as at the start.
    fn check<F: Format, A: FrameAllocator + Clone>(
        &self,
        src: &AddressSpace<F, A>,
        dst: &AddressSpace<F, A>,
    ) -> Result<(), MigrateError> {
        if src.root() != self.src_root || dst.root() != self.dst_root {
            return Err(MigrateError::WrongSpace);
        }
        let mut now = src.regions().map(Seen::of);
        for seen in &self.layout {
            match now.next() {
                Some(r) if r == *seen => {}
                Some(r) => return Err(MigrateError::SourceChanged { region: r.id.min(seen.id) }),
                None => return Err(MigrateError::SourceChanged { region: seen.id }),
            }
        }
        if let Some(r) = now.next() {
            return Err(MigrateError::SourceChanged { region: r.id });
        }
        if src.dirty_log_range() != self.log {
            return Err(MigrateError::LogLost);
        }
        Ok(())
    }

    /// Harvests the source's log into the pages owed (which are empty: the copy before it
    /// finished).
    fn harvest<F: Format, A: FrameAllocator + Clone>(
        &mut self,
        src: &mut AddressSpace<F, A>,
    ) -> Result<SpaceFlush<F>, MigrateError> {
        if self.log.is_none() {
            return Ok(SpaceFlush::none());
        }
        let (mut bits, flush) = src.harvest_dirty()?;
        // Only anonymous pages are copied (a linear page in the log's span is shared).
        let other: Vec<GuestPhysAddr> =
            bits.iter().filter(|&p| !src.region_at(p).is_some_and(|r| r.backend.owns_frames())).collect();
        for p in other {
            bits.unset(p);
        }
        self.owed = Some(bits);
        Ok(flush)
    }

    /// Copies the pages owed into the destination, clearing each from the owed set once done.
    fn copy_owed<F: Format, A: FrameAllocator + Clone>(
        &mut self,
        src: &AddressSpace<F, A>,
        dst: &mut AddressSpace<F, A>,
        round: &mut Round,
    ) -> Result<(), MigrateError> {
        let Some(log) = self.log else { return Ok(()) };
        if self.owed.is_none() {
            // First round: every page populated in an anonymous region of the source.
            let mut all = PageBitmap::try_new(log)?;
            for r in src.regions().filter(|r| r.backend.owns_frames()) {
                src.table
                    .for_each_leaf(r.range.start, r.range.len(), |leaf| all.set_range(leaf.gpa, leaf.size.bytes()));
            }
            self.owed = Some(all);
        }
        let owed = self.owed.as_mut().expect("set just above");
        let pages: Vec<GuestPhysAddr> = owed.iter().collect();
        let mut i = 0;
        while i < pages.len() {
            // One group: the owed pages of one 2 MiB block inside one region.
            let first = pages[i];
            let Some(r) = dst.region_at(first).filter(|r| r.backend.owns_frames()).cloned() else {
                // Not anonymous (a linear page inside the log's span): nothing to copy.
                owed.unset(first);
                i += 1;
                continue;
            };
            let block = first.align_down(BLOCK);
            let end = (block + BLOCK).min(r.range.end);
            let n = pages[i..].iter().take_while(|&&p| p < end).count();
            let group = &pages[i..i + n];
            i += n;
            copy_group(src, dst, &r, block, group, owed, round)?;
        }
        Ok(())
    }
}

/// Copies `group` (owed pages of region `r` inside the 2 MiB block at `block`, in order) from
/// `src` into `dst`: as one 2 MiB page where the whole block is owed and `dst` has none of it,
/// else page by page. Clears each page from `owed` once done.
fn copy_group<F: Format, A: FrameAllocator + Clone>(
    src: &AddressSpace<F, A>,
    dst: &mut AddressSpace<F, A>,
    r: &Region,
    block: GuestPhysAddr,
    group: &[GuestPhysAddr],
    owed: &mut PageBitmap,
    round: &mut Round,
) -> Result<(), MigrateError> {
    // The source frame of each page (a page the source does not have is not copied).
    let src_frame = |p: GuestPhysAddr| src.table.query(p).map(|l| l.translate(p));
    let whole = group.len() as u64 == BLOCK / PAGE
        && block >= r.range.start
        && r.huge.allows(PageSize::Size2M)
        && dst.opts.leaf_sizes.contains(PageSize::Size2M);
    if whole {
        let mut none_in_dst = true;
        dst.table.for_each_leaf(block, BLOCK, |_| none_in_dst = false);
        let frames: Option<Vec<HostPhysAddr>> = group.iter().map(|&p| src_frame(p)).collect();
        if let (true, Some(frames)) = (none_in_dst, frames) {
            if frames.iter().all(|&h| is_zero(&src.alloc, h)) {
                round.zero_pages += frames.len() as u64;
            } else if copy_huge(src, dst, r, block, &frames) {
                round.huge_pages += 1;
                round.pages += frames.len() as u64;
                round.bytes += BLOCK;
            } else {
                // No aligned run (or no table frame): 4 KiB pages below.
                return copy_pages(src, dst, r, group, owed, round);
            }
            for &p in group {
                owed.unset(p);
            }
            return Ok(());
        }
    }
    copy_pages(src, dst, r, group, owed, round)
}

/// Copies `pages` of region `r` one by one.
fn copy_pages<F: Format, A: FrameAllocator + Clone>(
    src: &AddressSpace<F, A>,
    dst: &mut AddressSpace<F, A>,
    r: &Region,
    pages: &[GuestPhysAddr],
    owed: &mut PageBitmap,
    round: &mut Round,
) -> Result<(), MigrateError> {
    for &p in pages {
        let Some(from) = src.table.query(p).map(|l| l.translate(p)) else {
            // Not populated in the source (it cannot have lost a page without losing its
            // region, which `check` rules out): nothing to copy.
            owed.unset(p);
            continue;
        };
        let to = match dst.table.query(p) {
            Some(l) => {
                let mut to = l.translate(p);
                if dst.refs.frame_count(to) > 1 {
                    // Someone forked the destination: give it its own copy first.
                    match dst.break_cow(r, p, to) {
                        Ok(f) => dst.flush_unloaded(f).expect("the destination's own token"),
                        Err(_) => return Err(MigrateError::OutOfFrames { gpa: p, copied: round.pages }),
                    }
                    to = dst.table.query(p).map(|l| l.translate(p)).expect("just copied");
                }
                to
            }
            None if is_zero(&src.alloc, from) => {
                round.zero_pages += 1;
                owed.unset(p);
                continue;
            }
            None => match new_page(dst, r, p) {
                Some(to) => to,
                None => return Err(MigrateError::OutOfFrames { gpa: p, copied: round.pages }),
            },
        };
        copy_frame(&src.alloc, from, &dst.alloc, to);
        round.pages += 1;
        round.bytes += PAGE;
        owed.unset(p);
    }
    Ok(())
}

/// Maps page `p` of anonymous region `r` of `dst` with a new frame (its content left for the
/// caller to fill before anyone can read it: the destination is not loaded). `None` (nothing
/// left allocated) if no frame could be had for it or its table.
fn new_page<F: Format, A: FrameAllocator + Clone>(
    dst: &mut AddressSpace<F, A>,
    r: &Region,
    p: GuestPhysAddr,
) -> Option<HostPhysAddr> {
    let hpa = dst.alloc.allocate_frame()?;
    dst.refs.insert_new(hpa);
    let flags = dst.flags_for(r, p, false);
    match dst.table.edit().map(p, hpa, PAGE, flags, MapSize::Exactly(PageSize::Size4K)) {
        Ok(f) => {
            dst.flush_unloaded(SpaceFlush::from_table(f)).expect("the destination's own token");
            preset_accessed_dirty(dst, p);
            dst.stats.frames_allocated += 1;
            Some(hpa)
        }
        Err(_) => {
            dst.refs.release_range(hpa, 1, |_, _| {});
            // SAFETY: `hpa` came from `allocate_frame` just above and was never mapped.
            unsafe { dst.alloc.deallocate_frames(hpa, 1) };
            None
        }
    }
}

/// Maps the 2 MiB block at `block` of region `r` in `dst` with one new aligned run holding a
/// copy of `frames` (the source's frames of its 512 pages). `false` (nothing left allocated)
/// if no run or no table frame could be had.
fn copy_huge<F: Format, A: FrameAllocator + Clone>(
    src: &AddressSpace<F, A>,
    dst: &mut AddressSpace<F, A>,
    r: &Region,
    block: GuestPhysAddr,
    frames: &[HostPhysAddr],
) -> bool {
    let n = BLOCK / PAGE;
    let Some(run) = dst.alloc.allocate_frames(n as usize, n as usize) else {
        dst.stats.huge_fallbacks += 1;
        return false;
    };
    for (i, &from) in frames.iter().enumerate() {
        copy_frame(&src.alloc, from, &dst.alloc, run + i as u64 * PAGE);
    }
    dst.refs.insert_run(run, n);
    let flags = dst.flags_for(r, block, false);
    match dst.table.edit().map(block, run, BLOCK, flags, MapSize::Exactly(PageSize::Size2M)) {
        Ok(f) => {
            dst.flush_unloaded(SpaceFlush::from_table(f)).expect("the destination's own token");
            preset_accessed_dirty(dst, block);
            dst.stats.frames_allocated += n;
            dst.stats.huge_2m_mapped += 1;
            true
        }
        Err(_) => {
            let alloc = &dst.alloc;
            dst.refs.release_range(run, n, |b, count| {
                // SAFETY: the run registered just above, never mapped: its last frame was just
                // released, so it is handed back whole, once.
                unsafe { alloc.deallocate_frames(b, count as usize) }
            });
            false
        }
    }
}

/// Sets A and D on the new leaf at `gpa` of `dst` when the table keeps them in software
/// ([`AdMode::Software`]: RISC-V without Svadu, where a G-stage access with A = 0, or a store
/// with D = 0, raises a guest-page fault for the hypervisor to set them; RISC-V Privileged spec,
/// "Virtual Address Translation Process", as applied to G-stage). The page was populated and
/// written in the source: without this the guest would take one more exit per page it touches
/// after moving. Hardware A/D sets them itself, and a preset table has them set already.
fn preset_accessed_dirty<F: Format, A: FrameAllocator + Clone>(dst: &mut AddressSpace<F, A>, gpa: GuestPhysAddr) {
    if dst.opts.ad != AdMode::Software {
        return;
    }
    if let Ok(f) = dst.table.edit().set_accessed_dirty(gpa, Access::Write) {
        dst.flush_unloaded(SpaceFlush::from_table(f)).expect("the destination's own token");
    }
}

/// Copies one 4 KiB frame, read through `from_alloc`, into one written through `to_alloc`.
fn copy_frame<A: FrameAllocator>(from_alloc: &A, from: HostPhysAddr, to_alloc: &A, to: HostPhysAddr) {
    let s = from_alloc.phys_to_virt(from).as_ptr();
    let d = to_alloc.phys_to_virt(to).as_ptr();
    // SAFETY: `from` is a frame the source maps (allocated by its allocator, whose promise makes
    // `phys_to_virt` valid for the whole frame); `to` is a frame the destination owns alone
    // (new, or private: its count is 1), reached through its own allocator; two different
    // allocated frames do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(s, d, FRAME_SIZE) }
}

/// Whether a frame reads as all zero bytes.
fn is_zero<A: FrameAllocator>(alloc: &A, hpa: HostPhysAddr) -> bool {
    let p = alloc.phys_to_virt(hpa).as_ptr();
    (0..FRAME_SIZE / 8).all(|i| {
        // SAFETY: `hpa` is an allocated frame (the allocator's promise makes `phys_to_virt`
        // valid for the whole frame); 8 bytes at `8 i` stay inside it.
        unsafe { core::ptr::read_unaligned(p.add(8 * i).cast::<u64>()) == 0 }
    })
}
