//! Host memory, injected: where table frames come from and how the engine reaches them.

use crate::addr::{HostPhysAddr, PageSize};
use core::ptr::NonNull;

/// Bytes in one frame: the 4 KiB page ([`PageSize::Size4K`]`.bytes()`), as a `usize` for
/// pointer arithmetic. The crate's one name for that size besides `PageSize::Size4K`.
pub const FRAME_SIZE: usize = PageSize::Size4K.bytes() as usize;

/// A source of host-physical frames, and the window through which their bytes are reached.
///
/// Methods take `&self` so that one allocator can serve many tables (and many vCPUs) at once;
/// implementations use interior mutability (a lock, a `RefCell` in single-threaded tests).
///
/// # Safety
/// An implementor promises that:
/// - `allocate_frames(n, align)` returns the base of `n` contiguous 4 KiB frames, aligned to
///   `align` frames, that no one else uses until they are handed back through
///   `deallocate_frames` with the same `n`; the contents are unspecified (not zeroed);
/// - `phys_to_virt(pa)` returns a pointer to the byte at `pa`, valid for reads and writes for as
///   long as the frame containing `pa` is allocated, and which no Rust reference aliases; for an
///   allocation of `n` frames, `phys_to_virt(base)` reaches all `n` frames contiguously;
/// - the host-physical address is what the hardware will see in a table entry, and lies below
///   the MAXPHYADDR of every CPU that will walk the table (the table's
///   [`crate::TableOptions::max_phys_bits`]). The engine checks this for every frame it takes and
///   panics on a frame beyond it: such a frame is an allocator bug, which no caller can recover
///   from, and linking it would make the hardware fail the walk with a misconfiguration.
pub unsafe trait FrameAllocator {
    /// `count` contiguous frames aligned to `align_frames` frames (a power of two), or `None`.
    fn allocate_frames(&self, count: usize, align_frames: usize) -> Option<HostPhysAddr>;

    /// Hands frames back.
    ///
    /// # Safety
    /// `base..base + count` must have come from one `allocate_frames(count, _)` on this allocator
    /// and must no longer be reachable by hardware or software.
    unsafe fn deallocate_frames(&self, base: HostPhysAddr, count: usize);

    /// Where the hypervisor can reach `pa`.
    fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8>;

    /// One frame.
    fn allocate_frame(&self) -> Option<HostPhysAddr> {
        self.allocate_frames(1, 1)
    }
}

// SAFETY: forwards to `T`, which keeps the promises.
unsafe impl<T: FrameAllocator + ?Sized> FrameAllocator for &T {
    fn allocate_frames(&self, count: usize, align_frames: usize) -> Option<HostPhysAddr> {
        (**self).allocate_frames(count, align_frames)
    }
    unsafe fn deallocate_frames(&self, base: HostPhysAddr, count: usize) {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { (**self).deallocate_frames(base, count) }
    }
    fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8> {
        (**self).phys_to_virt(pa)
    }
}

// SAFETY: forwards to `T`, which keeps the promises.
unsafe impl<T: FrameAllocator + ?Sized> FrameAllocator for alloc::sync::Arc<T> {
    fn allocate_frames(&self, count: usize, align_frames: usize) -> Option<HostPhysAddr> {
        (**self).allocate_frames(count, align_frames)
    }
    unsafe fn deallocate_frames(&self, base: HostPhysAddr, count: usize) {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { (**self).deallocate_frames(base, count) }
    }
    fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8> {
        (**self).phys_to_virt(pa)
    }
}
