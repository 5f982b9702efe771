//! Running a guest that twostage did not build: a file QEMU's loader device staged in host RAM.
//!
//! xtask passes `-device loader,file=GUEST,addr=0x88000000,force-raw=on` plus two 8-byte
//! `-device loader,data=...` blobs at 0x87fff000 (the magic below) and 0x87fff008 (the file's
//! size). The file is an ELF (PT_LOAD segments at their physical addresses) or a raw binary
//! for 0x80200000; it gets 64 MiB of demand-zero RAM at GPA 0x80000000, a device tree, and the
//! SBI; SRST ends the run with the guest's status.

use crate::vm::{Exit, Vm, UART_GPA};
use twostage_npt::{GpaRange, GuestPhysAddr, MappingFlags, PageSize};
use twostage_rvh::csr::cause;
use twostage_rvh::{elf, fdt, hw};

/// Where the staged file starts in host RAM.
pub const STAGE_ADDR: u64 = 0x8800_0000;
/// The staging header: magic, then size.
pub const STAGE_HEADER: u64 = STAGE_ADDR - 0x1000;
/// "TSGUEST!" as a little-endian u64.
pub const STAGE_MAGIC: u64 = u64::from_le_bytes(*b"TSGUEST!");
/// Largest file accepted.
const MAX_FILE: u64 = 32 << 20;

const GUEST_RAM: u64 = 0x8000_0000;
const GUEST_RAM_LEN: u64 = 64 << 20;
const GUEST_DTB: u64 = GUEST_RAM + GUEST_RAM_LEN - (1 << 20);

/// The staged file (base, length), if xtask staged one.
pub fn staged() -> Option<(u64, u64)> {
    // SAFETY: the header page is inside RAM on every virt machine with at least 128 MiB; it
    // holds zeros (or OpenSBI never touches it) unless the loader device wrote it.
    let (magic, len) = unsafe { (core::ptr::read_volatile(STAGE_HEADER as *const u64), core::ptr::read_volatile((STAGE_HEADER + 8) as *const u64)) };
    (magic == STAGE_MAGIC && len > 0 && len <= MAX_FILE).then_some((STAGE_ADDR, len))
}

fn ensure_ram(vm: &mut Vm, gpa: u64, len: u64) -> Result<(), &'static str> {
    if gpa < GUEST_RAM || gpa.checked_add(len).is_none_or(|e| e > GUEST_RAM + GUEST_RAM_LEN) {
        return Err("segment outside the guest's RAM");
    }
    let mut p = gpa & !0xfff;
    while p < gpa + len {
        if vm.table.query(GuestPhysAddr::new(p)).is_none() {
            vm.map_new(GuestPhysAddr::new(p), 4096, MappingFlags::RWX, PageSize::Size4K)?;
        }
        p += 4096;
    }
    Ok(())
}

fn load(vm: &mut Vm, file: &[u8]) -> Result<u64, &'static str> {
    if elf::is_elf(file) {
        let mut segs = alloc::vec::Vec::new();
        let entry = elf::load_segments(file, |s| segs.push(s)).map_err(|_| "not a loadable RISC-V ELF64 file")?;
        for s in segs {
            ensure_ram(vm, s.paddr, s.memsz.max(1))?;
            let bytes = &file[s.offset as usize..(s.offset + s.filesz) as usize];
            vm.phys().copy_to_guest(GuestPhysAddr::new(s.paddr), bytes).map_err(|_| "segment copy failed")?;
        }
        Ok(entry)
    } else {
        let entry = 0x8020_0000;
        ensure_ram(vm, entry, file.len() as u64)?;
        vm.phys().copy_to_guest(GuestPhysAddr::new(entry), file).map_err(|_| "image copy failed")?;
        Ok(entry)
    }
}

/// Loads and runs the staged guest; returns its exit status.
pub fn run_staged(base: u64, len: u64) -> i32 {
    // SAFETY: reserved from the frame allocator at boot; QEMU wrote `len` bytes there.
    let file = unsafe { core::slice::from_raw_parts(base as *const u8, len as usize) };
    let mut vm = Vm::new(1);
    vm.demand_zero = GpaRange::from_start_len(GuestPhysAddr::new(GUEST_RAM), GUEST_RAM_LEN);
    // Delegate the guest's own exceptions to it (Privileged 1.12 §8.2.2): misaligned fetch,
    // breakpoint, U-mode ecall, and its VS-stage page faults.
    vm.hedeleg = (1 << 0) | (1 << cause::BREAKPOINT) | (1 << 8) | (1 << cause::INSN_PAGE) | (1 << cause::LOAD_PAGE) | (1 << cause::STORE_PAGE);
    let entry = match load(&mut vm, file) {
        Ok(e) => e,
        Err(e) => {
            println!("guest file rejected: {e}");
            return 2;
        }
    };
    let tree = fdt::guest_tree(GUEST_RAM, GUEST_RAM_LEN, crate::vm::hart().timebase, "rv64imafdc_zicsr_zifencei", Some(UART_GPA));
    if ensure_ram(&mut vm, GUEST_DTB, tree.len() as u64).is_err() || vm.phys().copy_to_guest(GuestPhysAddr::new(GUEST_DTB), &tree).is_err() {
        println!("cannot place the guest's device tree");
        return 2;
    }
    println!("guest: {len} bytes, entry {entry:#x}, RAM {GUEST_RAM:#x}+{GUEST_RAM_LEN:#x}, dtb at {GUEST_DTB:#x}");
    // SAFETY: a fresh VS context: Bare vsatp, FS = Initial, no virtual interrupt pending.
    unsafe {
        hw::vsatp::write(0);
        hw::vsstatus::write(twostage_rvh::csr::sstatus::FS_INITIAL);
        hw::hvip::write(0);
    }
    hw::hfence_vvma_all();
    vm.regs.gpr[10] = 0;
    vm.regs.gpr[11] = GUEST_DTB;
    vm.pc = entry;
    let status = loop {
        match vm.run() {
            Exit::Reset(r) => {
                println!("\nguest reset: type {} reason {:#x} -> exit status {}", r.reset_type, r.reason, r.exit_status());
                break i32::from(r.exit_status());
            }
            Exit::Test { .. } | Exit::Budget => continue,
            Exit::Fault(f, t) => {
                println!("\nguest stopped: unresolved guest-page fault {:?} at pc {:#x}", f.info, t.sepc);
                break 1;
            }
            Exit::Exception(t) => {
                println!("\nguest stopped: {} (scause {}) at pc {:#x}, stval {:#x}", cause::name(t.scause), t.scause, t.sepc, t.stval);
                break 1;
            }
        }
    };
    vm.print_stats("guest file");
    status
}
