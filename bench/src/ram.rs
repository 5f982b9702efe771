//! Bench host RAM: one pre-touched block and a free-list frame allocator that both twostage and the anchors use.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use twostage_npt::{FrameAllocator, HostPhysAddr, FRAME_SIZE};

/// Host-physical address of the first frame (not zero, and unlike any host virtual address, so
/// that a missing `phys_to_virt` would fault instead of silently working).
pub const RAM_BASE: u64 = 0x10_0000_0000;

/// Alignment of the block: 2 MiB, so that frames aligned in host-physical terms are aligned in
/// host-virtual terms too.
const BLOCK_ALIGN: usize = 2 << 20;

struct Pool {
    /// Next never-used frame.
    bump: usize,
    /// Freed frames, reused last-in first-out.
    free: Vec<u32>,
    /// Frames allocated and not yet freed.
    in_use: usize,
}

/// Simulated host RAM for the benchmarks.
///
/// The block is touched once when made, so that no measurement pays the host kernel's first-touch
/// page faults. The allocator is a free-list stack behind a spin flag: uncontended it costs a
/// compare-and-swap and a store, so it does not dominate what it serves (the `testing::HostRam`
/// of the engine scans a bitmap behind a mutex, which is right for tests, not for timing).
pub struct BenchRam {
    base: NonNull<u8>,
    frames: usize,
    busy: AtomicBool,
    pool: std::cell::UnsafeCell<Pool>,
}

// SAFETY: the block is plain heap memory owned by the BenchRam; the pool is only reached while
// the `busy` flag is held (see `with_pool`), and frame bytes are shared per the FrameAllocator
// contract.
unsafe impl Send for BenchRam {}
// SAFETY: as above.
unsafe impl Sync for BenchRam {}

impl BenchRam {
    /// `bytes` of RAM (rounded up to whole frames), zeroed and touched.
    pub fn new(bytes: usize) -> Self {
        let frames = bytes.div_ceil(FRAME_SIZE);
        let layout = Layout::from_size_align(frames * FRAME_SIZE, BLOCK_ALIGN).expect("RAM size fits a layout");
        // SAFETY: the layout has a non-zero size.
        let base = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("out of host memory for BenchRam");
        // Touch every page (the zeroed allocation is lazily committed by the host kernel).
        for f in 0..frames {
            // SAFETY: `f * FRAME_SIZE` is inside the block just allocated.
            unsafe { base.as_ptr().add(f * FRAME_SIZE).write_volatile(0) };
        }
        let pool = Pool { bump: 0, free: Vec::with_capacity(frames), in_use: 0 };
        Self { base, frames, busy: AtomicBool::new(false), pool: std::cell::UnsafeCell::new(pool) }
    }

    /// Makes one and leaks it, for allocators that must be `'static` (page-table-generic's).
    pub fn leak(bytes: usize) -> &'static Self {
        Box::leak(Box::new(Self::new(bytes)))
    }

    /// Frames allocated and not yet freed.
    pub fn frames_in_use(&self) -> usize {
        self.with_pool(|p| p.in_use)
    }

    /// Total frames.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// The host-virtual window to `pa`: a constant offset, like a hypervisor's direct map (so
    /// that the benchmarks time the engines, not this fake). Only meaningful for addresses inside
    /// the block (checked in debug builds); callers dereference it only for frames they own.
    #[inline]
    pub fn ptr(&self, pa: u64) -> *mut u8 {
        debug_assert!(pa >= RAM_BASE && pa - RAM_BASE < (self.frames * FRAME_SIZE) as u64, "{pa:#x} outside BenchRam");
        self.base.as_ptr().wrapping_add(pa.wrapping_sub(RAM_BASE) as usize)
    }

    fn with_pool<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R {
        while self.busy.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::hint::spin_loop();
        }
        // SAFETY: the `busy` flag is held, so this is the only reference to the pool.
        let r = f(unsafe { &mut *self.pool.get() });
        self.busy.store(false, Ordering::Release);
        r
    }

    /// One frame; `None` when RAM is exhausted.
    pub fn alloc(&self) -> Option<u64> {
        self.alloc_n(1, 1)
    }

    /// `count` contiguous frames aligned to `align` frames.
    pub fn alloc_n(&self, count: usize, align: usize) -> Option<u64> {
        self.with_pool(|p| {
            if count == 1 {
                if let Some(f) = p.free.pop() {
                    p.in_use += 1;
                    return Some(RAM_BASE + f as u64 * FRAME_SIZE as u64);
                }
            }
            let align = align.max(1);
            let start = p.bump.next_multiple_of(align);
            if start + count > self.frames {
                return None;
            }
            // Frames skipped for alignment go to the free list.
            p.free.extend((p.bump..start).map(|f| f as u32));
            p.bump = start + count;
            p.in_use += count;
            Some(RAM_BASE + start as u64 * FRAME_SIZE as u64)
        })
    }

    /// Gives `count` frames from `pa` back.
    ///
    /// # Safety
    /// They came from one `alloc_n(count, _)` and nothing uses them any more.
    pub unsafe fn free_n(&self, pa: u64, count: usize) {
        let first = ((pa - RAM_BASE) / FRAME_SIZE as u64) as u32;
        self.with_pool(|p| {
            p.free.extend((0..count as u32).map(|i| first + i));
            p.in_use -= count;
        });
    }
}

impl Drop for BenchRam {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.frames * FRAME_SIZE, BLOCK_ALIGN).expect("as in new");
        // SAFETY: allocated in `new` with this layout, freed once here.
        unsafe { dealloc(self.base.as_ptr(), layout) };
    }
}

// SAFETY: frames are handed out once until freed (bump pointer plus free list under the spin
// flag); `phys_to_virt` reaches the block, which outlives every allocation and covers
// multi-frame allocations contiguously; frames are not zeroed (allowed by the contract).
unsafe impl FrameAllocator for BenchRam {
    fn allocate_frames(&self, count: usize, align_frames: usize) -> Option<HostPhysAddr> {
        self.alloc_n(count, align_frames).map(HostPhysAddr::new)
    }

    unsafe fn deallocate_frames(&self, base: HostPhysAddr, count: usize) {
        // SAFETY: the caller's promise (one allocation of `count`, no longer used) is ours.
        unsafe { self.free_n(base.as_u64(), count) }
    }

    #[inline]
    fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8> {
        // SAFETY: for an address inside the block (the only ones handed out) `ptr` points into
        // the block, which is not null.
        unsafe { NonNull::new_unchecked(self.ptr(pa.as_u64())) }
    }
}
