//! Zeroed frames kept ready for first touches, so that a demand fault maps a frame instead of
//! zeroing one.
//!
//! Zeroing a 4 KiB frame is most of a demand fault's cost. A hypervisor that has idle time (a
//! vCPU halted, a housekeeping thread, the moments after creating the VM) calls
//! [`AddressSpace::prepare_zeroed`] there to allocate and zero frames ahead; a first touch of a
//! demand-zero page (a fault, a write, a populate) then takes one from the pool and only falls
//! back to allocating and zeroing when the pool is empty. The pool's frames are allocated but
//! belong to no page: they are counted in [`AddressSpace::zeroed_ready`], handed back to the
//! allocator by [`AddressSpace::release_zeroed`] or when the space drops, and a fork starts with
//! an empty pool of its own.

use crate::space::AddressSpace;
use alloc::vec::Vec;
use twostage_npt::{Format, FrameAllocator, HostPhysAddr, FRAME_SIZE};

/// The pool (see the module documentation). It holds its own handle to the allocator so that
/// it hands its frames back when it drops.
pub(crate) struct ZeroPool<A: FrameAllocator> {
    alloc: A,
    frames: Vec<HostPhysAddr>,
}

impl<A: FrameAllocator> ZeroPool<A> {
    pub(crate) fn new(alloc: A) -> Self {
        Self { alloc, frames: Vec::new() }
    }

    /// A zeroed frame, now the caller's (to map, or to deallocate), if one is ready.
    #[inline]
    pub(crate) fn take(&mut self) -> Option<HostPhysAddr> {
        self.frames.pop()
    }

    /// Allocates and zeroes frames until `target` are ready (or the allocator runs out).
    fn fill(&mut self, target: usize) -> usize {
        self.frames.reserve(target.saturating_sub(self.frames.len()));
        while self.frames.len() < target {
            let Some(hpa) = self.alloc.allocate_frame() else { break };
            // SAFETY: a whole frame just allocated, which only this pool reaches
            // (`phys_to_virt` is valid for a whole allocated frame, the allocator's promise).
            unsafe { core::ptr::write_bytes(self.alloc.phys_to_virt(hpa).as_ptr(), 0, FRAME_SIZE) };
            self.frames.push(hpa);
        }
        self.frames.len()
    }

    /// Hands frames back until at most `keep` are left.
    fn shrink(&mut self, keep: usize) {
        while self.frames.len() > keep {
            let hpa = self.frames.pop().expect("above keep");
            // SAFETY: allocated by `fill` from this allocator, one frame, mapped nowhere.
            unsafe { self.alloc.deallocate_frames(hpa, 1) };
        }
    }

    fn len(&self) -> usize {
        self.frames.len()
    }
}

impl<A: FrameAllocator> Drop for ZeroPool<A> {
    fn drop(&mut self) {
        self.shrink(0);
    }
}

impl<F: Format, A: FrameAllocator + Clone> AddressSpace<F, A> {
    /// Allocates and zeroes frames until `frames` zeroed frames are ready for first touches of
    /// demand-zero pages (see the `zeroed` notes in the README's performance section): call it
    /// off the fault path, when the vCPUs are idle or right after creating the space. Returns
    /// how many are ready (fewer if the allocator ran out). Nothing in the guest changes.
    pub fn prepare_zeroed(&mut self, frames: usize) -> usize {
        self.zeroed.fill(frames)
    }

    /// Zeroed frames ready (allocated, mapped nowhere).
    pub fn zeroed_ready(&self) -> usize {
        self.zeroed.len()
    }

    /// Hands zeroed frames back to the allocator until at most `keep` are left.
    pub fn release_zeroed(&mut self, keep: usize) {
        self.zeroed.shrink(keep);
    }
}
