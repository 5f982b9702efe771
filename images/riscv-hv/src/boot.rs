//! Boot: the entry point OpenSBI jumps to, the sifive_test exit, the heap, the panic handler.
//! The SBI console is the runtime's (`twostage_hv_riscv::console`).

use core::arch::{asm, global_asm};
use twostage_hv_riscv::println;

global_asm!(
    ".section .text.entry, \"ax\"",
    ".globl _start",
    "_start:",
    // OpenSBI: a0 = hart id, a1 = device tree (Privileged 1.12 does not fix this; the SBI
    // spec's boot convention and OpenSBI's fw_jump do).
    "la sp, __stack_top",
    // Zero .bss (16-byte aligned at both ends, the link script): 64 bytes a round while they
    // fit, then 8 at a time. The 8 MiB heap is in .bss: 8 bytes a round took a million rounds.
    "la t0, __bss_start",
    "la t1, __bss_end",
    "addi t2, t1, -64",
    "1: bgtu t0, t2, 2f",
    "sd zero, 0(t0)",
    "sd zero, 8(t0)",
    "sd zero, 16(t0)",
    "sd zero, 24(t0)",
    "sd zero, 32(t0)",
    "sd zero, 40(t0)",
    "sd zero, 48(t0)",
    "sd zero, 56(t0)",
    "addi t0, t0, 64",
    "j 1b",
    "2: bgeu t0, t1, 3f",
    "sd zero, 0(t0)",
    "addi t0, t0, 8",
    "j 2b",
    "3: call {main}",
    "4: wfi",
    "j 4b",
    main = sym crate::boot::rust_main,
);

/// What the runtime gets from this image: the exit device and the heap's figures.
static BOARD: twostage_hv_riscv::Board = twostage_hv_riscv::Board { exit, heap_stats };

/// The first Rust code: sets up traps, then runs the suite or a staged guest.
extern "C" fn rust_main(hartid: usize, dtb: usize) -> ! {
    twostage_hv_riscv::trap::init(&BOARD);
    exit(crate::run(hartid, dtb))
}

/// The sifive_test device on QEMU virt (hw/misc/sifive_test.c): 0x5555 = pass,
/// `code << 16 | 0x3333` = fail with exit status `code`.
const SIFIVE_TEST: usize = 0x10_0000;

/// Ends the QEMU run with `code` as its exit status.
pub fn exit(code: i32) -> ! {
    let v: u32 = if code == 0 { 0x5555 } else { ((code as u32 & 0xffff) << 16) | 0x3333 };
    // SAFETY: the sifive_test MMIO register at its fixed virt address; the write ends the machine.
    unsafe { core::ptr::write_volatile(SIFIVE_TEST as *mut u32, v) };
    loop {
        // SAFETY: waiting for the machine to stop.
        unsafe { asm!("wfi") };
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("\nhypervisor panic: {info}");
    exit(101)
}

// The hypervisor's heap: 8 MiB for the engine's bookkeeping (twostage-baremetal's talc heap).
twostage_baremetal::global_heap!(HEAP, 8 << 20);

/// Heap counters, for the statistics.
pub fn heap_stats() -> twostage_baremetal::heap::HeapStats {
    twostage_baremetal::heap::stats(&HEAP)
}
