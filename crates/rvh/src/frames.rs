//! A bitmap frame allocator over one physical range, with holes for what is already in use.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use twostage_npt::{FrameAllocator, HostPhysAddr, FRAME_SIZE};

/// Frames the bitmap can describe: 64 Ki frames = 256 MiB.
pub const MAX_FRAMES: usize = 64 * 1024;

/// Frames over `[base, base + frames * 4 KiB)`, reached through `virt_base` (identity on the
/// hypervisor: `virt_base == base`; an offset window in host tests).
pub struct BitmapFrames {
    base: HostPhysAddr,
    virt_base: usize,
    frames: usize,
    lock: AtomicBool,
    used: UnsafeCell<[u64; MAX_FRAMES / 64]>,
    in_use: AtomicUsize,
    high_water: AtomicUsize,
}

// SAFETY: `used` is only touched with `lock` held (a spin lock), so shared references from
// several harts are sound.
unsafe impl Sync for BitmapFrames {}

/// The range given to [`BitmapFrames::new`] is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramesError {
    /// `base` is not 4 KiB-aligned.
    Misaligned(HostPhysAddr),
    /// More frames than [`MAX_FRAMES`].
    TooLarge {
        /// Frames asked for.
        frames: usize,
    },
}

impl core::fmt::Display for FramesError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Misaligned(base) => write!(f, "frame range base {base} is not 4 KiB-aligned"),
            Self::TooLarge { frames } => write!(f, "{frames} frames asked for; the bitmap holds at most {MAX_FRAMES}"),
        }
    }
}

impl core::error::Error for FramesError {}

impl BitmapFrames {
    /// An allocator over `frames` frames at `base`, all free.
    ///
    /// # Safety
    /// The range must be RAM that nothing else uses (except what is later passed to
    /// [`BitmapFrames::reserve`] before any allocation), reachable at `virt_base` for reads and writes.
    pub unsafe fn new(base: HostPhysAddr, virt_base: usize, frames: usize) -> Result<Self, FramesError> {
        if !base.is_aligned(FRAME_SIZE as u64) {
            return Err(FramesError::Misaligned(base));
        }
        if frames > MAX_FRAMES {
            return Err(FramesError::TooLarge { frames });
        }
        let mut used = [0u64; MAX_FRAMES / 64];
        // Frames beyond the range are permanently used.
        for f in frames..MAX_FRAMES {
            used[f / 64] |= 1 << (f % 64);
        }
        Ok(Self {
            base,
            virt_base,
            frames,
            lock: AtomicBool::new(false),
            used: UnsafeCell::new(used),
            in_use: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut [u64; MAX_FRAMES / 64]) -> R) -> R {
        while self.lock.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference to the bitmap.
        let r = f(unsafe { &mut *self.used.get() });
        self.lock.store(false, Ordering::Release);
        r
    }

    /// Marks `[start, end)` (clamped to the range) as in use, e.g. the image and the device tree.
    pub fn reserve(&self, start: HostPhysAddr, end: HostPhysAddr) {
        let lo = start.as_u64().saturating_sub(self.base.as_u64()) / FRAME_SIZE as u64;
        let hi = end.as_u64().saturating_sub(self.base.as_u64()).div_ceil(FRAME_SIZE as u64);
        self.with(|bm| {
            for f in lo as usize..(hi as usize).min(self.frames) {
                bm[f / 64] |= 1 << (f % 64);
            }
        });
    }

    /// Frames currently handed out by `allocate_frames`.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// The most frames ever handed out at once.
    pub fn high_water(&self) -> usize {
        self.high_water.load(Ordering::Relaxed)
    }

    /// Free frames left.
    pub fn free(&self) -> usize {
        self.with(|bm| bm.iter().map(|w| w.count_zeros() as usize).sum())
    }
}

fn is_free(bm: &[u64], f: usize) -> bool {
    bm[f / 64] & (1 << (f % 64)) == 0
}

// SAFETY: a frame is handed out only when its bit was clear, and its bit is set until
// `deallocate_frames`; the range is RAM reachable at `virt_base` (promised to `new`).
unsafe impl FrameAllocator for BitmapFrames {
    fn allocate_frames(&self, count: usize, align_frames: usize) -> Option<HostPhysAddr> {
        if count == 0 || !align_frames.is_power_of_two() {
            return None;
        }
        // Alignment is of the physical address, so start from the first aligned frame.
        let base_frame = (self.base.as_u64() / FRAME_SIZE as u64) as usize;
        let first = base_frame.next_multiple_of(align_frames) - base_frame;
        let found = self.with(|bm| {
            let mut f = first;
            while f + count <= self.frames {
                match (f..f + count).find(|&i| !is_free(bm, i)) {
                    None => {
                        (f..f + count).for_each(|i| bm[i / 64] |= 1 << (i % 64));
                        return Some(f);
                    }
                    Some(busy) => f = (base_frame + busy + 1).next_multiple_of(align_frames) - base_frame,
                }
            }
            None
        })?;
        let now = self.in_use.fetch_add(count, Ordering::Relaxed) + count;
        self.high_water.fetch_max(now, Ordering::Relaxed);
        Some(self.base + (found * FRAME_SIZE) as u64)
    }

    unsafe fn deallocate_frames(&self, base: HostPhysAddr, count: usize) {
        let first = ((base - self.base) / FRAME_SIZE as u64) as usize;
        self.with(|bm| {
            for i in first..first + count {
                debug_assert!(!is_free(bm, i), "frame {i} freed twice");
                bm[i / 64] &= !(1 << (i % 64));
            }
        });
        self.in_use.fetch_sub(count, Ordering::Relaxed);
    }

    fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8> {
        let off = pa.as_u64().wrapping_sub(self.base.as_u64()) as usize;
        NonNull::new(self.virt_base.wrapping_add(off) as *mut u8).expect("the window is never at address 0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_runs_reservations_and_reuse() {
        // SAFETY: the allocator is never used to reach memory in this test.
        let a = unsafe { BitmapFrames::new(HostPhysAddr::new(0x8020_0000), 0x1000_0000, 1024) }.unwrap();
        a.reserve(HostPhysAddr::new(0x8020_0000), HostPhysAddr::new(0x8020_3001));
        let f = a.allocate_frame().unwrap();
        assert_eq!(f, HostPhysAddr::new(0x8020_4000), "reserved frames are skipped");
        let root = a.allocate_frames(4, 4).unwrap();
        assert!(root.is_aligned(16 * 1024));
        assert_eq!(root, HostPhysAddr::new(0x8020_8000));
        let huge = a.allocate_frames(512, 512).unwrap();
        assert!(huge.is_aligned(2 << 20));
        assert_eq!(a.in_use(), 517);
        assert_eq!(a.allocate_frames(512, 512), None, "only one 2 MiB-aligned run fits in 4 MiB");
        // SAFETY: handing back what was allocated above.
        unsafe { a.deallocate_frames(huge, 512) };
        assert_eq!(a.allocate_frames(512, 512), Some(huge), "freed frames are reused");
        assert_eq!(a.phys_to_virt(HostPhysAddr::new(0x8020_1000)).as_ptr() as usize, 0x1000_1000);
        assert_eq!(a.high_water(), 517);
        // SAFETY: refused before it could be used.
        let bad = unsafe { BitmapFrames::new(HostPhysAddr::new(0x8000_0001), 0, 1) };
        assert!(matches!(bad, Err(FramesError::Misaligned(_))));
    }

    #[test]
    fn alignment_is_of_the_physical_address_not_the_index() {
        // SAFETY: never used to reach memory.
        let a = unsafe { BitmapFrames::new(HostPhysAddr::new(0x81a6_f000), 0x1000_0000, 64) }.unwrap();
        let one = a.allocate_frame().unwrap();
        assert_eq!(one, HostPhysAddr::new(0x81a6_f000));
        for _ in 0..3 {
            let r = a.allocate_frames(4, 4).unwrap();
            assert!(r.is_aligned(16 * 1024), "{r:?} is not 16 KiB-aligned");
            a.allocate_frame().unwrap();
        }
    }
}
