//! Guest-physical access by software translation through the nested table (no vsatp swap).
//!
//! The seed design reached guest-physical memory by zeroing vsatp, flushing the VS-stage TLB with
//! HFENCE.VVMA, copying with hlv/hsv and restoring both (two TLB flushes per copy; see
//! `hw::copy_from_guest_swap`). Here the hypervisor looks each page up in the nested
//! table it owns ([`GpaTranslate`]) and copies through its own window onto host memory.

use core::fmt;
use core::ptr::NonNull;
use twostage_npt::{Access, FrameAllocator, GuestPhysAddr, HostPhysAddr, MappingFlags};

/// Looks a guest-physical address up in a nested table: the host-physical address it maps to
/// and the rights of the leaf.
pub trait GpaTranslate {
    /// The translation of `gpa`, or `None` when nothing maps it.
    fn translate_gpa(&self, gpa: GuestPhysAddr) -> Option<(HostPhysAddr, MappingFlags)>;
}

impl<F: twostage_npt::Format, A: FrameAllocator> GpaTranslate for twostage_npt::PageTable<F, A> {
    fn translate_gpa(&self, gpa: GuestPhysAddr) -> Option<(HostPhysAddr, MappingFlags)> {
        self.translate(gpa)
    }
}

/// Why a guest-physical copy stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpaAccessError {
    /// Nothing maps this guest-physical address.
    NotMapped {
        /// The first unmapped address.
        gpa: GuestPhysAddr,
        /// The access the hypervisor attempted.
        access: Access,
        /// Bytes transferred before it.
        done: usize,
    },
    /// The mapping exists but its rights refuse the access (checked as the guest would be).
    NotPermitted {
        /// The address.
        gpa: GuestPhysAddr,
        /// The access.
        access: Access,
        /// The leaf's rights.
        flags: MappingFlags,
        /// Bytes transferred before it.
        done: usize,
    },
    /// The range runs past the top of the guest-physical address space.
    OutOfRange {
        /// The start of the range.
        gpa: GuestPhysAddr,
        /// Its length.
        len: usize,
    },
}

impl fmt::Display for GpaAccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMapped { gpa, access, done } => write!(f, "{access} at unmapped {gpa} after {done} bytes"),
            Self::NotPermitted { gpa, access, flags, done } => {
                write!(f, "{access} at {gpa} refused by rights {flags:?} after {done} bytes")
            }
            Self::OutOfRange { gpa, len } => write!(f, "{len} bytes at {gpa} leave the address space"),
        }
    }
}

/// Guest-physical memory seen through a nested table and a window onto host memory.
pub struct GuestPhys<'a, T: GpaTranslate + ?Sized, W: FrameAllocator + ?Sized> {
    table: &'a T,
    window: &'a W,
    /// Whether writes check the leaf's WRITE right (true: behave as the guest would).
    pub enforce_rights: bool,
}

impl<'a, T: GpaTranslate + ?Sized, W: FrameAllocator + ?Sized> GuestPhys<'a, T, W> {
    /// Wraps a table and a window.
    ///
    /// # Safety
    /// Every host-physical address that `table` translates to must be reachable for reads and
    /// writes through `window.phys_to_virt` (the frame allocator's promise, extended to every
    /// region the table maps), and no Rust reference may alias those bytes while a copy runs.
    pub unsafe fn new(table: &'a T, window: &'a W) -> Self {
        Self { table, window, enforce_rights: true }
    }

    fn chunks(
        &self,
        gpa: GuestPhysAddr,
        len: usize,
        access: Access,
        mut f: impl FnMut(NonNull<u8>, usize, usize),
    ) -> Result<(), GpaAccessError> {
        if gpa.checked_add(len as u64).is_none() {
            return Err(GpaAccessError::OutOfRange { gpa, len });
        }
        let mut done = 0;
        while done < len {
            let a = gpa + done as u64;
            let n = ((4096 - a.offset_in(4096)) as usize).min(len - done);
            let (hpa, flags) = self.table.translate_gpa(a).ok_or(GpaAccessError::NotMapped { gpa: a, access, done })?;
            if self.enforce_rights && !flags.allows(access) {
                return Err(GpaAccessError::NotPermitted { gpa: a, access, flags, done });
            }
            f(self.window.phys_to_virt(hpa), done, n);
            done += n;
        }
        Ok(())
    }

    /// Reads guest-physical memory (seed name `copy_from_guest`).
    pub fn copy_from_guest(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GpaAccessError> {
        let len = buf.len();
        self.chunks(gpa, len, Access::Read, |p, off, n| {
            // SAFETY: `new`'s contract: the translated frame is reachable through `p` for `n` bytes
            // (the chunk stays inside one 4 KiB page) and nothing aliases it.
            unsafe { core::ptr::copy_nonoverlapping(p.as_ptr(), buf[off..off + n].as_mut_ptr(), n) }
        })
    }

    /// Writes guest-physical memory (seed name `copy_to_guest`).
    pub fn copy_to_guest(&self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), GpaAccessError> {
        self.chunks(gpa, data.len(), Access::Write, |p, off, n| {
            // SAFETY: as in `copy_from_guest`.
            unsafe { core::ptr::copy_nonoverlapping(data[off..off + n].as_ptr(), p.as_ptr(), n) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;
    use core::cell::RefCell;

    struct FakeTable(BTreeMap<u64, (HostPhysAddr, MappingFlags)>);
    impl GpaTranslate for FakeTable {
        fn translate_gpa(&self, gpa: GuestPhysAddr) -> Option<(HostPhysAddr, MappingFlags)> {
            let (h, f) = self.0.get(&(gpa.as_u64() & !0xfff))?;
            Some((*h + gpa.offset_in(4096), *f))
        }
    }
    /// Host memory at "physical" 0..len backed by a Vec.
    struct FakeWindow(RefCell<Vec<u8>>);
    // SAFETY: test double; frames are never handed out, only reached.
    unsafe impl FrameAllocator for FakeWindow {
        fn allocate_frames(&self, _: usize, _: usize) -> Option<HostPhysAddr> {
            None
        }
        unsafe fn deallocate_frames(&self, _: HostPhysAddr, _: usize) {}
        fn phys_to_virt(&self, pa: HostPhysAddr) -> NonNull<u8> {
            let mut v = self.0.borrow_mut();
            NonNull::new(v[pa.as_u64() as usize..].as_mut_ptr()).unwrap()
        }
    }

    #[test]
    fn copies_follow_the_table_across_discontiguous_pages() {
        let window = FakeWindow(RefCell::new((0..4 * 4096).map(|i| (i % 251) as u8).collect()));
        let mut map = BTreeMap::new();
        // GPA 0x8000_0000 -> host page 3, GPA 0x8000_1000 -> host page 1 (read-only).
        map.insert(0x8000_0000, (HostPhysAddr::new(3 * 4096), MappingFlags::RW));
        map.insert(0x8000_1000, (HostPhysAddr::new(4096), MappingFlags::READ));
        let t = FakeTable(map);
        // SAFETY: the fake table only maps into the fake window.
        let g = unsafe { GuestPhys::new(&t, &window) };
        let mut buf = [0u8; 32];
        g.copy_from_guest(GuestPhysAddr::new(0x8000_0ff0), &mut buf).unwrap();
        let expect: Vec<u8> = (3 * 4096 + 0xff0..4 * 4096).chain(4096..4096 + 16).map(|i| (i % 251) as u8).collect();
        assert_eq!(&buf[..], &expect[..]);
        // A write into the read-only page stops there, after the writable part.
        let e = g.copy_to_guest(GuestPhysAddr::new(0x8000_0ffc), &[9; 8]).unwrap_err();
        assert_eq!(
            e,
            GpaAccessError::NotPermitted {
                gpa: GuestPhysAddr::new(0x8000_1000),
                access: Access::Write,
                flags: MappingFlags::READ,
                done: 4
            }
        );
        assert_eq!(&window.0.borrow()[4 * 4096 - 4..], &[9; 4]);
        let e = g.copy_from_guest(GuestPhysAddr::new(0x8000_1ff8), &mut buf).unwrap_err();
        assert_eq!(
            e,
            GpaAccessError::NotMapped { gpa: GuestPhysAddr::new(0x8000_2000), access: Access::Read, done: 8 }
        );
        let top = GuestPhysAddr::new((1 << 59) - 4);
        assert_eq!(g.copy_from_guest(top, &mut buf), Err(GpaAccessError::OutOfRange { gpa: top, len: 32 }));
    }
}
