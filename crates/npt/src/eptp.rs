//! The EPT pointer and the EPT capabilities it is checked against.

use crate::addr::{HostPhysAddr, PageSize};
use crate::format::{Ept4, Ept5, Format};
use crate::frame::FrameAllocator;
use crate::table::{AdMode, PageSizes, PageTable, TableOptions};
use core::fmt;

/// IA32_VMX_EPT_VPID_CAP (MSR 0x48C), as read on this CPU (Intel SDM Vol. 3D Appendix A.10).
/// Read it only when the secondary controls allow EPT: otherwise the MSR raises #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptCapabilities {
    /// The raw MSR value.
    pub raw: u64,
    /// MAXPHYADDR from CPUID.80000008H:EAX bits 7:0 (bounds the EPTP's root address).
    pub max_phys_bits: u8,
}

macro_rules! cap_bits {
    ($($(#[$d:meta])* $name:ident = $bit:expr;)*) => {
        impl EptCapabilities {
            $($(#[$d])* pub const fn $name(&self) -> bool { self.raw & (1u64 << $bit) != 0 })*
        }
    };
}

cap_bits! {
    /// Bit 0: execute-only EPT translations.
    execute_only = 0;
    /// Bit 6: page-walk length of 4.
    walk_length_4 = 6;
    /// Bit 7: page-walk length of 5.
    walk_length_5 = 7;
    /// Bit 8: the EPT paging structures may be uncacheable (EPTP memory type 0).
    memtype_uc = 8;
    /// Bit 14: the EPT paging structures may be write-back (EPTP memory type 6).
    memtype_wb = 14;
    /// Bit 16: 2 MiB pages (a PDE may map a page).
    pages_2m = 16;
    /// Bit 17: 1 GiB pages (a PDPTE may map a page).
    pages_1g = 17;
    /// Bit 20: INVEPT is supported.
    invept = 20;
    /// Bit 21: accessed and dirty flags for EPT.
    accessed_dirty = 21;
    /// Bit 22: advanced VM-exit information for EPT violations.
    advanced_exit_info = 22;
    /// Bit 25: single-context INVEPT.
    invept_single_context = 25;
    /// Bit 26: all-context INVEPT.
    invept_all_context = 26;
    /// Bit 32: INVVPID is supported.
    invvpid = 32;
    /// Bit 40: individual-address INVVPID.
    invvpid_individual_address = 40;
    /// Bit 41: single-context INVVPID.
    invvpid_single_context = 41;
    /// Bit 42: all-context INVVPID.
    invvpid_all_context = 42;
}

impl EptCapabilities {
    /// Capabilities from the MSR value and MAXPHYADDR.
    pub const fn new(raw: u64, max_phys_bits: u8) -> Self {
        Self { raw, max_phys_bits }
    }

    /// Table options a table of this CPU may use: the page sizes it offers, execute-only if
    /// offered, and hardware A/D if offered and wanted (otherwise the bits are not tracked).
    pub fn table_options(&self, want_accessed_dirty: bool) -> TableOptions {
        let mut sizes = PageSizes::SIZE_4K_ONLY;
        if self.pages_2m() {
            sizes = sizes.with(PageSize::Size2M);
        }
        if self.pages_1g() {
            sizes = sizes.with(PageSize::Size1G);
        }
        let ad = if want_accessed_dirty && self.accessed_dirty() { AdMode::Hardware } else { AdMode::Preset };
        TableOptions {
            leaf_sizes: sizes,
            ad,
            execute_only: self.execute_only(),
            max_phys_bits: self.max_phys_bits.min(<Ept4 as Format>::MAX_PHYS_BITS),
        }
    }
}

/// The EPTP memory type for the paging structures (Intel SDM Vol. 3C §25.6.11, Table 25-9, bits 2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptMemoryType {
    /// Uncacheable (0).
    Uncacheable = 0,
    /// Write-back (6).
    WriteBack = 6,
}

/// Why an EPT pointer could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptPointerError {
    /// The CPU does not offer this page-walk length.
    WalkLengthUnsupported(u8),
    /// The CPU does not offer this memory type for the paging structures.
    MemoryTypeUnsupported(EptMemoryType),
    /// EPT accessed/dirty flags were asked for and are not offered.
    AccessedDirtyUnsupported,
    /// The root is not 4 KiB-aligned or lies above MAXPHYADDR.
    BadRoot(HostPhysAddr),
    /// The table may hold leaves of a size the CPU does not offer (its options allow them).
    PageSizeUnsupported(PageSize),
    /// The table may hold execute-only leaves and the CPU does not offer them.
    ExecuteOnlyUnsupported,
    /// The table may hold host addresses wider than the CPU's MAXPHYADDR.
    MaxPhysTooWide {
        /// The table's `max_phys_bits`.
        table: u8,
        /// The CPU's MAXPHYADDR.
        cpu: u8,
    },
}

impl fmt::Display for EptPointerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WalkLengthUnsupported(n) => write!(f, "the CPU does not offer an EPT page-walk length of {n}"),
            Self::MemoryTypeUnsupported(t) => {
                write!(f, "the CPU does not offer memory type {t:?} for the EPT paging structures")
            }
            Self::AccessedDirtyUnsupported => f.write_str("the CPU does not offer EPT accessed and dirty flags"),
            Self::BadRoot(root) => {
                write!(f, "EPT root {:#x} is not 4 KiB-aligned or lies above MAXPHYADDR", root.as_u64())
            }
            Self::PageSizeUnsupported(size) => {
                write!(f, "the table may hold {size} pages, which the CPU does not offer")
            }
            Self::ExecuteOnlyUnsupported => {
                f.write_str("the table may hold execute-only pages, which the CPU does not offer")
            }
            Self::MaxPhysTooWide { table, cpu } => {
                write!(f, "the table may hold host addresses of {table} bits, beyond the CPU's MAXPHYADDR of {cpu}")
            }
        }
    }
}
impl core::error::Error for EptPointerError {}

/// An EPT pointer (VMCS field 0x201A), checked against the CPU's capabilities
/// (Intel SDM Vol. 3C §25.6.11, Table 25-9).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EptPointer(u64);

/// Formats an EPTP can point at, with their page-walk length.
pub trait EptFormat: Format<Family = crate::flush::EptFamily> {
    /// Page-walk length (4 or 5).
    const WALK_LENGTH: u8;
}
impl EptFormat for Ept4 {
    const WALK_LENGTH: u8 = 4;
}
impl EptFormat for Ept5 {
    const WALK_LENGTH: u8 = 5;
}

impl EptPointer {
    /// Bits 5:3 hold the page-walk length minus one.
    const WALK_SHIFT: u32 = 3;
    /// Bit 6 enables accessed and dirty flags (§29.3.5).
    pub const ACCESSED_DIRTY: u64 = 1 << 6;

    /// An EPTP for the table rooted at `root` with `walk_length` levels, write-back paging
    /// structures, and A/D flags if `accessed_dirty`.
    pub fn new(
        root: HostPhysAddr,
        walk_length: u8,
        accessed_dirty: bool,
        caps: &EptCapabilities,
    ) -> Result<Self, EptPointerError> {
        Self::with_memory_type(root, walk_length, accessed_dirty, EptMemoryType::WriteBack, caps)
    }

    /// As [`EptPointer::new`] with a chosen paging-structure memory type.
    pub fn with_memory_type(
        root: HostPhysAddr,
        walk_length: u8,
        accessed_dirty: bool,
        memtype: EptMemoryType,
        caps: &EptCapabilities,
    ) -> Result<Self, EptPointerError> {
        let walk_ok = match walk_length {
            4 => caps.walk_length_4(),
            5 => caps.walk_length_5(),
            _ => false,
        };
        if !walk_ok {
            return Err(EptPointerError::WalkLengthUnsupported(walk_length));
        }
        let mt_ok = match memtype {
            EptMemoryType::WriteBack => caps.memtype_wb(),
            EptMemoryType::Uncacheable => caps.memtype_uc(),
        };
        if !mt_ok {
            return Err(EptPointerError::MemoryTypeUnsupported(memtype));
        }
        if accessed_dirty && !caps.accessed_dirty() {
            return Err(EptPointerError::AccessedDirtyUnsupported);
        }
        if !root.is_aligned(4096) || root.as_u64() >> caps.max_phys_bits.min(52) != 0 {
            return Err(EptPointerError::BadRoot(root));
        }
        let mut bits = root.as_u64() | memtype as u64 | (u64::from(walk_length - 1) << Self::WALK_SHIFT);
        if accessed_dirty {
            bits |= Self::ACCESSED_DIRTY;
        }
        Ok(Self(bits))
    }

    /// The EPTP for `table`, with A/D flags exactly when the table has them hardware-managed.
    ///
    /// Refuses a table whose options allow what the CPU lacks (a leaf size, execute-only
    /// leaves, host addresses above MAXPHYADDR, hardware A/D): the CPU would meet an EPT
    /// misconfiguration on the first such entry (Intel SDM Vol. 3C §29.3.3.1). A table made with
    /// [`EptCapabilities::table_options`] of the same capabilities always passes.
    pub fn for_table<F: EptFormat, A: FrameAllocator>(
        table: &PageTable<F, A>,
        caps: &EptCapabilities,
    ) -> Result<Self, EptPointerError> {
        let opts = table.options();
        for (size, offered) in [(PageSize::Size2M, caps.pages_2m()), (PageSize::Size1G, caps.pages_1g())] {
            if opts.leaf_sizes.contains(size) && !offered {
                return Err(EptPointerError::PageSizeUnsupported(size));
            }
        }
        if opts.execute_only && !caps.execute_only() {
            return Err(EptPointerError::ExecuteOnlyUnsupported);
        }
        if opts.max_phys_bits > caps.max_phys_bits {
            return Err(EptPointerError::MaxPhysTooWide { table: opts.max_phys_bits, cpu: caps.max_phys_bits });
        }
        Self::new(table.root(), F::WALK_LENGTH, opts.ad == AdMode::Hardware, caps)
    }

    /// The value to write into the VMCS.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// The root table's address (bits N-1:12).
    pub const fn root(self) -> HostPhysAddr {
        HostPhysAddr::new_truncate(self.0 & 0x000f_ffff_ffff_f000)
    }
    /// Whether A/D flags are enabled.
    pub const fn accessed_dirty(self) -> bool {
        self.0 & Self::ACCESSED_DIRTY != 0
    }
    /// The page-walk length.
    pub const fn walk_length(self) -> u8 {
        ((self.0 >> Self::WALK_SHIFT) & 7) as u8 + 1
    }
}

impl fmt::Debug for EptPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EptPointer({:#x}: root {:?}, {}-level, A/D {})",
            self.0,
            self.root(),
            self.walk_length(),
            self.accessed_dirty()
        )
    }
}
