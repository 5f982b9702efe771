//! The hardware seam: every VMX instruction and privileged register access, behind a trait.
//!
//! [`VmxHardware`] is implemented by [`RealCpu`] and by fakes in tests. `RealCpu` runs the
//! instructions on bare-metal x86-64 (`all(target_arch = "x86_64", target_os = "none")`); on
//! every other target it is a type that cannot be made (its constructor panics). Methods take `&self`/`&mut self` so a test injects and inspects its own instance.

use crate::vmcs::VmcsField;
use twostage_npt::HostPhysAddr;

/// The four registers CPUID returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// How a VMX instruction failed (Intel SDM Vol. 3C 31.2 "Conventions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// VMfailInvalid: CF = 1, no current VMCS to hold an error number.
    Invalid,
    /// VMfailValid: ZF = 1, the VM-instruction error field of the current VMCS says why.
    Valid,
}

impl core::fmt::Display for VmFail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Invalid => "VMfailInvalid (CF = 1: no current VMCS to hold an error number)",
            Self::Valid => "VMfailValid (ZF = 1: the VM-instruction error field says why)",
        })
    }
}

impl core::error::Error for VmFail {}

/// INVEPT types (Intel SDM Vol. 2A "INVEPT"; Vol. 3C 29.4.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InveptKind {
    /// Type 1: mappings tagged with the given EPTP.
    SingleContext,
    /// Type 2: mappings of every EPTP.
    AllContext,
}

/// INVVPID types (Intel SDM Vol. 2A "INVVPID"; Vol. 3C 29.4.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvvpidKind {
    /// Type 0: one linear address of one VPID.
    IndividualAddress,
    /// Type 1: every mapping of one VPID.
    SingleContext,
    /// Type 2: every VPID (except 0).
    AllContext,
}

/// The guest's general-purpose registers that VM entry does not load from the VMCS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GuestRegisters {
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
}

impl GuestRegisters {
    /// The register a ModRM/REX register number names (Intel SDM Vol. 2A 2.1.5, Table 2-2 order).
    pub fn gpr(&self, n: u8) -> Option<u64> {
        Some(match n {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            15 => self.r15,
            _ => return None, // 4 = RSP lives in the VMCS
        })
    }

    /// Writes the register numbered `n`; RSP (4, kept in the VMCS) and out-of-range numbers are
    /// refused with [`BadRegister`].
    pub fn set_gpr(&mut self, n: u8, v: u64) -> Result<(), BadRegister> {
        let r = match n {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => return Err(BadRegister(n)),
        };
        *r = v;
        Ok(())
    }
}

/// A register number that is not a general-purpose register kept in [`GuestRegisters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadRegister(pub u8);

impl core::fmt::Display for BadRegister {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            4 => f.write_str("register 4 is RSP, which lives in the VMCS (GUEST_RSP)"),
            n => write!(f, "register number {n} names no general-purpose register"),
        }
    }
}

impl core::error::Error for BadRegister {}

/// The host state a VM exit returns to, read once from the running CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CS selector.
    pub cs: u16,
    /// SS/DS/ES selector.
    pub ds: u16,
    /// TR selector (must not be 0, Intel SDM Vol. 3C 27.2.3).
    pub tr: u16,
    /// TSS base.
    pub tr_base: u64,
    /// GDTR base.
    pub gdtr_base: u64,
    /// IDTR base.
    pub idtr_base: u64,
    /// IA32_EFER.
    pub efer: u64,
}

/// Privileged instructions and registers VMX needs. Only `RealCpu` executes them.
pub trait VmxHardware {
    /// CPUID with `leaf` in EAX and `subleaf` in ECX.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;
    /// RDMSR. Callers only read MSRs whose existence they have established.
    fn read_msr(&self, msr: u32) -> u64;
    /// WRMSR.
    fn write_msr(&mut self, msr: u32, value: u64);
    /// Reads CR0.
    fn read_cr0(&self) -> u64;
    /// Writes CR0.
    fn write_cr0(&mut self, value: u64);
    /// Reads CR4.
    fn read_cr4(&self) -> u64;
    /// Writes CR4.
    fn write_cr4(&mut self, value: u64);
    /// XSETBV: writes XCR`xcr` (CR4.OSXSAVE must be set).
    fn xsetbv(&mut self, xcr: u32, value: u64);
    /// The host state to put in the VMCS.
    fn host_state(&self) -> HostState;
    /// VMXON with the region at `region`.
    fn vmxon(&mut self, region: HostPhysAddr) -> Result<(), VmFail>;
    /// VMCLEAR.
    fn vmclear(&mut self, vmcs: HostPhysAddr) -> Result<(), VmFail>;
    /// VMPTRLD.
    fn vmptrld(&mut self, vmcs: HostPhysAddr) -> Result<(), VmFail>;
    /// VMREAD of the current VMCS.
    fn vmread(&self, field: VmcsField) -> Result<u64, VmFail>;
    /// VMWRITE to the current VMCS.
    fn vmwrite(&mut self, field: VmcsField, value: u64) -> Result<(), VmFail>;
    /// INVEPT with descriptor `{eptp, 0}`.
    fn invept(&mut self, kind: InveptKind, eptp: u64) -> Result<(), VmFail>;
    /// INVVPID with descriptor `{vpid, linear}`.
    fn invvpid(&mut self, kind: InvvpidKind, vpid: u16, linear: u64) -> Result<(), VmFail>;
    /// VMLAUNCH (`resume == false`) or VMRESUME, loading `regs` and saving them back on exit.
    /// `Ok` means a VM exit happened; `Err` means the instruction itself failed.
    fn vm_enter(&mut self, regs: &mut GuestRegisters, resume: bool) -> Result<(), VmFail>;
}

// Complementary gates: every target gets exactly one `RealCpu`, the instruction wrappers on
// bare-metal x86-64 and, everywhere else, a type that cannot be made (its constructor panics).
#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
mod host;
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod real;
#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
pub use host::RealCpu;
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub use real::RealCpu;
