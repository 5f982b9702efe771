//! RISC-V VS-stage translation (Sv39/Sv48/Sv57 from vsatp), tables read through the G-stage.
//!
//! RISC-V Privileged, "Supervisor-Level ISA" ("Virtual Address Translation Process", Sv39, Sv48,
//! Sv57, "Memory Privilege in sstatus": SUM, MXR) and the hypervisor chapter ("vsatp",
//! "Two-Stage Address Translation").

use super::{Privilege, Stage2, Stage2Kind, Stage2Request};
use crate::gstage::{cause, RvFaultKind};
use crate::rvpte::{self, PteKind, A, D, R, U, W, X};
use crate::{level_shift, Access, Gpa, Gva, Hpa, PageSize, PhysMem};

/// The vsatp MODE field (bits 63:60), as for satp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VsMode {
    /// 0: no VS-stage translation (guest-virtual = guest-physical).
    Bare,
    /// 8: 39-bit virtual addresses, 3 levels.
    Sv39,
    /// 9: 48-bit virtual addresses, 4 levels.
    Sv48,
    /// 10: 57-bit virtual addresses, 5 levels.
    Sv57,
}

impl VsMode {
    /// Decodes vsatp.MODE; `None` for reserved values.
    pub const fn from_vsatp(vsatp: u64) -> Option<Self> {
        match vsatp >> 60 {
            0 => Some(Self::Bare),
            8 => Some(Self::Sv39),
            9 => Some(Self::Sv48),
            10 => Some(Self::Sv57),
            _ => None,
        }
    }

    /// Number of levels (0 for Bare).
    pub const fn levels(self) -> u8 {
        match self {
            Self::Bare => 0,
            Self::Sv39 => 3,
            Self::Sv48 => 4,
            Self::Sv57 => 5,
        }
    }
}

/// The guest's VS-stage controls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsRegs {
    /// vsatp: MODE 63:60, ASID 59:44, PPN 43:0 (the root's guest-physical page number).
    pub vsatp: u64,
    /// vsstatus.SUM: VS-mode loads and stores may access U = 1 pages.
    pub sum: bool,
    /// vsstatus.MXR: loads from executable pages are allowed (VS-stage only).
    pub mxr: bool,
    /// HS-level sstatus.MXR, which also overrides VS-stage execute-only permissions.
    pub hs_mxr: bool,
    /// Hardware sets VS-stage A/D (Svadu with henvcfg.ADUE = 1); otherwise clear A, or clear
    /// D on a store, is a page fault (Svade).
    pub hw_ad_update: bool,
    /// Svpbmt enabled for VS-stage (henvcfg.PBMTE).
    pub svpbmt: bool,
}

/// A completed two-stage translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RvWalk {
    /// The guest-physical address the VS-stage gives.
    pub gpa: Gpa,
    /// The supervisor-physical address the G-stage gives for it.
    pub hpa: Hpa,
    /// Size of the VS-stage page (4 KiB for Bare).
    pub page_size: PageSize,
    /// VS leaf R.
    pub r: bool,
    /// VS leaf W.
    pub w: bool,
    /// VS leaf X.
    pub x: bool,
    /// VS leaf U.
    pub u: bool,
}

/// A VS-stage page fault, delivered as a page fault (12, 13, 15) with stval = the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsPageFault {
    /// 12 (instruction), 13 (load) or 15 (store/AMO).
    pub cause: u64,
    /// The faulting guest-virtual address.
    pub stval: Gva,
    /// Why.
    pub reason: RvFaultKind,
    /// Level of the PTE (`None` for a non-canonical address).
    pub level: Option<u8>,
}

/// Why a guest access did not translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RvError<F> {
    /// A VS-stage page fault.
    PageFault(VsPageFault),
    /// A VS-level PTE read or A/D write hit absent memory (after the G-stage): an access fault
    /// for the original access type (step 2 / step 9).
    AccessFault {
        /// 1, 5 or 7.
        cause: u64,
        /// The supervisor-physical address of the PTE.
        pa: Hpa,
    },
    /// The G-stage faulted: on an implicit VS-stage table access (`during_walk`; the fault's
    /// cause is the original access type and its htinst the pseudoinstruction) or on the
    /// final access.
    Stage2 {
        /// The second stage's fault.
        fault: F,
        /// True for implicit VS-stage table accesses, false for the final access.
        during_walk: bool,
    },
    /// vsatp.MODE is reserved.
    InvalidVsatp {
        /// The MODE value.
        mode: u8,
    },
}

fn pf<F>(gva: Gva, access: Access, reason: RvFaultKind, level: Option<u8>) -> RvError<F> {
    RvError::PageFault(VsPageFault { cause: cause::page_fault(access), stval: gva, reason, level })
}

/// Translates `gva` for `access` at `privilege` through the VS-stage tables named by vsatp,
/// translating every PTE address through `s2`, then the resulting guest-physical address.
///
/// The algorithm of "Virtual Address Translation Process": address sign extension, per-PTE
/// steps 3-5 (V, R/W, reserved bits, non-leaf D/A/U, last-level pointer, misaligned
/// superpage), step 6 U bit (U-mode needs U = 1; S-mode loads/stores to U = 1 pages need SUM;
/// S-mode never executes U = 1 pages), step 8 R/W/X (MXR from vsstatus or HS sstatus), step 9
/// A/D (fault, or update through `s2` as [`Stage2Kind::TableUpdate`]). Model choice: A/D are
/// written only once the VS-stage checks passed.
pub fn walk<S: Stage2>(
    mem: &mut dyn PhysMem,
    s2: &mut S,
    regs: &VsRegs,
    gva: Gva,
    access: Access,
    privilege: Privilege,
) -> Result<RvWalk, RvError<S::Fault>> {
    let mode = VsMode::from_vsatp(regs.vsatp).ok_or(RvError::InvalidVsatp { mode: (regs.vsatp >> 60) as u8 })?;
    let va = gva.0;
    let final_access = |s2: &mut S, mem: &mut dyn PhysMem, gpa: Gpa| {
        let req = Stage2Request { gpa, gva, original: access, kind: Stage2Kind::Final };
        s2.translate(mem, &req).map_err(|fault| RvError::Stage2 { fault, during_walk: false })
    };
    if mode == VsMode::Bare {
        let hpa = final_access(s2, mem, Gpa(va))?;
        return Ok(RvWalk { gpa: Gpa(va), hpa, page_size: PageSize::Size4K, r: true, w: true, x: true, u: true });
    }
    let levels = mode.levels();
    // Sv39: "must have bits 63-39 all equal to bit 38, or else a page-fault exception".
    let valen = level_shift(levels);
    let unused = 64 - valen;
    if ((va as i64) << unused >> unused) as u64 != va {
        return Err(pf(gva, access, RvFaultKind::AddressTooWide, None));
    }
    let mut a = (regs.vsatp & crate::bits(43, 0)) << 12;
    let mut level = levels - 1;
    loop {
        let pte_gpa = Gpa(a + ((va >> level_shift(level)) & 511) * 8);
        let req = Stage2Request { gpa: pte_gpa, gva, original: access, kind: Stage2Kind::TableRead };
        let pte_hpa = s2.translate(mem, &req).map_err(|fault| RvError::Stage2 { fault, during_walk: true })?;
        let access_fault = RvError::AccessFault { cause: cause::access_fault(access), pa: pte_hpa };
        let pte = mem.read_u64(pte_hpa).ok_or(access_fault)?;
        match rvpte::classify(pte, level, regs.svpbmt) {
            Err(reason) => return Err(pf(gva, access, reason, Some(level))),
            Ok(PteKind::Pointer(next)) => {
                a = next;
                level -= 1;
                continue;
            }
            Ok(PteKind::Leaf) => {}
        }
        // Step 6: the U bit.
        let user_page = pte & U != 0;
        let u_ok = match privilege {
            Privilege::User => user_page,
            Privilege::Supervisor => !user_page || (regs.sum && access != Access::Fetch),
        };
        if !u_ok {
            return Err(pf(gva, access, RvFaultKind::UserBit, Some(level)));
        }
        // Step 8: R/W/X, with MXR (vsstatus or HS-level sstatus) making X pages readable.
        let mxr = regs.mxr || regs.hs_mxr;
        let rwx_ok = match access {
            Access::Read => pte & R != 0 || (mxr && pte & X != 0),
            Access::Write => pte & W != 0,
            Access::Fetch => pte & X != 0,
        };
        if !rwx_ok {
            return Err(pf(gva, access, RvFaultKind::Permission, Some(level)));
        }
        // Step 9: A/D.
        let store = access == Access::Write;
        if pte & A == 0 || (store && pte & D == 0) {
            if !regs.hw_ad_update {
                let reason = if pte & A == 0 { RvFaultKind::AccessedClear } else { RvFaultKind::DirtyClear };
                return Err(pf(gva, access, reason, Some(level)));
            }
            let new = pte | A | if store { D } else { 0 };
            let req = Stage2Request { gpa: pte_gpa, gva, original: access, kind: Stage2Kind::TableUpdate };
            let hpa = s2.translate(mem, &req).map_err(|fault| RvError::Stage2 { fault, during_walk: true })?;
            mem.write_u64(hpa, new).ok_or(RvError::AccessFault { cause: cause::access_fault(access), pa: hpa })?;
        }
        let gpa = Gpa(rvpte::leaf_pa(pte, level, va));
        let hpa = final_access(s2, mem, gpa)?;
        return Ok(RvWalk {
            gpa,
            hpa,
            page_size: PageSize::from_level(level).unwrap_or(PageSize::Size4K),
            r: pte & R != 0,
            w: pte & W != 0,
            x: pte & X != 0,
            u: user_page,
        });
    }
}
