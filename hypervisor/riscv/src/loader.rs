//! Running a guest that twostage did not build: a file QEMU's loader device staged in host RAM.
//!
//! xtask passes `-device loader,file=GUEST,addr=0x88000000,force-raw=on`, the staging header
//! page at 0x87fff000 (magic, the file's size, guest RAM, initrd size, vCPUs, kernel command
//! line: [`crate::boot::Header`]) and an optional initrd at 0x8a000000. The file is an ELF
//! (PT_LOAD segments at their physical addresses), a Linux Image (at RAM + text_offset) or another
//! raw binary for 0x80200000 ([`crate::boot::plan`]); it gets an address space (twostage-aspace)
//! with the asked-for demand-zero RAM at GPA 0x80000000 (128 MiB by default) and MMIO regions
//! for the emulated UART and PLIC, a device tree ([`crate::boot::guest_tree`]), and the SBI; SRST ends
//! the run with the guest's status. The staging header may ask for a fork of the running guest
//! ([`crate::vmfork`], here) or its live migration into a new address space
//! ([`crate::smp::live`], on the SMP machine).
//!
//! Before anything is loaded the file goes through `twostage_baremetal::elf`'s checks (machine,
//! segments inside the file and inside guest RAM with their zero-fill, no overlaps, an entry
//! point in a segment, ...) and the device tree is placed at the top of RAM where no segment is.
//! A file that fails, and an empty or oversized staging, end the run with `EXIT_REFUSED` (126)
//! and a `guest file refused:` line naming the problem; a guest the hypervisor has to stop ends
//! it with `EXIT_GUEST_STOPPED` (125).

use crate::boot::{self, Header, LiveOp, GUEST_RAM, INITRD_STAGE, MAX_FILE, STAGE_HEADER};
use crate::hart::frames;
use crate::vm::{Exit, Space, Vm, UART_GPA};
use alloc::format;
use alloc::string::String;
use core::fmt::Display;
use twostage_aspace::Backend;
use twostage_baremetal::elf::{self, LoadPlan, EXIT_GUEST_STOPPED, EXIT_REFUSED};
use twostage_npt::{GpaRange, GuestPhysAddr, MappingFlags, Sv39x4, TableOptions};
use twostage_rvh::csr::cause;
use twostage_rvh::hw;

pub use crate::boot::{STAGE_ADDR, STAGE_MAGIC};

/// Status when the hypervisor cannot build the guest's address space or load it.
const SETUP_FAILED: i32 = 3;

/// The staging header page.
fn header_page() -> &'static [u8] {
    // SAFETY: the header page is inside RAM on every virt machine with at least 128 MiB; it
    // holds zeros (or OpenSBI never touches it) unless the loader device wrote it; it is
    // reserved from the frame allocator whenever it holds the magic.
    unsafe { core::slice::from_raw_parts(STAGE_HEADER as *const u8, 4096) }
}

/// The staging header: (magic, size).
fn header() -> (u64, u64) {
    let p = header_page();
    let word = |i: usize| u64::from_le_bytes(p[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    (word(0), word(1))
}

/// The staged file (base, length) when the header says one was staged, even an empty or an
/// oversized one (which [`run_staged`] refuses rather than run the suite instead): a length
/// over the limit comes back as the limit plus one, so that reserving it stays inside RAM.
pub fn staged() -> Option<(u64, u64)> {
    let (magic, len) = header();
    (magic == STAGE_MAGIC).then_some((STAGE_ADDR, len.min(MAX_FILE + 1)))
}

/// The staged initrd (base, length), when a valid header names one, for the frame allocator to
/// reserve.
pub fn staged_initrd() -> Option<(u64, u64)> {
    let h = Header::parse(header_page())?.ok()?;
    (h.initrd_len > 0).then_some((INITRD_STAGE, h.initrd_len))
}

/// Reports a refused guest file; the run's status.
fn refuse(why: impl Display) -> i32 {
    println!("guest file refused: {why}");
    i32::from(EXIT_REFUSED)
}

/// Copies the plan's segments (the kernel's, the initrd) into the space (the zero-fill is the
/// RAM's demand-zero) and the device tree to `dtb`.
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

fn new_space(mem: u64) -> Result<Space, String> {
    let mut space = Space::new(frames(), TableOptions::for_format::<Sv39x4>()).map_err(|e| format!("{e:?}"))?;
    let ram = GpaRange::from_start_len(GuestPhysAddr::new(GUEST_RAM), mem).ok_or("RAM range")?;
    let (_, f) = space.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero).map_err(|e| format!("{e}"))?;
    space.flush_unloaded(f).expect("its own token");
    let uart = GpaRange::from_start_len(GuestPhysAddr::new(UART_GPA), 0x1000).ok_or("UART range")?;
    let (_, f) = space.add_region("uart", uart, MappingFlags::RW, Backend::Mmio).map_err(|e| format!("{e}"))?;
    space.flush_unloaded(f).expect("its own token");
    let plic = GpaRange::from_start_len(GuestPhysAddr::new(boot::PLIC_GPA), boot::PLIC_LEN).ok_or("PLIC range")?;
    let (_, f) = space.add_region("plic", plic, MappingFlags::RW, Backend::Mmio).map_err(|e| format!("{e}"))?;
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
    let h = match Header::parse(header_page()) {
        Some(Ok(h)) => h,
        Some(Err(e)) => return refuse(e),
        None => return refuse("no staging header"),
    };
    // SAFETY: reserved from the frame allocator at boot; QEMU wrote `len` bytes there (at most
    // MAX_FILE, checked above).
    let file = unsafe { core::slice::from_raw_parts(base as *const u8, len as usize) };
    // SAFETY: reserved at boot (`staged_initrd`); the header's size is at most MAX_INITRD.
    let initrd = unsafe { core::slice::from_raw_parts(INITRD_STAGE as *const u8, h.initrd_len as usize) };
    let (plan, initrd_at) = match boot::plan(file, h.mem, Some(initrd)) {
        Ok(p) => p,
        Err(e) => return refuse(e),
    };
    let tree = boot::guest_tree(&boot::TreeSpec {
        mem: h.mem,
        timebase: crate::hart::hart().timebase,
        // Sstc only if every hart that will run a vCPU has it.
        isa: boot::guest_isa(if h.vcpus > 1 {
            crate::smp::probe_sstc(h.vcpus as usize, crate::hart::boot_hart())
        } else {
            crate::devices::sstc()
        }),
        vcpus: h.vcpus as u32,
        bootargs: &h.bootargs,
        initrd: initrd_at.map(|at| at..at + h.initrd_len),
        plic: true,
        room: crate::hart::hart().dtb_len,
    });
    let dtb = match boot::place_dtb(&plan, h.mem, tree.len() as u64) {
        Ok(at) => at,
        Err(e) => return refuse(e),
    };
    let mut space = match new_space(h.mem) {
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
    // A Linux kernel runs on the SMP machine even with one vCPU: it then finds the SBI's HSM, IPI
    // and RFENCE extensions as on bare QEMU. A migration always runs there (`smp::live`); a fork
    // runs on the single-hart path (one vCPU only, `crate::vmfork`).
    let fork = matches!(h.live, LiveOp::Fork { .. });
    let migrate = matches!(h.live, LiveOp::Migrate { .. });
    if h.vcpus > 1 || migrate || (boot::linux_image(file).is_some() && !fork) {
        println!(
            "guest: {len} bytes, entry {entry:#x}, RAM {GUEST_RAM:#x}+{:#x}, dtb at {dtb:#x}, {} vCPUs",
            h.mem, h.vcpus
        );
        return crate::smp::run(space, h.vcpus as usize, crate::hart::boot_hart(), entry, dtb, h.live);
    }
    let mut vm = Vm::with_space(space, 1);
    vm.uart.input = true;
    // The guest's own exceptions go straight to it (hedeleg); the rest are reflected.
    vm.hedeleg = twostage_rvh::reflect::HEDELEG;
    vm.reflect_exceptions = true;
    println!(
        "guest: {len} bytes, {} segment(s), entry {entry:#x}, RAM {GUEST_RAM:#x}+{:#x}, dtb at {dtb:#x} ({} bytes)",
        plan.segments.len(),
        h.mem,
        tree.len()
    );
    if let Some(at) = initrd_at {
        println!("initrd: {} bytes at {at:#x}", h.initrd_len);
    }
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
    match h.live {
        LiveOp::None => {
            let status = match drive(&mut vm, "") {
                Ended::Status(s) => s,
                Ended::Paused => unreachable!("no pause point in a plain run"),
            };
            vm.print_stats("guest file");
            status
        }
        LiveOp::Fork { after } => crate::vmfork::run(vm, after.min(u64::from(u32::MAX)) as u32),
        LiveOp::Migrate { .. } => unreachable!("a migration runs on the SMP machine (above)"),
    }
}

/// How [`drive`] gave control back.
pub(crate) enum Ended {
    /// The guest ended (SRST) or was stopped: the run's status.
    Status(i32),
    /// The VM's pause point ([`Vm::pause_at_user_exit`]) was reached; `paused` is cleared.
    Paused,
}

/// Runs `vm` until the guest ends or the VM pauses; `who` starts the lines that report how the
/// guest ended.
pub(crate) fn drive(vm: &mut Vm, who: &str) -> Ended {
    loop {
        let exit = vm.run();
        if matches!(exit, Exit::Reset(_) | Exit::Fault(..) | Exit::Exception(_)) {
            crate::notes::flush();
        }
        match exit {
            Exit::Reset(r) => {
                println!(
                    "\n{who}guest reset: type {} reason {:#x} -> exit status {}",
                    r.reset_type,
                    r.reason,
                    r.exit_status()
                );
                return Ended::Status(i32::from(r.exit_status()));
            }
            Exit::Budget if vm.paused => {
                vm.paused = false;
                return Ended::Paused;
            }
            Exit::Test { .. } | Exit::Budget => continue,
            Exit::Fault(f, t) => {
                println!("\n{who}guest stopped: unresolved guest-page fault {:?} at pc {:#x}", f.info, t.sepc);
                return Ended::Status(i32::from(EXIT_GUEST_STOPPED));
            }
            Exit::Exception(t) => {
                println!(
                    "\n{who}guest stopped: {} (scause {}) at pc {:#x}, stval {:#x}",
                    cause::name(t.scause),
                    t.scause,
                    t.sepc,
                    t.stval
                );
                return Ended::Status(i32::from(EXIT_GUEST_STOPPED));
            }
        }
    }
}
