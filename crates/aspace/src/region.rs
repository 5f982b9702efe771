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
    /// Anonymous memory: a frame is allocated and zeroed on the first touch of each page (or
    /// all at once with [`crate::AddressSpace::populate`]); the frames belong to the address
    /// space. The page is 2 MiB or 1 GiB where the region's [`HugePages`] policy allows (by
    /// default), else 4 KiB. After a fork its frames are shared copy-on-write.
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

/// Huge-page backing of anonymous memory (THP-like): whether the first touch of an untouched,
/// suitably aligned block of a demand-zero (or not yet touched copy-on-write) region maps a
/// whole 2 MiB or 1 GiB page, saving one nested page fault per 4 KiB page. What Firecracker's
/// `huge_pages` machine option and QEMU's hugepage-backed memory give, chosen per region.
///
/// A huge page is used only where the whole aligned block lies inside the region (never across
/// its edge, so never over an MMIO region or a hole), no page of the block is mapped yet, no
/// dirty log covers it, the table's [`twostage_npt::TableOptions::leaf_sizes`] allow the size,
/// and the allocator has a free aligned run of frames for it
/// (`allocate_frames(512, 512)` for 2 MiB); otherwise the touch maps 4 KiB as before. Set it
/// with [`crate::AddressSpace::set_huge_pages`] (regions added later) or
/// [`crate::AddressSpace::set_region_huge_pages`]; the default is [`HugePages::Size2M`] (a 1 GiB page
/// would be zeroed inside one fault: ask for it with [`HugePages::Always`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// 4 KiB pages only (Firecracker `huge_pages: None`, THP `never`).
    Never,
    /// 2 MiB pages where they fit (Firecracker `huge_pages: 2M`).
    #[default]
    Size2M,
    /// The largest page that fits: 1 GiB where the table allows it, else 2 MiB (THP `always`).
    Always,
}

impl HugePages {
    /// Whether pages of `size` may back a first touch.
    pub const fn allows(self, size: twostage_npt::PageSize) -> bool {
        match size {
            twostage_npt::PageSize::Size4K => true,
            twostage_npt::PageSize::Size2M => !matches!(self, Self::Never),
            _ => matches!(self, Self::Always),
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
    pub(crate) huge: HugePages,
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
    /// Its huge-page policy (used by anonymous regions only).
    pub fn huge_pages(&self) -> HugePages {
        self.huge
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
