//! An independent reference model of second-stage address translation, written from the Intel SDM
//! and the RISC-V Privileged specification, for holding twostage's page-table engine to account.
//!
//! # Key types
//!
//! - [`PhysMem`]: how the model reads and writes tables (8-byte aligned physical accesses).
//!   [`SparseMem`] is a `BTreeMap`-backed implementation for the model's own tests; the engine's
//!   tests adapt their fake host memory to the trait.
//! - [`ept::walk`]: the Intel EPT walk (Intel SDM Vol. 3C 29.3) from a raw EPTP value, with
//!   [`ept::EptCaps`] (IA32_VMX_EPT_VPID_CAP, Intel SDM Vol. 3D A.10). Returns an
//!   [`ept::EptWalk`] or an [`ept::EptExit`] (violation with its exit qualification, or
//!   misconfiguration).
//! - [`gstage::walk`]: the RISC-V G-stage walk (Privileged spec, "Hypervisor Extension",
//!   "Guest Physical Address Translation") from a raw hgatp value. Returns a [`gstage::GWalk`] or a
//!   [`gstage::GstageFault`] (guest-page fault with htval/htinst, or access fault).
//! - [`stage1`]: guest stage-1 walks (x86-64 4-level paging from CR3, RISC-V Sv39/Sv48/Sv57 from
//!   vsatp) whose own table reads and A/D updates go through a [`stage1::Stage2`] translation; the
//!   adapters [`stage1::EptStage2`], [`stage1::GstageStage2`], [`stage1::EptTlbStage2`],
//!   [`stage1::GstageTlbStage2`] and [`stage1::NoStage2`] plug the second stage in.
//! - [`memtype::effective`]: the memory type of an access through an EPT leaf (its type and
//!   ignore-PAT bit) combined with the guest's PAT type (SDM Vol. 3C 29.3.7.2, Vol. 3A
//!   Table 11-7); [`tlb::operands`]: which INVEPT / INVVPID operands fail (Vol. 2A);
//!   [`hgatp_csr::HgatpCsr`]: hgatp as a WARL register, for probing modes and VMIDLEN.
//! - [`tlb::EptTlb`] and [`tlb::GstageTlb`]: translation caches that cache as much as the
//!   architecture allows (leaf translations and partial walks) and forget only on a modelled
//!   INVEPT or HFENCE.GVMA, so that a missing or too narrow invalidation becomes visible.
//!
//! # How tests use it
//!
//! Build (or let the engine build) tables in memory, wrap that memory in a [`PhysMem`], then
//! compare: `ept::walk(&mut mem, eptp, &caps, gpa, EptAccess::READ, GuestLinear::NONE)` against
//! the engine's own query, for every address the test cares about. For coherence, keep one
//! [`tlb::EptTlb`] / [`tlb::GstageTlb`] per simulated hart, translate through it before and
//! after each change, pass it the invalidation the engine's flush token asked for, and check
//! that it agrees with a fresh walk.
//!
//! ```
//! use twostage_spec_model::ept::{self, EptAccess, EptCaps, EptExit, GuestLinear};
//! use twostage_spec_model::tlb::EptTlb;
//! use twostage_spec_model::{Gpa, Hpa, PageSize, SparseMem};
//!
//! // EPT PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x8000 (RWX, WB).
//! let mut mem = SparseMem::new(1 << 20);
//! for (table, next) in [(0x1000, 0x2000), (0x2000, 0x3000), (0x3000, 0x4000)] {
//!     mem.set_entry(Hpa(table), 0, next | 0b111);
//! }
//! mem.set_entry(Hpa(0x4000), 0, 0x8000 | 6 << 3 | 0b111);
//! let caps = EptCaps::from_msr(0xf0106334141, 39);
//! let eptp = 0x1000 | 3 << 3 | 6; // 4-level walk, write-back
//! let w = ept::walk(&mut mem, eptp, &caps, Gpa(0x123), EptAccess::READ, GuestLinear::NONE).unwrap();
//! assert_eq!((w.hpa, w.page_size), (Hpa(0x8123), PageSize::Size4K));
//!
//! // A TLB keeps the translation after the page is unmapped, until INVEPT.
//! let mut tlb = EptTlb::new();
//! tlb.translate(&mut mem, eptp, &caps, Gpa(0x123), EptAccess::READ, GuestLinear::NONE).unwrap();
//! mem.set_entry(Hpa(0x4000), 0, 0);
//! assert!(tlb.translate(&mut mem, eptp, &caps, Gpa(0x123), EptAccess::READ, GuestLinear::NONE).is_ok());
//! tlb.invept_single_context(eptp);
//! let gone = tlb.translate(&mut mem, eptp, &caps, Gpa(0x123), EptAccess::READ, GuestLinear::NONE);
//! assert!(matches!(gone, Err(EptExit::Violation { qualification: 0x1, .. })));
//! ```
//!
//! # Safety model
//!
//! The crate has no `unsafe` code (`#![forbid(unsafe_code)]`). It never touches real memory:
//! every table access goes through [`PhysMem`]. Guest-controlled values never panic it: a
//! table pointing at absent memory gives a typed model error.
//!
//! # Model choices
//!
//! Where the specifications leave a choice to the implementation, the model picks the one that
//! makes software mistakes visible and says so in the item's documentation (for example: it
//! sets accessed flags only on walks that succeed; its TLBs cache everything they may).
//! Citations name sections rather than page numbers: "Intel SDM Vol. 3C 29.3.3.1" (2023+
//! editions, where EPT is section 29.3, the EPTP is 25.6.11 and the EPT-violation exit
//! qualification is Table 28-7; older editions number these 28.2, 24.6.11 and Table 27-7), and
//! "RISC-V Privileged" for the ratified Privileged Architecture (version 1.12 and later).

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod ept;
pub mod gstage;
pub mod hgatp_csr;
mod mem;
pub mod memtype;
mod rvpte;
pub mod stage1;
pub mod tlb;

pub use mem::{PhysMem, SparseMem};

/// A host-physical address (what the second stage produces).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hpa(pub u64);

/// A guest-physical address (what the second stage consumes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

/// A guest-virtual (guest-linear) address (what the guest's stage 1 consumes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gva(pub u64);

/// The kind of a memory access, as the guest made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A data read (load).
    Read,
    /// A data write (store or AMO).
    Write,
    /// An instruction fetch.
    Fetch,
}

/// The size of the page a leaf entry maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB: a leaf at level 0 (EPT PTE, Sv* level 0).
    Size4K,
    /// 2 MiB: a leaf at level 1 (EPT PDE with bit 7, Sv* megapage).
    Size2M,
    /// 1 GiB: a leaf at level 2 (EPT PDPTE with bit 7, Sv* gigapage).
    Size1G,
    /// 512 GiB: a leaf at level 3 (Sv48/Sv57 terapage; never an EPT leaf).
    Size512G,
    /// 256 TiB: a leaf at level 4 (Sv57 petapage; never an EPT leaf).
    Size256T,
}

impl PageSize {
    /// The size for a leaf at `level` (0 = the last level of the walk), if one exists.
    pub const fn from_level(level: u8) -> Option<Self> {
        match level {
            0 => Some(Self::Size4K),
            1 => Some(Self::Size2M),
            2 => Some(Self::Size1G),
            3 => Some(Self::Size512G),
            4 => Some(Self::Size256T),
            _ => None,
        }
    }

    /// The level (0 = last) at which a leaf of this size sits.
    pub const fn level(self) -> u8 {
        match self {
            Self::Size4K => 0,
            Self::Size2M => 1,
            Self::Size1G => 2,
            Self::Size512G => 3,
            Self::Size256T => 4,
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        1u64 << level_shift(self.level())
    }
}

/// Number of address bits below the region an entry at `level` controls: 12 + 9 * level.
/// This holds for EPT (Intel SDM Vol. 3C 29.3.2) and for every RISC-V Sv* scheme with 8-byte
/// PTEs (RISC-V Privileged, Sv39/Sv48/Sv57: 9-bit VPN fields over a 12-bit page offset).
pub(crate) const fn level_shift(level: u8) -> u32 {
    12 + 9 * level as u32
}

/// A mask with bits `hi..=lo` set.
pub(crate) const fn bits(hi: u32, lo: u32) -> u64 {
    debug_assert!(hi >= lo && hi < 64);
    (u64::MAX >> (63 - hi)) & !((1u64 << lo) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_masks() {
        assert_eq!(bits(2, 0), 0b111);
        assert_eq!(bits(63, 63), 1 << 63);
        assert_eq!(bits(51, 12), 0x000f_ffff_ffff_f000);
        assert_eq!(bits(63, 0), u64::MAX);
    }

    #[test]
    fn page_sizes() {
        assert_eq!(PageSize::Size4K.bytes(), 4096);
        assert_eq!(PageSize::Size2M.bytes(), 2 << 20);
        assert_eq!(PageSize::Size1G.bytes(), 1 << 30);
        assert_eq!(PageSize::Size512G.bytes(), 512 << 30);
        assert_eq!(PageSize::Size256T.bytes(), 256 << 40);
        assert_eq!(PageSize::from_level(2), Some(PageSize::Size1G));
        assert_eq!(PageSize::from_level(5), None);
    }
}
