//! Fake RAM whose allocator checks that every allocation comes back whole, once, with the count
//! it was made with (a half-freed or twice-freed run panics): the tests that count frames
//! through huge pages, copy-on-write and migration use it.

use super::{gpa, ModelCpu};
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use twostage_aspace::{AddressSpace, FaultOutcome};
use twostage_npt::testing::HostRam;
use twostage_npt::{Access, AdMode, FrameAllocator, HostPhysAddr, NestedPageFaultInfo};

/// [`HostRam`] plus the live allocations (base -> frame count).
pub struct Checked {
    pub ram: HostRam,
    pub live: Mutex<BTreeMap<u64, usize>>,
}

/// The allocator handle the tests give their spaces.
pub type Mem = Arc<Checked>;

/// `frames` frames of checked fake RAM.
pub fn mem(frames: usize) -> Mem {
    Arc::new(Checked { ram: HostRam::new(frames), live: Mutex::new(BTreeMap::new()) })
}

// SAFETY: forwards to HostRam, which keeps the promises; the bookkeeping only adds checks.
unsafe impl FrameAllocator for Checked {
    fn allocate_frames(&self, count: usize, align: usize) -> Option<HostPhysAddr> {
        let a = self.ram.allocate_frames(count, align)?;
        assert!(self.live.lock().unwrap().insert(a.as_u64(), count).is_none());
        Some(a)
    }
    unsafe fn deallocate_frames(&self, base: HostPhysAddr, count: usize) {
        let was = self.live.lock().unwrap().remove(&base.as_u64());
        assert_eq!(was, Some(count), "{base:?} freed with {count} frames: not one whole allocation");
        // SAFETY: the caller's promise, checked to be a whole allocation just above.
        unsafe { self.ram.deallocate_frames(base, count) }
    }
    fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8> {
        self.ram.phys_to_virt(pa)
    }
}

/// A vCPU access to `at` through the spec model's walk of `s`'s table (a write stores `v`),
/// faults resolved by the space and flushed; `None` when the space ran out of frames.
pub fn access<F: ModelCpu>(s: &mut AddressSpace<F, Mem>, m: &Checked, at: u64, acc: Access, v: u64) -> Option<u64> {
    let hw = s.options().ad == AdMode::Hardware;
    for _ in 0..8 {
        match F::model_walk(&m.ram, s.root().as_u64(), hw, gpa(at), acc) {
            Ok(hpa) if acc == Access::Write => {
                m.ram.write_u64(hpa, v);
                return Some(v);
            }
            Ok(hpa) => return Some(m.ram.read_u64(hpa)),
            Err(_) => match s.handle_fault(NestedPageFaultInfo::new(gpa(at), acc)) {
                FaultOutcome::Resolved { flush } => s.flush(flush, |_| {}).unwrap(),
                FaultOutcome::OutOfMemory { .. } => return None,
                other => panic!("{acc} at {at:#x}: {other:?}"),
            },
        }
    }
    panic!("{acc} at {at:#x} kept faulting");
}
