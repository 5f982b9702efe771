//! x86-64 4-level guest paging from CR3 (Intel SDM Vol. 3A 4.5-4.8), tables read through stage 2.

use super::{Privilege, Stage2, Stage2Kind, Stage2Request};
use crate::{bits, level_shift, Access, Gpa, Gva, Hpa, PageSize, PhysMem};

/// Page-fault error code bits (Intel SDM Vol. 3A 4.7, Figure 4-12).
pub mod error_code {
    /// Bit 0 (P): 0 = non-present page; 1 = protection violation or reserved bit.
    pub const P: u32 = 1 << 0;
    /// Bit 1 (W/R): the access was a write.
    pub const W: u32 = 1 << 1;
    /// Bit 2 (U/S): the access was a user-mode access.
    pub const U: u32 = 1 << 2;
    /// Bit 3 (RSVD): a reserved bit was set in some paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// Bit 4 (I/D): the access was an instruction fetch (reported only when EFER.NXE = 1 or
    /// CR4.SMEP = 1).
    pub const ID: u32 = 1 << 4;
}

/// Paging entry bits (Intel SDM Vol. 3A 4.5, Tables 4-15 to 4-20).
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// The guest's paging controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X86Regs {
    /// CR3: bits MAXPHYADDR-1:12 locate the PML4 table (a guest-physical address). The low
    /// bits (PWT/PCD or a PCID) do not affect translation in this model.
    pub cr3: u64,
    /// CR0.WP: supervisor writes honour R/W.
    pub cr0_wp: bool,
    /// CR4.SMEP: supervisor fetches from user-mode addresses fault.
    pub cr4_smep: bool,
    /// CR4.SMAP: supervisor data accesses to user-mode addresses fault unless RFLAGS.AC = 1.
    pub cr4_smap: bool,
    /// RFLAGS.AC, for SMAP (explicit accesses).
    pub rflags_ac: bool,
    /// IA32_EFER.NXE: bit 63 (XD) is honoured; otherwise it is reserved.
    pub efer_nxe: bool,
    /// The guest's MAXPHYADDR (bits 51:MAXPHYADDR of entries are reserved).
    pub maxphyaddr: u8,
    /// CPUID.80000001H:EDX.Page1GB: PDPTEs may map 1-GByte pages (otherwise PS is reserved
    /// in a PDPTE).
    pub page_1g: bool,
}

/// A completed guest translation (both stages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X86Walk {
    /// The guest-physical address the guest's tables give.
    pub gpa: Gpa,
    /// The host-physical address stage 2 gives for it.
    pub hpa: Hpa,
    /// Size of the guest page.
    pub page_size: PageSize,
    /// AND of R/W across the entries.
    pub writable: bool,
    /// AND of U/S across the entries (a user-mode address).
    pub user: bool,
    /// Not (EFER.NXE and OR of XD across the entries).
    pub executable: bool,
}

/// A guest page fault (#PF, vector 14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The error code (see [`error_code`]).
    pub error_code: u32,
    /// CR2: the faulting linear address.
    pub gva: Gva,
}

/// Why a guest access did not translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum X86Error<F> {
    /// A guest page fault.
    PageFault(PageFault),
    /// The second stage faulted: on a guest paging-structure access or A/D update
    /// (`during_walk`), or on the final access.
    Stage2 {
        /// The second stage's fault.
        fault: F,
        /// True for guest paging-structure accesses, false for the final access.
        during_walk: bool,
    },
    /// The address is not canonical (bits 63:47 not all equal): #GP (or #SS), not #PF
    /// (Intel SDM Vol. 3A 3.3.7.1).
    NonCanonical {
        /// The address.
        gva: Gva,
    },
    /// Model-only: stage 2 gave a host-physical address with no memory behind it.
    NoMemory {
        /// The address.
        pa: Hpa,
    },
}

fn pf<F>(gva: Gva, code: u32) -> X86Error<F> {
    X86Error::PageFault(PageFault { error_code: code, gva })
}

/// Translates `gva` for `access` at `privilege` through the guest's 4-level tables, reading each
/// table entry through `s2`, then translates the resulting guest-physical address through `s2`.
///
/// Checks (Intel SDM Vol. 3A): canonical address (3.3.7.1); per entry, P = 0 is a not-present
/// fault and a set reserved bit (51:MAXPHYADDR, XD without EFER.NXE, PS in a PML4E, PS in a
/// PDPTE without 1-GByte pages, 29:13 in a 1-GByte PDPTE, 20:13 in a 2-MByte PDE; 4.5) a fault
/// with RSVD; then the access rights of 4.6 (U/S, R/W with CR0.WP, XD, SMEP, SMAP with
/// RFLAGS.AC). On success the accessed flags of all entries and, for a write, the dirty flag of
/// the leaf are set (4.8) with writes through `s2` ([`Stage2Kind::TableUpdate`]). Model choice:
/// flags are only written once the translation is known to succeed.
pub fn walk<S: Stage2>(
    mem: &mut dyn PhysMem,
    s2: &mut S,
    regs: &X86Regs,
    gva: Gva,
    access: Access,
    privilege: Privilege,
) -> Result<X86Walk, X86Error<S::Fault>> {
    let va = gva.0;
    // 3.3.7.1: 48-bit linear addresses must have bits 63:47 equal.
    if ((va as i64) << 16 >> 16) as u64 != va {
        return Err(X86Error::NonCanonical { gva });
    }
    let m = regs.maxphyaddr.clamp(36, 52) as u32;
    let addr_mask = bits(m - 1, 12);
    let base_code = match access {
        Access::Write => error_code::W,
        Access::Fetch if regs.efer_nxe || regs.cr4_smep => error_code::ID,
        _ => 0,
    } | if privilege == Privilege::User { error_code::U } else { 0 };

    let mut table = regs.cr3 & addr_mask;
    let mut used: [(u64, u64); 4] = [(0, 0); 4];
    let mut n = 0;
    let (mut writable, mut user, mut xd) = (true, true, false);
    let mut level: u8 = 3;
    let (leaf, leaf_level) = loop {
        let entry_gpa = table + ((va >> level_shift(level)) & 511) * 8;
        let req = Stage2Request { gpa: Gpa(entry_gpa), gva, original: access, kind: Stage2Kind::TableRead };
        let hpa = s2.translate(mem, &req).map_err(|fault| X86Error::Stage2 { fault, during_walk: true })?;
        let e = mem.read_u64(hpa).ok_or(X86Error::NoMemory { pa: hpa })?;
        if e & P == 0 {
            return Err(pf(gva, base_code));
        }
        let large = e & PS != 0;
        let mut reserved = if m < 52 { bits(51, m) } else { 0 };
        if !regs.efer_nxe {
            reserved |= XD;
        }
        match level {
            3 => reserved |= PS,
            2 if large && !regs.page_1g => reserved |= PS,
            2 if large => reserved |= bits(29, 13),
            1 if large => reserved |= bits(20, 13),
            _ => {}
        }
        if e & reserved != 0 {
            return Err(pf(gva, base_code | error_code::P | error_code::RSVD));
        }
        writable &= e & RW != 0;
        user &= e & US != 0;
        xd |= regs.efer_nxe && e & XD != 0;
        used[n] = (entry_gpa, e);
        n += 1;
        if level == 0 || large {
            break (e, level);
        }
        table = e & addr_mask;
        level -= 1;
    };

    // 4.6: access rights.
    let smap_blocks = regs.cr4_smap && !regs.rflags_ac;
    let smep_blocks = user && regs.cr4_smep;
    let allowed = match (privilege, access) {
        (Privilege::User, Access::Read) => user,
        (Privilege::User, Access::Write) => user && writable,
        (Privilege::User, Access::Fetch) => user && !xd,
        (Privilege::Supervisor, Access::Read) => !(user && smap_blocks),
        (Privilege::Supervisor, Access::Write) => !(user && smap_blocks) && (!regs.cr0_wp || writable),
        (Privilege::Supervisor, Access::Fetch) => !smep_blocks && !xd,
    };
    if !allowed {
        return Err(pf(gva, base_code | error_code::P));
    }

    // 4.8: accessed in every entry used, dirty in the leaf for a write.
    for (i, &(entry_gpa, e)) in used[..n].iter().enumerate() {
        let mut new = e | ACCESSED;
        if i == n - 1 && access == Access::Write {
            new |= DIRTY;
        }
        if new != e {
            let req = Stage2Request { gpa: Gpa(entry_gpa), gva, original: access, kind: Stage2Kind::TableUpdate };
            let hpa = s2.translate(mem, &req).map_err(|fault| X86Error::Stage2 { fault, during_walk: true })?;
            mem.write_u64(hpa, new).ok_or(X86Error::NoMemory { pa: hpa })?;
        }
    }

    let page_size = PageSize::from_level(leaf_level).unwrap_or(PageSize::Size4K);
    let offset_mask = page_size.bytes() - 1;
    let gpa = Gpa((leaf & addr_mask & !offset_mask) | (va & offset_mask));
    let req = Stage2Request { gpa, gva, original: access, kind: Stage2Kind::Final };
    let hpa = s2.translate(mem, &req).map_err(|fault| X86Error::Stage2 { fault, during_walk: false })?;
    Ok(X86Walk { gpa, hpa, page_size, writable, user, executable: !xd })
}
