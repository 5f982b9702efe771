//! `RealCpu` on every target that is not bare-metal x86-64: a type that cannot be made, so that
//! every target has exactly one `RealCpu` and calling it anywhere but bare metal fails loudly.

use super::{CpuidResult, GuestRegisters, HostState, InveptKind, InvvpidKind, VmFail, VmxHardware};
use crate::vmcs::VmcsField;
use core::convert::Infallible;
use twostage_npt::HostPhysAddr;

/// The running CPU — which, on this target, twostage cannot drive: VMX instructions exist only
/// in the bare-metal x86-64 build (`all(target_arch = "x86_64", target_os = "none")`). Host
/// tests inject their own [`VmxHardware`] instead.
#[derive(Debug)]
pub struct RealCpu {
    never: Infallible,
}

impl RealCpu {
    /// Panics: there is no VMX hardware to drive on this target.
    ///
    /// # Safety
    /// The same contract as the bare-metal constructor (ring 0, 64-bit mode, interrupts off, a
    /// single owner); it is never fulfilled here, since this function does not return.
    pub unsafe fn new() -> Self {
        panic!(
            "twostage_vmx::hw::RealCpu runs VMX instructions only on bare-metal x86-64 \
             (target_arch = \"x86_64\", target_os = \"none\"); on this target inject a VmxHardware fake"
        )
    }

    /// A `RealCpu` cannot exist on this target, so no method is ever reached.
    fn unreachable(&self) -> ! {
        let never = self.never;
        match never {}
    }
}

impl VmxHardware for RealCpu {
    fn cpuid(&self, _: u32, _: u32) -> CpuidResult {
        self.unreachable()
    }
    fn read_msr(&self, _: u32) -> u64 {
        self.unreachable()
    }
    fn write_msr(&mut self, _: u32, _: u64) {
        self.unreachable()
    }
    fn read_cr0(&self) -> u64 {
        self.unreachable()
    }
    fn write_cr0(&mut self, _: u64) {
        self.unreachable()
    }
    fn read_cr4(&self) -> u64 {
        self.unreachable()
    }
    fn write_cr4(&mut self, _: u64) {
        self.unreachable()
    }
    fn xsetbv(&mut self, _: u32, _: u64) {
        self.unreachable()
    }
    fn host_state(&self) -> HostState {
        self.unreachable()
    }
    fn vmxon(&mut self, _: HostPhysAddr) -> Result<(), VmFail> {
        self.unreachable()
    }
    fn vmclear(&mut self, _: HostPhysAddr) -> Result<(), VmFail> {
        self.unreachable()
    }
    fn vmptrld(&mut self, _: HostPhysAddr) -> Result<(), VmFail> {
        self.unreachable()
    }
    fn vmread(&self, _: VmcsField) -> Result<u64, VmFail> {
        self.unreachable()
    }
    fn vmwrite(&mut self, _: VmcsField, _: u64) -> Result<(), VmFail> {
        self.unreachable()
    }
    fn invept(&mut self, _: InveptKind, _: u64) -> Result<(), VmFail> {
        self.unreachable()
    }
    fn invvpid(&mut self, _: InvvpidKind, _: u16, _: u64) -> Result<(), VmFail> {
        self.unreachable()
    }
    fn vm_enter(&mut self, _: &mut GuestRegisters, _: bool) -> Result<(), VmFail> {
        self.unreachable()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "only on bare-metal x86-64")]
    #[allow(unreachable_code, reason = "RealCpu is uninhabited here: the call is known to diverge")]
    fn making_one_on_the_host_fails_loudly() {
        // SAFETY: the constructor panics before anything could run.
        let _ = unsafe { super::RealCpu::new() };
    }
}
