//! The kernel heap: a bump allocator over a static arena (the engine's bookkeeping Vecs).
//!
//! Freed blocks are not reused; the arena is sized for the image's whole run (a suite of short
//! scenarios), and running out is reported by `alloc` as a null pointer (an allocation error).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

const ARENA: usize = 4 << 20;

struct Bump {
    arena: UnsafeCell<[u8; ARENA]>,
    next: UnsafeCell<usize>,
}

// SAFETY: the image is single-core with interrupts off: no two allocations ever run at once.
unsafe impl Sync for Bump {}

// SAFETY: every block handed out lies inside the arena, is aligned as asked, and is never
// handed out twice (the cursor only moves forward).
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-core, no interrupts: nothing else touches the cursor meanwhile.
        let next = unsafe { &mut *self.next.get() };
        let base = self.arena.get() as usize;
        let start = (base + *next).next_multiple_of(layout.align());
        let end = start + layout.size();
        if end > base + ARENA {
            return core::ptr::null_mut();
        }
        *next = end - base;
        start as *mut u8
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static HEAP: Bump = Bump { arena: UnsafeCell::new([0; ARENA]), next: UnsafeCell::new(0) };

/// Bytes of heap handed out so far.
pub fn used() -> usize {
    // SAFETY: a plain read of the cursor on the only core.
    unsafe { *HEAP.next.get() }
}
