//! Multiboot (v1) header and the 32-bit entry that switches to 64-bit long mode.
//!
//! GRUB enters `_start32` in 32-bit protected mode with paging off, EAX = 0x2BADB002 and
//! EBX = the physical address of the multiboot information (Multiboot Specification 0.6.96, 3.2).
//! The entry identity-maps the first 4 GiB with 2 MiB pages, enables PAE, EFER.LME and paging
//! (Intel SDM Vol. 3A 10.8.5 "Initializing IA-32e Mode") and calls `kmain(magic, info)`.
//! Slots 3 and 4 of its GDT (`__boot_gdt`) are left for the TSS `twostage_hv_x86::cpu` installs.

core::arch::global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)

    .section .boot32, "ax"
    .code32
    .global _start32
_start32:
    cli
    mov esi, eax
    mov edi, ebx
    mov esp, offset __boot_stack_top
    mov eax, offset __boot_pdpt
    or eax, 3
    mov dword ptr [__boot_pml4], eax
    xor ecx, ecx
1:
    mov eax, ecx
    shl eax, 12
    add eax, offset __boot_pd
    or eax, 3
    mov dword ptr [__boot_pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jne 1b
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov dword ptr [__boot_pd + ecx * 8], eax
    mov dword ptr [__boot_pd + ecx * 8 + 4], 0
    inc ecx
    cmp ecx, 2048
    jne 2b
    mov eax, offset __boot_pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000021
    mov cr0, eax
    lgdt [__boot_gdt_ptr]
    mov eax, offset __long_entry
    push 0x08
    push eax
    retf

    .code64
__long_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + __boot_stack_top]
    mov eax, esi
    mov esi, edi
    mov edi, eax
    call kmain
3:
    hlt
    jmp 3b

    .section .data
    .balign 16
    .global __boot_gdt
__boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0
    .quad 0
__boot_gdt_end:
__boot_gdt_ptr:
    .word __boot_gdt_end - __boot_gdt - 1
    .quad __boot_gdt

    .section .bss
    .balign 4096
    .global __boot_pml4
__boot_pml4:
    .skip 4096
__boot_pdpt:
    .skip 4096
__boot_pd:
    .skip 4 * 4096
__boot_stack:
    .skip 128 * 1024
__boot_stack_top:
    "#
);
