//! Software walks of the guest's own VS-stage tables through its nested table: the GPA of a
//! guest-page fault the hart reported without one (htval = 0).

use crate::hart::frames;
use crate::vm::{Table, Vm};
use twostage_npt::{FrameAllocator, GuestPhysAddr, MappingFlags};
use twostage_rvh::fault::{GuestPageFault, UnreportedGpa};
use twostage_rvh::hw;

impl Vm {
    /// The guest-page fault the hart reported without a GPA (htval = 0), completed by walking the
    /// guest's VS-stage tables (vsatp, vsstatus) in software from the GVA in stval: the GPA the
    /// GVA translates to for an explicit access, the address of the PTE the walk cannot read for
    /// an implicit one. `None` when the walk does not agree with the trap (the guest changed its
    /// tables meanwhile, or stval holds no GVA): the caller hands the exit back.
    pub(crate) fn find_unreported_gpa(&self, u: &UnreportedGpa) -> Option<GuestPageFault> {
        use twostage_aspace::{translate_gva, GuestPaging, GuestVaError};
        let paging = GuestPaging::riscv(hw::vsatp::read(), hw::vsstatus::read()).ok()?;
        match translate_gva(&mut TableReader(self.table()), &paging, u.gva?, u.original) {
            Ok(t) if !u.is_implicit() => Some(u.with_gpa(t.gpa)),
            Err(GuestVaError::TableAccess { entry, .. }) if u.is_implicit() => Some(u.with_gpa(entry)),
            _ => None,
        }
    }
}

/// Read-only guest-physical memory through a nested table, for software walks of the guest's
/// tables: a GPA the table does not map (or maps without read) is an error naming it.
struct TableReader<'a>(&'a Table);

impl twostage_aspace::GuestMemory for TableReader<'_> {
    fn read_as(
        &mut self,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
        access: twostage_npt::Access,
    ) -> Result<(), twostage_aspace::GuestMemError> {
        let mut done = 0;
        while done < buf.len() {
            let at = gpa
                .checked_add(done as u64)
                .ok_or(twostage_aspace::GuestMemError::Overflow { gpa, len: buf.len() as u64 })?;
            let (hpa, flags) =
                self.0.translate(at).ok_or(twostage_aspace::GuestMemError::Unmapped { gpa: at, access })?;
            if !flags.contains(MappingFlags::READ) {
                return Err(twostage_aspace::GuestMemError::Forbidden { gpa: at, access, rights: flags });
            }
            let n = (4096 - at.offset_in(4096) as usize).min(buf.len() - done);
            // SAFETY: the table maps `at` to a frame from `frames()` (identity-mapped RAM), and
            // `n` bytes stay within that 4 KiB frame.
            unsafe { core::ptr::copy_nonoverlapping(frames().phys_to_virt(hpa).as_ptr(), buf[done..].as_mut_ptr(), n) };
            done += n;
        }
        Ok(())
    }
    fn write(&mut self, gpa: GuestPhysAddr, _: &[u8]) -> Result<(), twostage_aspace::GuestMemError> {
        Err(TableReader::refused(gpa))
    }
    fn compare_exchange_u64(
        &mut self,
        gpa: GuestPhysAddr,
        _: u64,
        _: u64,
    ) -> Result<Result<u64, u64>, twostage_aspace::GuestMemError> {
        Err(TableReader::refused(gpa))
    }
}

impl TableReader<'_> {
    fn refused(gpa: GuestPhysAddr) -> twostage_aspace::GuestMemError {
        twostage_aspace::GuestMemError::Forbidden {
            gpa,
            access: twostage_npt::Access::Write,
            rights: MappingFlags::READ,
        }
    }
}
