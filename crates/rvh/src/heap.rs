//! A size-class heap for a bare-metal hypervisor: freed blocks are reused, so a long-running guest
//! whose exits allocate and free cannot exhaust it by churn.
//!
//! Blocks of 16 B to 1 MiB come from power-of-two classes, each with an intrusive free list;
//! a class block is carved from the arena aligned to its own size, which honours any alignment
//! up to that size. Larger blocks come straight from the arena and are given back only when they
//! are the last block carved.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

const MIN_SHIFT: u32 = 4;
const MAX_SHIFT: u32 = 20;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;

struct Inner {
    base: usize,
    end: usize,
    next: usize,
    free: [usize; CLASSES],
    in_use: usize,
}

/// The heap. Give it an arena with [`SizeClassHeap::init`] before the first allocation.
pub struct SizeClassHeap {
    lock: AtomicBool,
    inner: UnsafeCell<Inner>,
}

// SAFETY: `inner` is only reached with `lock` held (a spin lock).
unsafe impl Sync for SizeClassHeap {}

/// Heap counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes handed out and not yet freed (rounded up to class sizes).
    pub in_use: usize,
    /// Bytes of the arena carved so far (the high-water mark).
    pub carved: usize,
    /// Arena size.
    pub arena: usize,
}

fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT).checked_next_power_of_two()?;
    let shift = size.trailing_zeros();
    (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
}

impl SizeClassHeap {
    /// An empty heap with no arena (every allocation fails until [`Self::init`]).
    pub const fn new() -> Self {
        Self {
            lock: AtomicBool::new(false),
            inner: UnsafeCell::new(Inner { base: 0, end: 0, next: 0, free: [0; CLASSES], in_use: 0 }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        while self.lock.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.inner.get() });
        self.lock.store(false, Ordering::Release);
        r
    }

    /// Gives the heap `[base, base + size)`.
    ///
    /// # Safety
    /// The range must be writable memory that nothing else uses, for as long as the heap lives;
    /// `init` is called once, before any allocation.
    pub unsafe fn init(&self, base: usize, size: usize) {
        self.with(|h| {
            h.base = base;
            h.end = base + size;
            h.next = base;
        });
    }

    /// Counters.
    pub fn stats(&self) -> HeapStats {
        self.with(|h| HeapStats { in_use: h.in_use, carved: h.next - h.base, arena: h.end - h.base })
    }
}

impl Default for SizeClassHeap {
    fn default() -> Self {
        Self::new()
    }
}

fn carve(h: &mut Inner, size: usize, align: usize) -> Option<usize> {
    let start = h.next.checked_next_multiple_of(align)?;
    let end = start.checked_add(size)?;
    if end > h.end {
        return None;
    }
    h.next = end;
    Some(start)
}

// SAFETY: a block is handed out once until it is freed; class blocks are aligned to their size
// (>= the layout's size and alignment); free-list links live inside free blocks only.
unsafe impl GlobalAlloc for SizeClassHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with(|h| match class_of(layout) {
            Some(c) => {
                let size = 1usize << (c as u32 + MIN_SHIFT);
                let block = if h.free[c] != 0 {
                    let b = h.free[c];
                    // SAFETY: a free block holds the address of the next free block of its class.
                    h.free[c] = unsafe { (b as *const usize).read() };
                    Some(b)
                } else {
                    carve(h, size, size)
                };
                block.map_or(core::ptr::null_mut(), |b| {
                    h.in_use += size;
                    b as *mut u8
                })
            }
            None => carve(h, layout.size(), layout.align()).map_or(core::ptr::null_mut(), |b| {
                h.in_use += layout.size();
                b as *mut u8
            }),
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.with(|h| match class_of(layout) {
            Some(c) => {
                // SAFETY: the block is free now and at least a word long and word-aligned.
                unsafe { (ptr as *mut usize).write(h.free[c]) };
                h.free[c] = ptr as usize;
                h.in_use -= 1usize << (c as u32 + MIN_SHIFT);
            }
            None => {
                if ptr as usize + layout.size() == h.next {
                    h.next = ptr as usize;
                }
                h.in_use -= layout.size();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn churn_reuses_blocks_and_alignment_holds() {
        let mut arena = vec![0u64; 1 << 18]; // 2 MiB
        let heap = SizeClassHeap::new();
        // SAFETY: the Vec outlives the heap's use here and is otherwise untouched.
        unsafe { heap.init(arena.as_mut_ptr() as usize, arena.len() * 8) };
        let l = Layout::from_size_align(24, 8).unwrap();
        // SAFETY: layouts are non-zero; every block is freed with its layout.
        unsafe {
            let a = heap.alloc(l);
            assert!(!a.is_null());
            heap.dealloc(a, l);
            let carved = heap.stats().carved;
            for _ in 0..100_000 {
                let b = heap.alloc(l);
                assert_eq!(b, a, "a freed block is reused");
                heap.dealloc(b, l);
            }
            assert_eq!(heap.stats().carved, carved, "churn does not grow the heap");
            let big = Layout::from_size_align(3000, 4096).unwrap();
            let p = heap.alloc(big);
            assert_eq!(p as usize % 4096, 0);
            assert_eq!(heap.stats().in_use, 4096);
            heap.dealloc(p, big);
            assert_eq!(heap.stats().in_use, 0);
            // Past the largest class: carved directly, and handed back when last.
            let huge = Layout::from_size_align(3 << 20, 8).unwrap();
            assert!(heap.alloc(huge).is_null(), "larger than the arena");
            let h1 = Layout::from_size_align(1 << 20 | 8, 8).unwrap();
            let before = heap.stats().carved;
            let p = heap.alloc(h1);
            assert!(!p.is_null());
            heap.dealloc(p, h1);
            assert_eq!(heap.stats().carved, before);
        }
    }

    #[test]
    fn classes() {
        assert_eq!(class_of(Layout::from_size_align(1, 1).unwrap()), Some(0));
        assert_eq!(class_of(Layout::from_size_align(17, 8).unwrap()), Some(1));
        assert_eq!(class_of(Layout::from_size_align(8, 64).unwrap()), Some(2));
        assert_eq!(class_of(Layout::from_size_align(1 << 20, 8).unwrap()), Some(16));
        assert_eq!(class_of(Layout::from_size_align((1 << 20) + 1, 8).unwrap()), None);
    }
}
