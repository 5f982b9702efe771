//! The host frame allocator: a bitmap over one stretch of RAM from the multiboot memory map,
//! with the image, the modules and low memory left out. `phys_to_virt` is the identity.

use core::cell::RefCell;
use core::ptr::NonNull;
use twostage_npt::{FrameAllocator, HostPhysAddr, FRAME_SIZE};

/// Frames the bitmap can describe (256 MiB).
const MAX_FRAMES: usize = 65536;

struct Inner {
    base: u64,
    frames: usize,
    used: [u64; MAX_FRAMES / 64],
    in_use: usize,
    allocations: u64,
    frees: u64,
}

/// Frames of host RAM.
pub struct Frames {
    inner: RefCell<Inner>,
}

// SAFETY: the image is single-core with interrupts off, so the RefCell is never contended.
unsafe impl Sync for Frames {}

/// Counters for the report.
#[derive(Clone, Copy, Debug)]
pub struct FrameStats {
    /// First frame managed.
    pub base: u64,
    /// Frames managed.
    pub frames: usize,
    /// Frames allocated now.
    pub in_use: usize,
    /// Allocation calls that succeeded.
    pub allocations: u64,
    /// Deallocation calls.
    pub frees: u64,
}

impl Frames {
    /// An empty allocator (manages nothing until [`Frames::init`]).
    pub const fn empty() -> Self {
        Self {
            inner: RefCell::new(Inner {
                base: 0,
                frames: 0,
                used: [0; MAX_FRAMES / 64],
                in_use: 0,
                allocations: 0,
                frees: 0,
            }),
        }
    }

    /// Manages `start..end` (4 KiB-aligned inward).
    pub fn init(&self, start: u64, end: u64) {
        let start = start.next_multiple_of(FRAME_SIZE as u64);
        let end = end & !(FRAME_SIZE as u64 - 1);
        let mut s = self.inner.borrow_mut();
        s.base = start;
        s.frames = (((end.saturating_sub(start)) / FRAME_SIZE as u64) as usize).min(MAX_FRAMES);
    }

    /// The counters.
    pub fn stats(&self) -> FrameStats {
        let s = self.inner.borrow();
        FrameStats { base: s.base, frames: s.frames, in_use: s.in_use, allocations: s.allocations, frees: s.frees }
    }
}

fn bit(used: &[u64], i: usize) -> bool {
    used[i / 64] & (1 << (i % 64)) != 0
}

// SAFETY: frames come from RAM the memory map lists as available, minus the image and modules;
// the bitmap hands each out once until it is returned; the identity map reaches all of it and
// nothing else holds references into it.
unsafe impl FrameAllocator for Frames {
    fn allocate_frames(&self, count: usize, align_frames: usize) -> Option<HostPhysAddr> {
        let mut s = self.inner.borrow_mut();
        if count == 0 {
            return None;
        }
        let align = align_frames.max(1);
        let base_frame = (s.base / FRAME_SIZE as u64) as usize;
        // First index whose physical frame number is aligned.
        let mut i = (base_frame.next_multiple_of(align)) - base_frame;
        while i + count <= s.frames {
            match (i..i + count).find(|&k| bit(&s.used, k)) {
                None => {
                    for k in i..i + count {
                        s.used[k / 64] |= 1 << (k % 64);
                    }
                    s.in_use += count;
                    s.allocations += 1;
                    return Some(HostPhysAddr::new(s.base + (i * FRAME_SIZE) as u64));
                }
                Some(busy) => i = (base_frame + busy + 1).next_multiple_of(align) - base_frame,
            }
        }
        None
    }

    unsafe fn deallocate_frames(&self, base: HostPhysAddr, count: usize) {
        let mut s = self.inner.borrow_mut();
        let first = ((base.as_u64() - s.base) / FRAME_SIZE as u64) as usize;
        for k in first..first + count {
            assert!(bit(&s.used, k), "frame {:#x} freed twice", s.base + (k * FRAME_SIZE) as u64);
            s.used[k / 64] &= !(1 << (k % 64));
        }
        s.in_use -= count;
        s.frees += 1;
    }

    fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8> {
        NonNull::new(pa.as_u64() as *mut u8).expect("frame 0 is never handed out")
    }
}
