//! twostage's x86 hypervisor image: booted by GRUB (multiboot v1) in Bochs, it runs guests under
//! VMX with EPT tables built by `twostage-npt`.
//!
//! Key pieces: [`boot`] (multiboot header, long-mode entry), [`serial`] (COM1 console and exit).
//! Safety model: the image is single-core with interrupts off; raw memory is reached only through
//! the identity map set up at boot.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod serial;

#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn kmain(magic: u32, info: u32) -> ! {
    serial::init();
    println!("twostage x86-hv: multiboot magic {magic:#x}, info at {info:#x}");
    serial::exit(0)
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("PANIC: {info}");
    serial::exit(101)
}

/// On the host this image is only type-checked; it runs under Bochs.
#[cfg(not(target_os = "none"))]
fn main() {}
