//! Host frames for the hypervisor images: a two-level bitmap over one range of RAM, with
//! constant-bounded searches (no scan from frame 0 on every allocation).
//!
//! Level 0 has one bit per 4 KiB frame (set = in use). Level 1 has one bit per level-0 word,
//! set while that word has a free frame. A single frame is found by a cursor over level 1: at
//! most `MAX_FRAMES / 4096` level-1 words are looked at, then one `trailing_zeros` in level 0,
//! whatever the state of the bitmap. Runs of frames (a 16 KiB G-stage root, a 2 MiB page) are
//! searched next-fit from where the previous run was found, one level-0 word at a time.

use core::cell::UnsafeCell;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use twostage_npt::{FrameAllocator, HostPhysAddr, FRAME_SIZE};

/// Frames one allocator can describe: 2^18 frames = 1 GiB.
pub const MAX_FRAMES: usize = 1 << 18;
const WORDS: usize = MAX_FRAMES / 64;
const SUMMARY: usize = WORDS / 64;

/// The range given to [`Frames::init`] is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramesError {
    /// The base is not 4 KiB-aligned.
    Misaligned(HostPhysAddr),
    /// More frames than [`MAX_FRAMES`].
    TooLarge {
        /// Frames asked for.
        frames: usize,
    },
    /// `init` was called twice.
    AlreadyInitialized,
}

impl fmt::Display for FramesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned(base) => write!(f, "frame range base {base} is not 4 KiB-aligned"),
            Self::TooLarge { frames } => write!(f, "{frames} frames asked for; the bitmap holds at most {MAX_FRAMES}"),
            Self::AlreadyInitialized => f.write_str("the frame allocator was already given its range"),
        }
    }
}

impl core::error::Error for FramesError {}

/// What the allocator has done, for the run summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Host-physical address of frame 0.
    pub base: u64,
    /// Frames in the range.
    pub frames: usize,
    /// Frames handed out now.
    pub in_use: usize,
    /// The most frames handed out at once.
    pub high_water: usize,
    /// Calls to `allocate_frames` that succeeded.
    pub allocations: u64,
    /// Calls to `deallocate_frames`.
    pub frees: u64,
    /// Bitmap words looked at by every search so far: the allocator's own work, which stays a
    /// small constant per allocation.
    pub words_searched: u64,
}

struct Inner {
    base: u64,
    virt_base: usize,
    frames: usize,
    used: [u64; WORDS],
    has_free: [u64; SUMMARY],
    /// Level-1 word where the last single-frame search ended.
    cursor: usize,
    /// Level-0 word where the last run search ended.
    run_cursor: usize,
    stats: FrameStats,
}

/// Frames of host RAM over `[base, base + frames * 4 KiB)`, reached through `virt_base` (the
/// identity on the hypervisors: `virt_base == base`; an offset window in host tests).
///
/// Usable from several harts: every operation takes a spin lock for a bounded time.
pub struct Frames {
    lock: AtomicBool,
    inner: UnsafeCell<Inner>,
}

// SAFETY: `inner` is only reached with `lock` held (see `with`), so shared references from
// several harts never alias a mutable access.
unsafe impl Sync for Frames {}

impl Default for Frames {
    fn default() -> Self {
        Self::empty()
    }
}

impl Frames {
    /// An allocator with no frames yet (every allocation fails until [`Frames::init`]); a
    /// `static` can hold it.
    pub const fn empty() -> Self {
        Self {
            lock: AtomicBool::new(false),
            inner: UnsafeCell::new(Inner {
                base: 0,
                virt_base: 0,
                frames: 0,
                used: [u64::MAX; WORDS],
                has_free: [0; SUMMARY],
                cursor: 0,
                run_cursor: 0,
                stats: FrameStats {
                    base: 0,
                    frames: 0,
                    in_use: 0,
                    high_water: 0,
                    allocations: 0,
                    frees: 0,
                    words_searched: 0,
                },
            }),
        }
    }

    /// Gives the allocator its range: `frames` frames at `base`, all free.
    ///
    /// # Safety
    /// The range must be RAM that nothing else uses (except what is passed to
    /// [`Frames::reserve`] before it is allocated), readable and writable at `virt_base`.
    pub unsafe fn init(&self, base: HostPhysAddr, virt_base: usize, frames: usize) -> Result<(), FramesError> {
        if !base.is_aligned(FRAME_SIZE as u64) {
            return Err(FramesError::Misaligned(base));
        }
        if frames > MAX_FRAMES {
            return Err(FramesError::TooLarge { frames });
        }
        self.with(|s| {
            if s.frames != 0 {
                return Err(FramesError::AlreadyInitialized);
            }
            s.base = base.as_u64();
            s.virt_base = virt_base;
            s.frames = frames;
            s.stats.base = base.as_u64();
            s.stats.frames = frames;
            s.mark(0, frames, false);
            Ok(())
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        while self.lock.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference to the state.
        let r = f(unsafe { &mut *self.inner.get() });
        self.lock.store(false, Ordering::Release);
        r
    }

    /// Marks `[start, end)` (clamped to the range) as in use for good: the image, the device
    /// tree, a staged guest file.
    pub fn reserve(&self, start: HostPhysAddr, end: HostPhysAddr) {
        self.with(|s| {
            let lo = (start.as_u64().saturating_sub(s.base) / FRAME_SIZE as u64) as usize;
            let hi = (end.as_u64().saturating_sub(s.base).div_ceil(FRAME_SIZE as u64) as usize).min(s.frames);
            for f in lo..hi {
                s.used[f / 64] |= 1 << (f % 64);
                s.note_word(f / 64);
            }
        })
    }

    /// What the allocator has done.
    pub fn stats(&self) -> FrameStats {
        self.with(|s| s.stats)
    }

    /// Frames handed out now.
    pub fn in_use(&self) -> usize {
        self.with(|s| s.stats.in_use)
    }

    /// Free frames left (not counting reserved ones).
    pub fn free(&self) -> usize {
        self.with(|s| s.used[..s.frames.div_ceil(64)].iter().map(|w| w.count_zeros() as usize).sum())
    }
}

impl Inner {
    /// Refreshes level 1 for level-0 word `w`.
    fn note_word(&mut self, w: usize) {
        let bit = 1u64 << (w % 64);
        if self.used[w] != u64::MAX {
            self.has_free[w / 64] |= bit;
        } else {
            self.has_free[w / 64] &= !bit;
        }
    }

    /// Marks frames `first..first + count` used or free, a level-0 word at a time (a bit at a
    /// time, initializing a 384 MiB machine's bitmap took 95,000 iterations under QEMU).
    fn mark(&mut self, first: usize, count: usize, used: bool) {
        let end = first + count;
        let mut f = first;
        while f < end {
            let (w, lo) = (f / 64, f % 64);
            let hi = (end - w * 64).min(64);
            let mask = (u64::MAX >> (64 - (hi - lo))) << lo;
            if used {
                self.used[w] |= mask;
            } else {
                debug_assert!(
                    self.used[w] & mask == mask,
                    "frame {} freed twice",
                    w * 64 + (!self.used[w] & mask).trailing_zeros() as usize
                );
                self.used[w] &= !mask;
            }
            self.note_word(w);
            f = w * 64 + hi;
        }
    }

    /// One free frame: level 1 from the cursor, then one level-0 word.
    fn one(&mut self) -> Option<usize> {
        let words = self.frames.div_ceil(64);
        let summaries = words.div_ceil(64);
        for i in 0..summaries {
            let j = (self.cursor + i) % summaries;
            self.stats.words_searched += 1;
            let s = self.has_free[j];
            if s != 0 {
                let w = j * 64 + s.trailing_zeros() as usize;
                self.stats.words_searched += 1;
                let f = w * 64 + (!self.used[w]).trailing_zeros() as usize;
                self.cursor = j;
                return Some(f);
            }
        }
        None
    }

    /// `count` free frames whose physical address is aligned to `align` frames: next-fit from the
    /// run cursor, skipping whole full words.
    fn run(&mut self, count: usize, align: usize) -> Option<usize> {
        let base_frame = (self.base / FRAME_SIZE as u64) as usize;
        // Frame index `f` is aligned when base_frame + f is a multiple of `align`.
        let aligned_from = |f: usize| (base_frame + f).next_multiple_of(align) - base_frame;
        let words = self.frames.div_ceil(64);
        if count > self.frames || words == 0 {
            return None;
        }
        let start = aligned_from((self.run_cursor % words) * 64);
        let mut f = start;
        let mut wrapped = false;
        loop {
            if f + count > self.frames {
                if wrapped {
                    return None;
                }
                wrapped = true;
                f = aligned_from(0);
                continue;
            }
            if wrapped && f >= start {
                return None;
            }
            self.stats.words_searched += 1;
            if self.used[f / 64] == u64::MAX {
                f = aligned_from((f / 64 + 1) * 64);
                continue;
            }
            match (f..f + count).find(|&i| self.used[i / 64] & (1 << (i % 64)) != 0) {
                None => {
                    self.run_cursor = (f + count) / 64;
                    return Some(f);
                }
                Some(busy) => f = aligned_from(busy + 1),
            }
        }
    }
}

// SAFETY: a frame is handed out only while its bit is clear, and its bit stays set until
// `deallocate_frames`; the range is RAM reachable at `virt_base` (promised to `init`).
unsafe impl FrameAllocator for Frames {
    fn allocate_frames(&self, count: usize, align_frames: usize) -> Option<HostPhysAddr> {
        if count == 0 || !align_frames.is_power_of_two() {
            return None;
        }
        self.with(|s| {
            let f = if count == 1 && align_frames == 1 { s.one()? } else { s.run(count, align_frames)? };
            s.mark(f, count, true);
            s.stats.in_use += count;
            s.stats.high_water = s.stats.high_water.max(s.stats.in_use);
            s.stats.allocations += 1;
            Some(HostPhysAddr::new(s.base + (f * FRAME_SIZE) as u64))
        })
    }

    unsafe fn deallocate_frames(&self, base: HostPhysAddr, count: usize) {
        self.with(|s| {
            let first = ((base.as_u64() - s.base) / FRAME_SIZE as u64) as usize;
            s.mark(first, count, false);
            s.stats.in_use -= count;
            s.stats.frees += 1;
        })
    }

    fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8> {
        let (base, virt) = self.with(|s| (s.base, s.virt_base));
        let off = pa.as_u64().wrapping_sub(base) as usize;
        NonNull::new(virt.wrapping_add(off) as *mut u8).expect("the window is never at address 0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::boxed::Box;
    use std::vec::Vec;

    fn frames(base: u64, n: usize) -> Box<Frames> {
        let a = Box::new(Frames::empty());
        // SAFETY: the allocator is never used to reach memory in these tests.
        unsafe { a.init(HostPhysAddr::new(base), 0x1000_0000, n) }.unwrap();
        a
    }

    #[test]
    fn marking_a_word_at_a_time_sets_exactly_the_range() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let a = frames(0x8000_0000, 1000);
        // Every frame of the range is free, none past it (the tail of the last word stays used).
        assert_eq!(a.free(), 1000);
        for _ in 0..500 {
            let (first, count) = (rnd(1000), 1 + rnd(200));
            let count = count.min(1000 - first);
            let before: Vec<u64> = a.with(|s| s.used[..16].to_vec());
            let used = rnd(2) == 0;
            a.with(|s| {
                if used {
                    s.mark(first, count, true);
                } else {
                    // Free only frames that are used (a double free is a bug the debug build catches).
                    s.mark(first, count, true);
                    s.mark(first, count, false);
                }
            });
            let after: Vec<u64> = a.with(|s| s.used[..16].to_vec());
            for f in 0..1024 {
                let bit = |v: &[u64]| v[f / 64] >> (f % 64) & 1 == 1;
                let want = if (first..first + count).contains(&f) { used } else { bit(&before) };
                assert_eq!(bit(&after), want, "frame {f} after marking {first}+{count} {used}");
            }
            a.with(|s| {
                for w in 0..16 {
                    assert_eq!(s.has_free[0] >> w & 1 == 1, s.used[w] != u64::MAX, "level 1 of word {w}");
                }
            });
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "frame 70 freed twice")]
    fn a_double_free_is_caught_in_debug_builds() {
        let a = frames(0x8000_0000, 1000);
        a.with(|s| {
            s.mark(64, 6, true);
            s.mark(64, 7, false);
        });
    }

    #[test]
    fn aligned_runs_reservations_and_reuse() {
        let a = frames(0x8020_0000, 1024);
        a.reserve(HostPhysAddr::new(0x8020_0000), HostPhysAddr::new(0x8020_3001));
        let f = a.allocate_frame().unwrap();
        assert_eq!(f, HostPhysAddr::new(0x8020_4000), "reserved frames are skipped");
        let root = a.allocate_frames(4, 4).unwrap();
        assert!(root.is_aligned(16 * 1024));
        let huge = a.allocate_frames(512, 512).unwrap();
        assert!(huge.is_aligned(2 << 20));
        assert_eq!(a.in_use(), 517);
        assert_eq!(a.allocate_frames(512, 512), None, "only one 2 MiB-aligned run fits in 4 MiB");
        // SAFETY: handing back what was allocated above.
        unsafe { a.deallocate_frames(huge, 512) };
        assert_eq!(a.allocate_frames(512, 512), Some(huge), "freed frames are reused");
        assert_eq!(a.phys_to_virt(HostPhysAddr::new(0x8020_1000)).as_ptr() as usize, 0x1000_1000);
        assert_eq!(a.stats().high_water, 517);
        let bad = Frames::empty();
        // SAFETY: refused before it could be used.
        let refused = unsafe { bad.init(HostPhysAddr::new(0x8000_0001), 0, 1) };
        assert_eq!(refused, Err(FramesError::Misaligned(HostPhysAddr::new(0x8000_0001))));
        // SAFETY: as above.
        assert_eq!(unsafe { a.init(HostPhysAddr::new(0x8000_0000), 0, 1) }, Err(FramesError::AlreadyInitialized));
    }

    #[test]
    fn alignment_is_of_the_physical_address_not_the_index() {
        let a = frames(0x81a6_f000, 64);
        assert_eq!(a.allocate_frame().unwrap(), HostPhysAddr::new(0x81a6_f000));
        for _ in 0..3 {
            let r = a.allocate_frames(4, 4).unwrap();
            assert!(r.is_aligned(16 * 1024), "{r:?} is not 16 KiB-aligned");
            a.allocate_frame().unwrap();
        }
    }

    #[test]
    fn every_frame_once_until_full_then_none() {
        let a = frames(0x4000_0000, 1000);
        let mut got: Vec<u64> = (0..1000).map(|_| a.allocate_frame().unwrap().as_u64()).collect();
        assert_eq!(a.allocate_frame(), None);
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 1000, "a frame was handed out twice");
        assert!(got.iter().all(|&f| (0x4000_0000..0x4000_0000 + 1000 * 4096).contains(&f)));
    }

    /// The regression the two-level bitmap exists for: with most of a large range in use, each
    /// single-frame allocation looks at a bounded number of words, not at everything before the
    /// first free frame.
    #[test]
    fn single_frame_work_is_bounded_when_the_range_is_nearly_full() {
        let n = MAX_FRAMES;
        let a = frames(0x1_0000_0000, n);
        let held: Vec<HostPhysAddr> = (0..n - 100).map(|_| a.allocate_frame().unwrap()).collect();
        // Free every 1000th frame near the end, then allocate them again.
        for h in held.iter().rev().step_by(1000).take(50) {
            // SAFETY: allocated above, freed once.
            unsafe { a.deallocate_frames(*h, 1) };
        }
        let before = a.stats().words_searched;
        for _ in 0..150 {
            a.allocate_frame().unwrap();
        }
        let per = (a.stats().words_searched - before) / 150;
        assert!(per <= (SUMMARY + 1) as u64, "{per} words looked at per allocation");
        assert_eq!(a.allocate_frame(), None);
    }

    #[test]
    fn runs_continue_where_the_last_one_ended() {
        let a = frames(0x8000_0000, 4096);
        let first = a.allocate_frames(512, 512).unwrap();
        let before = a.stats().words_searched;
        let second = a.allocate_frames(512, 512).unwrap();
        assert_eq!(second.as_u64(), first.as_u64() + (2 << 20));
        assert!(a.stats().words_searched - before <= 2, "the second run did not rescan the first");
        // SAFETY: allocated above.
        unsafe { a.deallocate_frames(first, 512) };
        let mut runs = 0;
        while a.allocate_frames(512, 512).is_some() {
            runs += 1;
        }
        assert_eq!(runs, 7, "the freed run at the start is found after wrapping");
    }
}
