//! RISC-V G-stage translation: hgatp, the Sv39x4/Sv48x4/Sv57x4 walk, guest-page faults.
//!
//! Sources: RISC-V Privileged, "Hypervisor Extension": "Hypervisor Guest Address Translation and
//! Protection (hgatp) Register", "Two-Stage Address Translation", "Guest Physical Address
//! Translation", "Guest-Page Faults", "Hypervisor Trap Value (htval)", "Transformed Instruction or
//! Pseudoinstruction for mtinst or htinst"; "Supervisor-Level ISA": "Virtual Address Translation
//! Process" (the algorithm), "Sv39" (PTE bits 63:54).

use alloc::vec::Vec;

use crate::rvpte::{self, PteKind, A, D, PBMT, R, U, W, X};
use crate::{level_shift, Access, Gpa, Hpa, PageSize, PhysMem};

/// Exception cause codes (RISC-V Privileged, "Supervisor Cause Register", and the hypervisor
/// chapter's "Trap Cause Codes").
pub mod cause {
    /// Instruction access fault.
    pub const INSTRUCTION_ACCESS_FAULT: u64 = 1;
    /// Load access fault.
    pub const LOAD_ACCESS_FAULT: u64 = 5;
    /// Store/AMO access fault.
    pub const STORE_ACCESS_FAULT: u64 = 7;
    /// Instruction page fault.
    pub const INSTRUCTION_PAGE_FAULT: u64 = 12;
    /// Load page fault.
    pub const LOAD_PAGE_FAULT: u64 = 13;
    /// Store/AMO page fault.
    pub const STORE_PAGE_FAULT: u64 = 15;
    /// Instruction guest-page fault.
    pub const INSTRUCTION_GUEST_PAGE_FAULT: u64 = 20;
    /// Load guest-page fault.
    pub const LOAD_GUEST_PAGE_FAULT: u64 = 21;
    /// Store/AMO guest-page fault.
    pub const STORE_GUEST_PAGE_FAULT: u64 = 23;

    use crate::Access;

    /// The access-fault cause for an access of this kind.
    pub const fn access_fault(a: Access) -> u64 {
        match a {
            Access::Fetch => INSTRUCTION_ACCESS_FAULT,
            Access::Read => LOAD_ACCESS_FAULT,
            Access::Write => STORE_ACCESS_FAULT,
        }
    }

    /// The page-fault cause for an access of this kind.
    pub const fn page_fault(a: Access) -> u64 {
        match a {
            Access::Fetch => INSTRUCTION_PAGE_FAULT,
            Access::Read => LOAD_PAGE_FAULT,
            Access::Write => STORE_PAGE_FAULT,
        }
    }

    /// The guest-page-fault cause for an access of this kind.
    pub const fn guest_page_fault(a: Access) -> u64 {
        match a {
            Access::Fetch => INSTRUCTION_GUEST_PAGE_FAULT,
            Access::Read => LOAD_GUEST_PAGE_FAULT,
            Access::Write => STORE_GUEST_PAGE_FAULT,
        }
    }
}

/// Special pseudoinstruction values for htinst on a guest-page fault taken by an implicit
/// access for VS-stage translation (RISC-V Privileged, hypervisor chapter, Table "Special
/// pseudoinstruction values for guest-page faults").
pub mod htinst {
    /// 32-bit read for VS-stage address translation (VSXLEN = 32).
    pub const READ_32: u64 = 0x0000_2000;
    /// 32-bit write for VS-stage address translation (an A/D update, VSXLEN = 32).
    pub const WRITE_32: u64 = 0x0000_2020;
    /// 64-bit read for VS-stage address translation (VSXLEN = 64: Sv39/Sv48/Sv57).
    pub const READ_64: u64 = 0x0000_3000;
    /// 64-bit write for VS-stage address translation (an A/D update, VSXLEN = 64).
    pub const WRITE_64: u64 = 0x0000_3020;
}

/// The hgatp MODE field (bits 63:60 for HSXLEN = 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HgatpMode {
    /// 0: no G-stage translation or protection.
    Bare,
    /// 8: 41-bit guest-physical addresses, 3 levels, 16 KiB root.
    Sv39x4,
    /// 9: 50-bit guest-physical addresses, 4 levels, 16 KiB root.
    Sv48x4,
    /// 10: 59-bit guest-physical addresses, 5 levels, 16 KiB root.
    Sv57x4,
}

impl HgatpMode {
    /// The MODE field value.
    pub const fn bits(self) -> u64 {
        match self {
            Self::Bare => 0,
            Self::Sv39x4 => 8,
            Self::Sv48x4 => 9,
            Self::Sv57x4 => 10,
        }
    }

    /// Number of table levels (0 for Bare).
    pub const fn levels(self) -> u8 {
        match self {
            Self::Bare => 0,
            Self::Sv39x4 => 3,
            Self::Sv48x4 => 4,
            Self::Sv57x4 => 5,
        }
    }

    /// Guest-physical address width: the Sv* width widened by 2 bits (41, 50, 59; 64 for Bare).
    pub const fn gpa_bits(self) -> u32 {
        match self {
            Self::Bare => 64,
            m => level_shift(m.levels()) + 2,
        }
    }
}

/// Why an hgatp value cannot be walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HgatpError {
    /// MODE is one of the reserved values (1-7, 11-15).
    ReservedMode(u8),
}

/// A decoded hgatp (RISC-V Privileged, hypervisor chapter, "hgatp" register, HSXLEN = 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hgatp {
    /// Bits 63:60.
    pub mode: HgatpMode,
    /// Bits 57:44 (VMIDMAX = 14 bits).
    pub vmid: u16,
    /// Bits 43:0 (PPN) times 4 KiB, with `PPN[1:0]` cleared: "for the paged virtual-memory
    /// schemes ... the lowest two bits of the physical page number (PPN) in hgatp always read
    /// as zeros". A value written with `PPN[1:0]` set therefore walks from the 16 KiB-aligned
    /// address below it; the model decodes it the same way.
    pub root: Hpa,
}

impl Hgatp {
    /// Decodes a raw hgatp value.
    pub fn decode(raw: u64) -> Result<Self, HgatpError> {
        let m = (raw >> 60) as u8;
        let mode = match m {
            0 => HgatpMode::Bare,
            8 => HgatpMode::Sv39x4,
            9 => HgatpMode::Sv48x4,
            10 => HgatpMode::Sv57x4,
            _ => return Err(HgatpError::ReservedMode(m)),
        };
        let vmid = ((raw >> 44) & 0x3fff) as u16;
        let ppn = raw & crate::bits(43, 0);
        let ppn = if mode == HgatpMode::Bare { ppn } else { ppn & !3 };
        Ok(Self { mode, vmid, root: Hpa(ppn << 12) })
    }

    /// Encodes the fields back into a raw value (root must be 16 KiB-aligned for a paged mode).
    pub const fn encode(&self) -> u64 {
        self.mode.bits() << 60 | (self.vmid as u64 & 0x3fff) << 44 | (self.root.0 >> 12)
    }
}

/// Options of the G-stage walk that the hart's configuration decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GstageConfig {
    /// Hardware updates A/D (Svadu with menvcfg.ADUE = 1): a clear A, or a clear D on a store,
    /// is set by the walk (written back to the PTE). Otherwise (Svade) it is a guest-page fault.
    pub hw_ad_update: bool,
    /// Svpbmt is implemented and enabled (menvcfg.PBMTE): leaf bits 62:61 hold PBMT 0-2.
    /// Otherwise those bits are reserved and a PTE with them set faults.
    pub svpbmt: bool,
    /// HS-level sstatus.MXR: "Setting MXR at HS-level ... overrides both VS-stage and G-stage
    /// execute-only permissions" (loads from X=1, R=0 pages are allowed).
    pub mxr: bool,
}

/// Why a RISC-V walk (G-stage or VS-stage) faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RvFaultKind {
    /// The address has bits set above the scheme's width (G-stage: bits 63:41/50/59 not zero;
    /// VS-stage: bits 63:VALEN not equal to bit VALEN-1).
    AddressTooWide,
    /// Step 3: V = 0.
    NotValid,
    /// Step 3: R = 0 and W = 1.
    WriteWithoutRead,
    /// Step 3: reserved bits (60:54, N without Svnapot, PBMT without Svpbmt or PBMT = 3).
    Reserved(u64),
    /// Step 3: D, A, U or PBMT set in a non-leaf PTE (reserved for future standard use).
    NonLeafReserved(u64),
    /// Step 4: a pointer PTE at the last level.
    NoLeaf,
    /// Step 5: a superpage whose low PPN fields are not zero.
    MisalignedSuperpage,
    /// Step 6: the U bit does not allow the access (G-stage: U = 0, since every G-stage access
    /// counts as a U-mode access; VS-stage: U/SUM rules).
    UserBit,
    /// Step 8: R/W/X do not allow the access.
    Permission,
    /// Step 9 (Svade): A = 0.
    AccessedClear,
    /// Step 9 (Svade): a store and D = 0.
    DirtyClear,
}

/// A guest-page fault (RISC-V Privileged, hypervisor chapter, "Guest-Page Faults").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPageFault {
    /// 20 (instruction), 21 (load) or 23 (store/AMO), for the *original* access type.
    pub cause: u64,
    /// The faulting guest-physical address shifted right by 2 (the model always reports it).
    pub htval: u64,
    /// The faulting guest-physical address (for an implicit VS-stage access: the PTE's GPA).
    pub gpa: Gpa,
    /// 0 for explicit accesses (the model writes no transformed instruction); for implicit
    /// VS-stage accesses one of the [`htinst`] pseudoinstructions.
    pub htinst: u64,
    /// Why.
    pub reason: RvFaultKind,
    /// Level of the PTE that caused it (`None` when no PTE was involved: AddressTooWide).
    pub level: Option<u8>,
}

/// Why a G-stage access did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GstageFault {
    /// A guest-page fault.
    GuestPage(GuestPageFault),
    /// Step 2 / step 9: a PTE read or A/D write hit absent memory (no memory in [`PhysMem`]):
    /// "raise an access-fault exception corresponding to the original access type".
    Access {
        /// 1, 5 or 7.
        cause: u64,
        /// The PTE address.
        pa: Hpa,
    },
    /// hgatp has a reserved MODE.
    InvalidHgatp(HgatpError),
}

/// A completed G-stage translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GWalk {
    /// The supervisor-physical address.
    pub hpa: Hpa,
    /// The size of the page the leaf maps (Bare: 4 KiB, meaninglessly).
    pub page_size: PageSize,
    /// Leaf R.
    pub r: bool,
    /// Leaf W.
    pub w: bool,
    /// Leaf X.
    pub x: bool,
    /// Leaf U.
    pub u: bool,
    /// Leaf PBMT (bits 62:61; 0 without Svpbmt).
    pub pbmt: u8,
    /// Leaf A after this walk.
    pub accessed: bool,
    /// Leaf D after this walk.
    pub dirty: bool,
}

/// How to check and report a G-stage access.
///
/// "For a memory access made to support VS-stage address translation ..., permissions and the
/// need to set A and/or D bits at the G-stage level are checked as though for an implicit load
/// or store, not for the original access type. However, any exception is always reported for
/// the original access type" (RISC-V Privileged, "Guest Physical Address Translation").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GRequest {
    /// The access the permissions and A/D are checked for.
    pub check: Access,
    /// The access type the fault cause is reported for.
    pub report: Access,
    /// The htinst value a guest-page fault carries.
    pub htinst: u64,
}

impl GRequest {
    /// An explicit access by the guest (or the final access of a two-stage translation).
    pub const fn explicit(access: Access) -> Self {
        Self { check: access, report: access, htinst: 0 }
    }

    /// An implicit read of a VS-level PTE on behalf of an `original` access (RV64 guest).
    pub const fn vs_table_read(original: Access) -> Self {
        Self { check: Access::Read, report: original, htinst: htinst::READ_64 }
    }

    /// An implicit A/D update of a VS-level PTE on behalf of an `original` access (RV64 guest).
    pub const fn vs_table_update(original: Access) -> Self {
        Self { check: Access::Write, report: original, htinst: htinst::WRITE_64 }
    }
}

/// Walks the G-stage tables named by `hgatp` for an explicit access to `gpa`.
pub fn walk<M: PhysMem + ?Sized>(
    mem: &mut M,
    hgatp: u64,
    cfg: &GstageConfig,
    gpa: Gpa,
    access: Access,
) -> Result<GWalk, GstageFault> {
    walk_with(mem, hgatp, cfg, gpa, GRequest::explicit(access))
}

/// Walks the G-stage tables for `gpa`, checking as `req.check` and reporting as `req.report`.
///
/// The algorithm is the Sv39/Sv48/Sv57 one with the G-stage changes: hgatp for satp, the root
/// index widened by 2 bits (a 2048-entry, 16 KiB root), guest-physical address bits above the
/// width must be zero, the U bit is checked as for a U-mode access, and guest-page faults are
/// raised instead of page faults. Model choice: A/D are written only when the walk succeeds.
pub fn walk_with<M: PhysMem + ?Sized>(
    mem: &mut M,
    hgatp: u64,
    cfg: &GstageConfig,
    gpa: Gpa,
    req: GRequest,
) -> Result<GWalk, GstageFault> {
    let h = Hgatp::decode(hgatp).map_err(GstageFault::InvalidHgatp)?;
    walk_from(mem, &h, cfg, gpa, req, None, &mut Vec::new())
}

/// What a walk saw, for the TLB model.
#[derive(Clone, Copy, Debug)]
pub(crate) enum GSeen {
    /// A valid non-leaf PTE at `level` for the region `prefix` pointing at `next`.
    Pointer { level: u8, prefix: u64, next: u64 },
    /// A PTE with V = 0 at `level` (cacheable: "This specification permits the caching of
    /// PTEs whose V (Valid) bit is clear").
    Invalid { level: u8 },
    /// A valid leaf with A = 1 (after any update): its translation, whatever this access's
    /// permission outcome. `walk.hpa` is the translation of the walked address.
    Leaf { walk: GWalk },
}

fn fault(gpa: Gpa, req: &GRequest, reason: RvFaultKind, level: Option<u8>) -> GstageFault {
    GstageFault::GuestPage(GuestPageFault {
        cause: cause::guest_page_fault(req.report),
        htval: gpa.0 >> 2,
        gpa,
        htinst: req.htinst,
        reason,
        level,
    })
}

/// Whether a leaf PTE allows `access` (steps 6 and 8), G-stage flavour.
pub(crate) fn rwx_allows(pte: u64, access: Access, mxr: bool) -> bool {
    match access {
        Access::Read => pte & R != 0 || (mxr && pte & X != 0),
        Access::Write => pte & W != 0,
        Access::Fetch => pte & X != 0,
    }
}

pub(crate) fn gwalk_of(pte: u64, level: u8, hpa: u64) -> GWalk {
    GWalk {
        hpa: Hpa(hpa),
        page_size: PageSize::from_level(level).unwrap_or(PageSize::Size4K),
        r: pte & R != 0,
        w: pte & W != 0,
        x: pte & X != 0,
        u: pte & U != 0,
        pbmt: ((pte & PBMT) >> 61) as u8,
        accessed: pte & A != 0,
        dirty: pte & D != 0,
    }
}

/// The walk proper. `start` = (level, table) to begin below a cached non-leaf PTE.
pub(crate) fn walk_from<M: PhysMem + ?Sized>(
    mem: &mut M,
    h: &Hgatp,
    cfg: &GstageConfig,
    gpa: Gpa,
    req: GRequest,
    start: Option<(u8, u64)>,
    seen: &mut Vec<GSeen>,
) -> Result<GWalk, GstageFault> {
    if h.mode == HgatpMode::Bare {
        // "When MODE=Bare, guest physical addresses are equal to supervisor physical addresses
        // ... and no memory protection applies".
        let mut w = gwalk_of(R | W | X | U | A | D, 0, gpa.0);
        w.hpa = Hpa(gpa.0);
        return Ok(w);
    }
    let width = h.mode.gpa_bits();
    // "Address bits 63:41 must all be zeros, or else a guest-page-fault exception occurs."
    if gpa.0 >> width != 0 {
        return Err(fault(gpa, &req, RvFaultKind::AddressTooWide, None));
    }
    let top = h.mode.levels() - 1;
    let (mut level, mut table) = start.unwrap_or((top, h.root.0));
    loop {
        let shift = level_shift(level);
        // The root index is VPN[top] widened by 2 bits: 11 bits, a 2048-entry root.
        let index_mask = if level == top { 0x7ff } else { 0x1ff };
        let pa = table + ((gpa.0 >> shift) & index_mask) * 8;
        let access_fault = GstageFault::Access { cause: cause::access_fault(req.report), pa: Hpa(pa) };
        let pte = mem.read_u64(Hpa(pa)).ok_or(access_fault)?;
        match rvpte::classify(pte, level, cfg.svpbmt) {
            Err(reason) => {
                if reason == RvFaultKind::NotValid {
                    seen.push(GSeen::Invalid { level });
                }
                return Err(fault(gpa, &req, reason, Some(level)));
            }
            Ok(PteKind::Pointer(next)) => {
                seen.push(GSeen::Pointer { level, prefix: gpa.0 >> shift, next });
                table = next;
                level -= 1;
                continue;
            }
            Ok(PteKind::Leaf) => {}
        }
        let hpa = rvpte::leaf_pa(pte, level, gpa.0);
        // Step 6: "when checking the U bit, the current privilege mode is always taken to be
        // U-mode": U = 0 faults.
        let user_ok = pte & U != 0;
        // Step 8: R/W/X for the checked access (HS-level MXR applies to G-stage).
        let rwx_ok = rwx_allows(pte, req.check, cfg.mxr);
        if pte & A != 0 {
            seen.push(GSeen::Leaf { walk: gwalk_of(pte, level, hpa) });
        }
        if !user_ok {
            return Err(fault(gpa, &req, RvFaultKind::UserBit, Some(level)));
        }
        if !rwx_ok {
            return Err(fault(gpa, &req, RvFaultKind::Permission, Some(level)));
        }
        // Step 9: A = 0, or a store with D = 0.
        let store = req.check == Access::Write;
        let mut pte = pte;
        if pte & A == 0 || (store && pte & D == 0) {
            if !cfg.hw_ad_update {
                let reason = if pte & A == 0 { RvFaultKind::AccessedClear } else { RvFaultKind::DirtyClear };
                return Err(fault(gpa, &req, reason, Some(level)));
            }
            pte |= A | if store { D } else { 0 };
            mem.write_u64(Hpa(pa), pte).ok_or(access_fault)?;
            seen.push(GSeen::Leaf { walk: gwalk_of(pte, level, hpa) });
        }
        return Ok(gwalk_of(pte, level, hpa));
    }
}
