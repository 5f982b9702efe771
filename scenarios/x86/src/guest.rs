//! The bundled guest: 64-bit code with its own page tables, driven by hypercalls.
//!
//! The guest greets on COM1 (I/O exits, forwarded), then loops: VMCALL 1 ("next") returns an
//! operation in RAX with its address in RBX and value in RCX; the guest performs it and reports
//! the result in RCX with VMCALL 2. So each scenario makes the *guest* touch memory, and the
//! (emulated) hardware raises the EPT violations.

use twostage_hv_x86::hv::{FaultAction, Hv, MmioDevice, RunError};
use twostage_npt::{GuestPhysAddr, GuestVirtAddr, HostPhysAddr, MapSize, MappingFlags, FRAME_SIZE};
use twostage_vmx::exit::EptViolation;
use twostage_vmx::{GuestEntry, VmExit};

core::arch::global_asm!(
    r#"
    .section .rodata.guest, "a"
    .global __guest_start
    .global __guest_end
__guest_start:
    lea rsi, [rip + 9f]
1:
    mov al, [rsi]
    test al, al
    jz 2f
    mov dx, 0x3f8
    out dx, al
    inc rsi
    jmp 1b
2:
    mov eax, 1
    vmcall
    cmp rax, 1
    je 10f
    cmp rax, 2
    je 11f
    cmp rax, 3
    je 12f
    cmp rax, 4
    je 13f
    cmp rax, 5
    je 14f
    cmp rax, 6
    je 15f
    cmp rax, 7
    je 16f
    jmp 2b
10:
    mov rcx, [rbx]
    jmp 20f
11:
    mov [rbx], rcx
    jmp 20f
12:
    call rbx
    mov rcx, rax
    jmp 20f
13:
    mov edx, ebx
    mov eax, ecx
    out dx, al
    jmp 20f
14:
    hlt
    jmp 2b
15:
    mov ecx, dword ptr [rbx]
    jmp 20f
16:
    mov dword ptr [rbx], ecx
    jmp 20f
20:
    mov eax, 2
    vmcall
    jmp 2b
9:
    .asciz "guest: hello from 64-bit long mode (own page tables, COM1 forwarded)\n"
__guest_end:
    "#
);

extern "C" {
    static __guest_start: u8;
    static __guest_end: u8;
}

/// Guest RAM: GPA 0..RAM_SIZE, 4 KiB EPT pages on scattered host frames.
pub const RAM_SIZE: u64 = 0x40000;
/// The guest's PML4 (and PDPT, PDs for 0-4 GiB identity with 2 MiB pages, then a PD and PT for
/// the scrambled window).
pub const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD0: u64 = 0x3000;
const PD_WINDOW: u64 = 0x7000;
const PT_WINDOW: u64 = 0x8000;
/// Where the guest code is loaded.
pub const CODE: u64 = 0x10000;
/// Top of the guest stack.
pub const STACK_TOP: u64 = 0x40000;
/// A GVA window whose pages map, out of order, to guest RAM pages at WINDOW_GPAS.
pub const WINDOW_GVA: u64 = 0x1_0000_0000;
/// The GPAs behind the window's pages 0..4.
pub const WINDOW_GPAS: [u64; 4] = [0x23000, 0x21000, 0x22000, 0x20000];

/// One operation of the guest's interpreter.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// `mov rcx, [addr]`.
    Read(u64),
    /// `mov [addr], rcx`.
    Write(u64, u64),
    /// `call addr`; the result is RAX.
    Exec(u64),
    /// `out port, al`.
    Out(u16, u8),
    /// `mov ecx, dword [addr]`.
    Read32(u64),
    /// `mov dword [addr], ecx`.
    Write32(u64, u32),
}

impl Op {
    fn regs(self) -> (u64, u64, u64) {
        match self {
            Op::Read(a) => (1, a, 0),
            Op::Write(a, v) => (2, a, v),
            Op::Exec(a) => (3, a, 0),
            Op::Out(p, b) => (4, u64::from(p), u64::from(b)),
            Op::Read32(a) => (6, a, 0),
            Op::Write32(a, v) => (7, a, u64::from(v)),
        }
    }
}

/// A device that reads as all ones and drops writes (an unassigned bus address).
pub struct Unassigned;

impl MmioDevice for Unassigned {
    fn read(&mut self, _gpa: GuestPhysAddr, _size: u8) -> u64 {
        u64::MAX
    }
    fn write(&mut self, _gpa: GuestPhysAddr, _size: u8, _value: u64) {}
}

/// Builds guest RAM (scattered frames), the guest's page tables and code; returns the entry.
pub fn build(hv: &mut Hv) -> Result<GuestEntry, &'static str> {
    let pages = (RAM_SIZE / FRAME_SIZE as u64) as usize;
    let mut frames = [HostPhysAddr::new(0); 64];
    for f in frames.iter_mut().take(pages) {
        *f = hv.zeroed_frame().ok_or("out of host frames for guest RAM")?;
    }
    // Reverse order: neighbouring guest pages are not neighbouring host frames, so page-crossing
    // copies really cross.
    for i in 0..pages {
        hv.map(
            (i as u64) * FRAME_SIZE as u64,
            frames[pages - 1 - i],
            FRAME_SIZE as u64,
            MappingFlags::RWX,
            MapSize::Exactly(twostage_npt::PageSize::Size4K),
        )
        .map_err(|_| "mapping guest RAM failed")?;
    }
    // Guest page tables (Intel SDM Vol. 3A 5.5): P | RW = 0x3, PS = 0x80 for 2 MiB pages.
    let put = |hv: &Hv, gpa: u64, v: u64| hv.copy_to_guest(GuestPhysAddr::new(gpa), &v.to_le_bytes());
    let e = "writing guest page tables failed";
    put(hv, PML4, PDPT | 3).map_err(|_| e)?;
    for i in 0..4u64 {
        put(hv, PDPT + 8 * i, (PD0 + 0x1000 * i) | 3).map_err(|_| e)?;
        for j in 0..512u64 {
            let base = (i << 30) | (j << 21);
            put(hv, PD0 + 0x1000 * i + 8 * j, base | 0x83).map_err(|_| e)?;
        }
    }
    put(hv, PDPT + 8 * 4, PD_WINDOW | 3).map_err(|_| e)?;
    put(hv, PD_WINDOW, PT_WINDOW | 3).map_err(|_| e)?;
    for (i, gpa) in WINDOW_GPAS.iter().enumerate() {
        put(hv, PT_WINDOW + 8 * i as u64, gpa | 3).map_err(|_| e)?;
    }
    // SAFETY: both symbols delimit the guest blob in this image's read-only data.
    let code = unsafe {
        let s = &raw const __guest_start;
        let n = (&raw const __guest_end as usize) - (s as usize);
        core::slice::from_raw_parts(s, n)
    };
    hv.copy_to_guest(GuestPhysAddr::new(CODE), code).map_err(|_| "loading guest code failed")?;
    Ok(entry())
}

/// The guest's entry state: 64-bit mode at its code, on its own page tables.
pub fn entry() -> GuestEntry {
    GuestEntry::LongMode {
        rip: GuestVirtAddr::new(CODE),
        rsp: GuestVirtAddr::new(STACK_TOP - 16),
        cr3: GuestPhysAddr::new(PML4),
    }
}

/// A fault handler that resolves nothing.
pub fn no_faults(_: &mut Hv, _: &EptViolation) -> FaultAction {
    FaultAction::Fail("unexpected EPT violation")
}

/// Running the bundled guest: the scenarios' way of making the guest touch memory.
pub trait GuestOps {
    /// Has the guest perform `op`; EPT violations go to `on_fault` (MMIO ones to `dev`).
    /// Returns the value the guest reported.
    fn op(
        &mut self,
        op: Op,
        on_fault: &mut dyn FnMut(&mut Hv, &EptViolation) -> FaultAction,
        dev: &mut dyn MmioDevice,
    ) -> Result<u64, RunError>;

    /// Lets the guest finish an operation an unhandled exit interrupted; returns its result.
    fn finish(&mut self) -> Result<u64, RunError>;

    /// `op` with no fault handling and no device.
    fn op_plain(&mut self, op: Op) -> Result<u64, RunError>;
}

impl GuestOps for Hv {
    fn op(
        &mut self,
        op: Op,
        on_fault: &mut dyn FnMut(&mut Hv, &EptViolation) -> FaultAction,
        dev: &mut dyn MmioDevice,
    ) -> Result<u64, RunError> {
        run_guest(self, Some(op), on_fault, dev)
    }

    fn finish(&mut self) -> Result<u64, RunError> {
        run_guest(self, None, &mut no_faults, &mut Unassigned)
    }

    fn op_plain(&mut self, op: Op) -> Result<u64, RunError> {
        self.op(op, &mut no_faults, &mut Unassigned)
    }
}

/// Runs the guest until it reports a result (VMCALL 2), handing it `pending` when it asks for
/// its next operation.
fn run_guest(
    hv: &mut Hv,
    mut pending: Option<Op>,
    on_fault: &mut dyn FnMut(&mut Hv, &EptViolation) -> FaultAction,
    dev: &mut dyn MmioDevice,
) -> Result<u64, RunError> {
    for _ in 0..10_000 {
        let exit = hv.vcpu.run().map_err(RunError::Entry)?;
        hv.count(&exit);
        match exit {
            VmExit::Vmcall => {
                let call = hv.vcpu.regs.rax;
                hv.vcpu.advance_rip().map_err(|e| RunError::Vmcs("RIP not advanced past VMCALL", e))?;
                match call {
                    1 => match pending.take() {
                        Some(o) => {
                            let (a, b, c) = o.regs();
                            hv.vcpu.regs.rax = a;
                            hv.vcpu.regs.rbx = b;
                            hv.vcpu.regs.rcx = c;
                        }
                        None => hv.vcpu.regs.rax = 0,
                    },
                    2 => return Ok(hv.vcpu.regs.rcx),
                    _ => hv.vcpu.regs.rax = u64::MAX,
                }
            }
            VmExit::Io(q) if !q.is_string() => {
                hv.forward_serial_io(q);
                hv.vcpu.advance_rip().map_err(|e| RunError::Vmcs("RIP not advanced past the I/O instruction", e))?;
            }
            VmExit::EptViolation(v) => match on_fault(hv, &v) {
                FaultAction::Retry => {
                    hv.stats.faults_resolved += 1;
                    // A fault taken while delivering an event: deliver it again.
                    hv.vcpu
                        .reinject_interrupted_event()
                        .map_err(|e| RunError::Vmcs("the interrupted event not re-injected", e))?;
                }
                FaultAction::Mmio => {
                    hv.emulate_mmio(&v, dev)?;
                }
                FaultAction::Fail(why) => return Err(RunError::Fault(why, v)),
            },
            VmExit::Hlt => return Err(RunError::Halted),
            other => return Err(RunError::Unhandled(other)),
        }
    }
    Err(RunError::Runaway)
}
