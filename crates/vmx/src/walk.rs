//! A software walk of the guest's own x86-64 page tables, each table read going through the
//! caller's guest-physical reader (which, in the hypervisor, translates through the EPT).

use core::fmt;
use twostage_npt::{Access, GuestPhysAddr, GuestVirtAddr, PageSize};

/// Present (Intel SDM Vol. 3A 5.5, Tables 5-15 to 5-20, bit 0).
const P: u64 = 1 << 0;
/// Read/write (bit 1).
const RW: u64 = 1 << 1;
/// Page size (bit 7 of a PDPTE or PDE).
const PS: u64 = 1 << 7;
/// Execute-disable (bit 63, when EFER.NXE = 1).
const XD: u64 = 1 << 63;
/// Address bits 51:12 of an entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The guest's paging mode, from its CR0, CR4 and EFER.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPaging {
    /// CR0 as the guest runs with it.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
}

/// Why a guest-virtual address could not be translated. Every case names the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError<E> {
    /// Bits 63:47 are not a sign extension of bit 47 (Intel SDM Vol. 3A 5.5.1).
    NonCanonical(GuestVirtAddr),
    /// A paging-structure entry on the walk is not present.
    NotPresent {
        /// The address being translated.
        gva: GuestVirtAddr,
        /// Level of the entry (4 = PML4E ... 1 = PTE).
        level: u8,
        /// Where the entry is.
        entry: GuestPhysAddr,
    },
    /// The translation exists but does not allow the access (write to read-only, fetch from XD).
    Protection {
        /// The address.
        gva: GuestVirtAddr,
        /// The access refused.
        access: Access,
    },
    /// The guest uses a paging mode this walker does not model (32-bit or PAE paging).
    UnsupportedMode {
        /// CR0 at the time.
        cr0: u64,
        /// CR4 at the time.
        cr4: u64,
    },
    /// Reading a table entry from guest-physical memory failed.
    Read(E),
}

impl<E: fmt::Debug> fmt::Display for WalkError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: GuestPhysAddr,
    /// The size of the guest page holding it.
    pub page: PageSize,
}

/// Translates `gva` for `access` with the guest's paging state. `read` reads one 8-byte entry at
/// a guest-physical address. Paging off (CR0.PG = 0) is the identity. 4-level paging with 1 GiB
/// and 2 MiB pages is modelled (Intel SDM Vol. 3A 5.5); rights are checked as for a supervisor
/// access with CR0.WP = 1.
pub fn translate<E>(
    paging: &GuestPaging,
    gva: GuestVirtAddr,
    access: Access,
    mut read: impl FnMut(GuestPhysAddr) -> Result<u64, E>,
) -> Result<Translation, WalkError<E>> {
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_LA57: u64 = 1 << 12;
    const EFER_LMA: u64 = 1 << 10;
    const EFER_NXE: u64 = 1 << 11;
    let v = gva.as_u64();
    if paging.cr0 & CR0_PG == 0 {
        return Ok(Translation { gpa: GuestPhysAddr::new_truncate(v & 0xffff_ffff), page: PageSize::Size4K });
    }
    if paging.cr4 & CR4_PAE == 0 || paging.efer & EFER_LMA == 0 || paging.cr4 & CR4_LA57 != 0 {
        return Err(WalkError::UnsupportedMode { cr0: paging.cr0, cr4: paging.cr4 });
    }
    if ((v as i64) << 16 >> 16) as u64 != v {
        return Err(WalkError::NonCanonical(gva));
    }
    let mut table = paging.cr3 & ADDR;
    let (mut writable, mut executable) = (true, true);
    for level in (1..=4u8).rev() {
        let index = (v >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff;
        let entry_at = GuestPhysAddr::new_truncate(table + index * 8);
        let e = read(entry_at).map_err(WalkError::Read)?;
        if e & P == 0 {
            return Err(WalkError::NotPresent { gva, level, entry: entry_at });
        }
        writable &= e & RW != 0;
        if paging.efer & EFER_NXE != 0 && e & XD != 0 {
            executable = false;
        }
        let leaf_size = match level {
            3 if e & PS != 0 => Some(PageSize::Size1G),
            2 if e & PS != 0 => Some(PageSize::Size2M),
            1 => Some(PageSize::Size4K),
            _ => None,
        };
        if let Some(size) = leaf_size {
            let refused = match access {
                Access::Write => !writable,
                Access::Execute => !executable,
                Access::Read => false,
            };
            if refused {
                return Err(WalkError::Protection { gva, access });
            }
            let mask = size.bytes() - 1;
            let base = e & ADDR & !mask;
            return Ok(Translation { gpa: GuestPhysAddr::new_truncate(base | (v & mask)), page: size });
        }
        table = e & ADDR;
    }
    unreachable!("level 1 always returns")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn paging(cr3: u64) -> GuestPaging {
        GuestPaging { cr0: 0x8000_0031, cr3, cr4: 0x20, efer: 0xd00 }
    }

    #[test]
    fn walks_4k_2m_and_1g_pages_and_reports_holes() {
        let mut m: HashMap<u64, u64> = HashMap::new();
        // PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000, PT at 0x4000.
        m.insert(0x1000, 0x2000 | P | RW);
        m.insert(0x2000, 0x3000 | P | RW); // PDPTE 0 -> PD
        m.insert(0x2000 + 8, 0x4000_0000 | P | PS); // PDPTE 1: 1 GiB page, read-only
        m.insert(0x3000, 0x4000 | P | RW); // PDE 0 -> PT
        m.insert(0x3000 + 8, 0x60_0000 | P | RW | PS | XD); // PDE 1: 2 MiB page, no execute
        m.insert(0x4000 + 5 * 8, 0x9000 | P | RW); // PTE 5
        let read = |gpa: GuestPhysAddr| -> Result<u64, ()> { Ok(*m.get(&gpa.as_u64()).unwrap_or(&0)) };
        let p = paging(0x1000);
        let t = translate(&p, GuestVirtAddr::new(0x5123), Access::Write, read).unwrap();
        assert_eq!((t.gpa, t.page), (GuestPhysAddr::new(0x9123), PageSize::Size4K));
        let t = translate(&p, GuestVirtAddr::new(0x2f_fff8), Access::Read, read).unwrap();
        assert_eq!((t.gpa, t.page), (GuestPhysAddr::new(0x6f_fff8), PageSize::Size2M));
        assert_eq!(
            translate(&p, GuestVirtAddr::new(0x20_0000), Access::Execute, read),
            Err(WalkError::Protection { gva: GuestVirtAddr::new(0x20_0000), access: Access::Execute })
        );
        let t = translate(&p, GuestVirtAddr::new(0x4123_4567), Access::Read, read).unwrap();
        assert_eq!((t.gpa, t.page), (GuestPhysAddr::new(0x4123_4567), PageSize::Size1G));
        assert_eq!(
            translate(&p, GuestVirtAddr::new(0x4000_0000), Access::Write, read),
            Err(WalkError::Protection { gva: GuestVirtAddr::new(0x4000_0000), access: Access::Write })
        );
        assert_eq!(
            translate(&p, GuestVirtAddr::new(0x6000), Access::Read, read),
            Err(WalkError::NotPresent { gva: GuestVirtAddr::new(0x6000), level: 1, entry: GuestPhysAddr::new(0x4030) })
        );
        assert_eq!(
            translate(&p, GuestVirtAddr::new(0x0000_8000_0000_0000), Access::Read, read),
            Err(WalkError::NonCanonical(GuestVirtAddr::new(0x0000_8000_0000_0000)))
        );
    }

    #[test]
    fn paging_off_is_identity_and_read_errors_propagate() {
        let p = GuestPaging { cr0: 0x11, cr3: 0, cr4: 0, efer: 0 };
        let t = translate(&p, GuestVirtAddr::new(0x12345), Access::Execute, |_| Err::<u64, _>("unused")).unwrap();
        assert_eq!(t.gpa, GuestPhysAddr::new(0x12345));
        let p = paging(0x1000);
        assert_eq!(
            translate(&p, GuestVirtAddr::new(0), Access::Read, |_| Err::<u64, _>("unmapped")),
            Err(WalkError::Read("unmapped"))
        );
        let pae32 = GuestPaging { cr0: 0x8000_0011, cr3: 0, cr4: 0x20, efer: 0 };
        assert!(matches!(
            translate(&pae32, GuestVirtAddr::new(0), Access::Read, |_| Ok::<u64, ()>(0)),
            Err(WalkError::UnsupportedMode { .. })
        ));
    }
}
