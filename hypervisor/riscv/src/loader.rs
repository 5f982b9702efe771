//! Running a guest that twostage did not build: a file QEMU's loader device staged in host RAM.
//!
//! xtask passes `-device loader,file=GUEST,addr=0x88000000,force-raw=on` plus two 8-byte
//! `-device loader,data=...` blobs at 0x87fff000 (the magic below) and 0x87fff008 (the file's
//! size). The file is an ELF (PT_LOAD segments at their physical addresses) or a raw binary
//! for 0x80200000; it gets an address space (twostage-aspace) with 64 MiB of demand-zero RAM at
//! GPA 0x80000000 and an MMIO region for the emulated UART, a device tree, and the SBI; SRST ends
//! the run with the guest's status. After a few exits the address space is forked as a snapshot,
//! so the statistics show copy-on-write at work.
//!
//! Before anything is loaded the file goes through `twostage_baremetal::elf`'s checks (machine,
//! segments inside the file and inside guest RAM with their zero-fill, no overlaps, an entry
//! point in a segment, ...) and the device tree is placed at the top of RAM where no segment is.
//! A file that fails, and an empty or oversized staging, end the run with `EXIT_REFUSED` (126)
//! and a `guest file refused:` line naming the problem; a guest the hypervisor has to stop ends
//! it with `EXIT_GUEST_STOPPED` (125).

use crate::hart::frames;
use crate::vm::{Exit, Space, Vm, UART_GPA};
use alloc::format;
use alloc::string::String;
use core::fmt::Display;
use twostage_aspace::Backend;
use twostage_baremetal::elf::{self, LoadPlan, Machine, Place, EXIT_GUEST_STOPPED, EXIT_REFUSED};
use twostage_baremetal::fdt;
use twostage_npt::{GpaRange, GuestPhysAddr, MappingFlags, Sv39x4, TableOptions};
use twostage_rvh::csr::cause;
use twostage_rvh::hw;

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
/// Where a raw image goes, and starts.
const RAW_LOAD: u64 = 0x8020_0000;
/// The device tree goes at the top of guest RAM where no segment is, at the first of these
/// alignments that finds room (1 MiB, as before, when the top MiB is free).
const DTB_ALIGNS: [u64; 3] = [1 << 20, 0x1000, 8];
/// Status when the hypervisor cannot build the guest's address space or load it.
const SETUP_FAILED: i32 = 3;
/// Exits before the run loop snapshots (forks) the guest's address space.
const SNAPSHOT_AFTER: u32 = 100;

/// The staging header: (magic, size).
fn header() -> (u64, u64) {
    // SAFETY: the header page is inside RAM on every virt machine with at least 128 MiB; it
    // holds zeros (or OpenSBI never touches it) unless the loader device wrote it.
    unsafe {
        (
            core::ptr::read_volatile(STAGE_HEADER as *const u64),
            core::ptr::read_volatile((STAGE_HEADER + 8) as *const u64),
        )
    }
}

/// The staged file (base, length) when the header says one was staged, even an empty or an
/// oversized one (which [`run_staged`] refuses rather than run the suite instead): a length
/// over the limit comes back as the limit plus one, so that reserving it stays inside RAM.
pub fn staged() -> Option<(u64, u64)> {
    let (magic, len) = header();
    (magic == STAGE_MAGIC).then_some((STAGE_ADDR, len.min(MAX_FILE + 1)))
}

/// Reports a refused guest file; the run's status.
fn refuse(why: impl Display) -> i32 {
    println!("guest file refused: {why}");
    i32::from(EXIT_REFUSED)
}

/// Copies the plan's segments into the space (the zero-fill is the RAM's demand-zero) and the
/// device tree to `dtb`.
fn load(space: &mut Space, plan: &LoadPlan<'_>, dtb: u64, tree: &[u8]) -> Result<(), String> {
    let blobs = plan.segments.iter().map(|s| (s.gpa, s.bytes)).chain([(dtb, tree)]);
    for (gpa, bytes) in blobs {
        let at = GuestPhysAddr::try_new(gpa).map_err(|e| format!("load address: {e}"))?;
        // On failure the partial load's flush stays pending in the space.
        let f = space.load_image(at, bytes).map_err(|e| format!("loading {} bytes at {at:?}: {e}", bytes.len()))?;
        // The table is not loaded on any hart yet.
        space.flush_unloaded(f).expect("its own token");
    }
    Ok(())
}

fn new_space() -> Result<Space, String> {
    let mut space = Space::new(frames(), TableOptions::for_format::<Sv39x4>()).map_err(|e| format!("{e:?}"))?;
    let ram = GpaRange::from_start_len(GuestPhysAddr::new(GUEST_RAM), GUEST_RAM_LEN).ok_or("RAM range")?;
    let (_, f) = space.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero).map_err(|e| format!("{e}"))?;
    space.flush_unloaded(f).expect("its own token");
    let uart = GpaRange::from_start_len(GuestPhysAddr::new(UART_GPA), 0x1000).ok_or("UART range")?;
    let (_, f) = space.add_region("uart", uart, MappingFlags::RW, Backend::Mmio).map_err(|e| format!("{e}"))?;
    space.flush_unloaded(f).expect("its own token");
    Ok(space)
}

/// Checks, loads and runs the staged guest; returns its exit status, [`EXIT_REFUSED`] for a file
/// that fails the checks, or [`EXIT_GUEST_STOPPED`] for a guest the hypervisor had to stop.
pub fn run_staged(base: u64, len: u64) -> i32 {
    if len == 0 {
        return refuse(elf::LoadError::Empty);
    }
    if len > MAX_FILE {
        let (_, said) = header();
        return refuse(format_args!(
            "the staged size {said:#x} is larger than the {MAX_FILE:#x} bytes the staging area holds"
        ));
    }
    // SAFETY: reserved from the frame allocator at boot; QEMU wrote `len` bytes there (at most
    // MAX_FILE, checked above).
    let file = unsafe { core::slice::from_raw_parts(base as *const u8, len as usize) };
    let ram = GUEST_RAM..GUEST_RAM + GUEST_RAM_LEN;
    let plan = match elf::plan_elf_or_raw(file, Machine::Riscv64, ram.clone(), RAW_LOAD) {
        Ok(p) => p,
        Err(e) => return refuse(e),
    };
    let tree = fdt::guest_tree(
        GUEST_RAM,
        GUEST_RAM_LEN,
        crate::hart::hart().timebase,
        "rv64imafdc_zicsr_zifencei",
        Some(UART_GPA),
    );
    let dtb = match plan.place("device tree", ram, tree.len() as u64, &DTB_ALIGNS, Place::Highest) {
        Ok(at) => at,
        Err(e) => return refuse(e),
    };
    let mut space = match new_space() {
        Ok(s) => s,
        Err(e) => {
            println!("cannot build the guest's address space: {e}");
            return SETUP_FAILED;
        }
    };
    if let Err(e) = load(&mut space, &plan, dtb, &tree) {
        println!("cannot load the guest: {e}");
        return SETUP_FAILED;
    }
    let entry = plan.entry;
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
    println!(
        "guest: {len} bytes, {} segment(s), entry {entry:#x}, RAM {GUEST_RAM:#x}+{GUEST_RAM_LEN:#x}, dtb at {dtb:#x} \
         ({} bytes)",
        plan.segments.len(),
        tree.len()
    );
    // SAFETY: a fresh VS context: Bare vsatp, FS = Initial, no virtual interrupt pending.
    unsafe {
        hw::vsatp::write(0);
        hw::vsstatus::write(twostage_rvh::csr::sstatus::FS_INITIAL);
        hw::hvip::write(0);
    }
    hw::hfence_vvma_all();
    vm.regs.gpr[10] = 0;
    vm.regs.gpr[11] = dtb;
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
                break i32::from(EXIT_GUEST_STOPPED);
            }
            Exit::Exception(t) => {
                println!(
                    "\nguest stopped: {} (scause {}) at pc {:#x}, stval {:#x}",
                    cause::name(t.scause),
                    t.scause,
                    t.sepc,
                    t.stval
                );
                break i32::from(EXIT_GUEST_STOPPED);
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
