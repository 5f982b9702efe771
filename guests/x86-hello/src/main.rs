//! x86-hello: a multiboot (v1) guest written in 32-bit assembly.
//!
//! Entered as the Multiboot Specification 0.6.96 (3.2) says: 32-bit protected mode, paging off,
//! EAX = 0x2BADB002, EBX = the multiboot information. It prints a greeting on COM1, walks the
//! memory map (flags bit 6, `mmap_length` at +44, `mmap_addr` at +48), prints the entry count
//! and the available bytes, and writes its exit status to I/O port 0xf4: 0x31 when the map
//! was present and non-empty, 0x32 when not, 0x33 when the magic was wrong.
#![no_std]
#![no_main]

core::arch::global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)

    .section .text
    .code32
    .global _start
_start:
    mov esp, offset __hello_stack_top
    mov edi, eax
    mov ebp, ebx
    mov esi, offset __hello_msg
    call __hello_puts
    cmp edi, 0x2BADB002
    je 1f
    mov al, 0x33
    jmp 9f
1:
    xor ecx, ecx
    xor edx, edx
    test dword ptr [ebp], 0x40
    jz 4f
    mov ebx, [ebp + 48]
    mov edi, ebx
    add edi, [ebp + 44]
2:
    cmp ebx, edi
    jae 4f
    inc ecx
    cmp dword ptr [ebx + 20], 1
    jne 3f
    add edx, [ebx + 12]
3:
    add ebx, [ebx]
    add ebx, 4
    jmp 2b
4:
    push edx
    push ecx
    mov esi, offset __hello_map
    call __hello_puts
    pop eax
    push eax
    call __hello_puthex
    mov esi, offset __hello_entries
    call __hello_puts
    mov eax, [esp + 4]
    call __hello_puthex
    mov esi, offset __hello_bytes
    call __hello_puts
    pop ecx
    pop edx
    mov al, 0x32
    test ecx, ecx
    jz 9f
    test edx, edx
    jz 9f
    mov al, 0x31
9:
    out 0xf4, al
5:
    cli
    hlt
    jmp 5b

__hello_putc:
    push edx
    push eax
    mov dx, 0x3fd
6:
    in al, dx
    test al, 0x20
    jz 6b
    pop eax
    mov dx, 0x3f8
    out dx, al
    pop edx
    ret

__hello_puts:
    lodsb
    test al, al
    jz 7f
    call __hello_putc
    jmp __hello_puts
7:
    ret

__hello_puthex:
    push ecx
    mov ecx, 8
    mov edx, eax
8:
    rol edx, 4
    mov eax, edx
    and eax, 0xf
    cmp al, 10
    jb 10f
    add al, 'a' - 10
    jmp 11f
10:
    add al, '0'
11:
    call __hello_putc
    dec ecx
    jnz 8b
    pop ecx
    ret

    .section .rodata
__hello_msg:
    .asciz "x86-hello: hello from a multiboot guest (32-bit protected mode, paging off)\n"
__hello_map:
    .asciz "x86-hello: memory map: 0x"
__hello_entries:
    .asciz " entries, 0x"
__hello_bytes:
    .asciz " bytes available\n"

    .section .bss
    .balign 16
__hello_stack:
    .skip 4096
__hello_stack_top:
    "#
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
