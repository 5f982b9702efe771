//! Boot: the entry point OpenSBI jumps to, the SBI console, the sifive_test exit, the heap.

use core::arch::{asm, global_asm};
use core::fmt::{self, Write};

global_asm!(
    ".section .text.entry, \"ax\"",
    ".globl _start",
    "_start:",
    // OpenSBI: a0 = hart id, a1 = device tree (Privileged 1.12 does not fix this; the SBI
    // spec's boot convention and OpenSBI's fw_jump do).
    "la sp, __stack_top",
    "la t0, __bss_start",
    "la t1, __bss_end",
    "1: bgeu t0, t1, 2f",
    "sd zero, 0(t0)",
    "addi t0, t0, 8",
    "j 1b",
    "2: call {main}",
    "3: wfi",
    "j 3b",
    main = sym crate::boot::rust_main,
);

/// The first Rust code: sets up traps, then runs the suite or a staged guest.
extern "C" fn rust_main(hartid: usize, dtb: usize) -> ! {
    crate::trap::init();
    let code = crate::vm::start(hartid, dtb);
    exit(code)
}

/// One SBI legacy call (SBI v2.0 §5: legacy extensions, a7 = EID, result in a0).
fn sbi_legacy(eid: usize, arg0: usize) -> isize {
    let ret: isize;
    // SAFETY: an ecall into OpenSBI; the legacy calls used here have no memory arguments.
    unsafe { asm!("ecall", inlateout("a0") arg0 as isize => ret, in("a7") eid, options(nostack)) };
    ret
}

/// SBI TIME set_timer (SBI v2.0 §6.1; legacy EID 0 on OpenSBI 1.1 works alike).
pub fn sbi_set_timer(deadline: u64) {
    // SAFETY: an ecall into OpenSBI with a value argument.
    unsafe {
        asm!("ecall", inlateout("a0") deadline => _, inlateout("a1") 0usize => _, in("a6") 0, in("a7") 0x5449_4D45usize, options(nostack))
    };
}

/// Writes one byte to the console (legacy console_putchar, EID 1: OpenSBI 1.1 has no DBCN).
pub fn putchar(c: u8) {
    sbi_legacy(1, c as usize);
}

/// Reads one console byte if one is waiting (legacy console_getchar, EID 2).
pub fn getchar() -> Option<u8> {
    let r = sbi_legacy(2, 0);
    (r >= 0).then_some(r as u8)
}

/// The console as a `fmt::Write`.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(putchar);
        Ok(())
    }
}

/// `print!` to the SBI console.
macro_rules! print {
    ($($arg:tt)*) => {{ let _ = core::fmt::Write::write_fmt(&mut $crate::boot::Console, format_args!($($arg)*)); }};
}
/// `println!` to the SBI console.
macro_rules! println {
    () => { print!("\n") };
    ($($arg:tt)*) => {{ print!($($arg)*); print!("\n"); }};
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
