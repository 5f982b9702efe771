//! # twostage-aspace: guest physical address spaces
//!
//! Key types:
//! - [`AddressSpace<F, A>`]: a guest's physical address space over one nested
//!   [`twostage_npt::PageTable`]: non-overlapping [`Region`]s with a [`Backend`] (linear
//!   passthrough, demand-zero, copy-on-write, MMIO), fault resolution
//!   ([`AddressSpace::handle_fault`] → [`FaultOutcome`]), copy-on-write [`AddressSpace::fork`],
//!   dirty logging ([`AddressSpace::start_dirty_log`], [`AddressSpace::harvest_dirty`]) and a
//!   text dump (`impl Display`).
//! - [`SpaceFlush`]: every change returns one (`#[must_use]`): the table invalidation plus the
//!   data frames to release after it. Carry it out with [`AddressSpace::flush`].
//! - [`GuestMemory`]: the small consumer trait through which hypervisor code reads and writes
//!   guest memory by guest-physical address; [`SharedAddressSpace`] implements it for several
//!   vCPUs at once. [`guest`] walks the guest's own page tables ([`GuestPaging`]) for
//!   [`copy_from_guest_va`], [`copy_to_guest_va`] and [`fetch_guest_instruction`].
//!
//! ## Safety model
//! Host memory comes from the `unsafe trait` [`twostage_npt::FrameAllocator`], whose promise
//! (unique frames, `phys_to_virt` reaches them) the copies and frame fills rely on. A data frame
//! is freed (or its copy-on-write count lowered) only when the flush that unmapped it is carried
//! out, so no stale translation can reach a reused frame. Guest-controlled values (addresses,
//! lengths, the guest's page tables) give typed errors naming the address and the access; they
//! never panic.
//!
//! ## Locking model
//! [`AddressSpace`] is a plain single-owner value: every change takes `&mut self`, reads of
//! guest memory take `&self`. For several vCPUs, [`SharedAddressSpace`] wraps it in a
//! reader-writer spin lock: guest-memory reads take the read lock; faults, writes (which may
//! populate a page or break copy-on-write), fork, dirty harvest and region changes take the
//! write lock, and carry out their flush before releasing it. The frame reference counts shared
//! by forks sit behind their own mutex, taken briefly inside either lock.
#![no_std]
#![warn(missing_docs)]
#![allow(
    clippy::result_large_err,
    reason = "errors of changing operations carry the flush of the partial change (as large as the Ok value, which carries one too)"
)]

extern crate alloc;

mod dirty;
mod dump;
mod error;
mod fault;
mod flush;
mod fork;
mod frames;
pub mod guest;
mod mem;
mod region;
mod shared;
mod space;

pub use dirty::{DirtyMode, PageBitmap};
pub use error::*;
pub use fault::FaultOutcome;
pub use flush::SpaceFlush;
pub use frames::FrameRefs;
pub use guest::{
    copy_from_guest_va, copy_to_guest_va, fetch_guest_instruction, translate_gva, GuestPaging, GuestVaError,
    Instruction, Isa,
};
pub use mem::{GuestMemError, GuestMemory, Pod, SpaceMemory};
pub use region::{Backend, Region, RegionId, RegionLabel};
pub use shared::{Invalidator, SharedAddressSpace};
pub use space::{AddressSpace, SpaceStats, PAGE};
pub use twostage_npt::NestedPageFaultInfo;
