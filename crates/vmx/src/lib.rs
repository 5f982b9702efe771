//! # twostage-vmx: Intel VMX glue for twostage's EPT tables
//!
//! Key types:
//! - [`VmxVcpu`]: VMXON with capability checks ([`VmxVcpu::new`]), a VMCS set up for one EPT
//!   table and an entry state ([`VmxVcpu::setup`]: EPT, and VPID, and unrestricted guest for
//!   guests that start with paging off), VM entry with exits decoded into [`VmExit`]
//!   ([`VmxVcpu::run`]), another table loaded with [`VmxVcpu::load_ept`]. The EPT pointer is
//!   derived from the table ([`EptPointer::for_table`]: walk length from the format, A/D flags
//!   from the table's A/D mode), never assembled beside it. An EPT violation becomes a
//!   [`twostage_npt::NestedPageFaultInfo`] through [`exit::EptViolation::nested_page_fault_info`];
//!   the engine's flush tokens are carried out by [`VmxVcpu::invalidate`] (INVEPT of a type the
//!   CPU offers, [`invept_kind`]); CPUID exits are answered with [`VmxVcpu::guest_cpuid`]
//!   ([`cpuid::filter`]).
//! - [`caps::VmxCapabilities`]: the capability MSRs, read in an order that never touches an MSR
//!   the CPU lacks; controls computed as `(wanted | allowed0) & allowed1`. The EPT and VPID
//!   capabilities are the engine's [`EptCapabilities`], re-exported here.
//! - [`emulate`]: checks for guest values the exit handlers pass on (EFER, CR3), refused as
//!   the CPU would refuse them.
//! - [`decode::decode_mmio`]: the MOV an MMIO exit came from, decoded from the instruction bytes
//!   (which the hypervisor fetches with `twostage_aspace::fetch_guest_instruction`, the software
//!   walk of the guest's own page tables through the EPT).
//!
//! ## Safety model
//! Every privileged instruction sits behind the [`hw::VmxHardware`] trait. Its only real
//! implementation, [`hw::RealCpu`], runs the instructions on bare-metal x86-64
//! (`all(target_arch = "x86_64", target_os = "none")`) and is created with an `unsafe`
//! constructor whose caller promises ring 0 and a single owner; on every other target the same
//! type exists but cannot be made (its constructor panics), so each target gets exactly one of
//! the two. Everything else in this crate is safe, portable code tested on the host against a
//! fake CPU.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod caps;
pub mod controls;
pub mod cpuid;
pub mod decode;
pub mod emulate;
pub mod exit;
pub mod hw;
pub mod msr;
pub mod vcpu;
pub mod vmcs;

#[cfg(test)]
mod tests;

pub use caps::{EptCapsSummary, VmxCapabilities, VmxUnsupported};
pub use exit::{
    CrAccess, CrAccessQualification, EptViolation, EptViolationQualification, IoQualification, VmExit,
    VmInstructionError,
};
pub use hw::{GuestRegisters, VmxHardware};
/// The EPT and VPID capabilities (IA32_VMX_EPT_VPID_CAP, Intel SDM Vol. 3D Appendix A.10): one
/// type, the engine's, which the EPT pointer is checked against.
pub use twostage_npt::{EptCapabilities, EptPointer};
pub use vcpu::{
    invept_kind, invvpid_kind, EntryError, GuestEntry, Handled, HandlerError, InjectError, InvalidateError,
    PreemptionTimerError, SetupError, VcpuConfig, VmxInstructionFailure, VmxOnError, VmxVcpu,
};
pub use vmcs::VmcsField;
