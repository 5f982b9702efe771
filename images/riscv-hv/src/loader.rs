//! Running a guest that twostage did not build: a file QEMU's loader device staged in host RAM.
//!
//! xtask passes `-device loader,file=GUEST,addr=0x88000000,force-raw=on` plus two 8-byte
//! `-device loader,data=...` blobs at 0x87fff000 (the magic below) and 0x87fff008 (the file's
//! size). The file is an ELF (PT_LOAD segments at their physical addresses) or a raw binary
//! for 0x80200000; it gets an address space (twostage-aspace) with 64 MiB of demand-zero RAM at
//! GPA 0x80000000 and an MMIO region for the emulated UART, a device tree, and the SBI; SRST ends
//! the run with the guest's status. After a few exits the address space is forked as a snapshot,
//! so the statistics show copy-on-write at work.

use crate::vm::{frames, Exit, Space, Vm, UART_GPA};
use alloc::format;
use alloc::string::String;
use twostage_aspace::Backend;
use twostage_npt::{GpaRange, GuestPhysAddr, MappingFlags, Sv39x4, TableOptions};
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
/// Exits before the run loop snapshots (forks) the guest's address space.
const SNAPSHOT_AFTER: u32 = 100;

/// The staged file (base, length), if xtask staged one.
pub fn staged() -> Option<(u64, u64)> {
    // SAFETY: the header page is inside RAM on every virt machine with at least 128 MiB; it
    // holds zeros (or OpenSBI never touches it) unless the loader device wrote it.
    let (magic, len) = unsafe {
        (
            core::ptr::read_volatile(STAGE_HEADER as *const u64),
            core::ptr::read_volatile((STAGE_HEADER + 8) as *const u64),
        )
    };
    (magic == STAGE_MAGIC && len > 0 && len <= MAX_FILE).then_some((STAGE_ADDR, len))
}

fn load(space: &mut Space, file: &[u8]) -> Result<u64, String> {
    let mut copy = |at: u64, bytes: &[u8]| -> Result<(), String> {
        let at = GuestPhysAddr::try_new(at).map_err(|e| format!("load address: {e}"))?;
        // On failure the partial load's flush stays pending in the space.
        let f = space.load_image(at, bytes).map_err(|e| format!("loading {} bytes at {at:?}: {e}", bytes.len()))?;
        // The table is not loaded on any hart yet.
        space.flush_unloaded(f);
        Ok(())
    };
    if elf::is_elf(file) {
        let mut segs = alloc::vec::Vec::new();
        let entry =
            elf::load_segments(file, |s| segs.push(s)).map_err(|e| format!("not a loadable RISC-V ELF64 file: {e}"))?;
        for s in segs {
            copy(s.paddr, &file[s.offset as usize..(s.offset + s.filesz) as usize])?;
        }
        Ok(entry)
    } else {
        copy(0x8020_0000, file)?;
        Ok(0x8020_0000)
    }
}

fn new_space() -> Result<Space, String> {
    let mut space = Space::new(frames(), TableOptions::for_format::<Sv39x4>()).map_err(|e| format!("{e:?}"))?;
    let ram = GpaRange::from_start_len(GuestPhysAddr::new(GUEST_RAM), GUEST_RAM_LEN).ok_or("RAM range")?;
    let (_, f) = space.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero).map_err(|e| format!("{e}"))?;
    space.flush_unloaded(f);
    let uart = GpaRange::from_start_len(GuestPhysAddr::new(UART_GPA), 0x1000).ok_or("UART range")?;
    let (_, f) = space.add_region("uart", uart, MappingFlags::RW, Backend::Mmio).map_err(|e| format!("{e}"))?;
    space.flush_unloaded(f);
    Ok(space)
}

/// Loads and runs the staged guest; returns its exit status.
pub fn run_staged(base: u64, len: u64) -> i32 {
    // SAFETY: reserved from the frame allocator at boot; QEMU wrote `len` bytes there.
    let file = unsafe { core::slice::from_raw_parts(base as *const u8, len as usize) };
    let mut space = match new_space() {
        Ok(s) => s,
        Err(e) => {
            println!("cannot build the guest's address space: {e}");
            return 2;
        }
    };
    let entry = match load(&mut space, file) {
        Ok(e) => e,
        Err(e) => {
            println!("guest file rejected: {e}");
            return 2;
        }
    };
    let tree = fdt::guest_tree(
        GUEST_RAM,
        GUEST_RAM_LEN,
        crate::vm::hart().timebase,
        "rv64imafdc_zicsr_zifencei",
        Some(UART_GPA),
    );
    match space.load_image(GuestPhysAddr::new(GUEST_DTB), &tree) {
        Ok(f) => space.flush_unloaded(f),
        Err(e) => {
            println!("cannot place the guest's device tree: {e}");
            return 2;
        }
    }
    let mut vm = Vm::with_space(space, 1);
    vm.uart.input = true;
    // Delegate the guest's own exceptions to it (Privileged 1.12 §8.2.2): misaligned fetch,
    // breakpoint, U-mode ecall, and its VS-stage page faults.
    vm.hedeleg = (1 << 0)
        | (1 << cause::BREAKPOINT)
        | (1 << 8)
        | (1 << cause::INSN_PAGE)
        | (1 << cause::LOAD_PAGE)
        | (1 << cause::STORE_PAGE);
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
    // A snapshot of the running guest after SNAPSHOT_AFTER exits: the address space is forked,
    // so every later guest write to a page touched before it is a copy-on-write break.
    vm.budget = SNAPSHOT_AFTER;
    let mut snapshot: Option<Space> = None;
    let status = loop {
        match vm.run() {
            Exit::Reset(r) => {
                println!(
                    "\nguest reset: type {} reason {:#x} -> exit status {}",
                    r.reset_type,
                    r.reason,
                    r.exit_status()
                );
                break i32::from(r.exit_status());
            }
            Exit::Budget if snapshot.is_none() => {
                vm.budget = 100_000;
                if let crate::vm::Memory::Space(space) = &mut vm.mem {
                    match space.fork() {
                        Ok((child, f)) => {
                            vm.apply_space(f);
                            snapshot = Some(child);
                        }
                        Err(e) => {
                            println!("snapshot failed: {e}");
                            // The partial fork's flush is pending in the space.
                            vm.apply_space(twostage_aspace::SpaceFlush::none());
                        }
                    }
                }
            }
            Exit::Test { .. } | Exit::Budget => continue,
            Exit::Fault(f, t) => {
                println!("\nguest stopped: unresolved guest-page fault {:?} at pc {:#x}", f.info, t.sepc);
                break 1;
            }
            Exit::Exception(t) => {
                println!(
                    "\nguest stopped: {} (scause {}) at pc {:#x}, stval {:#x}",
                    cause::name(t.scause),
                    t.scause,
                    t.sepc,
                    t.stval
                );
                break 1;
            }
        }
    };
    if let Some(snap) = &snapshot {
        let st = snap.stats();
        println!(
            "snapshot (fork after {SNAPSHOT_AFTER} exits): its own copy-on-write copies {}, reuses {}",
            st.cow_copies, st.cow_reuses
        );
    }
    vm.print_stats("guest file");
    status
}
