//! RISC-V Sv39/Sv48/Sv57 (the guest's VS-stage), walked in software (RISC-V Privileged §4.3.2).
#![forbid(unsafe_code)]

use super::{guest_gpa, GuestPaging, GuestVaError, PageFaultKind, PagingModeError, Translation, Walk, WalkCache};
use crate::mem::{GuestMemory, PageHint};
use twostage_npt::{Access, GuestPhysAddr, GuestVirtAddr};

/// PTE bits (RISC-V Privileged §4.3.1, Figure "Sv32 page table entry", same low bits in Sv39+).
const V: u64 = 1 << 0;
const R: u64 = 1 << 1;
const W: u64 = 1 << 2;
const X: u64 = 1 << 3;
const U: u64 = 1 << 4;
const A: u64 = 1 << 6;
const D: u64 = 1 << 7;
/// PPN, bits 53:10 (§4.4.1).
const PPN_SHIFT: u32 = 10;
const PPN_MASK: u64 = (1 << 44) - 1;
/// Bits 60:54 are reserved for future standard use (§4.4.1).
const RESERVED_60_54: u64 = 0x7f << 54;
/// Bits 62:61 are PBMT with Svpbmt, reserved otherwise (§4.4.1, Svpbmt chapter).
const PBMT: u64 = 0b11 << 61;
/// Bit 63 is N with Svnapot, reserved otherwise.
const N: u64 = 1 << 63;
/// vsstatus.SUM (bit 18) and MXR (bit 19) (§3.1.6.3, as sstatus).
const SSTATUS_SUM: u64 = 1 << 18;
const SSTATUS_MXR: u64 = 1 << 19;

/// The guest's VS-stage translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RiscvPaging {
    /// Guest-physical address of the root table (vsatp.PPN × 4 KiB).
    pub root: GuestPhysAddr,
    /// 3 (Sv39), 4 (Sv48) or 5 (Sv57).
    pub levels: u8,
    /// vsstatus.SUM: supervisor loads/stores may touch U pages.
    pub sum: bool,
    /// vsstatus.MXR: loads from execute-only pages are allowed.
    pub mxr: bool,
    /// The access is made as VU-mode rather than VS-mode.
    pub user: bool,
    /// The hart updates A/D bits itself (Svadu with henvcfg.ADUE); otherwise (Svade) a clear A,
    /// or a clear D on a store, is a page fault that the guest handles.
    pub update_ad: bool,
    /// Svpbmt is enabled for the guest (henvcfg.PBMTE): PTE bits 62:61 are PBMT, not reserved.
    pub svpbmt: bool,
}

impl RiscvPaging {
    /// Decodes vsatp (MODE bits 63:60: 0 Bare, 8 Sv39, 9 Sv48, 10 Sv57; PPN bits 43:0; §4.1.11)
    /// and vsstatus (SUM, MXR). Accesses are VS-mode, A/D not updated by hardware (Svade), no
    /// Svpbmt; change the fields to match the hart.
    pub fn from_regs(vsatp: u64, vsstatus: u64) -> Result<GuestPaging, PagingModeError> {
        let levels = match (vsatp >> 60) as u8 {
            0 => return Ok(GuestPaging::Bare),
            8 => 3,
            9 => 4,
            10 => 5,
            m => return Err(PagingModeError::RiscvMode(m)),
        };
        let base = (vsatp & PPN_MASK) << 12;
        let root = GuestPhysAddr::try_new(base).map_err(PagingModeError::RootOutOfRange)?;
        Ok(GuestPaging::Riscv(Self {
            root,
            levels,
            sum: vsstatus & SSTATUS_SUM != 0,
            mxr: vsstatus & SSTATUS_MXR != 0,
            user: false,
            update_ad: false,
            svpbmt: false,
        }))
    }
}

pub(super) fn translate<M: GuestMemory + ?Sized>(
    mem: &mut M,
    p: &RiscvPaging,
    gva: GuestVirtAddr,
    access: Access,
    cache: &mut WalkCache<'_>,
) -> Result<Walk, GuestVaError> {
    if let Some(w) = leaf_fast(mem, p, gva.as_u64(), access, cache) {
        return Ok(w);
    }
    let mut last = None;
    for _ in 0..4 {
        match walk_once(mem, p, gva, access, cache)? {
            (t, level, false) => return Ok(Walk { t, level, settled: true }),
            (t, level, true) => last = Some(Walk { t, level, settled: false }),
        }
    }
    last.ok_or(GuestVaError::NonCanonical { gva, access })
}

/// The PTE bits that are reserved in every entry of mode `p` (§4.4.1; PBMT without Svpbmt).
fn reserved_bits(p: &RiscvPaging) -> u64 {
    let mut reserved = RESERVED_60_54 | N;
    if !p.svpbmt {
        reserved |= PBMT;
    }
    reserved
}

/// Whether leaf `pte` allows `access` in mode `p`: R/W/X with MXR, and U with SUM (§4.3.1, §4.3.2
/// step 5).
fn leaf_allows(p: &RiscvPaging, access: Access, pte: u64) -> bool {
    let rights = match access {
        Access::Read => pte & R != 0 || (p.mxr && pte & X != 0),
        Access::Write => pte & W != 0,
        Access::Execute => pte & X != 0,
    };
    let mode_ok = if p.user { pte & U != 0 } else { pte & U == 0 || (access != Access::Execute && p.sum) };
    rights && mode_ok
}

/// A translation through a cached last-level table whose PTE for `va` needs nothing done: a
/// valid 4 KiB leaf with no reserved bit, allowing the access, with A (and D for a store)
/// already set. Anything else (a fault, an A/D update, a read error) is left to the full walk,
/// which reports it.
#[inline]
fn leaf_fast<M: GuestMemory + ?Sized>(
    mem: &mut M,
    p: &RiscvPaging,
    va: u64,
    access: Access,
    cache: &WalkCache<'_>,
) -> Option<Walk> {
    let c = cache.hit(va).filter(|c| c.level == 0)?;
    let at = c.table.checked_add(((va >> 12) & 0x1ff) * 8)?;
    let mut hint = c.hint;
    let pte = mem.read_u64_hinted(at, &mut hint).ok()?;
    let want = if access == Access::Write { V | A | D } else { V | A };
    let bad_pbmt = p.svpbmt && pte & PBMT == PBMT;
    if pte & want != want
        || pte & (R | X) == 0
        || (pte & R == 0 && pte & W != 0)
        || pte & reserved_bits(p) != 0
        || bad_pbmt
    {
        return None;
    }
    if !leaf_allows(p, access, pte) {
        return None;
    }
    let ppn = (pte >> PPN_SHIFT) & PPN_MASK;
    let gpa = GuestPhysAddr::try_new((ppn << 12) | (va & 0xfff)).ok()?;
    Some(Walk { t: Translation { gpa, page_remaining: 0x1000 - (va & 0xfff) }, level: 0, settled: true })
}

fn walk_once<M: GuestMemory + ?Sized>(
    mem: &mut M,
    p: &RiscvPaging,
    gva: GuestVirtAddr,
    access: Access,
    cache: &mut WalkCache<'_>,
) -> Result<(Translation, u32, bool), GuestVaError> {
    let va = gva.as_u64();
    let levels = u32::from(p.levels.clamp(3, 5));
    let fault = |kind, level: u32| GuestVaError::PageFault { gva, access, kind, level: level as u8 };
    // Bits 63:VABITS must equal bit VABITS-1, else a page fault (§4.4.1, §4.5.1, §4.6.1).
    let va_bits = 12 + 9 * levels;
    let shift = 64 - va_bits;
    if ((va << shift) as i64 >> shift) as u64 != va {
        return Err(GuestVaError::NonCanonical { gva, access });
    }
    let reserved = reserved_bits(p);
    // Step 1: a = satp.ppn × PAGESIZE, i = LEVELS − 1 (§4.3.2). At most LEVELS reads: a cycle
    // in the guest's tables cannot lengthen the walk.
    let mut a = p.root;
    let mut top = levels - 1;
    // The table the last translation of this copy found its leaf in, if it covers `gva` (the
    // non-leaf entries above it were valid pointers, and carry no rights or A/D bits).
    // The host view of the page of `a` (kept with a cached table).
    let mut hint = PageHint::default();
    if let Some(c) = cache.hit(va) {
        a = c.table;
        top = c.level;
        hint = c.hint;
    }
    for i in (0..=top).rev() {
        let vpn = (va >> (12 + 9 * i)) & 0x1ff;
        // Step 2: pte = the PTE at a + va.vpn[i] × PTESIZE.
        let at = a.checked_add(vpn * 8).ok_or(fault(PageFaultKind::Reserved, i))?;
        let pte = mem.read_u64_hinted(at, &mut hint).map_err(|error| GuestVaError::TableAccess {
            gva,
            access,
            entry: at,
            error,
        })?;
        // Step 3: V = 0, or W without R, or reserved bits: page fault.
        if pte & V == 0 {
            return Err(fault(PageFaultKind::NotPresent, i));
        }
        // With Svpbmt, PBMT = 3 is reserved (Privileged, Svpbmt chapter).
        let bad_pbmt = p.svpbmt && pte & PBMT == PBMT;
        if (pte & R == 0 && pte & W != 0) || pte & reserved != 0 || bad_pbmt {
            return Err(fault(PageFaultKind::Reserved, i));
        }
        let ppn = (pte >> PPN_SHIFT) & PPN_MASK;
        // Step 4: R = X = 0 is a pointer to the next level.
        if pte & (R | X) == 0 {
            // For non-leaf PTEs, D, A and U are reserved (§4.3.1), and so are bits 62:61 even
            // with Svpbmt (Svpbmt chapter): they must be zero.
            if pte & (D | A | U | PBMT) != 0 {
                return Err(fault(PageFaultKind::Reserved, i));
            }
            if i == 0 {
                return Err(fault(PageFaultKind::NoLeaf, i));
            }
            a = guest_gpa(ppn << 12, || fault(PageFaultKind::Reserved, i))?;
            hint = PageHint::default();
            continue;
        }
        // Step 5: a leaf; check the access against R/W/X, U, SUM and MXR (§4.3.1, §4.3.2).
        if !leaf_allows(p, access, pte) {
            return Err(fault(PageFaultKind::Protection, i));
        }
        // Step 6: a superpage must have its low PPN bits clear.
        if i > 0 && ppn & ((1u64 << (9 * i)) - 1) != 0 {
            return Err(fault(PageFaultKind::MisalignedSuperpage, i));
        }
        // Step 7: A, and D for a store.
        let want = if access == Access::Write { A | D } else { A };
        let mut raced = false;
        if pte & want != want {
            if !p.update_ad {
                return Err(fault(PageFaultKind::AccessedDirty, i));
            }
            match mem.compare_exchange_u64(at, pte, pte | want) {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => raced = true,
                Err(error) => return Err(GuestVaError::TableAccess { gva, access, entry: at, error }),
            }
        }
        // Step 8: pa.pgoff = va.pgoff; a superpage takes the low VPNs from va.
        let page = 1u64 << (12 + 9 * i);
        let base = (ppn << 12) & !(page - 1);
        let gpa = guest_gpa(base | (va & (page - 1)), || fault(PageFaultKind::Reserved, i))?;
        if !raced && i + 1 < levels {
            cache.store(va, i, a, 0, hint);
        }
        return Ok((Translation { gpa, page_remaining: page - (va & (page - 1)) }, i, raced));
    }
    Err(fault(PageFaultKind::NoLeaf, 0))
}
