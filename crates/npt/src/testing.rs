//! Fake host memory for tests and benchmarks: a Vec-backed RAM with a counting frame allocator.

extern crate std;

use crate::addr::HostPhysAddr;
use crate::frame::{FrameAllocator, FRAME_SIZE};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;
use std::sync::Mutex;

/// Host-physical address of the first frame of every [`HostRam`] (not zero, so that a zero
/// address in an entry is never mistaken for a real frame).
pub const HOST_RAM_BASE: u64 = 0x4000_0000;

struct State {
    used: Vec<bool>,
    cursor: usize,
    in_use: usize,
    allocations: u64,
    frees: u64,
    fail_after: Option<u64>,
}

/// Simulated host RAM: `frames` frames at [`HOST_RAM_BASE`], an allocator over them that counts
/// every allocation and free, panics on a double or foreign free, and can be told to fail.
pub struct HostRam {
    mem: NonNull<u64>,
    words: usize,
    state: Mutex<State>,
}

// SAFETY: the memory is a plain heap block that lives as long as the HostRam; who may touch
// which frame is governed by the allocator (behind the mutex) and the FrameAllocator contract.
unsafe impl Send for HostRam {}
// SAFETY: as above; shared access to frame bytes goes through raw pointers per the contract.
unsafe impl Sync for HostRam {}

impl HostRam {
    /// RAM of `frames` 4 KiB frames, all free and zeroed.
    pub fn new(frames: usize) -> Self {
        let words = frames * FRAME_SIZE / 8;
        let block: Box<[u64]> = vec![0u64; words].into_boxed_slice();
        let mem = NonNull::new(Box::into_raw(block).cast::<u64>()).expect("Box is never null");
        let state =
            State { used: vec![false; frames], cursor: 0, in_use: 0, allocations: 0, frees: 0, fail_after: None };
        Self { mem, words, state: Mutex::new(state) }
    }

    /// Frames allocated and not yet freed.
    pub fn frames_in_use(&self) -> usize {
        self.state.lock().unwrap().in_use
    }
    /// Successful allocation calls so far.
    pub fn allocations(&self) -> u64 {
        self.state.lock().unwrap().allocations
    }
    /// Free calls so far.
    pub fn frees(&self) -> u64 {
        self.state.lock().unwrap().frees
    }
    /// After `n` more successful allocations, every allocation fails until [`HostRam::heal`].
    pub fn fail_after(&self, n: u64) {
        let mut s = self.state.lock().unwrap();
        s.fail_after = Some(s.allocations + n);
    }
    /// Allocations succeed again.
    pub fn heal(&self) {
        self.state.lock().unwrap().fail_after = None;
    }
    /// Total frames.
    pub fn frames(&self) -> usize {
        self.words * 8 / FRAME_SIZE
    }

    /// Whether `pa..pa+len` lies inside this RAM.
    pub fn contains(&self, pa: u64, len: usize) -> bool {
        pa >= HOST_RAM_BASE && pa - HOST_RAM_BASE + len as u64 <= self.words as u64 * 8
    }

    fn offset(&self, pa: u64, len: usize) -> usize {
        let off = pa.checked_sub(HOST_RAM_BASE).expect("address below HostRam") as usize;
        assert!(off + len <= self.words * 8, "address {pa:#x}+{len} beyond HostRam");
        off
    }

    /// Reads the aligned 64-bit word at `pa`.
    pub fn read_u64(&self, pa: u64) -> u64 {
        assert_eq!(pa % 8, 0);
        let off = self.offset(pa, 8);
        // SAFETY: in bounds (checked) and aligned; u64 reads of plain memory.
        unsafe { self.mem.as_ptr().add(off / 8).read_volatile() }
    }
    /// Writes the aligned 64-bit word at `pa`.
    pub fn write_u64(&self, pa: u64, v: u64) {
        assert_eq!(pa % 8, 0);
        let off = self.offset(pa, 8);
        // SAFETY: in bounds (checked) and aligned.
        unsafe { self.mem.as_ptr().add(off / 8).write_volatile(v) }
    }
    /// The aligned 64-bit word at `pa` as an atomic: what a test acting as the hardware uses to
    /// set accessed/dirty bits with locked read-modify-writes while the engine runs.
    pub fn atomic_u64(&self, pa: u64) -> &core::sync::atomic::AtomicU64 {
        assert_eq!(pa % 8, 0);
        let off = self.offset(pa, 8);
        // SAFETY: in bounds (checked) and 8-byte aligned; the block lives as long as `self`, and
        // the engine itself only touches table entries through atomics of the same size.
        unsafe { &*self.mem.as_ptr().add(off / 8).cast::<core::sync::atomic::AtomicU64>() }
    }
    /// Copies bytes out of RAM.
    pub fn read_bytes(&self, pa: u64, buf: &mut [u8]) {
        let off = self.offset(pa, buf.len());
        // SAFETY: in bounds (checked); byte copies have no alignment needs.
        unsafe { core::ptr::copy_nonoverlapping(self.mem.as_ptr().cast::<u8>().add(off), buf.as_mut_ptr(), buf.len()) }
    }
    /// Copies bytes into RAM.
    pub fn write_bytes(&self, pa: u64, buf: &[u8]) {
        let off = self.offset(pa, buf.len());
        // SAFETY: in bounds (checked).
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), self.mem.as_ptr().cast::<u8>().add(off), buf.len()) }
    }
}

impl Drop for HostRam {
    fn drop(&mut self) {
        let slice = core::ptr::slice_from_raw_parts_mut(self.mem.as_ptr(), self.words);
        // SAFETY: made from a Box<[u64]> of `words` words in `new`, dropped once here.
        drop(unsafe { Box::from_raw(slice) });
    }
}

// SAFETY: frames are handed out once until freed (tracked in `used`), `phys_to_virt` maps into
// the block that lives as long as the HostRam and covers multi-frame allocations contiguously,
// and host-physical addresses are what tables store.
unsafe impl FrameAllocator for HostRam {
    fn allocate_frames(&self, count: usize, align_frames: usize) -> Option<HostPhysAddr> {
        let mut s = self.state.lock().unwrap();
        let total = s.used.len();
        if s.fail_after.is_some_and(|n| s.allocations >= n) || count == 0 || count > total {
            return None;
        }
        let align = align_frames.max(1);
        let start = s.cursor - s.cursor % align;
        let mut tried = 0;
        let mut i = start;
        while tried <= total {
            if i + count > total {
                i = 0;
            }
            if s.used[i..i + count].iter().all(|u| !u) {
                s.used[i..i + count].iter_mut().for_each(|u| *u = true);
                s.cursor = i + count;
                s.in_use += count;
                s.allocations += 1;
                return Some(HostPhysAddr::new(HOST_RAM_BASE + (i * FRAME_SIZE) as u64));
            }
            i += align;
            tried += align;
        }
        None
    }

    unsafe fn deallocate_frames(&self, base: HostPhysAddr, count: usize) {
        let mut s = self.state.lock().unwrap();
        let first = self.offset(base.as_u64(), count * FRAME_SIZE) / FRAME_SIZE;
        for u in &mut s.used[first..first + count] {
            assert!(*u, "frame {base:?} freed twice or never allocated");
            *u = false;
        }
        s.in_use -= count;
        s.frees += 1;
    }

    fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8> {
        let off = self.offset(pa.as_u64(), 1);
        // SAFETY: in bounds of the block (checked just above).
        unsafe { NonNull::new_unchecked(self.mem.as_ptr().cast::<u8>().add(off)) }
    }
}
