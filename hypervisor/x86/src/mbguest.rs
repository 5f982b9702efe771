//! Running a multiboot (v1) guest given as a GRUB module, on a `twostage-aspace` address space.
//!
//! The module first goes through `twostage_baremetal::multiboot::plan_guest`: an ELF32 i386 or
//! ELF64 x86-64 executable (a file for another machine is refused), its segments inside the file
//! and, with their zero-fill, inside guest RAM, none overlapping, the entry point in a segment,
//! and a multiboot header with a good checksum and no flag this loader cannot honour. A refused
//! file ends the run with `EXIT_REFUSED` (126) and a `guest file refused:` line naming the
//! problem; nothing of it runs.
//!
//! The segments go into a demand-zero RAM region at their physical addresses; a multiboot
//! information structure with a memory map goes where no segment is; the guest starts in 32-bit
//! protected mode with paging off (unrestricted guest), EAX = 0x2BADB002, EBX = its GPA
//! (Multiboot Specification 0.6.96, 3.2). COM1 is forwarded; a write to port 0xf4 ends the run
//! with that status (like QEMU's isa-debug-exit). A guest the hypervisor has to stop (an
//! unresolved fault, an exit it cannot serve, a halt without a status) ends it with
//! `EXIT_GUEST_STOPPED` (125).

use crate::{println, serial};
use core::fmt::Display;
use twostage_aspace::{AddressSpace, Backend, FaultOutcome};
use twostage_baremetal::elf::{LoadError, EXIT_GUEST_STOPPED, EXIT_REFUSED};
use twostage_baremetal::frames::Frames;
use twostage_baremetal::multiboot::{guest_information, plan_guest, BOOTLOADER_MAGIC};
use twostage_npt::{Ept4, GpaRange, GuestPhysAddr, MappingFlags};
use twostage_vmx::caps::IA32_EFER;
use twostage_vmx::controls::CR0_PG;
use twostage_vmx::cpuid::CpuidOptions;
use twostage_vmx::emulate::efer_write;
use twostage_vmx::hw::RealCpu;
use twostage_vmx::{GuestEntry, VcpuConfig, VmExit, VmcsField, VmxVcpu};

/// Guest RAM when the hypervisor's command line names none (`mem=`).
pub const DEFAULT_RAM: u64 = 16 << 20;
/// Status when the guest halts without writing port 0xf4, faults, or makes an exit the
/// hypervisor cannot serve.
const STOPPED: u32 = EXIT_GUEST_STOPPED as u32;
/// Status when the hypervisor cannot set the guest up on this machine (VMX, memory).
const SETUP_FAILED: u32 = 3;

/// Reports a failed VMCS access that the guest's next entry depends on; the caller then stops
/// the guest, since resuming would run it in a state it never reached.
fn vmcs_failed(what: &str, e: impl core::fmt::Debug) {
    println!("twostage x86-hv: guest stopped: {what}: {e:?}");
}

/// Reports a refused guest file; the run's status.
pub fn refuse(why: impl Display) -> u32 {
    println!("guest file refused: {why}");
    u32::from(EXIT_REFUSED)
}

/// Checks, loads and runs the guest module GRUB loaded at physical `start..end` with `ram_size`
/// bytes of RAM from address 0 (at most 4 GiB: the guest starts in 32-bit mode) and `cpuid` for
/// its CPUID (the hypervisor bit); returns the
/// status it wrote to port 0xf4, [`EXIT_REFUSED`] for a file that fails the checks, or
/// [`EXIT_GUEST_STOPPED`].
///
/// # Safety
///
/// `start..end` is the module as the boot loader reported it: when `end > start` and `start` is
/// not 0, the bytes lie inside the identity map, outside the frames `frames` manages, and
/// nothing writes them during the call.
pub unsafe fn run(frames: &'static Frames, start: u64, end: u64, ram_size: u64, cpuid: CpuidOptions) -> u32 {
    println!("twostage x86-hv: multiboot guest module at {start:#x}..{end:#x}");
    if end <= start || start == 0 {
        // GRUB's entry for an empty file: there is nothing to make a slice of.
        return refuse(LoadError::Empty);
    }
    // SAFETY: the caller's contract: GRUB loaded the module at these physical addresses
    // (non-null, `end > start`), inside the identity map and outside the frames the allocator
    // manages; nothing writes it while this slice lives.
    let image = unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
    let ram_size = ram_size.min(1 << 32);
    let plan = match plan_guest(image, ram_size) {
        Ok(p) => p,
        Err(e) => return refuse(e),
    };
    let Ok(entry) = u32::try_from(plan.load.entry) else {
        // plan_guest keeps every segment below the RAM's end (at most 4 GiB).
        return refuse(LoadError::EntryOutsideSegments { entry: plan.load.entry });
    };
    // SAFETY: ring 0, interrupts off, and this is the only RealCpu the image creates.
    let cpu = unsafe { RealCpu::new() };
    let mut vcpu = match VmxVcpu::new(cpu, frames, VcpuConfig { cpuid, ..VcpuConfig::default() }) {
        Ok(v) => v,
        Err(e) => {
            println!("VMXON failed: {e:?}");
            return SETUP_FAILED;
        }
    };
    let opts = vcpu.ept_capabilities().table_options(true);
    let mut space = match AddressSpace::<Ept4, _>::new(frames, opts) {
        Ok(s) => s,
        Err(e) => {
            println!("address space: {e:?}");
            return SETUP_FAILED;
        }
    };
    let Some(ram) = GpaRange::from_start_len(GuestPhysAddr::new(0), ram_size) else { return SETUP_FAILED };
    match space.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero) {
        Ok((_, f)) => space.flush_unloaded(f).expect("its own token"),
        Err(e) => {
            println!("ram region: {e:?}");
            return SETUP_FAILED;
        }
    }
    // The segments' bytes (the RAM's demand-zero gives the zero-fill), then the boot information
    // where no segment is.
    let info = guest_information(plan.info_at, ram_size);
    let info_at = u64::from(plan.info_at);
    let blobs = plan.load.segments.iter().map(|s| (s.gpa, s.bytes)).chain([(info_at, &info[..])]);
    for (gpa, bytes) in blobs {
        match space.load_image(GuestPhysAddr::new(gpa), bytes) {
            Ok(f) => space.flush_unloaded(f).expect("its own token"),
            Err(e) => {
                // The partial load's flush stays pending in the space.
                println!("loading {} bytes at {gpa:#x}: {e}", bytes.len());
                return SETUP_FAILED;
            }
        }
    }
    if let Err(e) = vcpu.setup(space.table(), GuestEntry::Protected32 { eip: entry, esp: 0 }) {
        println!("VMCS setup: {e:?}");
        return SETUP_FAILED;
    }
    vcpu.regs.rax = u64::from(BOOTLOADER_MAGIC);
    vcpu.regs.rbx = info_at;
    println!(
        "twostage x86-hv: entering guest at {entry:#x} (EAX=0x2badb002, EBX={info_at:#x}), {} segment(s)",
        plan.load.segments.len()
    );
    let mut faults = 0u64;
    // The status the guest wrote, or None when the hypervisor stopped it.
    let status = loop {
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) => {
                println!("VM entry failed: {e:?}");
                break None;
            }
        };
        match exit {
            VmExit::EptViolation(v) => match space.handle_fault(v.nested_page_fault_info()) {
                FaultOutcome::Resolved { flush } => {
                    faults += 1;
                    space
                        .flush(flush, |inv| {
                            crate::hv::invept(&mut vcpu, inv);
                        })
                        .expect("its own token");
                    // A fault taken while delivering an event: deliver it again.
                    if let Err(e) = vcpu.reinject_interrupted_event() {
                        vmcs_failed("the interrupted event not re-injected", e);
                        break None;
                    }
                }
                other => {
                    println!("guest fault at {:?} ({:?}): {other:?}", v.gpa, v.qualification);
                    break None;
                }
            },
            VmExit::Io(q) if !q.is_string() => {
                let port = q.port();
                let value = vcpu.regs.rax
                    & match q.size() {
                        1 => 0xff,
                        2 => 0xffff,
                        _ => 0xffff_ffff,
                    };
                if !q.is_in() && port == 0xf4 {
                    break Some(value as u32);
                }
                if let Err(e) = vcpu.advance_rip() {
                    vmcs_failed("RIP not advanced past the I/O instruction", e);
                    break None;
                }
                let com1 = (serial::COM1..serial::COM1 + 8).contains(&port);
                if q.is_in() {
                    // COM1 answers a byte; the rest of an IN, and other ports, read as all ones.
                    let v = if com1 { 0xffff_ff00 | u64::from(serial::inb(port)) } else { u64::MAX };
                    vcpu.regs.rax = q.merge_in(vcpu.regs.rax, v);
                } else if port == serial::COM1 {
                    serial::putb(value as u8);
                }
            }
            VmExit::Cpuid => {
                // The host's answer, filtered for the guest (twostage_vmx::cpuid::filter).
                let r = vcpu.guest_cpuid(vcpu.regs.rax as u32, vcpu.regs.rcx as u32);
                vcpu.regs.rax = u64::from(r.eax);
                vcpu.regs.rbx = u64::from(r.ebx);
                vcpu.regs.rcx = u64::from(r.ecx);
                vcpu.regs.rdx = u64::from(r.edx);
                if let Err(e) = vcpu.advance_rip() {
                    vmcs_failed("RIP not advanced past CPUID", e);
                    break None;
                }
            }
            VmExit::Msr { write } => {
                // IA32_EFER lives in the VMCS; other MSRs read as 0 and ignore writes. A value
                // the CPU would refuse is #GP here too, so it never reaches the VMCS (where it
                // would fail the next entry).
                let efer = vcpu.regs.rcx as u32 == IA32_EFER;
                if write && efer {
                    let v = (vcpu.regs.rdx << 32) | (vcpu.regs.rax & 0xffff_ffff);
                    let cur_and_cr0 = vcpu
                        .vmread(VmcsField::GUEST_IA32_EFER)
                        .and_then(|cur| Ok((cur, vcpu.vmread(VmcsField::GUEST_CR0)?)));
                    let (cur, cr0) = match cur_and_cr0 {
                        Ok(r) => r,
                        Err(e) => {
                            vmcs_failed("the guest's EFER or CR0 not read for WRMSR", e);
                            break None;
                        }
                    };
                    match efer_write(cur, v, cr0 & CR0_PG != 0) {
                        Ok(v) => {
                            if let Err(e) = vcpu.vmwrite(VmcsField::GUEST_IA32_EFER, v) {
                                vmcs_failed("the guest's EFER not written", e);
                                break None;
                            }
                        }
                        Err(_) => {
                            // #GP(0), without advancing RIP (Intel SDM Vol. 2B "WRMSR").
                            if let Err(e) = vcpu.inject_exception(13, Some(0)) {
                                vmcs_failed("#GP not injected for a refused EFER value", e);
                                break None;
                            }
                            continue;
                        }
                    }
                } else if !write {
                    let v = if efer { vcpu.vmread(VmcsField::GUEST_IA32_EFER).unwrap_or(0) } else { 0 };
                    vcpu.regs.rax = v & 0xffff_ffff;
                    vcpu.regs.rdx = v >> 32;
                }
                if let Err(e) = vcpu.advance_rip() {
                    vmcs_failed("RIP not advanced past RDMSR/WRMSR", e);
                    break None;
                }
            }
            VmExit::Vmcall => {
                vcpu.regs.rax = u64::MAX;
                if let Err(e) = vcpu.advance_rip() {
                    vmcs_failed("RIP not advanced past VMCALL", e);
                    break None;
                }
            }
            VmExit::Hlt => {
                println!("twostage x86-hv: guest halted without writing port 0xf4");
                break None;
            }
            other => {
                println!("twostage x86-hv: guest stopped: {other:?}");
                break None;
            }
        }
    };
    match status {
        Some(status) => {
            println!(
                "twostage x86-hv: guest wrote {status:#x} to port 0xf4; {faults} EPT faults resolved by the address \
                 space"
            );
            println!("guest-exit-status: {status}");
            status
        }
        None => {
            println!("twostage x86-hv: guest stopped by the hypervisor after {faults} EPT faults resolved");
            STOPPED
        }
    }
}
