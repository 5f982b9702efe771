//! riscv-hello: an S-mode program that exercises what an SBI firmware (or a hypervisor acting as
//! one) provides: the base extension, the debug console (DBCN) and legacy console_putchar, the
//! device tree's memory node, a timer interrupt through SBI TIME, and SRST to exit with a status
//! (set at build time with RISCV_HELLO_STATUS, default 0; any failed self-check exits with
//! "system failure").
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod hello {
    use core::arch::{asm, global_asm};
    use core::fmt::{self, Write};
    use core::sync::atomic::{AtomicU64, Ordering};

    global_asm!(
        ".section .text.entry, \"ax\"",
        ".globl _start",
        "_start:",
        "la sp, __stack_top",
        "la t0, __bss_start",
        "la t1, __bss_end",
        "1: bgeu t0, t1, 2f",
        "sd zero, 0(t0)",
        "addi t0, t0, 8",
        "j 1b",
        "2: call {main}",
        "3: j 3b",
        // The trap vector: a timer interrupt records scause, masks STIE and returns.
        ".balign 4",
        ".globl hello_trap",
        "hello_trap:",
        "addi sp, sp, -16",
        "sd t0, 0(sp)",
        "sd t1, 8(sp)",
        "csrr t0, scause",
        "la t1, {ticked}",
        "sd t0, 0(t1)",
        "li t0, 32",
        "csrc sie, t0",
        "ld t0, 0(sp)",
        "ld t1, 8(sp)",
        "addi sp, sp, 16",
        "sret",
        main = sym main,
        ticked = sym TICKED,
    );

    static TICKED: AtomicU64 = AtomicU64::new(0);

    extern "C" {
        fn hello_trap();
    }

    const EID_BASE: usize = 0x10;
    const EID_TIME: usize = 0x5449_4D45;
    const EID_DBCN: usize = 0x4442_434E;
    const EID_SRST: usize = 0x5352_5354;

    fn sbi(eid: usize, fid: usize, a0: usize, a1: usize, a2: usize) -> (isize, usize) {
        let (e, v): (isize, usize);
        // SAFETY: an SBI call; the arguments are values or addresses of our own buffers.
        unsafe {
            asm!("ecall", inlateout("a0") a0 => e, inlateout("a1") a1 => v, in("a2") a2, in("a6") fid, in("a7") eid, options(nostack))
        };
        (e, v)
    }

    fn legacy_putchar(c: u8) {
        // SAFETY: legacy console_putchar (EID 1).
        unsafe { asm!("ecall", inlateout("a0") c as usize => _, in("a7") 1usize, options(nostack)) };
    }

    struct Legacy;
    impl Write for Legacy {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            s.bytes().for_each(legacy_putchar);
            Ok(())
        }
    }

    fn dbcn_write(s: &str) -> bool {
        // S-mode runs with satp = Bare here, so the buffer's address is its physical address.
        let (e, n) = sbi(EID_DBCN, 0, s.len(), s.as_ptr() as usize, 0);
        e == 0 && n == s.len()
    }

    fn be32(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    /// The size of the first `memory` node's first range (root #address-cells = #size-cells = 2).
    fn dtb_memory(dtb: usize) -> Option<(u64, u64)> {
        // SAFETY: a1 at entry points at a device tree; its header gives its length.
        let head = unsafe { core::slice::from_raw_parts(dtb as *const u8, 40) };
        if be32(head, 0)? != 0xd00d_feed {
            return None;
        }
        let total = be32(head, 4)? as usize;
        // SAFETY: as above.
        let b = unsafe { core::slice::from_raw_parts(dtb as *const u8, total) };
        let (st, strs) = (be32(b, 8)? as usize, be32(b, 12)? as usize);
        let mut at = st;
        let mut in_mem = false;
        loop {
            let tok = be32(b, at)?;
            at += 4;
            match tok {
                1 => {
                    let name_len = b[at..].iter().position(|&c| c == 0)?;
                    in_mem = b[at..at + name_len].starts_with(b"memory");
                    at += (name_len + 1).next_multiple_of(4);
                }
                2 | 4 => {}
                3 => {
                    let len = be32(b, at)? as usize;
                    let name_off = strs + be32(b, at + 4)? as usize;
                    let is_reg = b.get(name_off..name_off + 4)? == b"reg\0";
                    if in_mem && is_reg && len >= 16 {
                        let v = &b[at + 8..at + 8 + len];
                        let q = |i: usize| {
                            (u64::from(be32(v, i).unwrap_or(0)) << 32) | u64::from(be32(v, i + 4).unwrap_or(0))
                        };
                        return Some((q(0), q(8)));
                    }
                    at += 8 + len.next_multiple_of(4);
                }
                _ => return None,
            }
        }
    }

    /// Writes one word into each of 256 pages 4 MiB into RAM and reads them back (a hypervisor
    /// sees first touches of fresh memory here).
    fn touch_memory(base: u64, size: u64) -> bool {
        let start = base + (4 << 20);
        if size < (8 << 20) {
            return true;
        }
        let mut good = true;
        for i in 0..256u64 {
            let p = (start + i * 4096) as *mut u64;
            // SAFETY: inside the RAM the device tree describes, past this image (loaded at base + 2 MiB, well under 2 MiB long).
            unsafe {
                good &= p.read_volatile() == 0;
                p.write_volatile(i ^ 0x5a5a);
                good &= p.read_volatile() == i ^ 0x5a5a;
            }
        }
        let _ =
            writeln!(Legacy, "riscv-hello: touched 256 pages at {start:#x}: {}", if good { "ok" } else { "MISMATCH" });
        good
    }

    /// Prints through the ns16550 UART at 0x1000_0000 (QEMU virt's, and the one a twostage guest's
    /// device tree names), polling LSR.THRE (bit 5).
    fn uart_print(s: &str) {
        let uart = 0x1000_0000 as *mut u8;
        for c in s.bytes() {
            // SAFETY: MMIO to the UART's THR (offset 0) and LSR (offset 5).
            unsafe {
                let mut n = 0;
                while uart.add(5).read_volatile() & 0x20 == 0 && n < 100_000 {
                    n += 1;
                }
                uart.write_volatile(c);
            }
        }
    }

    fn rdtime() -> u64 {
        let t: u64;
        // SAFETY: reading the time CSR.
        unsafe { asm!("rdtime {0}", out(reg) t) };
        t
    }

    fn exit_status() -> u32 {
        option_env!("RISCV_HELLO_STATUS").and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    fn srst(reason: u32) -> ! {
        sbi(EID_SRST, 0, 0, reason as usize, 0);
        loop {
            core::hint::spin_loop();
        }
    }

    extern "C" fn main(hartid: usize, dtb: usize) -> ! {
        let mut ok = true;
        let (_, spec) = sbi(EID_BASE, 0, 0, 0, 0);
        let (_, has_dbcn) = sbi(EID_BASE, 3, EID_DBCN, 0, 0);
        let _ = writeln!(
            Legacy,
            "riscv-hello: hart {hartid}, SBI spec {}.{}, legacy console_putchar works",
            spec >> 24 & 0x7f,
            spec & 0xff_ffff
        );
        if has_dbcn != 0 {
            ok &= dbcn_write("riscv-hello: hello through the SBI debug console (DBCN)\n");
        } else {
            let _ = writeln!(Legacy, "riscv-hello: no DBCN");
        }
        match dtb_memory(dtb) {
            Some((base, size)) => {
                let _ =
                    writeln!(Legacy, "riscv-hello: device tree at {dtb:#x} says memory {base:#x} + {} MiB", size >> 20);
                ok &= size > 0;
                ok &= touch_memory(base, size);
            }
            None => {
                let _ = writeln!(Legacy, "riscv-hello: no memory node in the device tree at {dtb:#x}");
                ok = false;
            }
        }
        uart_print("riscv-hello: hello through the ns16550 UART\n");
        // Timer: vector, STIE, SIE, then set_timer 5 ms ahead (timebase 10 MHz on QEMU virt).
        // SAFETY: our own trap vector; enabling the supervisor timer interrupt (Privileged §4.1).
        unsafe {
            asm!("csrw stvec, {0}", in(reg) hello_trap as *const () as usize);
            asm!("csrs sie, {0}", in(reg) 1usize << 5);
        }
        let start = rdtime();
        let (e, _) = sbi(EID_TIME, 0, (start + 50_000) as usize, 0, 0);
        ok &= e == 0;
        // SAFETY: enables interrupts; the handler only records and masks.
        unsafe { asm!("csrsi sstatus, 2") };
        let mut spins = 0u64;
        while TICKED.load(Ordering::SeqCst) == 0 && spins < 10_000_000 {
            // SAFETY: waiting for the interrupt.
            unsafe { asm!("wfi") };
            spins += 1;
        }
        // SAFETY: interrupts off again.
        unsafe { asm!("csrci sstatus, 2") };
        let cause = TICKED.load(Ordering::SeqCst);
        sbi(EID_TIME, 0, usize::MAX, 0, 0);
        let elapsed = rdtime() - start;
        let _ = writeln!(Legacy, "riscv-hello: timer interrupt (scause {cause:#x}) after {elapsed} ticks");
        ok &= cause == (1 << 63) | 5 && elapsed >= 50_000;
        let status = exit_status();
        if !ok {
            let _ = writeln!(Legacy, "riscv-hello: a self-check failed: system failure");
            srst(1);
        }
        let _ = writeln!(Legacy, "riscv-hello: exiting through SRST with status {status}");
        srst(if status == 0 { 0 } else { 0xF000_0000 | (status & 0xff) })
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
        srst(1)
    }
}

/// Host builds: nothing to run.
#[cfg(not(target_os = "none"))]
fn main() {}
