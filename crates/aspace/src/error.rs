//! Error enums, one per operation.

use crate::flush::SpaceFlush;
use crate::region::{RegionId, RegionLabel};
use core::fmt;
use twostage_npt::FlagsError;
use twostage_npt::{CloneError, Format, GpaRange, HostPhysAddr, MapError, OutOfFrames, RangeError, SplitError};

/// Why [`crate::AddressSpace::new`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewSpaceError {
    /// No frame for the root table.
    OutOfFrames(OutOfFrames),
}

/// Why a region could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

impl fmt::Display for AddRegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned { range } => write!(f, "region {range} is empty or not 4 KiB-aligned"),
            Self::OutOfRange { range, gpa_bits } => {
                write!(f, "region {range} reaches past the {gpa_bits}-bit guest-physical space")
            }
            Self::Overlap { name, range, existing } => {
                write!(f, "region \"{name}\" {range} overlaps {existing}")
            }
            Self::Flags(e) => write!(f, "rights refused by the table: {e:?}"),
            Self::BadHost { host } => write!(f, "linear host address {host} is unaligned or overflows"),
            Self::Map(e) => write!(f, "mapping the linear region failed: {e:?}"),
            Self::DirtyLog(e) => write!(f, "arming the running dirty log on the new region failed: {e:?}"),
        }
    }
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
        gpa: twostage_npt::GuestPhysAddr,
    },
}

/// An operation that stopped part way: what went wrong, and the flush for what it had done.
#[must_use = "the partial change must still be flushed"]
pub struct Failed<E, F: Format> {
    /// Why it stopped.
    pub error: E,
    /// Covers the changes made before it stopped.
    pub flush: SpaceFlush<F>,
}

impl<E: fmt::Debug, F: Format> fmt::Debug for Failed<E, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Failed({:?}, {:?})", self.error, self.flush)
    }
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
