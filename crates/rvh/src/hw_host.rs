//! The instruction wrappers' stand-in on every target but riscv64 bare metal: the same API, each
//! function panicking with a clear message.
//!
//! The real wrappers (`hw.rs`, compiled for `all(target_arch = "riscv64", target_os = "none")`)
//! execute H-extension instructions, which exist only there. This module makes the
//! gate complementary (every target gets exactly one `hw`), so that code naming `hw` builds
//! everywhere, and a host test that reaches a privileged instruction fails loudly instead of
//! silently doing nothing.

use crate::access::GuestMemOps;
use crate::extable::{ExTableEntry, HwFault};
use crate::fence::GvmaFence;
use twostage_npt::{GuestPhysAddr, GuestVirtAddr};

/// Panics: `what` needs the hardware.
#[cold]
#[track_caller]
fn unavailable(what: &str) -> ! {
    panic!(
        "twostage-rvh: {what} executes a privileged RISC-V instruction and is only available on riscv64 \
         bare metal (target_arch = \"riscv64\", target_os = \"none\"); host code must use the portable \
         modules (access, fence, probe, fault) with a fake"
    )
}

macro_rules! csr {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub mod $name {
            /// Reads the CSR (panics off riscv64 bare metal).
            pub fn read() -> u64 {
                super::unavailable(concat!("reading ", stringify!($name)))
            }
            /// Writes the CSR (panics off riscv64 bare metal).
            ///
            /// # Safety
            /// As for the real wrapper: the value changes how the hart translates, traps or
            /// enters the guest.
            pub unsafe fn write(_: u64) {
                super::unavailable(concat!("writing ", stringify!($name)))
            }
            /// Sets bits (panics off riscv64 bare metal).
            ///
            /// # Safety
            /// As for [`write()`].
            pub unsafe fn set(_: u64) {
                super::unavailable(concat!("setting bits of ", stringify!($name)))
            }
            /// Clears bits (panics off riscv64 bare metal).
            ///
            /// # Safety
            /// As for [`write()`].
            pub unsafe fn clear(_: u64) {
                super::unavailable(concat!("clearing bits of ", stringify!($name)))
            }
        }
    };
}

csr!(/// sstatus.
    sstatus);
csr!(/// stvec.
    stvec);
csr!(/// sie.
    sie);
csr!(/// sip.
    sip);
csr!(/// sscratch.
    sscratch);
csr!(/// sepc.
    sepc);
csr!(/// scause.
    scause);
csr!(/// stval.
    stval);
csr!(/// hstatus.
    hstatus);
csr!(/// hedeleg.
    hedeleg);
csr!(/// hideleg.
    hideleg);
csr!(/// hvip.
    hvip);
csr!(/// hie.
    hie);
csr!(/// hcounteren.
    hcounteren);
csr!(/// htval.
    htval);
csr!(/// htinst.
    htinst);
csr!(/// hgatp.
    hgatp);
csr!(/// vsstatus.
    vsstatus);
csr!(/// vsatp.
    vsatp);
csr!(/// vstvec.
    vstvec);
csr!(/// vsepc.
    vsepc);
csr!(/// vscause.
    vscause);
csr!(/// vstval.
    vstval);
csr!(/// henvcfg.
    henvcfg);
csr!(/// vsie.
    vsie);
csr!(/// vsscratch.
    vsscratch);
csr!(/// htimedelta.
    htimedelta);
csr!(/// vstimecmp.
    vstimecmp);

/// The `time` counter (panics off riscv64 bare metal).
pub fn rdtime() -> u64 {
    unavailable("rdtime")
}

/// The `cycle` counter (panics off riscv64 bare metal).
pub fn rdcycle() -> u64 {
    unavailable("rdcycle")
}

/// HFENCE.GVMA (panics off riscv64 bare metal).
pub fn hfence_gvma(_: GvmaFence) {
    unavailable("hfence.gvma")
}

/// HFENCE.GVMA x0, x0 (panics off riscv64 bare metal).
pub fn hfence_gvma_all() {
    unavailable("hfence.gvma")
}

/// FENCE.I or HFENCE.VVMA (panics off riscv64 bare metal).
pub fn vs_fence(_: crate::smp::VsFence) {
    unavailable("hfence.vvma")
}

/// HFENCE.VVMA x0, x0 (panics off riscv64 bare metal).
pub fn hfence_vvma_all() {
    unavailable("hfence.vvma")
}

/// The exception table (panics off riscv64 bare metal: there is no linker-gathered table).
pub fn extable() -> &'static [ExTableEntry] {
    unavailable("the exception table")
}

/// HLV/HSV/HLVX (every access panics off riscv64 bare metal).
pub struct Hlv {
    _private: (),
}

impl Hlv {
    /// Panics off riscv64 bare metal.
    ///
    /// # Safety
    /// As for the real wrapper.
    pub unsafe fn new() -> Self {
        unavailable("hlv/hsv/hlvx")
    }
}

impl GuestMemOps for Hlv {
    fn load_u8(&mut self, _: GuestVirtAddr) -> Result<u8, HwFault> {
        unavailable("hlv.bu")
    }
    fn load_u64(&mut self, _: GuestVirtAddr) -> Result<u64, HwFault> {
        unavailable("hlv.d")
    }
    fn store_u8(&mut self, _: GuestVirtAddr, _: u8) -> Result<(), HwFault> {
        unavailable("hsv.b")
    }
    fn store_u64(&mut self, _: GuestVirtAddr, _: u64) -> Result<(), HwFault> {
        unavailable("hsv.d")
    }
    fn fetch_u16(&mut self, _: GuestVirtAddr) -> Result<u16, HwFault> {
        unavailable("hlvx.hu")
    }
}

/// Reading hstatus with a guard (panics off riscv64 bare metal).
pub fn probe_hstatus() -> Result<u64, HwFault> {
    unavailable("reading hstatus")
}

/// hgatp and HFENCE.GVMA as [`crate::probe::HgatpAccess`] (every method panics off riscv64 bare metal).
pub struct CsrHgatp;

impl crate::probe::HgatpAccess for CsrHgatp {
    fn read(&mut self) -> u64 {
        unavailable("reading hgatp")
    }
    fn write(&mut self, _: u64) {
        unavailable("writing hgatp")
    }
    fn fence_all(&mut self) {
        unavailable("hfence.gvma")
    }
}

/// Probes hgatp (panics off riscv64 bare metal; host code calls
/// [`crate::probe::probe_hgatp`] with a fake).
pub fn probe() -> twostage_npt::HgatpCapabilities {
    unavailable("the hgatp probe")
}

/// The vsatp-swap guest-physical read (panics off riscv64 bare metal).
///
/// # Safety
/// As for the real wrapper.
pub unsafe fn copy_from_guest_swap(_: GuestPhysAddr, _: &mut [u8]) -> Result<(), crate::access::GuestAccessError> {
    unavailable("copy_from_guest_swap")
}

/// The vsatp-swap guest-physical write (panics off riscv64 bare metal).
///
/// # Safety
/// As for the real wrapper.
pub unsafe fn copy_to_guest_swap(_: GuestPhysAddr, _: &[u8]) -> Result<(), crate::access::GuestAccessError> {
    unavailable("copy_to_guest_swap")
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "only available on riscv64 bare metal")]
    fn the_host_stub_fails_loudly() {
        super::hgatp::read();
    }
}
