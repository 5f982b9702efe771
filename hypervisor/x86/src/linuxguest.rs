//! Running a Linux x86_64 kernel given as a GRUB module, on a `twostage-aspace` address space:
//! a bzImage through the 64-bit boot protocol (`twostage_baremetal::linux_x86`), or an ELF
//! `vmlinux` with a PVH entry note through its 32-bit PVH entry (`twostage_baremetal::pvh`).
//!
//! Device policy, one line per device:
//! - RAM: demand-zero regions behind the EPT: the machine's RAM entries of the first MiB, then
//!   1 MiB up to `mem`. The e820 map is the machine's own below 1 MiB and the guest's RAM above
//!   (`twostage_baremetal::linux_x86::firmware_e820`), with an ACPI data entry where the guest's
//!   tables are. Without a BIOS map from the boot loader: RAM from 0 to `mem`, the legacy hole
//!   0xA0000-0xFFFFF reserved, no ACPI tables.
//! - ACPI tables: the machine's, moved (`twostage_baremetal::acpi`): the BIOS's ACPI area is at the
//!   top of the machine's RAM, which is the hypervisor's, so it is copied into guest RAM at the
//!   same distance below `mem` (where the BIOS of a machine with `mem` of RAM puts it: the guest's
//!   map is the bare machine's), with the tree's pointers and the checksums rewritten. The page(s)
//!   holding the RSDP are a private read-only copy of the machine's with the RSDP rewritten (at the
//!   machine's address: a kernel scanning the BIOS area finds it where the bare one does); the RSDP
//!   is also named in `boot_params.acpi_rsdp_addr` or `hvm_start_info.rsdp_paddr`. Tables that fail
//!   a check give the guest none: the run says why, and the guest's copy of the RSDP's page has the
//!   RSDP wiped (it would point at the machine's tables).
//! - ACPI hardware (with the tables): the HPET's page from the HPET table, a linear device region
//!   like the APICs, and the FADT's port blocks (SMI_CMD, PM1 event and control, PM timer, GPE),
//!   passed through: the guest owns the machine's power management, so its ACPI soft-off powers
//!   the machine off (the project's init ends the run through port 0xF4 first).
//! - Firmware areas (what else the first MiB holds besides RAM: the EBDA, the VGA window, the
//!   option ROMs, the BIOS area): read-only linear regions onto the machine's own bytes (memory type
//!   UC), so the kernel's ROM probe and MP-table scan read what they read on the bare machine.
//! - I/O APIC: the page at 0xFEC00000 is a linear device region onto the machine's I/O APIC,
//!   like the local APIC: the guest owns the machine's interrupt routing (one guest per machine).
//! - Local APIC: the page at 0xFEE00000 is a linear region onto the processor's own APIC, mapped
//!   as device memory (EPT memory type UC, guest PAT ignored); reserved in e820. The guest owns
//!   the APIC (one guest per CPU); x2APIC is hidden in CPUID, APIC_BASE writes are checked.
//! - PIC (0x20-0x21, 0xA0-0xA1), PIT (0x40-0x43, 0x61), CMOS (0x70-0x71), the POST delay port
//!   0x80: passed through (I/O bitmap bits clear); their interrupts reach the guest directly
//!   (external-interrupt exiting is off). Confined to this image: only the Bochs machine has them.
//! - COM1 (0x3F8-0x3FF): passed through as well, not emulated (the one policy for this device), so
//!   Linux's 8250 driver probes the real 16550 (every register, its FIFO) and gets its IRQ 4 through
//!   the passed-through interrupt controllers; the hypervisor prints only before the guest starts
//!   and after it ends, reprogramming the UART first.
//! - Port 0xF4: exits; the byte written is the run's status (like QEMU's isa-debug-exit).
//! - Every other port exits: reads return all ones (no device), writes are dropped.

use crate::{println, serial};
use alloc::vec::Vec;
use twostage_aspace::{AddressSpace, Backend, FaultOutcome};
use twostage_baremetal::acpi::{self, AcpiError, Window};
use twostage_baremetal::elf::{EXIT_GUEST_STOPPED, EXIT_REFUSED};
use twostage_baremetal::frames::Frames;
use twostage_baremetal::linux_x86::{
    e820_map, firmware_areas, firmware_e820, plan_bzimage, without, E820Entry, LinuxPlan, E820_RAM, LOW_MEMORY_END,
};
use twostage_baremetal::pvh::{plan_pvh, PvhPlan};
use twostage_npt::{Ept4, GpaRange, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, MappingFlags, PageSize};
use twostage_vmx::hw::RealCpu;
use twostage_vmx::{GuestEntry, Handled, VcpuConfig, VmExit, VmxVcpu};

/// The local APIC's page (Intel SDM Vol. 3A 12.4.1: the default APIC base).
pub const APIC_PAGE: u64 = 0xfee0_0000;
/// The I/O APIC's page: the address the Bochs BIOS's MP table gives it (the usual PC address,
/// Intel 82093AA datasheet 3.0).
pub const IOAPIC_PAGE: u64 = 0xfec0_0000;
/// Ports passed through to the Bochs machine's devices (see the module docs).
pub const PASSED_PORTS: [core::ops::Range<u16>; 7] =
    [0x20..0x22, 0xa0..0xa2, 0x40..0x44, 0x61..0x62, 0x70..0x72, 0x80..0x81, serial::COM1..serial::COM1 + 8];

/// What the hypervisor starts: the kernel file, an optional initrd, the command line, the RAM.
pub struct LinuxGuest<'a> {
    /// The bzImage.
    pub image: &'a [u8],
    /// The initrd, if any.
    pub initrd: Option<&'a [u8]>,
    /// The kernel command line (without NUL).
    pub cmdline: &'a [u8],
    /// Guest RAM in bytes.
    pub mem: u64,
    /// The machine's memory map as the boot loader passed it on (empty: none).
    pub bios: &'a [E820Entry],
    /// The machine's first MiB from 0x400 on (the BDA's EBDA pointer, the EBDA, the BIOS area),
    /// where the RSDP is looked for; `None`: not readable.
    pub low: Option<Window<'a>>,
    /// The machine's ACPI area (`twostage_baremetal::acpi::machine_area` of `bios`), if any.
    pub acpi: Option<Window<'a>>,
    /// The user's CPUID choices (`cpu=` on the hypervisor's command line: the hypervisor bit).
    pub cpuid: twostage_vmx::cpuid::CpuidOptions,
}

/// How the kernel is started.
enum Plan<'a> {
    /// A bzImage through the 64-bit boot protocol.
    BzImage(LinuxPlan<'a>),
    /// An ELF kernel through its PVH entry.
    Pvh(PvhPlan<'a>),
}

/// Counters of one run.
#[derive(Default)]
struct Counts {
    exits: u64,
    /// EPT violations resolved in guest RAM (the demand-zero regions).
    ram_faults: u64,
    /// EPT violations resolved in device and firmware regions (linear: mapped when added, so
    /// only a stale translation faults there).
    device_faults: u64,
    msr_gp: u64,
    io: u64,
}

/// Checks, loads and runs the Linux guest; returns the status it wrote to port 0xf4,
/// [`EXIT_REFUSED`] for a file that fails the checks, or [`EXIT_GUEST_STOPPED`].
pub fn run(frames: &'static Frames, g: &LinuxGuest<'_>) -> u32 {
    let ram = 0..g.mem;
    let apic = APIC_PAGE..APIC_PAGE + 0x1000;
    // Without a BIOS map there are no firmware areas and no tables to give.
    let acpi = match g.low {
        Some(low) if !g.bios.is_empty() => acpi::for_guest(g.bios, g.mem, low, g.acpi),
        _ => acpi::ForGuest { rsdp_pages: None, tables: Err(AcpiError::NoArea) },
    };
    let (e820, n) = if g.bios.is_empty() {
        e820_map(core::slice::from_ref(&ram), core::slice::from_ref(&apic))
    } else {
        firmware_e820(g.bios, g.mem, acpi.tables.as_ref().ok().map(|t| t.area.clone()))
    };
    let e820 = &e820[..n];
    let initrd_len = g.initrd.map_or(0, |i| i.len() as u64);
    let mut plan = if is_linux(g.image) {
        match plan_bzimage(g.image, g.mem, e820, g.cmdline, initrd_len) {
            Ok(p) => Plan::BzImage(p),
            Err(e) => return crate::mbguest::refuse(e),
        }
    } else {
        match plan_pvh(g.image, g.mem, e820, g.cmdline, initrd_len) {
            Ok(p) => Plan::Pvh(p),
            Err(e) => return crate::mbguest::refuse(e),
        }
    };
    match &acpi.tables {
        Ok(t) => {
            let names: Vec<&str> = t.found.iter().map(|i| core::str::from_utf8(&i.signature).unwrap_or("?")).collect();
            println!(
                "twostage x86-hv: ACPI: the machine's tables moved to {:#x}-{:#x} ({}), RSDP at {:#x} in a private \
                 copy of its page",
                t.area.start,
                t.area.end - 1,
                names.join(" "),
                t.rsdp_at
            );
            match &mut plan {
                Plan::BzImage(p) => p.set_acpi_rsdp(t.rsdp_at),
                Plan::Pvh(p) => p.set_rsdp(t.rsdp_at),
            }
        }
        Err(e) if !g.bios.is_empty() => match &acpi.rsdp_pages {
            Some((pages, _)) => println!(
                "twostage x86-hv: no ACPI tables for the guest: {e} (the RSDP is wiped from its copy of page {:#x})",
                pages.start
            ),
            None => println!("twostage x86-hv: no ACPI tables for the guest: {e}"),
        },
        Err(_) => {}
    }
    // SAFETY: ring 0, interrupts off, and this is the only RealCpu the image creates.
    let cpu = unsafe { RealCpu::new() };
    let mut vcpu = match VmxVcpu::new(cpu, frames, VcpuConfig { cpuid: g.cpuid, ..VcpuConfig::default() }) {
        Ok(v) => v,
        Err(e) => {
            println!("VMXON failed: {e:?}");
            return 3;
        }
    };
    let opts = vcpu.ept_capabilities().table_options(true);
    let Ok(mut space) = AddressSpace::<Ept4, _>::new(frames, opts) else { return 3 };
    let device = MappingFlags::RW | MappingFlags::DEVICE;
    let linear = |at: u64| Backend::Linear { host: HostPhysAddr::new(at) };
    let mut regions: Vec<(&str, u64, u64, MappingFlags, Backend)> = Vec::new();
    if g.bios.is_empty() {
        regions.push(("ram", 0, g.mem, MappingFlags::RWX, Backend::DemandZero));
    } else {
        // The RAM of the first MiB (whole pages inside each entry), the firmware areas read-only
        // from the machine (whole pages around each), then the RAM above.
        for e in e820.iter().filter(|e| e.kind == E820_RAM && e.addr < LOW_MEMORY_END) {
            let start = e.addr.next_multiple_of(0x1000);
            let end = (e.addr + e.size).min(LOW_MEMORY_END) & !0xfff;
            if end > start {
                regions.push(("ram-low", start, end - start, MappingFlags::RWX, Backend::DemandZero));
            }
        }
        let mut areas = firmware_areas(e820);
        if let Some((pages, _)) = &acpi.rsdp_pages {
            // The RSDP's pages are the guest's own copy (loaded below), not the machine's.
            areas = without(&areas, pages.clone());
            regions.push(("acpi-rsdp", pages.start, pages.end - pages.start, MappingFlags::READ, Backend::DemandZero));
        }
        for a in areas {
            let flags = MappingFlags::READ | MappingFlags::DEVICE;
            regions.push(("firmware", a.start, a.end - a.start, flags, linear(a.start)));
        }
        regions.push(("ram", LOW_MEMORY_END, g.mem - LOW_MEMORY_END, MappingFlags::RWX, Backend::DemandZero));
    }
    // The ACPI hardware the guest's tables describe is the machine's: the HPET page and the FADT's
    // port blocks, passed through like the APICs and the PIT (one guest per machine).
    let hw = acpi.tables.as_ref().map(acpi::hardware).unwrap_or_default();
    match hw.hpet {
        Some(at) if at % 0x1000 == 0 && at >= g.mem && at < 1 << 32 && at != APIC_PAGE && at != IOAPIC_PAGE => {
            regions.push(("hpet", at, 0x1000, device, linear(at)));
        }
        Some(at) => println!("twostage x86-hv: the HPET table's registers at {at:#x} are not mapped (not a free page)"),
        None => {}
    }
    regions.push(("local-apic", APIC_PAGE, 0x1000, device, linear(APIC_PAGE)));
    regions.push(("io-apic", IOAPIC_PAGE, 0x1000, device, linear(IOAPIC_PAGE)));
    for (name, start, len, flags, backend) in regions {
        let Some(r) = GpaRange::from_start_len(GuestPhysAddr::new(start), len) else { return 3 };
        match space.add_region(name, r, flags, backend) {
            Ok((_, f)) => space.flush_unloaded(f).expect("its own token"),
            Err(e) => {
                println!("{name} region: {e:?}");
                return 3;
            }
        }
    }
    let mut cmdline = Vec::from(g.cmdline);
    cmdline.push(0);
    // The bzImage entry's GDT and identity tables, as bytes.
    let (gdt, tables): (Vec<u8>, Vec<u8>) = match &plan {
        Plan::BzImage(plan) => (
            plan.gdt.iter().flat_map(|d| d.to_le_bytes()).collect(),
            plan.tables.iter().flat_map(|t| t.iter().flat_map(|e| e.to_le_bytes())).collect(),
        ),
        Plan::Pvh(_) => (Vec::new(), Vec::new()),
    };
    let mut blobs: Vec<(u64, &[u8])> = Vec::new();
    let initrd_at = match &plan {
        Plan::BzImage(plan) => {
            blobs.extend([
                (plan.kernel_at, plan.kernel),
                (plan.boot_params_at, &plan.boot_params[..]),
                (plan.cmdline_at, &cmdline[..]),
                (plan.gdt_at, &gdt[..]),
                (plan.cr3, &tables[..]),
            ]);
            plan.initrd_at
        }
        Plan::Pvh(plan) => {
            blobs.extend(plan.load.segments.iter().map(|s| (s.gpa, s.bytes)));
            blobs.extend([(plan.start_info_at, &plan.start_info[..]), (plan.cmdline_at, &cmdline[..])]);
            plan.initrd_at
        }
    };
    if let (Some(at), Some(bytes)) = (initrd_at, g.initrd) {
        blobs.push((at, bytes));
    }
    if let Ok(t) = &acpi.tables {
        blobs.push((t.area.start, &t.tables[..]));
    }
    if let Some((pages, bytes)) = &acpi.rsdp_pages {
        blobs.push((pages.start, bytes));
    }
    for (gpa, bytes) in blobs {
        match space.load_image(GuestPhysAddr::new(gpa), bytes) {
            Ok(f) => space.flush_unloaded(f).expect("its own token"),
            Err(e) => {
                println!("loading {} bytes at {gpa:#x}: {e}", bytes.len());
                return 3;
            }
        }
    }
    let entry = match &plan {
        Plan::BzImage(plan) => GuestEntry::Linux64 {
            rip: GuestVirtAddr::new(plan.entry),
            cr3: GuestPhysAddr::new(plan.cr3),
            gdt: GuestPhysAddr::new(plan.gdt_at),
            gdt_limit: (gdt.len() - 1) as u16,
        },
        // 32-bit protected mode, paging off, flat segments, TR a 32-bit TSS of base 0 and
        // limit 0x67: the PVH entry state (`twostage_baremetal::pvh`).
        Plan::Pvh(plan) => GuestEntry::Protected32 { eip: plan.entry, esp: 0 },
    };
    if let Err(e) = vcpu.setup(space.table(), entry) {
        println!("VMCS setup: {e:?}");
        return 3;
    }
    for ports in PASSED_PORTS {
        vcpu.pass_through_io(ports);
    }
    // The port that ends the run keeps exiting.
    for ports in hw.ports.iter().filter(|p| !p.contains(&0xf4)) {
        vcpu.pass_through_io(ports.clone());
    }
    match &plan {
        Plan::BzImage(plan) => {
            vcpu.regs.rsi = plan.boot_params_at;
            println!(
                "twostage x86-hv: Linux boot protocol {}.{:02}, entering the 64-bit entry at {:#x} (RSI={:#x}), {} \
                 MiB RAM",
                plan.header.version >> 8,
                plan.header.version & 0xff,
                plan.entry,
                plan.boot_params_at,
                g.mem >> 20
            );
        }
        Plan::Pvh(plan) => {
            vcpu.regs.rbx = plan.start_info_at;
            println!(
                "twostage x86-hv: PVH entry at {:#x} (32-bit, paging off, EBX={:#x} hvm_start_info), {} segment(s), \
                 {} MiB RAM",
                plan.entry,
                plan.start_info_at,
                plan.load.segments.len(),
                g.mem >> 20
            );
        }
    }
    let mut n = Counts::default();
    let status = loop {
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) => {
                println!("VM entry failed: {e:?}");
                break None;
            }
        };
        n.exits += 1;
        let handled = match exit {
            VmExit::EptViolation(v) => match space.handle_fault(v.nested_page_fault_info()) {
                FaultOutcome::Resolved { flush } => {
                    let in_ram = space
                        .region_at(v.gpa)
                        .is_some_and(|r| matches!(r.backend(), Backend::DemandZero | Backend::CopyOnWrite));
                    if in_ram {
                        n.ram_faults += 1;
                    } else {
                        n.device_faults += 1;
                    }
                    space
                        .flush(flush, |inv| {
                            crate::hv::invept(&mut vcpu, inv);
                        })
                        .expect("its own token");
                    vcpu.reinject_interrupted_event().map(|_| Handled::Done).map_err(Into::into)
                }
                other => {
                    println!("guest fault at {:?} ({:?}): {other:?}", v.gpa, v.qualification);
                    break None;
                }
            },
            VmExit::Io(q) if !q.is_string() => {
                n.io += 1;
                if !q.is_in() && q.port() == 0xf4 {
                    break Some((vcpu.regs.rax & 0xff) as u32);
                }
                if q.is_in() {
                    vcpu.regs.rax = q.merge_in(vcpu.regs.rax, u64::MAX);
                }
                vcpu.advance_rip().map(|()| Handled::Done).map_err(Into::into)
            }
            VmExit::Cpuid => {
                let r = vcpu.guest_cpuid(vcpu.regs.rax as u32, vcpu.regs.rcx as u32);
                vcpu.regs.rax = u64::from(r.eax);
                vcpu.regs.rbx = u64::from(r.ebx);
                vcpu.regs.rcx = u64::from(r.ecx);
                vcpu.regs.rdx = u64::from(r.edx);
                vcpu.advance_rip().map(|()| Handled::Done).map_err(Into::into)
            }
            VmExit::Msr { write } => {
                let r = vcpu.handle_msr(write);
                if r == Ok(Handled::Injected(13)) {
                    n.msr_gp += 1;
                }
                r
            }
            VmExit::CrAccess(q) => vcpu.handle_cr_access(q),
            VmExit::Other { reason: twostage_vmx::exit::reason::XSETBV, .. } => vcpu.handle_xsetbv(),
            VmExit::Hlt => {
                // HLT with interrupts off never ends (a panicked kernel's last instruction).
                let rflags = vcpu.vmread(twostage_vmx::VmcsField::GUEST_RFLAGS).unwrap_or(0);
                if rflags & (1 << 9) == 0 {
                    println!("twostage x86-hv: Linux guest halted with interrupts off");
                    break None;
                }
                vcpu.handle_hlt()
            }
            other => {
                println!("twostage x86-hv: Linux guest stopped: {other:?}");
                break None;
            }
        };
        if let Err(e) = handled {
            println!("twostage x86-hv: Linux guest stopped: {e}");
            break None;
        }
    };
    // The guest drove COM1 itself: the hypervisor's console settings again (115200 8N1,
    // interrupts off) before it reports.
    serial::init();
    println!(
        "twostage x86-hv: {} exits, {} EPT faults resolved, {} port exits, {} MSR accesses refused (#GP)",
        n.exits,
        n.ram_faults + n.device_faults,
        n.io,
        n.msr_gp
    );
    // Issue 11: the guest RAM populated now (its leaves, by size) against the faults that
    // populated it; with 2 MiB backing a first touch maps a whole 2 MiB page.
    let (mut p4k, mut p2m, mut p1g) = (0u64, 0u64, 0u64);
    for r in space.regions().filter(|r| matches!(r.backend(), Backend::DemandZero | Backend::CopyOnWrite)) {
        space.table().for_each_leaf(r.range().start, r.range().len(), |l| match l.size {
            PageSize::Size4K => p4k += 1,
            PageSize::Size2M => p2m += 1,
            _ => p1g += 1,
        });
    }
    let mib = (p4k * 4096 + p2m * (2 << 20) + p1g * (1 << 30)) >> 20;
    let st = space.stats();
    println!("nested page faults: {} for {mib} MiB touched (MMIO exits apart: {})", n.ram_faults, n.device_faults);
    println!(
        "twostage x86-hv: guest RAM pages mapped: 4K={p4k} 2M={p2m} 1G={p1g}; 2 MiB pages mapped by first touch {}, \
         fallbacks to 4 KiB (no aligned run of frames) {}",
        st.huge_2m_mapped, st.huge_fallbacks
    );
    match status {
        Some(s) => {
            println!("guest-exit-status: {s}");
            s
        }
        None => u32::from(EXIT_GUEST_STOPPED),
    }
}

/// Whether a guest module is a Linux bzImage (rather than a multiboot ELF).
pub fn is_linux(image: &[u8]) -> bool {
    twostage_baremetal::linux_x86::is_bzimage(image)
}

/// Whether a guest module is an ELF kernel with a PVH entry note, which [`run`] starts through
/// it; a file whose notes are hostile is `Err` (refused, not taken for a multiboot file).
pub fn is_pvh(image: &[u8]) -> Result<bool, twostage_baremetal::pvh::PvhError> {
    twostage_baremetal::pvh::has_pvh_note(image)
}

/// A refused file's status, for callers that check before [`run`].
pub const REFUSED: u32 = EXIT_REFUSED as u32;
