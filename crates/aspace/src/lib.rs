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
//! ## Example
//! ```
//! use std::sync::Arc;
//! use twostage_aspace::{AddressSpace, Backend, FaultOutcome, GuestMemory};
//! use twostage_npt::testing::HostRam; // fake host RAM; a hypervisor passes its own allocator
//! use twostage_npt::{Access, GpaRange, GuestPhysAddr, MappingFlags, NestedPageFaultInfo, Sv39x4, TableOptions};
//!
//! let ram = Arc::new(HostRam::new(256));
//! let mut vm = AddressSpace::<Sv39x4, _>::new(ram.clone(), TableOptions::for_format::<Sv39x4>()).unwrap();
//! let gpa = GuestPhysAddr::new;
//! let ram_range = GpaRange::from_start_len(gpa(0x8000_0000), 1 << 20).unwrap();
//! let (_, f) = vm.add_region("ram", ram_range, MappingFlags::RWX, Backend::DemandZero).unwrap();
//! vm.flush_unloaded(f); // no CPU has the table loaded yet
//! let uart = GpaRange::from_start_len(gpa(0x1000_0000), 0x1000).unwrap();
//! let (_, f) = vm.add_region("uart", uart, MappingFlags::RW, Backend::Mmio).unwrap();
//! vm.flush_unloaded(f);
//!
//! // Load the guest, then run it with vm.root() in hgatp (or an EPTP). On each nested fault:
//! let f = vm.copy_to_guest(gpa(0x8000_0000), &[0x13, 0, 0, 0]).unwrap(); // `nop`
//! vm.flush_unloaded(f);
//! match vm.handle_fault(NestedPageFaultInfo::new(gpa(0x8000_1000), Access::Write)) {
//!     FaultOutcome::Resolved { flush } => vm.flush(flush, |inv| { /* HFENCE.GVMA or INVEPT: `inv` says which */ }),
//!     FaultOutcome::Mmio { gpa, access, .. } => { /* hand to the device model */ }
//!     other => panic!("{other:?}"),
//! }
//!
//! // Fork: copy-on-write, no guest byte copied; each side then sees only its own writes.
//! let (mut child, f) = vm.fork().unwrap();
//! vm.flush(f, |_| {});
//! let mut mem = child.memory(|_| {});
//! mem.write_obj(gpa(0x8000_0000), &0xdead_beefu32).unwrap();
//! assert_eq!(mem.read_obj::<u32>(gpa(0x8000_0000)).unwrap(), 0xdead_beef);
//! assert_eq!(vm.memory(|_| {}).read_obj::<u32>(gpa(0x8000_0000)).unwrap(), 0x13);
//!
//! // Dirty logging: pages written since the last harvest.
//! let (_mode, f) = vm.start_dirty_log(ram_range).unwrap();
//! vm.flush(f, |_| {});
//! let f = vm.copy_to_guest(gpa(0x8000_3008), b"hello").unwrap();
//! vm.flush(f, |_| {});
//! let (dirty, f) = vm.harvest_dirty().unwrap();
//! vm.flush(f, |_| {});
//! assert_eq!(dirty.iter().collect::<Vec<_>>(), [gpa(0x8000_3000)]);
//! println!("{vm}"); // regions, backends, page sizes
//! ```
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
