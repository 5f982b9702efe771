//! Error enums, one per operation. Each has a message per variant (`Display`), implements
//! [`core::error::Error`] (with [`core::error::Error::source`] naming the error it wraps), and
//! converts from the errors it wraps, so `?` works across them.
#![forbid(unsafe_code)]

use crate::region::{RegionId, RegionLabel};
use alloc::collections::TryReserveError;
use core::error::Error;
use core::fmt;
use twostage_npt::{
    CloneError, FlagsError, GpaRange, GuestPhysAddr, HostPhysAddr, MapError, OutOfFrames, RangeError, SplitError,
};

/// Why [`crate::AddressSpace::new`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewSpaceError {
    /// No frame for the root table.
    OutOfFrames(OutOfFrames),
}

/// Why a region could not be added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddRegionError {
    /// Start or length is not a multiple of 4 KiB, or the range is empty.
    Misaligned {
        /// The refused range.
        range: GpaRange,
    },
    /// The range reaches past what the table's format translates.
    OutOfRange {
        /// The refused range.
        range: GpaRange,
        /// Width of the format's guest-physical space.
        gpa_bits: u32,
    },
    /// The new region would overlap an existing one.
    Overlap {
        /// Name of the refused region.
        name: &'static str,
        /// Its range.
        range: GpaRange,
        /// The region already there.
        existing: RegionLabel,
    },
    /// The rights cannot be mapped by this table.
    Flags(FlagsError),
    /// A linear region's host address is not 4 KiB-aligned or overflows.
    BadHost {
        /// The refused host address.
        host: HostPhysAddr,
    },
    /// Mapping a linear region failed (nothing was mapped).
    Map(MapError),
    /// A linear region added inside a running dirty log could not be armed (its huge pages
    /// split); the region was not added.
    DirtyLog(DirtyLogError),
}

/// No region has this id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoSuchRegion(pub RegionId);

/// Why a region could not be removed (it is still there, unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveRegionError {
    /// Unknown id.
    NoSuchRegion(RegionId),
    /// The engine refused the unmap.
    Unmap(RangeError),
}

/// Why a region's rights could not be changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtectRegionError {
    /// Unknown id.
    NoSuchRegion(RegionId),
    /// The rights cannot be mapped by this table.
    Flags(FlagsError),
    /// The engine refused a change (the region keeps its old rights record; leaves already
    /// changed stay changed and are covered by the returned flush).
    Protect(RangeError),
}

/// Why [`crate::AddressSpace::populate`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PopulateError {
    /// Unknown id.
    NoSuchRegion(RegionId),
    /// The region does not own frames (linear or MMIO).
    NotAnonymous(RegionId),
    /// No frame for a page or a table.
    OutOfMemory {
        /// The page that could not be backed.
        gpa: GuestPhysAddr,
    },
}

/// Why [`crate::AddressSpace::fork`] failed (the parent is unchanged, the partial child freed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForkError {
    /// No frames for the child's table (its root and the copy of the parent's tables).
    OutOfFrames(OutOfFrames),
    /// The engine refused to copy and write-protect the tables (a region edge inside a huge
    /// page, which anonymous regions never have).
    Clone(CloneError),
    /// Giving the child's linear pages their rights back failed.
    Protect(RangeError),
}

/// Why [`crate::AddressSpace::share_from`] failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShareError {
    /// The two spaces count frames in different [`crate::FrameRefs`].
    DifferentFrameRefs,
    /// The source has no such region.
    NoSuchRegion(RegionId),
    /// The source region does not own frames (linear or MMIO).
    NotAnonymous(RegionId),
    /// The new region could not be added (overlap, range...).
    Add(AddRegionError),
    /// Mapping a shared frame failed (no frame for a table).
    Map(MapError),
    /// Write-protecting the source failed.
    Protect(RangeError),
}

/// Why a dirty-log operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirtyLogError {
    /// A log is already running (one per address space).
    AlreadyLogging {
        /// Its range.
        range: GpaRange,
    },
    /// No log is running.
    NotLogging,
    /// Empty or unaligned range.
    Misaligned {
        /// The refused range.
        range: GpaRange,
    },
    /// Protecting a page failed (a huge page split needed a frame that could not be had).
    Table(RangeError),
    /// Splitting a huge page failed.
    Split(SplitError),
    /// The log's bitmap could not be allocated (the range is too large for the memory left).
    Bitmap(BitmapAllocError),
}

/// The bitmap of a page range (one bit per 4 KiB page: 32 KiB per GiB) could not be allocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapAllocError {
    /// The range the bitmap would have covered.
    pub range: GpaRange,
    /// What the allocator said.
    pub source: TryReserveError,
}

/// The one way fault resolution and page population can fail: no frame, for data or for a
/// table. Every other engine error on those paths would mean this crate passed a range or flags
/// it had not checked; debug builds assert that it does not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NoFrame;

impl From<MapError> for NoFrame {
    fn from(e: MapError) -> Self {
        debug_assert!(matches!(e, MapError::OutOfFrames(_)), "engine refused a checked mapping: {e:?}");
        NoFrame
    }
}

impl From<RangeError> for NoFrame {
    fn from(e: RangeError) -> Self {
        debug_assert!(matches!(e, RangeError::OutOfFrames(_)), "engine refused a checked range: {e:?}");
        NoFrame
    }
}

impl From<twostage_npt::RemapError> for NoFrame {
    fn from(e: twostage_npt::RemapError) -> Self {
        debug_assert!(false, "engine refused to remap a leaf just queried: {e:?}");
        NoFrame
    }
}

impl fmt::Display for NewSpaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfFrames(_) => f.write_str("no frame for the nested table's root"),
        }
    }
}

impl Error for NewSpaceError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::OutOfFrames(e) => Some(e),
        }
    }
}

impl From<OutOfFrames> for NewSpaceError {
    fn from(e: OutOfFrames) -> Self {
        Self::OutOfFrames(e)
    }
}

impl fmt::Display for AddRegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned { range } => write!(f, "region {range} is empty or not 4 KiB-aligned"),
            Self::OutOfRange { range, gpa_bits } => {
                write!(f, "region {range} reaches past the {gpa_bits}-bit guest-physical space")
            }
            Self::Overlap { name, range, existing } => write!(f, "region \"{name}\" {range} overlaps {existing}"),
            Self::Flags(e) => write!(f, "rights refused by the table: {}", e),
            Self::BadHost { host } => write!(f, "linear host address {host} is unaligned or overflows"),
            Self::Map(_) => f.write_str("mapping the linear region failed"),
            Self::DirtyLog(_) => f.write_str("arming the running dirty log on the new region failed"),
        }
    }
}

impl Error for AddRegionError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Map(e) => Some(e),
            Self::DirtyLog(e) => Some(e),
            _ => None,
        }
    }
}

impl From<FlagsError> for AddRegionError {
    fn from(e: FlagsError) -> Self {
        Self::Flags(e)
    }
}

impl From<MapError> for AddRegionError {
    fn from(e: MapError) -> Self {
        Self::Map(e)
    }
}

impl From<DirtyLogError> for AddRegionError {
    fn from(e: DirtyLogError) -> Self {
        Self::DirtyLog(e)
    }
}

impl fmt::Display for NoSuchRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no region #{} in this address space", self.0.as_u32())
    }
}

impl Error for NoSuchRegion {}

impl fmt::Display for RemoveRegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchRegion(id) => NoSuchRegion(*id).fmt(f),
            Self::Unmap(_) => f.write_str("the table refused to unmap the region (it is unchanged)"),
        }
    }
}

impl Error for RemoveRegionError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Unmap(e) => Some(e),
            Self::NoSuchRegion(_) => None,
        }
    }
}

impl From<NoSuchRegion> for RemoveRegionError {
    fn from(e: NoSuchRegion) -> Self {
        Self::NoSuchRegion(e.0)
    }
}

impl From<RangeError> for RemoveRegionError {
    fn from(e: RangeError) -> Self {
        Self::Unmap(e)
    }
}

impl fmt::Display for ProtectRegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchRegion(id) => NoSuchRegion(*id).fmt(f),
            Self::Flags(e) => write!(f, "rights refused by the table: {}", e),
            Self::Protect(_) => f.write_str("the table refused to change the rights of the region's pages"),
        }
    }
}

impl Error for ProtectRegionError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Protect(e) => Some(e),
            _ => None,
        }
    }
}

impl From<NoSuchRegion> for ProtectRegionError {
    fn from(e: NoSuchRegion) -> Self {
        Self::NoSuchRegion(e.0)
    }
}

impl From<FlagsError> for ProtectRegionError {
    fn from(e: FlagsError) -> Self {
        Self::Flags(e)
    }
}

impl From<RangeError> for ProtectRegionError {
    fn from(e: RangeError) -> Self {
        Self::Protect(e)
    }
}

impl fmt::Display for PopulateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchRegion(id) => NoSuchRegion(*id).fmt(f),
            Self::NotAnonymous(id) => {
                write!(f, "region #{} does not own its frames (linear or MMIO): nothing to populate", id.as_u32())
            }
            Self::OutOfMemory { gpa } => write!(f, "no frame to back the page at {gpa} (or a table for it)"),
        }
    }
}

impl Error for PopulateError {}

impl From<NoSuchRegion> for PopulateError {
    fn from(e: NoSuchRegion) -> Self {
        Self::NoSuchRegion(e.0)
    }
}

impl fmt::Display for ForkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfFrames(_) => f.write_str("no frames for the child's nested table"),
            Self::Clone(_) => f.write_str("the table refused to copy and write-protect itself"),
            Self::Protect(_) => f.write_str("giving the child's linear pages their rights back failed"),
        }
    }
}

impl Error for ForkError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::OutOfFrames(e) => Some(e),
            Self::Clone(e) => Some(e),
            Self::Protect(e) => Some(e),
        }
    }
}

impl From<OutOfFrames> for ForkError {
    fn from(e: OutOfFrames) -> Self {
        Self::OutOfFrames(e)
    }
}

impl From<CloneError> for ForkError {
    fn from(e: CloneError) -> Self {
        match e {
            CloneError::OutOfFrames(e) => Self::OutOfFrames(e),
            e => Self::Clone(e),
        }
    }
}

impl fmt::Display for ShareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DifferentFrameRefs => f.write_str("the two address spaces count frames in different tables"),
            Self::NoSuchRegion(id) => write!(f, "the source has no region #{}", id.as_u32()),
            Self::NotAnonymous(id) => {
                write!(f, "source region #{} does not own its frames (linear or MMIO): nothing to share", id.as_u32())
            }
            Self::Add(_) => f.write_str("the shared region could not be added"),
            Self::Map(_) => f.write_str("mapping a shared frame failed"),
            Self::Protect(_) => f.write_str("write-protecting the source's pages failed"),
        }
    }
}

impl Error for ShareError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Add(e) => Some(e),
            Self::Map(e) => Some(e),
            Self::Protect(e) => Some(e),
            _ => None,
        }
    }
}

impl From<AddRegionError> for ShareError {
    fn from(e: AddRegionError) -> Self {
        Self::Add(e)
    }
}

impl From<MapError> for ShareError {
    fn from(e: MapError) -> Self {
        Self::Map(e)
    }
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyLogging { range } => write!(f, "a dirty log already runs over {range} (one per space)"),
            Self::NotLogging => f.write_str("no dirty log is running"),
            Self::Misaligned { range } => write!(f, "dirty-log range {range} is empty or not 4 KiB-aligned"),
            Self::Table(_) => f.write_str("the table refused to write-protect a logged page"),
            Self::Split(_) => f.write_str("splitting a huge page of the logged range failed"),
            Self::Bitmap(_) => f.write_str("no memory for the dirty log's bitmap"),
        }
    }
}

impl Error for DirtyLogError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Table(e) => Some(e),
            Self::Split(e) => Some(e),
            Self::Bitmap(e) => Some(e),
            _ => None,
        }
    }
}

impl From<RangeError> for DirtyLogError {
    fn from(e: RangeError) -> Self {
        Self::Table(e)
    }
}

impl From<SplitError> for DirtyLogError {
    fn from(e: SplitError) -> Self {
        Self::Split(e)
    }
}

impl From<BitmapAllocError> for DirtyLogError {
    fn from(e: BitmapAllocError) -> Self {
        Self::Bitmap(e)
    }
}

impl fmt::Display for BitmapAllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no memory for a bitmap of the {} pages of {}", self.range.len() >> 12, self.range)
    }
}

impl Error for BitmapAllocError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.source)
    }
}
