//! The SBI console (`print!`, `println!`) and the SBI timer.

use core::arch::asm;
use core::fmt::{self, Write};

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
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{ let _ = core::fmt::Write::write_fmt(&mut $crate::console::Console, format_args!($($arg)*)); }};
}
/// `println!` to the SBI console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{ $crate::print!($($arg)*); $crate::print!("\n"); }};
}
