//! The hypervisors' heap: the `talc` allocator over a static arena, behind a spin lock.
//!
//! The images need a `#[global_allocator]` for the engine's bookkeeping (`Vec`s, boxed flush
//! lists). Heap allocators are not twostage's subject, so this is the well-kept no_std `talc`
//! crate (free-list allocator with size-class bins; frees are reused, unlike a bump arena), with
//! its `counters` feature for the run summary. Declare the heap with
//! [`global_heap!`](crate::global_heap).

pub use talc::source::Claim;

/// A heap that several harts may use: talc behind a `spinning_top` spin lock (no OS to block on).
pub type Heap = talc::TalcLock<spinning_top::RawSpinlock, Claim>;

/// What the heap holds, for the run summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes in live allocations.
    pub in_use: usize,
    /// Live allocations.
    pub allocations: usize,
    /// Allocations made so far.
    pub total_allocations: u64,
    /// Bytes of the arena claimed so far (the arena is claimed on the first allocation).
    pub claimed: usize,
}

/// The heap's figures.
pub fn stats(heap: &Heap) -> HeapStats {
    let talc = heap.lock();
    let c = talc.counters();
    HeapStats {
        in_use: c.allocated_bytes,
        allocations: c.allocation_count,
        total_allocations: c.total_allocation_count,
        claimed: c.claimed_bytes,
    }
}

/// Declares the `#[global_allocator]`: `global_heap!(HEAP, 8 << 20);` gives an 8 MiB arena in
/// the image's .bss, claimed by talc on first use.
#[macro_export]
macro_rules! global_heap {
    ($name:ident, $bytes:expr) => {
        #[global_allocator]
        static $name: $crate::heap::Heap = $crate::heap::Heap::new({
            static mut ARENA: [u8; $bytes] = [0; $bytes];
            // SAFETY: `ARENA` is private to this declaration and handed to talc once, here; talc
            // is its only user from then on.
            unsafe { $crate::heap::Claim::array(&raw mut ARENA) }
        });
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::alloc::{GlobalAlloc, Layout};

    #[test]
    fn frees_are_reused_and_counted() {
        static mut ARENA: [u8; 64 * 1024] = [0; 64 * 1024];
        // SAFETY: the arena is handed to this heap only.
        let heap = Heap::new(unsafe { Claim::array(&raw mut ARENA) });
        let l = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: a valid non-zero layout; each block is freed once with the layout it had.
        unsafe {
            let a = heap.alloc(l);
            assert!(!a.is_null());
            assert_eq!(stats(&heap).in_use, 1000);
            heap.dealloc(a, l);
            let b = heap.alloc(l);
            assert_eq!(a, b, "a freed block is handed out again");
            heap.dealloc(b, l);
        }
        let s = stats(&heap);
        assert_eq!((s.in_use, s.allocations, s.total_allocations), (0, 0, 2));
        assert!(s.claimed > 60 * 1024);
    }
}
