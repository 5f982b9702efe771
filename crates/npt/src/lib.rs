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
//! - [`EptPointer`] and [`Hgatp`]: the values that load a table into the hardware, checked
//!   against the CPU's capabilities ([`EptCapabilities`], [`HgatpCapabilities`]).
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

mod addr;
mod eptp;
mod fault;
mod flags;
mod flush;
mod format;
mod frame;
mod hgatp;
mod table;
#[cfg(feature = "testing")]
pub mod testing;

// Every public type has exactly one path: here, at the crate root.
pub use addr::{AddrOutOfRange, GpaRange, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PageSize};
pub use eptp::{EptCapabilities, EptFormat, EptMemoryType, EptPointer, EptPointerError};
pub use fault::NestedPageFaultInfo;
pub use flags::{Access, MappingFlags};
pub use flush::{
    EptFamily, EptInvalidation, Family, FamilyKind, Flush, ForeignFlush, GStageFamily, GvmaInvalidation,
    InvalidationOf, FLUSH_ADDRESS_SLOTS,
};
pub use format::{Ept4, Ept5, FlagsError, Format, LeafBits, Pte, Sv39x4, Sv48x4, Sv57x4};
pub use frame::{FrameAllocator, FRAME_SIZE};
pub use hgatp::{GStageFormat, Hgatp, HgatpCapabilities, HgatpError, HgatpMode};
pub use table::{
    AdClear, AdError, AdMode, BeyondMaxPhys, CloneError, CollapseError, Leaf, MapError, MapSize, NotCollapsible,
    OutOfFrames, PageSizes, PageTable, RangeError, RangeProblem, RemapError, SplitError, TableDump, TableOptions,
};
