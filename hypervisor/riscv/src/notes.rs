//! What the hypervisor reports while a guest runs (a fork, a migration), kept from splitting a
//! line the guest is writing on the shared console: a note made while the guest's last byte was
//! not a newline waits until the guest ends that line (or until [`flush`]).

use alloc::string::String;
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

/// The guest's last byte on the console was not a newline.
static MID_LINE: AtomicBool = AtomicBool::new(false);
/// Notes are waiting.
static WAITING: AtomicBool = AtomicBool::new(false);

/// The waiting notes, behind a flag lock (held only to append or take, never while waiting for
/// anything else).
struct Queue {
    locked: AtomicBool,
    text: UnsafeCell<String>,
}

// SAFETY: `text` is reached only with `locked` held.
unsafe impl Sync for Queue {}

static QUEUE: Queue = Queue { locked: AtomicBool::new(false), text: UnsafeCell::new(String::new()) };

fn with_queue<R>(f: impl FnOnce(&mut String) -> R) -> R {
    while QUEUE.locked.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: the flag is ours until the store below.
    let r = f(unsafe { &mut *QUEUE.text.get() });
    QUEUE.locked.store(false, Ordering::Release);
    r
}

/// Whether the guest's console is at the start of a line.
pub fn at_line_start() -> bool {
    !MID_LINE.load(Ordering::Acquire)
}

/// Called after each byte the guest wrote went to the console: a newline lets waiting notes out.
pub fn guest_byte(c: u8) {
    MID_LINE.store(c != b'\n', Ordering::Release);
    if c == b'\n' && WAITING.load(Ordering::Acquire) {
        flush();
    }
}

/// Prints the waiting notes.
pub fn flush() {
    if !WAITING.swap(false, Ordering::AcqRel) {
        return;
    }
    let text = with_queue(core::mem::take);
    print!("{text}");
}

/// Prints `args` and a newline now if the guest's console is at a line start, else once the
/// guest ends its line.
pub fn note(args: fmt::Arguments<'_>) {
    if at_line_start() {
        flush();
        println!("{args}");
        return;
    }
    with_queue(|q| {
        let _ = q.write_fmt(args);
        q.push('\n');
    });
    WAITING.store(true, Ordering::Release);
    // The guest may have ended its line meanwhile (another hart).
    if at_line_start() {
        flush();
    }
}

/// `println!` as a [`note`].
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => { $crate::notes::note(format_args!($($arg)*)) };
}
