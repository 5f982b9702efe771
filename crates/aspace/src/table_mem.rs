//! A bare nested page table seen as guest memory: for hypervisors that manage their
//! [`PageTable`] themselves rather than through an [`crate::AddressSpace`].

use crate::mem::{GuestMemError, GuestMemory};
use crate::space::PAGE;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};
use twostage_npt::{Access, Format, FrameAllocator, GuestPhysAddr, PageTable};

/// Guest-physical memory through a bare nested [`PageTable`]: each page is translated with
/// [`PageTable::translate`] and reached through the table's allocator's
/// [`FrameAllocator::phys_to_virt`]. Rights are checked as the guest would be checked (the
/// leaf must allow the access); page crossings are handled here. Every page of an access is
/// checked before any byte moves, so a failed access changes nothing and reads nothing.
///
/// Unlike an [`crate::AddressSpace`], the table has no regions: an unmapped page is
/// [`GuestMemError::Unmapped`] (including MMIO, which such a table leaves unmapped), and
/// nothing is ever populated or copied on write, so no access needs a flush.
pub struct TableMemory<'a, F: Format, A: FrameAllocator> {
    table: &'a PageTable<F, A>,
}

impl<'a, F: Format, A: FrameAllocator> TableMemory<'a, F, A> {
    /// Guest memory through `table`.
    ///
    /// # Safety
    /// Every host-physical address that `table` maps (not only frames its allocator handed
    /// out: also RAM or device memory mapped from elsewhere) must be reachable for reads and
    /// writes through `table.allocator().phys_to_virt`, and no Rust reference may alias those
    /// bytes while an access runs.
    pub unsafe fn new(table: &'a PageTable<F, A>) -> Self {
        Self { table }
    }

    /// The table.
    pub fn table(&self) -> &'a PageTable<F, A> {
        self.table
    }

    /// Host pointer to `gpa`, if its leaf allows `access`.
    fn host(&self, gpa: GuestPhysAddr, access: Access) -> Result<*mut u8, GuestMemError> {
        let (hpa, rights) = self.table.translate(gpa).ok_or(GuestMemError::Unmapped { gpa, access })?;
        if !rights.allows(access) {
            return Err(GuestMemError::Forbidden { gpa, access, rights: rights.rights() });
        }
        Ok(self.table.allocator().phys_to_virt(hpa).as_ptr())
    }

    /// Checks every page of `gpa..gpa+len` for `access`, then calls `f(host, range_in_buf)` for
    /// each piece inside one 4 KiB page.
    fn pieces(
        &self,
        gpa: GuestPhysAddr,
        len: usize,
        access: Access,
        mut f: impl FnMut(*mut u8, Range<usize>),
    ) -> Result<(), GuestMemError> {
        gpa.checked_add(len as u64).ok_or(GuestMemError::Overflow { gpa, len: len as u64 })?;
        let each = |f: &mut dyn FnMut(*mut u8, Range<usize>)| -> Result<(), GuestMemError> {
            let mut done = 0;
            while done < len {
                let a = gpa + done as u64;
                let n = ((PAGE - a.offset_in(PAGE)) as usize).min(len - done);
                f(self.host(a, access)?, done..done + n);
                done += n;
            }
            Ok(())
        };
        each(&mut |_, _| {})?;
        each(&mut f)
    }
}

impl<F: Format, A: FrameAllocator> GuestMemory for TableMemory<'_, F, A> {
    fn read_as(&mut self, gpa: GuestPhysAddr, buf: &mut [u8], access: Access) -> Result<(), GuestMemError> {
        self.pieces(gpa, buf.len(), access, |p, r| {
            // SAFETY: `new`'s contract: `p` reaches the leaf's host page for the `r.len()` bytes
            // left in it, and no reference aliases guest memory; `buf` is the caller's buffer.
            unsafe { core::ptr::copy_nonoverlapping(p, buf[r.clone()].as_mut_ptr(), r.len()) }
        })
    }

    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        self.pieces(gpa, buf.len(), Access::Write, |p, r| {
            // SAFETY: as in `read_as`.
            unsafe { core::ptr::copy_nonoverlapping(buf[r.clone()].as_ptr(), p, r.len()) }
        })
    }

    fn compare_exchange_u64(
        &mut self,
        gpa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, GuestMemError> {
        if !gpa.is_aligned(8) {
            return Err(GuestMemError::Misaligned { gpa });
        }
        let p = self.host(gpa, Access::Write)?.cast::<u64>();
        // SAFETY: `new`'s contract makes `p` valid for the 8 bytes (aligned: `gpa` is, and host
        // pages are page-aligned in the allocator's view); the guest may update the word
        // concurrently (a page-table entry), hence the atomic.
        let word = unsafe { AtomicU64::from_ptr(p) };
        Ok(word.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire))
    }
}
