//! One error type per table operation, each naming the address it is about.

use crate::addr::{GuestPhysAddr, HostPhysAddr, PageSize};
use crate::flags::MappingFlags;
use crate::format::FlagsError;
use core::fmt;

/// The frame allocator had no frame for a new table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfFrames {
    /// How many frames the operation needed (nothing was changed).
    pub needed: usize,
}

impl fmt::Display for OutOfFrames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "out of frames: the change needed {} table frame(s); nothing was changed", self.needed)
    }
}

/// A host-physical address at or above the CPU's MAXPHYADDR (the table's
/// [`crate::TableOptions::max_phys_bits`]): the hardware would find reserved bits set in the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BeyondMaxPhys {
    /// The first host address of the request that is out of reach.
    pub hpa: HostPhysAddr,
    /// MAXPHYADDR, in bits.
    pub max_phys_bits: u8,
}

impl fmt::Display for BeyondMaxPhys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host-physical address {:#x} is beyond MAXPHYADDR ({} bits): the bits above are reserved",
            self.hpa.as_u64(),
            self.max_phys_bits
        )
    }
}
impl core::error::Error for BeyondMaxPhys {}

/// Why a range was refused before anything was touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeProblem {
    /// The length is zero.
    Empty,
    /// An address or the length is not a multiple of the page size needed.
    Unaligned,
    /// The range runs past the format's guest-physical width (or the host's, for `hpa`).
    OutOfRange,
}

/// `PageTable::map` failed; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The guest range `gpa..gpa+len` is not acceptable.
    BadGuestRange {
        /// Start of the range.
        gpa: GuestPhysAddr,
        /// Its length.
        len: u64,
        /// What is wrong with it.
        problem: RangeProblem,
    },
    /// The host range `hpa..hpa+len` is not acceptable.
    BadHostRange {
        /// Start of the range.
        hpa: HostPhysAddr,
        /// Its length.
        len: u64,
        /// What is wrong with it.
        problem: RangeProblem,
    },
    /// The host range reaches beyond MAXPHYADDR.
    BeyondMaxPhys(BeyondMaxPhys),
    /// The flags cannot be mapped.
    BadFlags {
        /// The flags asked for.
        flags: MappingFlags,
        /// Why not.
        reason: FlagsError,
    },
    /// The page size asked for is not offered by the format or the CPU.
    UnsupportedPageSize(PageSize),
    /// A page in the range is already mapped.
    AlreadyMapped {
        /// The first mapped address found.
        gpa: GuestPhysAddr,
    },
    /// No frame for a table.
    OutOfFrames(OutOfFrames),
}

/// `unmap` or `protect` failed; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// The range is not acceptable.
    BadRange {
        /// Start of the range.
        gpa: GuestPhysAddr,
        /// Its length.
        len: u64,
        /// What is wrong with it.
        problem: RangeProblem,
    },
    /// The new flags cannot be mapped (protect only).
    BadFlags {
        /// The flags asked for.
        flags: MappingFlags,
        /// Why not.
        reason: FlagsError,
    },
    /// A huge page at an edge of the range had to be split and there was no frame for it.
    OutOfFrames(OutOfFrames),
}

/// `remap` failed; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemapError {
    /// No leaf maps this address.
    NotMapped(GuestPhysAddr),
    /// The address is inside a leaf of `size` but not its base.
    NotLeafBase {
        /// The address asked for.
        gpa: GuestPhysAddr,
        /// Size of the leaf that maps it.
        size: PageSize,
    },
    /// The new host address is not aligned to the leaf's size.
    Unaligned {
        /// The host address asked for.
        hpa: HostPhysAddr,
        /// Size of the leaf.
        size: PageSize,
    },
    /// The new host page reaches beyond MAXPHYADDR.
    BeyondMaxPhys(BeyondMaxPhys),
    /// The new flags cannot be mapped.
    BadFlags {
        /// The flags asked for.
        flags: MappingFlags,
        /// Why not.
        reason: FlagsError,
    },
}

/// `try_clone_protected` failed; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneError {
    /// A range is not acceptable.
    BadRange {
        /// Start of the range.
        gpa: GuestPhysAddr,
        /// Its length.
        len: u64,
        /// What is wrong with it.
        problem: RangeProblem,
    },
    /// A range's flags cannot be mapped.
    BadFlags {
        /// The flags asked for.
        flags: MappingFlags,
        /// Why not.
        reason: FlagsError,
    },
    /// A range edge falls inside a huge page.
    CutsHugePage {
        /// Base of the huge page.
        gpa: GuestPhysAddr,
        /// Its size.
        size: PageSize,
    },
    /// No frame for a table of the copy.
    OutOfFrames(OutOfFrames),
}

/// `split` failed; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitError {
    /// No leaf maps this address.
    NotMapped(GuestPhysAddr),
    /// The leaf is already a 4 KiB page.
    AlreadySmallest(GuestPhysAddr),
    /// The smaller page size is not allowed in this table.
    UnsupportedPageSize(PageSize),
    /// No frame for the new table.
    OutOfFrames(OutOfFrames),
}

/// Why a table cannot be replaced by one huge leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotCollapsible {
    /// The entry is not a table (already a leaf, or nothing mapped).
    NotATable,
    /// An entry of the table is missing or is itself a table.
    NotAllLeaves,
    /// The leaves are not contiguous in host memory from a suitably aligned base.
    NotContiguous,
    /// The leaves differ in rights or attributes.
    MixedFlags,
}

/// `collapse` failed; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollapseError {
    /// The page size is not offered by the format or the CPU.
    UnsupportedPageSize(PageSize),
    /// The address is beyond the format's width.
    OutOfRange(GuestPhysAddr),
    /// The table at `gpa` cannot become one leaf.
    NotCollapsible {
        /// Base of the would-be huge page.
        gpa: GuestPhysAddr,
        /// Why.
        reason: NotCollapsible,
    },
}

/// `set_accessed_dirty` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdError {
    /// No leaf maps this address.
    NotMapped(GuestPhysAddr),
    /// The table presets A/D bits ([`crate::AdMode::Preset`]): there is nothing to track.
    NotTracked,
}

impl core::error::Error for OutOfFrames {}

impl fmt::Display for RangeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "it is empty",
            Self::Unaligned => "an address or the length is not a multiple of the page size",
            Self::OutOfRange => "it runs past the address space",
        })
    }
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadGuestRange { gpa, len, problem } => {
                write!(f, "cannot map guest range {:#x}+{len:#x}: {problem}", gpa.as_u64())
            }
            Self::BadHostRange { hpa, len, problem } => {
                write!(f, "cannot map host range {:#x}+{len:#x}: {problem}", hpa.as_u64())
            }
            Self::BeyondMaxPhys(e) => write!(f, "cannot map: {e}"),
            Self::BadFlags { flags, reason } => write!(f, "cannot map with rights {flags}: {reason}"),
            Self::UnsupportedPageSize(size) => {
                write!(f, "cannot map {size} pages: the format or the CPU does not offer them")
            }
            Self::AlreadyMapped { gpa } => write!(f, "cannot map: guest address {:#x} is already mapped", gpa.as_u64()),
            Self::OutOfFrames(e) => write!(f, "cannot map: {e}"),
        }
    }
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRange { gpa, len, problem } => {
                write!(f, "bad guest range {:#x}+{len:#x}: {problem}", gpa.as_u64())
            }
            Self::BadFlags { flags, reason } => write!(f, "cannot protect to rights {flags}: {reason}"),
            Self::OutOfFrames(e) => write!(f, "cannot split a huge page at the range's edge: {e}"),
        }
    }
}

impl fmt::Display for RemapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMapped(gpa) => write!(f, "cannot remap: guest address {:#x} is not mapped", gpa.as_u64()),
            Self::NotLeafBase { gpa, size } => {
                write!(f, "cannot remap: guest address {:#x} is inside a {size} page, not its base", gpa.as_u64())
            }
            Self::Unaligned { hpa, size } => {
                write!(f, "cannot remap to host address {:#x}: not aligned to the {size} page", hpa.as_u64())
            }
            Self::BeyondMaxPhys(e) => write!(f, "cannot remap: {e}"),
            Self::BadFlags { flags, reason } => write!(f, "cannot remap with rights {flags}: {reason}"),
        }
    }
}

impl fmt::Display for CloneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRange { gpa, len, problem } => {
                write!(f, "cannot clone: bad guest range {:#x}+{len:#x}: {problem}", gpa.as_u64())
            }
            Self::BadFlags { flags, reason } => write!(f, "cannot clone with rights {flags}: {reason}"),
            Self::CutsHugePage { gpa, size } => write!(
                f,
                "cannot clone: a range edge cuts the {size} page at guest address {:#x} (split it first)",
                gpa.as_u64()
            ),
            Self::OutOfFrames(e) => write!(f, "cannot clone: {e}"),
        }
    }
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMapped(gpa) => write!(f, "cannot split: guest address {:#x} is not mapped", gpa.as_u64()),
            Self::AlreadySmallest(gpa) => {
                write!(f, "cannot split: guest address {:#x} is mapped by a 4K page", gpa.as_u64())
            }
            Self::UnsupportedPageSize(size) => write!(f, "cannot split into {size} pages: this table may not use them"),
            Self::OutOfFrames(e) => write!(f, "cannot split: {e}"),
        }
    }
}

impl fmt::Display for NotCollapsible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotATable => "the entry is not a table (already a leaf, or nothing mapped)",
            Self::NotAllLeaves => "an entry of the table is missing or is itself a table",
            Self::NotContiguous => "the pages are not contiguous in host memory from an aligned base",
            Self::MixedFlags => "the pages differ in rights or attributes",
        })
    }
}

impl fmt::Display for CollapseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedPageSize(size) => {
                write!(f, "cannot collapse into a {size} page: this table may not use it")
            }
            Self::OutOfRange(gpa) => {
                write!(f, "cannot collapse: guest address {:#x} is beyond the format's width", gpa.as_u64())
            }
            Self::NotCollapsible { gpa, reason } => {
                write!(f, "cannot collapse at guest address {:#x}: {reason}", gpa.as_u64())
            }
        }
    }
}

impl fmt::Display for AdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMapped(gpa) => {
                write!(f, "cannot set accessed/dirty: guest address {:#x} is not mapped", gpa.as_u64())
            }
            Self::NotTracked => f.write_str("cannot set accessed/dirty: this table presets them (AdMode::Preset)"),
        }
    }
}

impl core::error::Error for RangeProblem {}
impl core::error::Error for NotCollapsible {}
impl core::error::Error for AdError {}

impl core::error::Error for MapError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::BadGuestRange { problem, .. } | Self::BadHostRange { problem, .. } => Some(problem),
            Self::BadFlags { reason, .. } => Some(reason),
            Self::BeyondMaxPhys(e) => Some(e),
            Self::OutOfFrames(e) => Some(e),
            Self::UnsupportedPageSize(_) | Self::AlreadyMapped { .. } => None,
        }
    }
}

impl core::error::Error for RangeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::BadRange { problem, .. } => Some(problem),
            Self::BadFlags { reason, .. } => Some(reason),
            Self::OutOfFrames(e) => Some(e),
        }
    }
}

impl core::error::Error for RemapError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::BadFlags { reason, .. } => Some(reason),
            Self::BeyondMaxPhys(e) => Some(e),
            Self::NotMapped(_) | Self::NotLeafBase { .. } | Self::Unaligned { .. } => None,
        }
    }
}

impl core::error::Error for CloneError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::BadRange { problem, .. } => Some(problem),
            Self::BadFlags { reason, .. } => Some(reason),
            Self::OutOfFrames(e) => Some(e),
            Self::CutsHugePage { .. } => None,
        }
    }
}

impl core::error::Error for SplitError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::OutOfFrames(e) => Some(e),
            _ => None,
        }
    }
}

impl core::error::Error for CollapseError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::NotCollapsible { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

macro_rules! from_out_of_frames {
    ($($t:ty),*) => {$(
        impl From<OutOfFrames> for $t {
            fn from(e: OutOfFrames) -> Self {
                Self::OutOfFrames(e)
            }
        }
    )*};
}
from_out_of_frames!(MapError, RangeError, SplitError, CloneError);

impl From<BeyondMaxPhys> for MapError {
    fn from(e: BeyondMaxPhys) -> Self {
        Self::BeyondMaxPhys(e)
    }
}
impl From<BeyondMaxPhys> for RemapError {
    fn from(e: BeyondMaxPhys) -> Self {
        Self::BeyondMaxPhys(e)
    }
}
