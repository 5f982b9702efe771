//! A dirty log over a range whose bitmap cannot be allocated is a typed error, not an abort.
//! This test binary's global allocator refuses any single allocation above 256 MiB, as a
//! hypervisor's fixed heap would.

mod common;
use common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use twostage_aspace::*;
use twostage_npt::{AdMode, GpaRange, GuestPhysAddr, MappingFlags, Sv48x4};

struct Capped;

// SAFETY: forwards to `System`, or returns null (allowed: allocation failure).
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > 256 << 20 {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;

#[test]
fn a_huge_dirty_log_range_is_a_typed_error() {
    let ram = ram(256);
    let mut s = AddressSpace::<Sv48x4, Ram>::new(ram.clone(), opts::<Sv48x4>(AdMode::Hardware)).unwrap();
    let (_, f) = s.add_region("ram", range(0x8000_0000, 0x10000), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    // The whole 50-bit guest-physical space: 2^38 pages, a 32 GiB bitmap.
    let huge = GpaRange::from_start_len(GuestPhysAddr::ZERO, 1 << 50).unwrap();
    let e = s.start_dirty_log(huge).unwrap_err();
    assert!(matches!(e, DirtyLogError::Bitmap(BitmapAllocError { range, .. }) if range == huge), "{e:?}");
    assert!(std::error::Error::source(&e).is_some(), "the allocator's error is kept as the source");
    assert_eq!(e.to_string(), "no memory for the dirty log's bitmap");
    assert_eq!(s.dirty_log_range(), None, "nothing changed");
    assert!(matches!(s.harvest_accessed(huge), Err(BitmapAllocError { .. })));
    // A range that fits still works.
    let (_, f) = s.start_dirty_log(range(0x8000_0000, 0x10000)).unwrap();
    s.flush_unloaded(f).unwrap();
    assert_eq!(s.dirty_log_range(), Some(range(0x8000_0000, 0x10000)));
}
