//! The VMX instruction wrappers for the running CPU (bare metal only).

use super::{CpuidResult, GuestRegisters, HostState, InveptKind, InvvpidKind, VmFail, VmxHardware};
use crate::vmcs::VmcsField;
use core::arch::asm;
use twostage_npt::HostPhysAddr;

/// The CPU this code runs on, in ring 0 with interrupts off.
///
/// Constructing it is `unsafe`: every method executes privileged instructions whose effects (on
/// CR4, on MSRs, on VMX operation) the caller must want.
#[derive(Debug)]
pub struct RealCpu {
    _private: (),
}

impl RealCpu {
    /// The running CPU.
    ///
    /// # Safety
    /// The caller runs in ring 0, 64-bit mode, with interrupts off, and holds the only `RealCpu`.
    pub unsafe fn new() -> Self {
        Self { _private: () }
    }
}

/// Turns the RFLAGS after a VMX instruction into its outcome (Intel SDM Vol. 3C 31.2):
/// CF = 1 is VMfailInvalid, ZF = 1 is VMfailValid, both clear is VMsucceed.
fn outcome(rflags: u64) -> Result<(), VmFail> {
    if rflags & 1 != 0 {
        Err(VmFail::Invalid)
    } else if rflags & (1 << 6) != 0 {
        Err(VmFail::Valid)
    } else {
        Ok(())
    }
}

impl VmxHardware for RealCpu {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        // CPUID is available on every x86-64 CPU and has no side effects.
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        CpuidResult { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
    }

    fn xsetbv(&mut self, xcr: u32, value: u64) {
        // SAFETY: ring 0 (constructor's promise); the caller checked the value against CPUID.0DH
        // (`emulate::xsetbv_check`) and set CR4.OSXSAVE, so it cannot fault. The host uses no
        // extended state (soft-float target), so XCR0 changes nothing it relies on.
        unsafe {
            asm!("xsetbv", in("ecx") xcr, in("eax") value as u32, in("edx") (value >> 32) as u32,
                options(nostack, nomem, preserves_flags))
        };
    }

    fn read_msr(&self, msr: u32) -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: ring 0 (constructor's promise); the caller only names MSRs the CPU has.
        unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack, nomem)) };
        (u64::from(hi) << 32) | u64::from(lo)
    }

    fn write_msr(&mut self, msr: u32, value: u64) {
        // SAFETY: ring 0; the caller writes an MSR it has established and wants changed.
        unsafe {
            asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
        };
    }

    fn read_cr0(&self) -> u64 {
        let v: u64;
        // SAFETY: reading CR0 in ring 0 has no side effects.
        unsafe { asm!("mov {}, cr0", out(reg) v, options(nostack, nomem)) };
        v
    }

    fn write_cr0(&mut self, value: u64) {
        // SAFETY: the caller (VMXON setup) only adds bits the CPU requires (IA32_VMX_CR0_FIXED0).
        unsafe { asm!("mov cr0, {}", in(reg) value, options(nostack)) };
    }

    fn read_cr4(&self) -> u64 {
        let v: u64;
        // SAFETY: reading CR4 in ring 0 has no side effects.
        unsafe { asm!("mov {}, cr4", out(reg) v, options(nostack, nomem)) };
        v
    }

    fn write_cr4(&mut self, value: u64) {
        // SAFETY: the caller only adds CR4.VMXE and bits IA32_VMX_CR4_FIXED0 requires.
        unsafe { asm!("mov cr4, {}", in(reg) value, options(nostack)) };
    }

    fn host_state(&self) -> HostState {
        let (cr3, cs, ds, tr): (u64, u16, u16, u16);
        let mut gdtr = [0u8; 10];
        let mut idtr = [0u8; 10];
        // SAFETY: reads of CR3, selectors and descriptor-table registers; SGDT/SIDT write 10
        // bytes into the local buffers passed to them.
        unsafe {
            asm!("mov {}, cr3", out(reg) cr3, options(nostack, nomem));
            asm!("mov {0:x}, cs", out(reg) cs, options(nostack, nomem));
            asm!("mov {0:x}, ds", out(reg) ds, options(nostack, nomem));
            asm!("str {0:x}", out(reg) tr, options(nostack, nomem));
            asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr(), options(nostack));
            asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack));
        }
        let base = |b: &[u8; 10]| u64::from_le_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]);
        let gdtr_base = base(&gdtr);
        // The 64-bit TSS descriptor's base is spread over bytes 2-4, 7 and 8-11
        // (Intel SDM Vol. 3A 8.2.3, Figure 8-4).
        let tr_base = if tr == 0 {
            0
        } else {
            let d = (gdtr_base + u64::from(tr & !7)) as *const u32;
            // SAFETY: TR names a descriptor inside the GDT, which the identity map covers.
            let (w0, w1, w2) = unsafe { (d.read_volatile(), d.add(1).read_volatile(), d.add(2).read_volatile()) };
            u64::from((w0 >> 16) & 0xffff)
                | (u64::from(w1 & 0xff) << 16)
                | (u64::from(w1 >> 24) << 24)
                | (u64::from(w2) << 32)
        };
        HostState {
            cr0: self.read_cr0(),
            cr3,
            cr4: self.read_cr4(),
            cs,
            ds,
            tr,
            tr_base,
            gdtr_base,
            idtr_base: base(&idtr),
            efer: self.read_msr(crate::caps::IA32_EFER),
        }
    }

    fn vmxon(&mut self, region: HostPhysAddr) -> Result<(), VmFail> {
        let pa = region.as_u64();
        let flags: u64;
        // SAFETY: the caller set CR4.VMXE and the fixed bits and wrote the revision into the region.
        unsafe { asm!("vmxon qword ptr [{pa}]", "pushfq", "pop {f}", pa = in(reg) &pa, f = out(reg) flags) };
        outcome(flags)
    }

    fn vmclear(&mut self, vmcs: HostPhysAddr) -> Result<(), VmFail> {
        let pa = vmcs.as_u64();
        let flags: u64;
        // SAFETY: VMX root operation; `vmcs` is a frame owned by the caller for this VMCS.
        unsafe { asm!("vmclear qword ptr [{pa}]", "pushfq", "pop {f}", pa = in(reg) &pa, f = out(reg) flags) };
        outcome(flags)
    }

    fn vmptrld(&mut self, vmcs: HostPhysAddr) -> Result<(), VmFail> {
        let pa = vmcs.as_u64();
        let flags: u64;
        // SAFETY: as for `vmclear`.
        unsafe { asm!("vmptrld qword ptr [{pa}]", "pushfq", "pop {f}", pa = in(reg) &pa, f = out(reg) flags) };
        outcome(flags)
    }

    fn vmread(&self, field: VmcsField) -> Result<u64, VmFail> {
        let (v, flags): (u64, u64);
        // SAFETY: VMREAD only reads the current VMCS.
        unsafe {
            asm!("vmread {v}, {f}", "pushfq", "pop {fl}", v = out(reg) v, f = in(reg) u64::from(field.0), fl = out(reg) flags)
        };
        outcome(flags).map(|()| v)
    }

    fn vmwrite(&mut self, field: VmcsField, value: u64) -> Result<(), VmFail> {
        let flags: u64;
        // SAFETY: VMWRITE changes the current VMCS only; VM entry checks the result.
        unsafe {
            asm!("vmwrite {f}, {v}", "pushfq", "pop {fl}", f = in(reg) u64::from(field.0), v = in(reg) value, fl = out(reg) flags)
        };
        outcome(flags)
    }

    fn invept(&mut self, kind: InveptKind, eptp: u64) -> Result<(), VmFail> {
        let desc: [u64; 2] = [eptp, 0];
        let ty: u64 = match kind {
            InveptKind::SingleContext => 1,
            InveptKind::AllContext => 2,
        };
        let flags: u64;
        // SAFETY: INVEPT only drops cached translations; the descriptor is a local 16-byte array.
        unsafe {
            asm!("invept {t}, [{d}]", "pushfq", "pop {f}", t = in(reg) ty, d = in(reg) &desc, f = out(reg) flags)
        };
        outcome(flags)
    }

    fn invvpid(&mut self, kind: InvvpidKind, vpid: u16, linear: u64) -> Result<(), VmFail> {
        let desc: [u64; 2] = [u64::from(vpid), linear];
        let ty: u64 = match kind {
            InvvpidKind::IndividualAddress => 0,
            InvvpidKind::SingleContext => 1,
            InvvpidKind::AllContext => 2,
        };
        let flags: u64;
        // SAFETY: INVVPID only drops cached translations; the descriptor is a local array.
        unsafe {
            asm!("invvpid {t}, [{d}]", "pushfq", "pop {f}", t = in(reg) ty, d = in(reg) &desc, f = out(reg) flags)
        };
        outcome(flags)
    }

    fn vm_enter(&mut self, regs: &mut GuestRegisters, resume: bool) -> Result<(), VmFail> {
        let flags: u64;
        // SAFETY: the current VMCS is fully set up by `VmxVcpu`; this sequence saves the host's
        // callee-saved registers on the stack, points HOST_RSP/HOST_RIP at the exit path below,
        // loads the guest GPRs from `regs` and enters. On exit (label 2) the guest GPRs are stored
        // back into `regs` and the host registers restored; on VMfail (label 4) RFLAGS is returned.
        // The target has no red zone, so the pushes do not clobber live data.
        unsafe {
            asm!(
                "push rbp",
                "push rbx",
                "push r12",
                "push r13",
                "push r14",
                "push r15",
                "push rdi",
                "mov rax, 0x6C14",
                "vmwrite rax, rsp",
                "lea rax, [rip + 2f]",
                "mov rbx, 0x6C16",
                "vmwrite rbx, rax",
                "test rsi, rsi",
                "mov rax, [rdi]",
                "mov rbx, [rdi + 8]",
                "mov rcx, [rdi + 16]",
                "mov rdx, [rdi + 24]",
                "mov rsi, [rdi + 32]",
                "mov rbp, [rdi + 48]",
                "mov r8, [rdi + 56]",
                "mov r9, [rdi + 64]",
                "mov r10, [rdi + 72]",
                "mov r11, [rdi + 80]",
                "mov r12, [rdi + 88]",
                "mov r13, [rdi + 96]",
                "mov r14, [rdi + 104]",
                "mov r15, [rdi + 112]",
                "mov rdi, [rdi + 40]",
                "jnz 3f",
                "vmlaunch",
                "jmp 4f",
                "3:",
                "vmresume",
                "4:",
                "pushfq",
                "pop rax",
                "pop rdi",
                "jmp 5f",
                "2:",
                "push rdi",
                "mov rdi, [rsp + 8]",
                "mov [rdi], rax",
                "mov [rdi + 8], rbx",
                "mov [rdi + 16], rcx",
                "mov [rdi + 24], rdx",
                "mov [rdi + 32], rsi",
                "mov [rdi + 48], rbp",
                "mov [rdi + 56], r8",
                "mov [rdi + 64], r9",
                "mov [rdi + 72], r10",
                "mov [rdi + 80], r11",
                "mov [rdi + 88], r12",
                "mov [rdi + 96], r13",
                "mov [rdi + 104], r14",
                "mov [rdi + 112], r15",
                "pop rax",
                "mov [rdi + 40], rax",
                "pop rdi",
                "xor eax, eax",
                "5:",
                "pop r15",
                "pop r14",
                "pop r13",
                "pop r12",
                "pop rbx",
                "pop rbp",
                inout("rdi") regs as *mut GuestRegisters => _,
                inout("rsi") u64::from(resume) => _,
                lateout("rax") flags,
                out("rcx") _,
                out("rdx") _,
                out("r8") _,
                out("r9") _,
                out("r10") _,
                out("r11") _,
            )
        };
        outcome(flags)
    }
}
