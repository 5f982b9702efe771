//! twostage-baremetal: the bare-metal support that is not specific to one architecture, shared by
//! the hypervisor images (`images/riscv-hv`, `images/x86-hv`) and tested on the host.
//!
//! - [`elf`] turns a guest file into a checked loading plan (or a typed refusal naming the
//!   problem), and [`multiboot`] checks a multiboot (v1) header. `cargo xtask` runs the same
//!   checks before it boots an emulator, so a file is refused with the same message by xtask and
//!   by the image.
//! - [`linux_x86`]: the Linux x86 boot protocol: a bzImage's setup header checked, the zero page
//!   with its e820 map (the firmware's layout of the first MiB kept), identity tables and boot
//!   GDT for the 64-bit entry.
//! - [`acpi`]: the machine's ACPI tables moved to the top of a guest's RAM (RSDP found as the
//!   ACPI spec says, every pointer of the table tree rewritten, every checksum recomputed;
//!   hostile tables refused with the reason).
//! - [`pvh`]: the PVH entry of an ELF kernel: its `XEN_ELFNOTE_PHYS32_ENTRY` note checked, the
//!   `hvm_start_info` (memory map, command line, initrd module) built.
//! - [`fdt`]: flattened device trees, read (the host's, from the firmware) and written (a
//!   guest's), with host tests; not H-extension glue, so here rather than in twostage-rvh.
//! - [`frames::Frames`]: the host frame allocator (a two-level bitmap: constant-bounded searches).
//! - [`heap`]: the images' global heap (the `talc` crate over a static arena).
//!
//! Unsafe code is denied except in `frames` and `heap`, which implement the allocator traits.
#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod acpi;
pub mod elf;
pub mod fdt;
#[allow(unsafe_code)]
pub mod frames;
#[allow(unsafe_code)]
pub mod heap;
pub mod linux_x86;
pub mod multiboot;
pub mod pvh;
