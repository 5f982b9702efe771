//! The bundled VS-mode test guest: small position-independent routines copied into guest memory.
//!
//! The hypervisor enters a routine with its arguments in a0..a5; each one finishes with the
//! twostage test hypercall (SBI EID 0x08007473, fid 0 = done with a0 = result; fid 1 = report
//! a0 and continue). They use only pc-relative addressing, so they run wherever they are copied.

use core::arch::global_asm;

/// Test hypercall: the routine finished, a0 = result.
pub const HC_DONE: u64 = 0;
/// Test hypercall: a0 = an intermediate value; the routine continues after it.
pub const HC_REPORT: u64 = 1;

global_asm!(
    ".section .text.guest, \"ax\"",
    ".balign 4096",
    ".globl guest_blob_start",
    "guest_blob_start:",
    ".option push",
    ".option norvc",
    // done(a0): a7 = EID, a6 = fid 0.
    ".macro DONE",
    "li a7, 0x08007473",
    "li a6, 0",
    "ecall",
    "1: j 1b",
    ".endm",
    ".macro REPORT",
    "li a7, 0x08007473",
    "li a6, 1",
    "ecall",
    ".endm",
    // g_load64(a0 = address) -> value
    ".globl g_load64",
    "g_load64:",
    "ld a0, 0(a0)",
    "DONE",
    // g_store64(a0 = address, a1 = value) -> 0
    ".globl g_store64",
    "g_store64:",
    "sd a1, 0(a0)",
    "li a0, 0",
    "DONE",
    // g_load_twice(a0 = address): report the first read, then done with the second.
    ".globl g_load_twice",
    "g_load_twice:",
    "mv a2, a0",
    "ld a0, 0(a2)",
    "REPORT",
    "ld a0, 0(a2)",
    "DONE",
    // g_call(a0 = target): jalr to it; the target returns a result in a0.
    ".globl g_call",
    "g_call:",
    "jalr ra, 0(a0)",
    "DONE",
    // g_store_many(a0 = base, a1 = count, a2 = stride, a3 = value) -> 0
    ".globl g_store_many",
    "g_store_many:",
    "1: beqz a1, 2f",
    "sd a3, 0(a0)",
    "add a0, a0, a2",
    "addi a1, a1, -1",
    "j 1b",
    "2: li a0, 0",
    "DONE",
    // g_uart_puts(a0 = UART base, a1 = NUL-terminated string): byte stores to THR, then reads
    // LSR (offset 5) and returns it.
    ".globl g_uart_puts",
    "g_uart_puts:",
    "1: lbu t0, 0(a1)",
    "beqz t0, 2f",
    "sb t0, 0(a0)",
    "addi a1, a1, 1",
    "j 1b",
    "2: lbu a0, 5(a0)",
    "DONE",
    ".option pop",
    // g_mmio_compressed(a0 = UART base, a1 = value): a compressed c.sw to the UART's MCR
    // (offset 4: c.sw offsets are multiples of 4), then a c.lw back; returns what was read.
    ".globl g_mmio_compressed",
    "g_mmio_compressed:",
    ".option arch, +c",
    "c.sw a1, 4(a0)",
    "c.lw a0, 4(a0)",
    ".option push",
    ".option norvc",
    "DONE",
    // g_setup_paging(a0 = root, a1 = level-1 table, a2 = level-0 table, a3 = PTE array, a4 =
    // count): the guest builds its own Sv39 tables (Privileged 1.12 §4.4): root[2] = a 1 GiB
    // identity leaf for 0x8000_0000 (V R W X A D = 0xcf), root[0] -> a1, a1[0] -> a2, and
    // a2[i] = PTE array[i] (virtual pages at 0x0, 0x1000, ...); then satp (vsatp) = Sv39 root.
    ".globl g_setup_paging",
    "g_setup_paging:",
    "li t0, 0x200000cf",
    "sd t0, 16(a0)",
    "srli t0, a1, 12",
    "slli t0, t0, 10",
    "ori t0, t0, 1",
    "sd t0, 0(a0)",
    "srli t0, a2, 12",
    "slli t0, t0, 10",
    "ori t0, t0, 1",
    "sd t0, 0(a1)",
    "mv t2, a2",
    "1: beqz a4, 2f",
    "ld t1, 0(a3)",
    "sd t1, 0(t2)",
    "addi a3, a3, 8",
    "addi t2, t2, 8",
    "addi a4, a4, -1",
    "j 1b",
    "2: srli t0, a0, 12",
    "li t1, 8",
    "slli t1, t1, 60",
    "or t0, t0, t1",
    "sfence.vma",
    "csrw satp, t0",
    "sfence.vma",
    "li a0, 0",
    "DONE",
    // g_wait_timer(a0 = deadline): vstvec = the handler below, vsie.STIE, SBI TIME set_timer,
    // vsstatus.SIE, then WFI until the virtual timer interrupt arrives; the handler returns
    // vscause after disarming the timer (Privileged 1.12 §4.1.2, §4.1.3, §8.2.3).
    ".globl g_wait_timer",
    "g_wait_timer:",
    "lla t0, 3f",
    "csrw stvec, t0",
    "li t0, 32",
    "csrs sie, t0",
    "li a7, 0x54494D45",
    "li a6, 0",
    "ecall",
    "csrsi sstatus, 2",
    "2: wfi",
    "j 2b",
    ".balign 4",
    "3: csrr s1, scause",
    "csrci sstatus, 2",
    "li a0, -1",
    "li a7, 0x54494D45",
    "li a6, 0",
    "ecall",
    "mv a0, s1",
    "DONE",
    ".option pop",
    ".balign 4",
    // g_wait_uart_irq(a0 = UART base, a1 = PLIC base): source 10 at priority 1, enabled for
    // context 1 (hart 0's S-mode) with threshold 0 (PLIC spec "Memory Map"), vstvec = the handler
    // below, vsie.SEIE, UART IER = ERBFI, vsstatus.SIE, then WFI until the external interrupt
    // arrives. The handler claims, reads RBR, completes, reports (claimed ID << 8 | byte) and
    // finishes with vscause.
    ".globl g_wait_uart_irq",
    "g_wait_uart_irq:",
    "lla t0, 3f",
    "csrw stvec, t0",
    "li t0, 1",
    "sw t0, 40(a1)",
    "li t1, 0x2080",
    "add t1, a1, t1",
    "li t0, 1 << 10",
    "sw t0, 0(t1)",
    "li t1, 0x201000",
    "add t1, a1, t1",
    "sw zero, 0(t1)",
    "li t0, 1 << 9",
    "csrs sie, t0",
    "li t0, 1",
    "sb t0, 1(a0)",
    "csrsi sstatus, 2",
    "2: wfi",
    "j 2b",
    ".balign 4",
    "3: csrr s1, scause",
    "csrci sstatus, 2",
    "lw t2, 4(t1)",
    "lbu t3, 0(a0)",
    "sw t2, 4(t1)",
    "slli a0, t2, 8",
    "or a0, a0, t3",
    "REPORT",
    "mv a0, s1",
    "DONE",
    ".balign 4",
    ".globl guest_blob_end",
    "guest_blob_end:",
    ".text",
);

extern "C" {
    static guest_blob_start: u8;
    static guest_blob_end: u8;
    static g_load64: u8;
    static g_store64: u8;
    static g_load_twice: u8;
    static g_call: u8;
    static g_store_many: u8;
    static g_uart_puts: u8;
    static g_mmio_compressed: u8;
    static g_setup_paging: u8;
    static g_wait_timer: u8;
    static g_wait_uart_irq: u8;
}

/// A routine of the test guest.
#[derive(Clone, Copy, Debug)]
pub enum Routine {
    /// a0 = address → value.
    Load64,
    /// a0 = address, a1 = value.
    Store64,
    /// a0 = address; reports the first read, finishes with the second.
    LoadTwice,
    /// a0 = code address; returns what the code returns.
    Call,
    /// a0 = base, a1 = count, a2 = stride, a3 = value.
    StoreMany,
    /// a0 = UART, a1 = string → LSR.
    UartPuts,
    /// a0 = UART, a1 = value → value read back through compressed accesses.
    MmioCompressed,
    /// a0 = root, a1 = L1, a2 = L0, a3 = PTE array, a4 = count.
    SetupPaging,
    /// a0 = deadline → vscause of the interrupt taken.
    WaitTimer,
    /// a0 = UART, a1 = PLIC → reports (claimed ID << 8 | byte read), then vscause.
    WaitUartIrq,
}

/// The routines' code, as bytes to copy into guest memory.
pub fn blob() -> &'static [u8] {
    // SAFETY: the two symbols bound the `.text.guest` bytes emitted above, which are never written.
    unsafe {
        let s = &raw const guest_blob_start;
        let e = &raw const guest_blob_end;
        core::slice::from_raw_parts(s, e as usize - s as usize)
    }
}

/// Offset of a routine in [`blob`].
pub fn offset(r: Routine) -> u64 {
    let sym = match r {
        Routine::Load64 => &raw const g_load64,
        Routine::Store64 => &raw const g_store64,
        Routine::LoadTwice => &raw const g_load_twice,
        Routine::Call => &raw const g_call,
        Routine::StoreMany => &raw const g_store_many,
        Routine::UartPuts => &raw const g_uart_puts,
        Routine::MmioCompressed => &raw const g_mmio_compressed,
        Routine::SetupPaging => &raw const g_setup_paging,
        Routine::WaitTimer => &raw const g_wait_timer,
        Routine::WaitUartIrq => &raw const g_wait_uart_irq,
    };
    (sym as usize - (&raw const guest_blob_start) as usize) as u64
}
