//! twostage-rvh: the RISC-V H-extension glue between a hypervisor and the twostage engine.
//!
//! Key types: [`fault::GuestPageFault`] (a decoded scause 20/21/23 trap, carrying the engine's
//! [`twostage_npt::NestedPageFaultInfo`]), [`access::GuestAccessError`] (a recovered fault in an
//! hlv/hsv/hlvx access, naming the GVA, the GPA when known and the access),
//! [`fence::GvmaFence`] (the engine's `GvmaInvalidation` as HFENCE.GVMA), [`sbi::SbiCall`],
//! [`mmio::decode_access`] (the load or store behind an MMIO fault) and [`reflect::reflect`] (an
//! exception handed to the guest as if the hart had taken it in VS-mode).
//!
//! Safety model: only [`hw`] executes privileged instructions and it is compiled for riscv64
//! bare metal alone (every other target gets a stand-in with the same API that panics with a
//! clear message); every decision (what to fence, how to split a copy, how to read a fault, how to serve
//! an SBI call) is portable code with host tests. Guest-controlled values (addresses, lengths,
//! instruction bits, device-tree bytes) produce typed errors, never panics. Faults in
//! hypervisor accesses to guest memory are recovered through an exception table
//! ([`extable`]): the image's trap handler looks sepc up and resumes at the fixup.
//!
//! Spec citations are to the RISC-V Privileged Architecture 1.12 (H extension: chapter 8).
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod access;
pub mod csr;
pub mod extable;
pub mod fault;
pub mod fence;
pub mod insn;
pub mod mmio;
pub mod probe;
pub mod reflect;
pub mod sbi;
pub mod shootdown;
pub mod smp;

#[cfg(all(target_arch = "riscv64", target_os = "none"))]
pub mod hw;
#[cfg(not(all(target_arch = "riscv64", target_os = "none")))]
#[path = "hw_host.rs"]
pub mod hw;
