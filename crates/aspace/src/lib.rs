//! # twostage-aspace: guest physical address spaces
//!
//! Key types:
//! - [`AddressSpace<F, A>`]: a guest's physical address space over one nested
//!   [`twostage_npt::PageTable`]: non-overlapping [`Region`]s with a [`Backend`] (linear
//!   passthrough, demand-zero, copy-on-write, MMIO), fault resolution
//!   ([`AddressSpace::handle_fault`] → [`FaultOutcome`]), copy-on-write [`AddressSpace::fork`],
//!   dirty logging ([`AddressSpace::start_dirty_log`], [`AddressSpace::harvest_dirty`]) and a
//!   text dump (`impl Display`).
//! - [`HugePages`]: huge-page (THP-like) backing of anonymous regions, on by default: the first
//!   touch of an untouched aligned 2 MiB (or 1 GiB) block wholly inside the region maps one huge
//!   page from one aligned run of frames, else 4 KiB. A copy-on-write break on a 2 MiB page
//!   copies it whole into a free aligned run where the policy allows (else splits it and copies
//!   4 KiB); a dirty log splits what it must; [`AddressSpace::collapse_huge`] (and
//!   [`AddressSpace::stop_dirty_log`]) restore huge pages. A run is counted per frame in
//!   [`FrameRefs`] and freed whole, once, when its last frame is released.
//! - [`migrate::Migration`]: live migration into a fresh address space by dirty logging
//!   (pre-copy rounds while the guest runs, a final copy once it is paused); the destination
//!   gets only the pages the source populated, as 2 MiB pages where whole blocks are copied.
//! - [`SpaceFlush`]: every change returns one (`#[must_use]`): the table invalidation it needs.
//!   Carry it out with [`AddressSpace::flush`]. The data frames a change unmapped wait in the
//!   space's pending list until an invalidation covering them has run, so a dropped token
//!   leaks nothing.
//! - Errors: one enum per operation, each with a message per variant, implementing
//!   [`core::error::Error`], so `?` works. An operation that fails part way leaves the flush of
//!   what it had changed in the space's pending list (carried out by
//!   [`AddressSpace::flush_pending`] or any later flush): an error never carries a flush, and
//!   none can be dropped with it.
//! - [`GuestMemory`]: the small consumer trait through which hypervisor code reads and writes
//!   guest memory by guest-physical address: [`GuestMemory::read`], [`GuestMemory::read_as`],
//!   [`GuestMemory::write`], [`GuestMemory::read_obj`], [`GuestMemory::write_obj`],
//!   [`GuestMemory::compare_exchange_u64`]. It is implemented by [`AddressSpace`] itself (a
//!   write that populates a page or breaks copy-on-write leaves its flush pending: carry it out
//!   before resuming a vCPU), by `&SharedAddressSpace` for several vCPUs, and by
//!   [`TableMemory`] for hypervisors that use a bare [`twostage_npt::PageTable`].
//!   [`AddressSpace::load_image`] writes ignoring the regions' rights (firmware into a
//!   read-only region). [`guest`] walks the guest's own page tables ([`GuestPaging`]) for
//!   [`copy_from_guest_va`], [`copy_to_guest_va`] and [`fetch_guest_instruction`].
//!
//! ## Safety model
//! Host memory comes from the `unsafe trait` [`twostage_npt::FrameAllocator`], whose promise
//! (unique frames, `phys_to_virt` reaches them) the copies and frame fills rely on. A data frame
//! is freed (or its copy-on-write count lowered) only once an invalidation covering the page it
//! was mapped at has been carried out (or the table is unloaded or dropped), so no stale
//! translation can reach a reused frame. Guest-memory accesses remember recent page
//! translations (the region last used and 512 pages) tagged with the space's change count; the
//! nested table and the region map can only be changed through an accessor that raises the
//! count, so no cached translation outlives the change that removed it. Guest-controlled values (addresses, lengths, the
//! guest's page tables) give typed errors naming the address and the access; they never panic.
//!
//! ## Guest memory, fork and dirty logging
//! ```
//! use std::sync::Arc;
//! use twostage_aspace::{AddressSpace, Backend, FaultOutcome, GuestMemory};
//! use twostage_npt::testing::HostRam; // fake host RAM; a hypervisor passes its own allocator
//! use twostage_npt::{Access, GpaRange, GuestPhysAddr, MappingFlags, NestedPageFaultInfo, Sv39x4, TableOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ram = Arc::new(HostRam::new(256));
//! let mut vm = AddressSpace::<Sv39x4, _>::new(ram.clone(), TableOptions::for_format::<Sv39x4>())?;
//! let gpa = GuestPhysAddr::new;
//! let ram_range = GpaRange::from_start_len(gpa(0x8000_0000), 1 << 20).unwrap();
//! let (_, f) = vm.add_region("ram", ram_range, MappingFlags::RWX, Backend::DemandZero)?;
//! vm.flush_unloaded(f)?; // no CPU has the table loaded yet
//!
//! // Load the guest (this populates the page: its flush is left pending).
//! vm.write(gpa(0x8000_0000), &[0x13, 0, 0, 0])?; // `nop`
//! vm.flush_pending(|_| {}); // before the guest runs: HFENCE.GVMA or INVEPT, `inv` says which
//! // Run it with vm.root() in hgatp (or an EPTP). On each nested fault:
//! match vm.handle_fault(NestedPageFaultInfo::new(gpa(0x8000_1000), Access::Write)) {
//!     FaultOutcome::Resolved { flush } => vm.flush(flush, |_inv| { /* HFENCE.GVMA or INVEPT */ })?,
//!     FaultOutcome::Mmio { .. } => { /* hand to the device model */ }
//!     other => panic!("{other:?}"),
//! }
//!
//! // Fork: copy-on-write, no guest byte copied; each side then sees only its own writes.
//! let (mut child, f) = vm.fork()?;
//! vm.flush(f, |_| {});
//! child.write_obj(gpa(0x8000_0000), &0xdead_beefu32)?;
//! child.flush_pending(|_| {}); // the write broke copy-on-write
//! assert_eq!(child.read_obj::<u32>(gpa(0x8000_0000))?, 0xdead_beef);
//! assert_eq!(vm.read_obj::<u32>(gpa(0x8000_0000))?, 0x13);
//!
//! // Dirty logging: pages written since the last harvest.
//! let (_mode, f) = vm.start_dirty_log(ram_range)?;
//! vm.flush(f, |_| {});
//! vm.write(gpa(0x8000_3008), b"hello")?;
//! let (dirty, f) = vm.harvest_dirty()?;
//! vm.flush(f, |_| {}); // also carries out the write's pending flush
//! assert_eq!(dirty.iter().collect::<Vec<_>>(), [gpa(0x8000_3000)]);
//! println!("{vm}"); // regions, backends, page sizes
//! # Ok(()) }
//! ```
//!
//! ## Locking model
//! [`AddressSpace`] is a plain single-owner value: every change takes `&mut self`; reads of
//! guest memory can take `&self` ([`AddressSpace::read`], [`AddressSpace::read_as`]). For
//! several vCPUs, [`SharedAddressSpace`] wraps it in a fair reader-writer spin lock:
//! guest-memory reads take the read lock; faults, writes (which may populate a page or break
//! copy-on-write), fork, dirty harvest and region changes take the write lock, and carry out
//! their flush before releasing it. The frame reference counts shared by forks sit behind their
//! own mutex, taken briefly inside either lock.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

mod dirty;
mod dump;
mod error;
mod fault;
mod flush;
mod fork;
mod frames;
pub mod guest;
mod huge;
mod lock;
mod mem;
pub mod migrate;
mod region;
mod shared;
mod space;
mod table_mem;
mod tlb;
mod zeroed;

pub use dirty::{DirtyMode, PageBitmap};
pub use error::*;
pub use fault::FaultOutcome;
pub use flush::{ForeignSpaceFlush, SpaceFlush};
pub use frames::FrameRefs;
pub use guest::{
    copy_from_guest_va, copy_to_guest_va, fetch_guest_instruction, translate_gva, GuestPaging, GuestVaError,
    Instruction, Isa,
};
pub use mem::{GuestMemError, GuestMemory, MemoryEpoch, PageHint, Pod};
pub use region::{Backend, HugePages, Region, RegionId, RegionLabel};
pub use shared::{Invalidator, SharedAddressSpace, MAX_CPUS};
pub use space::{AddressSpace, SpaceStats};
pub use table_mem::TableMemory;
pub use twostage_npt::NestedPageFaultInfo;

/// The project README's code, compiled and run by `cargo test` as doctests (the README's examples
/// use this crate and twostage-npt, with npt's `testing` allocator standing in for host RAM).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
