//! RISC-V G-stage entries: Sv39x4, Sv48x4, Sv57x4 (RISC-V Privileged spec, Hypervisor
//! extension, "Two-Stage Address Translation" §9.5 in v1.12 / §18.5 in v20240411; PTE format
//! of Sv39 §4.4.1, Sv48 §4.5, Sv57 §4.6).

use super::{Format, GStageFamily, LeafBits, Pte};
use crate::addr::HostPhysAddr;
use crate::flags::MappingFlags;

/// Valid (Privileged spec §4.4.1, PTE bit 0).
const PTE_V: u64 = 1 << 0;
/// Readable (bit 1).
const PTE_R: u64 = 1 << 1;
/// Writable (bit 2).
const PTE_W: u64 = 1 << 2;
/// Executable (bit 3).
const PTE_X: u64 = 1 << 3;
/// User (bit 4). G-stage accesses count as U-mode, so every G-stage leaf needs U=1 (§9.5.1).
const PTE_U: u64 = 1 << 4;
// Bit 5 (G, global) is not used by G-stage tables.
/// Accessed (bit 6).
const PTE_A: u64 = 1 << 6;
/// Dirty (bit 7).
const PTE_D: u64 = 1 << 7;
/// PPN field position (bits 53:10).
const PTE_PPN_SHIFT: u32 = 10;
/// PPN field mask once shifted down (44 bits).
const PTE_PPN_MASK: u64 = (1 << 44) - 1;

/// Sv39x4: 3 levels, 41-bit guest-physical addresses, 16 KiB root (hgatp MODE 8).
pub enum Sv39x4 {}
/// Sv48x4: 4 levels, 50-bit guest-physical addresses, 16 KiB root (hgatp MODE 9).
pub enum Sv48x4 {}
/// Sv57x4: 5 levels, 59-bit guest-physical addresses, 16 KiB root (hgatp MODE 10).
pub enum Sv57x4 {}

fn ppn_to_hpa(raw: u64) -> HostPhysAddr {
    HostPhysAddr::new_truncate(((raw >> PTE_PPN_SHIFT) & PTE_PPN_MASK) << 12)
}

fn hpa_to_ppn(hpa: HostPhysAddr) -> u64 {
    (hpa.as_u64() >> 12) << PTE_PPN_SHIFT
}

fn decode(raw: u64, _level: usize) -> Pte {
    if raw & PTE_V == 0 {
        return Pte::Invalid;
    }
    // R=W=X=0 marks a pointer to the next level (§4.3.2 step 4).
    if raw & (PTE_R | PTE_W | PTE_X) == 0 {
        return Pte::Table(ppn_to_hpa(raw));
    }
    let mut flags = MappingFlags::empty();
    flags.set(MappingFlags::READ, raw & PTE_R != 0);
    flags.set(MappingFlags::WRITE, raw & PTE_W != 0);
    flags.set(MappingFlags::EXECUTE, raw & PTE_X != 0);
    Pte::Leaf(LeafBits { hpa: ppn_to_hpa(raw), flags, accessed: raw & PTE_A != 0, dirty: raw & PTE_D != 0 })
}

fn encode_leaf(leaf: &LeafBits, _level: usize) -> u64 {
    let f = leaf.flags;
    let mut raw = hpa_to_ppn(leaf.hpa) | PTE_V | PTE_U;
    if f.contains(MappingFlags::READ) {
        raw |= PTE_R;
    }
    if f.contains(MappingFlags::WRITE) {
        raw |= PTE_W;
    }
    if f.contains(MappingFlags::EXECUTE) {
        raw |= PTE_X;
    }
    if leaf.accessed {
        raw |= PTE_A;
    }
    if leaf.dirty {
        raw |= PTE_D;
    }
    raw
}

fn encode_table(next: HostPhysAddr) -> u64 {
    // Non-leaf entries keep D, A and U clear: they are reserved there (§4.4.1).
    hpa_to_ppn(next) | PTE_V
}

macro_rules! gstage_format {
    ($ty:ty, $name:literal, $levels:literal, $bits:literal, $leaves:literal) => {
        impl Format for $ty {
            const NAME: &'static str = $name;
            type Family = GStageFamily;
            const LEVELS: usize = $levels;
            const GPA_BITS: u32 = $bits;
            // The x4 root is 16 KiB and 16 KiB-aligned: its index is 2 bits wider (§9.5.1).
            const MAX_PHYS_BITS: u8 = 56;
            const ROOT_FRAMES: usize = 4;
            const LEAF_LEVELS: u8 = $leaves;
            // Memory types come from PMAs (and Svpbmt, not used here): DEVICE/UNCACHED are not stored.
            const ENCODES_MEMORY_TYPE: bool = false;
            const ACCESSED: u64 = PTE_A;
            const DIRTY: u64 = PTE_D;

            fn decode(raw: u64, level: usize) -> Pte {
                decode(raw, level)
            }
            #[inline]
            fn present(raw: u64) -> bool {
                raw & PTE_V != 0
            }
            #[inline]
            fn is_leaf(raw: u64, _level: usize) -> bool {
                raw & (PTE_R | PTE_W | PTE_X) != 0
            }
            #[inline]
            fn address(raw: u64) -> HostPhysAddr {
                ppn_to_hpa(raw)
            }
            fn encode_table(next: HostPhysAddr) -> u64 {
                encode_table(next)
            }
            fn encode_leaf(leaf: &LeafBits, level: usize) -> u64 {
                encode_leaf(leaf, level)
            }
        }
    };
}

// Every level may hold a leaf ("megapage", "gigapage", "terapage", "petapage"); the engine maps
// up to 512 GiB pages (level 3); a 256 TiB Sv57 petapage is never chosen.
gstage_format!(Sv39x4, "Sv39x4", 3, 41, 0b111);
gstage_format!(Sv48x4, "Sv48x4", 4, 50, 0b1111);
gstage_format!(Sv57x4, "Sv57x4", 5, 59, 0b1111);
