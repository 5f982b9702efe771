//! twostage's x86 hypervisor image: booted by GRUB (multiboot v1) in Bochs, it runs guests under
//! VMX with EPT tables built by `twostage-npt`, through the glue in `twostage-vmx`.
//!
//! The image is wiring only: [`boot`] (multiboot header, long-mode entry), [`multiboot`] (the
//! information GRUB passed: memory map, command line, modules), the host frames and heap
//! (`twostage-baremetal`), the panic handler, and the choice of what to run: the guest module
//! GRUB loaded (`twostage_hv_x86::mbguest`) or, without one, the scenario suite
//! (`twostage_scenarios_x86::run`). The hypervisor itself (vCPU, EPT, exit handling, COM1
//! console, host descriptor tables) is `twostage-hv-x86`.
//!
//! Safety model: the image is single-core with interrupts off; physical memory is reached only
//! through the identity map set up at boot; the only instruction wrappers are in `twostage-vmx`
//! (`RealCpu`) and `twostage-hv-x86`, each with its SAFETY note.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod multiboot;

#[cfg(target_os = "none")]
use twostage_hv_x86::{cpu, linuxguest, mbguest, println, serial};

#[cfg(target_os = "none")]
static FRAMES: twostage_baremetal::frames::Frames = twostage_baremetal::frames::Frames::empty();

// The hypervisor's heap: 4 MiB for the engine's bookkeeping (twostage-baremetal's talc heap).
#[cfg(target_os = "none")]
twostage_baremetal::global_heap!(HEAP, 4 << 20);

#[cfg(target_os = "none")]
extern "C" {
    static __image_end: u8;
}

#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn kmain(magic: u32, info: u32) -> ! {
    serial::init();
    println!("twostage x86-hv: booted by multiboot (magic {magic:#x}, info at {info:#x})");
    let Some(boot) = multiboot::BootInfo::new(magic, info) else {
        println!("not started by a multiboot loader");
        serial::exit(2)
    };
    // Read before any frame is handed out: GRUB's structures may lie in the RAM the frames
    // come from. The heap is a static arena, not frames.
    // The hypervisor's command line (xtask's GRUB configuration): `guest=FILE [initrd=FILE]
    // [mem=BYTES] [cpu=PROPERTIES] [-- GUEST COMMAND LINE]`; everything after ` -- ` is the Linux
    // guest's. PROPERTIES are the guest CPUID's, QEMU-style (`hypervisor=off`).
    let line = boot.cmdline().map(alloc::vec::Vec::from).unwrap_or_default();
    let (own, guest_cmdline) = match line.windows(4).position(|w| w == b" -- ") {
        Some(i) => (&line[..i], &line[i + 4..]),
        None => (&line[..], &b""[..]),
    };
    let arg = |k| twostage_baremetal::multiboot::cmdline_arg(own, k);
    let asked = arg("guest").map(|g| alloc::string::String::from_utf8_lossy(g).into_owned());
    let wants_initrd = arg("initrd").is_some();
    // Guest RAM: `mem=BYTES`, else 128 MiB for a Linux guest and 16 MiB for a multiboot one.
    let mem_arg = arg("mem").and_then(|m| core::str::from_utf8(m).ok()?.parse::<u64>().ok());
    let mem = mem_arg.unwrap_or(128 << 20);
    let guest_cmdline = alloc::vec::Vec::from(guest_cmdline);
    let cpuid = match twostage_hv_x86::CpuidOptions::parse(arg("cpu").unwrap_or_default()) {
        Ok(o) => o,
        Err(e) => {
            println!("twostage x86-hv: cpu= on the command line: {e}");
            serial::exit(2)
        }
    };
    if !cpuid.hypervisor {
        println!("twostage x86-hv: CPUID.1:ECX bit 31 (hypervisor present) clear for the guest (cpu=hypervisor=off)");
    }
    // The machine's memory map, for a Linux guest's e820 (its firmware areas).
    let bios: alloc::vec::Vec<_> = boot
        .memory_map()
        .map(|r| twostage_baremetal::linux_x86::E820Entry { addr: r.base, size: r.len, kind: r.kind })
        .collect();
    let mut modules = boot.modules();
    let first_module = modules.next();
    let more_modules = modules.count();
    let image_end = &raw const __image_end as u64;
    let modules_end = boot.modules().map(|m| m.end).max().unwrap_or(0);
    let low = image_end.max(modules_end).max(0x20_0000);
    // Frames start on a frame boundary: a module (and so `low`) may end anywhere.
    let page = twostage_npt::FRAME_SIZE as u64;
    let best = boot
        .memory_map()
        .map(|r| (r.kind, r.base.max(low).next_multiple_of(page), r.base + r.len))
        .filter(|&(kind, start, end)| kind == 1 && end > start)
        .map(|(_, start, end)| (start, end))
        .max_by_key(|(s, e)| e - s);
    let Some((start, end)) = best else {
        println!("no usable RAM in the multiboot memory map");
        serial::exit(2)
    };
    let frames = (end.saturating_sub(start) / twostage_npt::FRAME_SIZE as u64) as usize;
    let frames = frames.min(twostage_baremetal::frames::MAX_FRAMES);
    // SAFETY: RAM from the multiboot memory map above the image and the modules, identity-mapped
    // at boot, used by nothing else.
    if let Err(e) = unsafe { FRAMES.init(twostage_npt::HostPhysAddr::new(start), start as usize, frames) } {
        println!("host frames: {e}");
        serial::exit(2)
    }
    let s = FRAMES.stats();
    println!("host frames: {} from {:#x} (multiboot memory map, image and modules left out)", s.frames, s.base);
    cpu::init();
    // A guest asked for on the command line (`guest=FILE`, as xtask's GRUB configuration says)
    // but not passed as a module was not loaded by GRUB: refuse, rather than run the suite.
    let module = |m: &multiboot::Module| {
        // SAFETY: GRUB loaded the module at `m.start..m.end`, below 4 GiB inside the boot identity
        // map and outside the frames (which start above every module); nothing writes it.
        unsafe { core::slice::from_raw_parts(m.start as *const u8, (m.end - m.start) as usize) }
    };
    // An ELF file with a PVH entry note is a Linux guest too; one whose notes are hostile is refused.
    let pvh = first_module.filter(|m| m.end > m.start && m.start != 0).map(|m| linuxguest::is_pvh(module(&m)));
    let status = match (first_module, asked) {
        _ if let Some(Err(e)) = pvh => mbguest::refuse(e),
        (Some(m), _)
            if m.end > m.start && m.start != 0 && (linuxguest::is_linux(module(&m)) || pvh == Some(Ok(true))) =>
        {
            let initrd = boot.modules().nth(1);
            if more_modules > usize::from(wants_initrd) || wants_initrd != initrd.is_some() {
                mbguest::refuse(format_args!(
                    "GRUB passed {} modules for a Linux guest {} an initrd",
                    more_modules + 1,
                    if wants_initrd { "with" } else { "without" }
                ))
            } else {
                use twostage_baremetal::acpi::{machine_area, Window};
                // The machine's firmware memory, for the guest's ACPI tables: the first MiB from
                // the BDA's EBDA pointer on, and the BIOS's ACPI area.
                // SAFETY: the first MiB and the ACPI area (a type-3 entry of the BIOS map, below
                // 4 GiB) are inside the boot identity map and outside the frames (which come from
                // one RAM entry above the image); the firmware's bytes are only read.
                let low = unsafe { core::slice::from_raw_parts(0x400 as *const u8, 0x10_0000 - 0x400) };
                let area = machine_area(&bios).ok().map(|r| Window {
                    base: r.start,
                    // SAFETY: as above.
                    bytes: unsafe { core::slice::from_raw_parts(r.start as *const u8, (r.end - r.start) as usize) },
                });
                let guest = linuxguest::LinuxGuest {
                    image: module(&m),
                    initrd: initrd.as_ref().map(module),
                    cmdline: &guest_cmdline,
                    mem,
                    bios: &bios,
                    low: Some(Window { base: 0x400, bytes: low }),
                    acpi: area,
                    cpuid,
                };
                linuxguest::run(&FRAMES, &guest)
            }
        }
        (Some(_), _) if more_modules > 0 => mbguest::refuse(format_args!(
            "GRUB passed {} modules; the hypervisor runs one guest, the only module",
            more_modules + 1
        )),
        // SAFETY: GRUB loaded the module at `m.start..m.end`, below 4 GiB inside the boot identity
        // map and outside the frames (which start above every module); nothing writes it.
        (Some(m), _) => unsafe {
            mbguest::run(&FRAMES, m.start, m.end, mem_arg.unwrap_or(mbguest::DEFAULT_RAM), cpuid)
        },
        (None, Some(name)) => mbguest::refuse(format_args!(
            "GRUB was asked to load {name} as the guest (guest={name} on the kernel command line) but passed no \
             module: it could not load the file (GRUB drops a file larger than the machine's free memory)"
        )),
        (None, None) => twostage_scenarios_x86::run(&FRAMES, heap_in_use),
    };
    serial::exit(status)
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

/// Bytes in live heap allocations, for the run summary.
#[cfg(target_os = "none")]
pub fn heap_in_use() -> usize {
    twostage_baremetal::heap::stats(&HEAP).in_use
}
