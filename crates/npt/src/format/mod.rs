//! The format trait: how one kind of nested table lays out its entries.

mod ept;
mod riscv;

pub use ept::{Ept4, Ept5};
pub use riscv::{Sv39x4, Sv48x4, Sv57x4};

use crate::addr::HostPhysAddr;
use crate::flags::MappingFlags;
use crate::table::{AdMode, TableOptions};

pub(crate) use crate::flush::{EptFamily, GStageFamily};

pub(crate) mod sealed {
    /// Implemented by the crate's own formats only: the engine's correctness rests on each
    /// format's encoding and caching rules, which it knows.
    pub trait Sealed {}
    impl Sealed for super::Ept4 {}
    impl Sealed for super::Ept5 {}
    impl Sealed for super::Sv39x4 {}
    impl Sealed for super::Sv48x4 {}
    impl Sealed for super::Sv57x4 {}
}

/// One decoded table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pte {
    /// Not present: the walk stops with a fault.
    Invalid,
    /// Points at the next-level table.
    Table(HostPhysAddr),
    /// Maps a page of the size of its level.
    Leaf(LeafBits),
}

/// What a leaf entry says, format-independently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafBits {
    /// Host-physical base of the page.
    pub hpa: HostPhysAddr,
    /// Rights and memory attributes.
    pub flags: MappingFlags,
    /// Accessed bit.
    pub accessed: bool,
    /// Dirty bit.
    pub dirty: bool,
}

/// Why a set of flags cannot be encoded by a format (or is refused by the table's options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagsError {
    /// No right at all: that is an unmapped page, use `unmap`.
    NoRights,
    /// Write without read is reserved (EPT: misconfiguration; RISC-V: reserved encoding).
    WriteWithoutRead,
    /// Execute-only needs a capability this table was not given (EPT: IA32_VMX_EPT_VPID_CAP bit 0).
    ExecuteOnlyUnsupported,
}

impl core::fmt::Display for FlagsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::NoRights => "no right at all is an unmapped page (use unmap)",
            Self::WriteWithoutRead => "write without read is a reserved encoding",
            Self::ExecuteOnlyUnsupported => "execute-only pages are not offered (EPT: IA32_VMX_EPT_VPID_CAP bit 0)",
        })
    }
}
impl core::error::Error for FlagsError {}

/// A nested paging format: an uninhabited marker type with the format's constants and its entry
/// encoding. The engine ([`crate::PageTable`]) is generic over it.
///
/// Sealed: only [`Ept4`], [`Ept5`], [`Sv39x4`], [`Sv48x4`] and [`Sv57x4`] implement it.
pub trait Format: sealed::Sealed + Sized + 'static {
    /// Human-readable name, e.g. "EPT 4-level".
    const NAME: &'static str;
    /// How invalidation works for this format: [`crate::EptFamily`] (INVEPT) or [`crate::GStageFamily`]
    /// (HFENCE.GVMA). Its [`crate::Family::Invalidation`] is the only invalidation a token of this
    /// format can ask for.
    type Family: crate::flush::Family;
    /// Number of levels; the root is level `LEVELS - 1`, 4 KiB leaves are level 0.
    const LEVELS: usize;
    /// Width of the guest-physical address space the format translates.
    const GPA_BITS: u32;
    /// Widest host-physical address the entry's address field can hold: 52 for EPT (bits 51:12,
    /// Intel SDM Vol. 3C §29.3.2), 56 for the G-stage formats (a 44-bit PPN). A CPU may offer
    /// fewer (MAXPHYADDR): see [`crate::TableOptions::max_phys_bits`].
    const MAX_PHYS_BITS: u8;
    /// Frames in the root table (4 for the RISC-V x4 formats: 16 KiB, 16 KiB-aligned).
    const ROOT_FRAMES: usize;
    /// Bit `L` set when a leaf may sit at level `L`.
    const LEAF_LEVELS: u8;
    /// Whether the leaf memory type is encoded (EPT); elsewhere DEVICE/UNCACHED are not stored.
    const ENCODES_MEMORY_TYPE: bool;
    /// The accessed bit of an entry.
    const ACCESSED: u64;
    /// The dirty bit of a leaf entry.
    const DIRTY: u64;

    /// Decodes a raw entry found at `level`.
    fn decode(raw: u64, level: usize) -> Pte;
    /// Whether a raw entry is present: a mask test, for the hot walks that must not decode.
    fn present(raw: u64) -> bool;
    /// Whether a present raw entry at `level` maps a page (rather than pointing at a table).
    fn is_leaf(raw: u64, level: usize) -> bool;
    /// The address field of a present entry (the next table, or the page).
    fn address(raw: u64) -> HostPhysAddr;
    /// Encodes a pointer to a next-level table.
    fn encode_table(next: HostPhysAddr) -> u64;
    /// Encodes a leaf at `level` (flags already checked with [`Format::check_flags`]).
    fn encode_leaf(leaf: &LeafBits, level: usize) -> u64;

    /// Whether `flags` can be mapped in a table with `opts`.
    fn check_flags(flags: MappingFlags, opts: &TableOptions) -> Result<(), FlagsError> {
        let r = flags.rights();
        if r.is_empty() {
            return Err(FlagsError::NoRights);
        }
        if r.contains(MappingFlags::WRITE) && !r.contains(MappingFlags::READ) {
            return Err(FlagsError::WriteWithoutRead);
        }
        if r == MappingFlags::EXECUTE && !opts.execute_only {
            return Err(FlagsError::ExecuteOnlyUnsupported);
        }
        Ok(())
    }

    /// Entries in a table at `level` (the root of an x4 format is wider).
    fn entries(level: usize) -> usize {
        if level == Self::LEVELS - 1 {
            1 << (Self::GPA_BITS - (12 + 9 * level as u32))
        } else {
            512
        }
    }

    /// Index into the table at `level` for guest-physical address `gpa`.
    fn index(gpa: u64, level: usize) -> usize {
        ((gpa >> (12 + 9 * level)) as usize) & (Self::entries(level) - 1)
    }

    /// The A/D bits a new leaf starts with under `mode`.
    fn initial_ad(flags: MappingFlags, mode: AdMode) -> (bool, bool) {
        match mode {
            AdMode::Hardware | AdMode::Software => (false, false),
            AdMode::Preset => (true, flags.contains(MappingFlags::WRITE)),
        }
    }
}

/// Bytes covered by one entry at `level`.
pub(crate) const fn level_size(level: usize) -> u64 {
    1u64 << (12 + 9 * level)
}
