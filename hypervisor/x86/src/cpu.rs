//! Descriptor tables for the host: the 64-bit TSS VMX needs for the host TR (Intel SDM Vol. 3C
//! 27.2.3: TR must not be 0), and an IDT that reports any exception on the console.
//!
//! The image's boot code provides the GDT as the symbol `__boot_gdt`: five 8-byte slots, the
//! kernel code selector 0x08 in slot 1, and slots 3 and 4 left free for the TSS descriptor.

/// Selector of the 64-bit TSS in the boot GDT (index 3, two slots).
pub const KERNEL_TR: u16 = 0x18;

#[repr(C, align(16))]
struct Tss([u8; 104]);

static mut TSS: Tss = Tss([0; 104]);
static mut IDT: [u64; 64] = [0; 64];

extern "C" {
    static mut __boot_gdt: [u64; 5];
    static __isr_stubs: u8;
}

core::arch::global_asm!(
    r#"
    .section .text
    .balign 16
    .global __isr_stubs
__isr_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    push vec
    jmp __isr_common
    .set vec, vec + 1
    .endr
__isr_common:
    mov rdi, [rsp]
    mov rsi, [rsp + 8]
    mov rdx, [rsp + 16]
    and rsp, -16
    call host_exception
    "#
);

#[no_mangle]
extern "C" fn host_exception(vector: u64, word1: u64, word2: u64) -> ! {
    crate::println!("HOST EXCEPTION vector {vector} (stack: {word1:#x} {word2:#x})");
    crate::serial::exit(102)
}

/// Installs the TSS descriptor (GDT slot 3, Intel SDM Vol. 3A 8.2.3) and loads TR, then the IDT.
pub fn init() {
    let tss = &raw const TSS as u64;
    let limit = 103u64;
    // 64-bit available TSS: type 9, P (Intel SDM Vol. 3A 8.2.3, Figure 8-4).
    let low = (limit & 0xffff) | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56);
    let high = tss >> 32;
    // SAFETY: single-core boot code; the GDT slot 3/4 is reserved for this descriptor and TR is
    // loaded once, right after.
    unsafe {
        let gdt = &raw mut __boot_gdt;
        (*gdt)[3] = low;
        (*gdt)[4] = high;
        core::arch::asm!("ltr {0:x}", in(reg) KERNEL_TR, options(nostack));
    }
    let stubs = &raw const __isr_stubs as u64;
    // SAFETY: the IDT is a static only written here; the stubs exist for vectors 0-31, each 16
    // bytes apart. Interrupt gate: type 0xE, P, selector 0x08 (Intel SDM Vol. 3A 7.14.1).
    unsafe {
        let idt = &raw mut IDT;
        for v in 0..32u64 {
            let h = stubs + 16 * v;
            (*idt)[2 * v as usize] = (h & 0xffff) | (0x08 << 16) | (0x8E00u64 << 32) | (((h >> 16) & 0xffff) << 48);
            (*idt)[2 * v as usize + 1] = h >> 32;
        }
        let ptr: [u64; 2] = [(32 * 16 - 1) | ((idt as u64) << 16), (idt as u64) >> 48];
        core::arch::asm!("lidt [{}]", in(reg) ptr.as_ptr().cast::<u8>(), options(nostack));
    }
}
