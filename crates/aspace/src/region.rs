//! Regions of a guest-physical address space and the backends that give them memory.
#![forbid(unsafe_code)]

use core::fmt;
use twostage_npt::{GpaRange, GuestPhysAddr, HostPhysAddr, MappingFlags};

/// Names one region of one address space (stable for the region's life; never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(pub(crate) u32);

impl RegionId {
    /// The raw number, for logs.
    pub const fn as_u32(self) -> u32 {
        self.0
    }
}

/// Where a region's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A host range given by the caller (RAM passthrough or device memory), mapped at once with
    /// the largest pages that fit. The address space never frees it, and a fork shares it
    /// (it is not copied on write: it is the caller's memory).
    Linear {
        /// Host-physical address of the region's first byte.
        host: HostPhysAddr,
    },
    /// Anonymous memory: a 4 KiB frame is allocated and zeroed on the first touch of each page
    /// (or all at once with [`crate::AddressSpace::populate`]); the frames belong to the
    /// address space. After a fork its frames are shared copy-on-write.
    DemandZero,
    /// Anonymous memory whose frames are (or were) shared with another address space: what a
    /// demand-zero region becomes in both spaces after [`crate::AddressSpace::fork`], and what
    /// [`crate::AddressSpace::share_from`] creates. A write to a
    /// shared page gives a private copy; the last holder's write only restores the write right.
    /// Pages not touched before the fork stay demand-zero.
    CopyOnWrite,
    /// Never mapped: every access faults and is handed to the device model.
    Mmio,
}

impl Backend {
    /// Whether the address space owns (allocates, refcounts, frees) this region's frames.
    pub const fn owns_frames(&self) -> bool {
        matches!(self, Self::DemandZero | Self::CopyOnWrite)
    }

    /// Short name used in dumps.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Linear { .. } => "linear",
            Self::DemandZero => "demand-zero",
            Self::CopyOnWrite => "copy-on-write",
            Self::Mmio => "mmio",
        }
    }
}

/// One region: a page-aligned guest-physical range with rights and a backend.
#[derive(Clone, Debug)]
pub struct Region {
    pub(crate) id: RegionId,
    pub(crate) name: &'static str,
    pub(crate) range: GpaRange,
    pub(crate) flags: MappingFlags,
    pub(crate) backend: Backend,
}

impl Region {
    /// The region's id.
    pub fn id(&self) -> RegionId {
        self.id
    }
    /// The name given at creation (for dumps and errors).
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// The guest-physical range it covers.
    pub fn range(&self) -> GpaRange {
        self.range
    }
    /// Rights (and memory attributes) the guest has on it.
    pub fn flags(&self) -> MappingFlags {
        self.flags
    }
    /// Where its memory comes from.
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// Host address backing `gpa` for a linear region.
    pub(crate) fn linear_hpa(&self, gpa: GuestPhysAddr) -> Option<HostPhysAddr> {
        match self.backend {
            Backend::Linear { host } => host.checked_add(gpa - self.range.start),
            _ => None,
        }
    }
}

/// A short description of a region, carried by errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLabel {
    /// The region's id.
    pub id: RegionId,
    /// Its name.
    pub name: &'static str,
    /// Its range.
    pub range: GpaRange,
}

impl From<&Region> for RegionLabel {
    fn from(r: &Region) -> Self {
        Self { id: r.id, name: r.name, range: r.range }
    }
}

impl fmt::Display for RegionLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region #{} \"{}\" {}", self.id.0, self.name, self.range)
    }
}
