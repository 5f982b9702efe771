//! COM1 (16550 UART at I/O port 0x3F8): the console, and the exit path that drains it first.

use core::fmt;

/// Base I/O port of COM1.
pub const COM1: u16 = 0x3F8;
/// Line status register offset; bit 5 = transmit holding register empty, bit 6 = transmitter empty
/// (PC16550D data sheet, LSR).
const LSR: u16 = 5;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O on the PC's own devices (COM1, the debug ports); no memory is touched.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { core::arch::asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

/// Programs COM1 for 115200 8N1, FIFOs on, interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xC7);
    outb(COM1 + 4, 0x03);
}

/// Sends one byte, waiting for room in the transmitter.
pub fn putb(b: u8) {
    while inb(COM1 + LSR) & 0x20 == 0 {}
    outb(COM1, b);
}

/// Waits until the transmitter is completely empty (LSR bit 6).
pub fn drain() {
    while inb(COM1 + LSR) & 0x40 == 0 {}
}

/// The console as a `fmt::Write` sink (`\n` becomes `\r\n`).
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                putb(b'\r');
            }
            putb(b);
        }
        Ok(())
    }
}

/// `print!` to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{ let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Console, format_args!($($arg)*)); }};
}

/// `println!` to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{ $crate::print!($($arg)*); $crate::print!("\n"); }};
}

/// Ends the run: prints the parseable status line, drains the UART, and stops Bochs through its
/// magic breakpoint (`xchg bx, bx`, enabled by `magic_break: enabled=1`; the rc file then says `quit`).
pub fn exit(status: u32) -> ! {
    crate::println!("twostage-exit: {status}");
    drain();
    loop {
        // SAFETY: `xchg bx, bx` is a no-op to the CPU; Bochs treats it as a breakpoint.
        unsafe { core::arch::asm!("xchg bx, bx", "cli", "hlt", options(nomem, nostack)) }
    }
}
