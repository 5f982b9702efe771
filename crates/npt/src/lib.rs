//! # twostage-npt: nested page tables for Intel EPT and RISC-V G-stage
//!
//! Key types:
//! - [`PageTable<F, A>`]: one generic engine for every [`Format`]: [`Ept4`], [`Ept5`],
//!   [`Sv39x4`], [`Sv48x4`], [`Sv57x4`]. It maps (choosing the largest page the alignment
//!   allows, or a size asked for), unmaps, protects, queries, splits and collapses huge pages,
//!   harvests accessed/dirty bits, and dumps itself as text.
//! - [`Flush`]: every change returns one, `#[must_use]`, naming exactly the invalidation it
//!   needs, typed by the format's family ([`EptInvalidation`]: INVEPT single-context on this
//!   EPTP; [`GvmaInvalidation`]: HFENCE.GVMA by guest-physical address and VMID, or by VMID), so
//!   an EPT change cannot be handed to a RISC-V fence or the reverse.
//! - [`ept::EptPointer`] and [`riscv::Hgatp`]: the values that load a table into the hardware,
//!   checked against the CPU's capabilities ([`ept::EptCapabilities`],
//!   [`riscv::HgatpCapabilities`]).
//! - Address newtypes [`GuestPhysAddr`], [`GuestVirtAddr`], [`HostPhysAddr`]; [`MappingFlags`];
//!   [`Access`]; [`NestedPageFaultInfo`].
//!
//! ## Safety model
//! Host memory is injected through the `unsafe trait` [`FrameAllocator`]: its implementor
//! promises that frames are unique and that `phys_to_virt` reaches them. On that promise the
//! engine reads and writes table entries as 64-bit atomics (hardware walks them concurrently and
//! sets A/D bits). A change either completes or leaves the table as it was: the frames it needs
//! are counted and allocated before anything is touched. Unlinked table frames are freed only
//! after the flush that makes them unreachable ([`PageTable::flush`]), or on drop.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

pub mod addr;
pub mod ept;
pub mod fault;
pub mod flags;
pub mod flush;
pub mod format;
pub mod frame;
pub mod riscv;
pub mod table;
#[cfg(feature = "testing")]
pub mod testing;

pub use addr::{AddrOutOfRange, GpaRange, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PageSize, PAGE_SIZE_4K};
pub use fault::NestedPageFaultInfo;
pub use flags::{Access, MappingFlags};
pub use flush::{EptInvalidation, Flush, ForeignFlush, GvmaInvalidation, InvalidationOf};
pub use format::{Ept4, Ept5, EptFamily, Family, FamilyKind, FlagsError, Format, GStageFamily, Sv39x4, Sv48x4, Sv57x4};
pub use frame::{FrameAllocator, FRAME_SIZE};

pub use table::{
    AdClear, AdError, AdMode, BeyondMaxPhys, CloneError, CollapseError, Leaf, MapError, MapSize, NotCollapsible,
    OutOfFrames, PageSizes, PageTable, RangeError, RangeProblem, RemapError, SplitError, TableDump, TableOptions,
};
