//! Intel EPT entries, 4- and 5-level (Intel SDM Vol. 3C §29.3.2, Tables 29-1 to 29-7).

use super::{EptFamily, Format, LeafBits, Pte};
use crate::addr::HostPhysAddr;
use crate::flags::MappingFlags;

/// Read access (Intel SDM Vol. 3C §29.3.2, Table 29-1 ff., bit 0).
const EPT_READ: u64 = 1 << 0;
/// Write access (bit 1).
const EPT_WRITE: u64 = 1 << 1;
/// Execute access (bit 2; supervisor-mode execute when mode-based execute control is on).
const EPT_EXECUTE: u64 = 1 << 2;
/// Leaf memory type, bits 5:3 (Table 29-4/29-6; types from §29.3.7: 0 UC, 1 WC, 4 WT, 5 WP, 6 WB).
const EPT_MEMTYPE_SHIFT: u32 = 3;
/// Ignore PAT memory type (bit 6 of a leaf).
const EPT_IGNORE_PAT: u64 = 1 << 6;
/// Maps a page (bit 7 of a PDPTE or PDE; reserved in PML5E/PML4E, ignored in a PTE).
const EPT_LARGE: u64 = 1 << 7;
/// Accessed (bit 8; used only when EPTP bit 6 enables A/D, §29.3.5).
const EPT_ACCESSED: u64 = 1 << 8;
/// Dirty (bit 9 of a leaf; same condition).
const EPT_DIRTY: u64 = 1 << 9;
/// Physical-address field, bits 51:12.
const EPT_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// EPT memory type UC (Intel SDM Vol. 3C §29.3.7).
const MEMTYPE_UC: u64 = 0;
/// EPT memory type WB.
const MEMTYPE_WB: u64 = 6;

/// Intel EPT with a 4-level walk (48-bit guest-physical addresses).
pub enum Ept4 {}
/// Intel EPT with a 5-level walk (57-bit guest-physical addresses).
pub enum Ept5 {}

fn decode(raw: u64, level: usize) -> Pte {
    // An entry is present when any of bits 2:0 is set (§29.3.2).
    if raw & (EPT_READ | EPT_WRITE | EPT_EXECUTE) == 0 {
        return Pte::Invalid;
    }
    let hpa = HostPhysAddr::new_truncate(raw & EPT_ADDR_MASK);
    let is_leaf = level == 0 || ((level == 1 || level == 2) && raw & EPT_LARGE != 0);
    if !is_leaf {
        return Pte::Table(hpa);
    }
    let mut flags = MappingFlags::empty();
    flags.set(MappingFlags::READ, raw & EPT_READ != 0);
    flags.set(MappingFlags::WRITE, raw & EPT_WRITE != 0);
    flags.set(MappingFlags::EXECUTE, raw & EPT_EXECUTE != 0);
    match (raw >> EPT_MEMTYPE_SHIFT) & 7 {
        MEMTYPE_WB => {}
        MEMTYPE_UC if raw & EPT_IGNORE_PAT != 0 => flags |= MappingFlags::DEVICE,
        _ => flags |= MappingFlags::UNCACHED,
    }
    Pte::Leaf(LeafBits { hpa, flags, accessed: raw & EPT_ACCESSED != 0, dirty: raw & EPT_DIRTY != 0 })
}

fn encode_leaf(leaf: &LeafBits, level: usize) -> u64 {
    let f = leaf.flags;
    let mut raw = leaf.hpa.as_u64() & EPT_ADDR_MASK;
    if f.contains(MappingFlags::READ) {
        raw |= EPT_READ;
    }
    if f.contains(MappingFlags::WRITE) {
        raw |= EPT_WRITE;
    }
    if f.contains(MappingFlags::EXECUTE) {
        raw |= EPT_EXECUTE;
    }
    // Device memory: UC with ignore-PAT, so the access is UC whatever the guest's PAT says
    // (Intel SDM Vol. 3C §29.3.7.2: with IPAT set the PAT type is ignored). "Uncached": UC with
    // IPAT clear, so the guest's PAT takes part through Vol. 3A Table 11-7 (§11.5.2.2), the EPT
    // type standing in for the MTRR type: UC for every PAT type except WC, which stays WC (the
    // guest may write-combine, e.g. a frame buffer; never cached either way).
    raw |= if f.contains(MappingFlags::DEVICE) {
        (MEMTYPE_UC << EPT_MEMTYPE_SHIFT) | EPT_IGNORE_PAT
    } else if f.contains(MappingFlags::UNCACHED) {
        MEMTYPE_UC << EPT_MEMTYPE_SHIFT
    } else {
        MEMTYPE_WB << EPT_MEMTYPE_SHIFT
    };
    if level > 0 {
        raw |= EPT_LARGE;
    }
    if leaf.accessed {
        raw |= EPT_ACCESSED;
    }
    if leaf.dirty {
        raw |= EPT_DIRTY;
    }
    raw
}

fn encode_table(next: HostPhysAddr) -> u64 {
    // Non-leaf entries grant everything; rights are decided at the leaf (§29.3.3: access is the AND).
    (next.as_u64() & EPT_ADDR_MASK) | EPT_READ | EPT_WRITE | EPT_EXECUTE
}

macro_rules! ept_format {
    ($ty:ty, $name:literal, $levels:literal, $bits:literal) => {
        impl Format for $ty {
            const NAME: &'static str = $name;
            type Family = EptFamily;
            const LEVELS: usize = $levels;
            const GPA_BITS: u32 = $bits;
            const MAX_PHYS_BITS: u8 = 52;
            const ROOT_FRAMES: usize = 1;
            // 4 KiB PTEs, 2 MiB PDEs and 1 GiB PDPTEs may map pages; a PML4E or PML5E may not.
            const LEAF_LEVELS: u8 = 0b111;
            const ENCODES_MEMORY_TYPE: bool = true;
            const ACCESSED: u64 = EPT_ACCESSED;
            const DIRTY: u64 = EPT_DIRTY;

            fn decode(raw: u64, level: usize) -> Pte {
                decode(raw, level)
            }
            #[inline]
            fn present(raw: u64) -> bool {
                raw & (EPT_READ | EPT_WRITE | EPT_EXECUTE) != 0
            }
            #[inline]
            fn is_leaf(raw: u64, level: usize) -> bool {
                level == 0 || ((level == 1 || level == 2) && raw & EPT_LARGE != 0)
            }
            #[inline]
            fn address(raw: u64) -> HostPhysAddr {
                HostPhysAddr::new_truncate(raw & EPT_ADDR_MASK)
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

ept_format!(Ept4, "EPT 4-level", 4, 48);
ept_format!(Ept5, "EPT 5-level", 5, 57);
