//! The RISC-V Sv39/Sv48/Sv57 PTE format and its per-entry checks, shared by G-stage and VS-stage.
//!
//! RISC-V Privileged, "Sv32" (bits 9:0, the translation algorithm) and "Sv39" (bits 63:10).

use crate::gstage::RvFaultKind;
use crate::{bits, level_shift};

/// Bit 0: valid.
pub(crate) const V: u64 = 1 << 0;
/// Bit 1: readable.
pub(crate) const R: u64 = 1 << 1;
/// Bit 2: writable.
pub(crate) const W: u64 = 1 << 2;
/// Bit 3: executable.
pub(crate) const X: u64 = 1 << 3;
/// Bit 4: user.
pub(crate) const U: u64 = 1 << 4;
/// Bit 6: accessed.
pub(crate) const A: u64 = 1 << 6;
/// Bit 7: dirty.
pub(crate) const D: u64 = 1 << 7;
/// Bits 53:10: PPN.
pub(crate) const PPN: u64 = bits(53, 10);
/// Bits 60:54: reserved for future standard use (page fault if set).
const RESERVED: u64 = bits(60, 54);
/// Bits 62:61: PBMT (Svpbmt); reserved without Svpbmt.
pub(crate) const PBMT: u64 = bits(62, 61);
/// Bit 63: N (Svnapot), which the model does not implement: reserved.
const N: u64 = 1 << 63;

/// What a PTE that passed the per-entry checks is.
pub(crate) enum PteKind {
    /// A pointer to the next table (at this physical address).
    Pointer(u64),
    /// A leaf.
    Leaf,
}

/// Steps 3-5 of the translation algorithm (RISC-V Privileged, "Virtual Address Translation
/// Process") for the PTE read at `level` (the spec's i).
pub(crate) fn classify(pte: u64, level: u8, svpbmt: bool) -> Result<PteKind, RvFaultKind> {
    // Step 3: V=0, or R=0 and W=1, or reserved bits/encodings set.
    if pte & V == 0 {
        return Err(RvFaultKind::NotValid);
    }
    if pte & (R | W) == W {
        return Err(RvFaultKind::WriteWithoutRead);
    }
    let mut reserved = pte & (RESERVED | N);
    let pbmt = pte & PBMT;
    if !svpbmt {
        // Sv39: "If Svpbmt is not implemented, bits 62-61 ... or else a page-fault exception".
        reserved |= pbmt;
    } else if pbmt == PBMT {
        // Svpbmt: PBMT value 3 is reserved for future standard use.
        reserved |= pbmt;
    }
    if reserved != 0 {
        return Err(RvFaultKind::Reserved(reserved));
    }
    if pte & (R | X) == 0 {
        // Sv32: "For non-leaf PTEs, the D, A, and U bits are reserved for future standard
        // use"; Svpbmt: bits 62:61 are reserved in non-leaf PTEs. Step 3 faults on them.
        let nonleaf_reserved = pte & (D | A | U | PBMT);
        if nonleaf_reserved != 0 {
            return Err(RvFaultKind::NonLeafReserved(nonleaf_reserved));
        }
        // Step 4: a pointer at i = 0 leaves i < 0: page fault.
        if level == 0 {
            return Err(RvFaultKind::NoLeaf);
        }
        return Ok(PteKind::Pointer((pte & PPN) << 2));
    }
    // Step 5: misaligned superpage (pte.ppn[i-1:0] != 0).
    if level > 0 {
        let low = ((pte & PPN) >> 10) & ((1u64 << (9 * level as u32)) - 1);
        if low != 0 {
            return Err(RvFaultKind::MisalignedSuperpage);
        }
    }
    Ok(PteKind::Leaf)
}

/// Step 10: the physical address for `addr` through a leaf at `level`.
pub(crate) fn leaf_pa(pte: u64, level: u8, addr: u64) -> u64 {
    let offset_mask = (1u64 << level_shift(level)) - 1;
    (((pte & PPN) << 2) & !offset_mask) | (addr & offset_mask)
}
