//! twostage-hv-x86: the runtime of twostage's bare-metal x86 hypervisor, the part of it that is
//! neither boot code nor a test: one vCPU on one EPT with its exit handling and statistics
//! ([`hv`]), the COM1 console with `print!`/`println!` and the exit path ([`serial`]), the host
//! descriptor tables VMX needs ([`cpu`]), running a multiboot guest file ([`mbguest`]) and a Linux bzImage ([`linuxguest`]).
//!
//! The image (`images/x86-hv`) boots, sets up frames and heap and calls into this crate; the
//! scenario suite (`twostage-scenarios-x86`) drives [`hv::Hv`].
//!
//! Everything here runs only on x86-64 bare metal: the crate is compiled for
//! `target_arch = "x86_64", target_os = "none"` and is empty elsewhere (the `cfg` on the crate
//! root), so that a host `cargo build --workspace` still builds it.
//!
//! Safety model: single-core with interrupts off; physical memory is reached only through the
//! identity map the image set up at boot; the VMX instruction wrappers are in `twostage-vmx`
//! (`RealCpu`), and the few port and descriptor-table accesses here each have their SAFETY note.
#![cfg(all(target_arch = "x86_64", target_os = "none"))]
#![no_std]

extern crate alloc;

pub mod cpu;
pub mod hv;
pub mod linuxguest;
pub mod mbguest;
pub mod serial;

/// The guest CPUID choices of the hypervisor's `cpu=` argument, for the image's command line.
pub use twostage_vmx::cpuid::CpuidOptions;
