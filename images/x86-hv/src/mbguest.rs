//! Running a multiboot (v1) guest given as a GRUB module, on a `twostage-aspace` address space.
//!
//! The ELF's loadable segments go into a demand-zero RAM region at their physical addresses; a
//! multiboot information structure with a memory map is built in guest memory; the guest starts
//! in 32-bit protected mode with paging off (unrestricted guest), EAX = 0x2BADB002, EBX = its
//! GPA (Multiboot Specification 0.6.96, 3.2). COM1 is forwarded; a write to port 0xf4 ends the
//! run with that status (like QEMU's isa-debug-exit).

use crate::frames::Frames;
use crate::multiboot::Module;
use crate::{println, serial};
use twostage_aspace::{AddressSpace, Backend, FaultOutcome};
use twostage_npt::{Ept4, GpaRange, GuestPhysAddr, MappingFlags};
use twostage_vmx::caps::IA32_EFER;
use twostage_vmx::controls::CR0_PG;
use twostage_vmx::emulate::efer_write;
use twostage_vmx::hw::{RealCpu, VmxHardware};
use twostage_vmx::{GuestEntry, VcpuConfig, VmExit, VmcsField, VmxVcpu};

/// Guest RAM size.
const RAM: u64 = 16 << 20;
/// Where the multiboot information goes.
const INFO: u64 = 0x9000;
/// Where the memory map goes.
const MMAP: u64 = 0x9100;
/// Status when the guest halts without writing port 0xf4.
const HALTED: u32 = 125;
/// Status when the guest cannot be loaded or run.
const FAILED: u32 = 126;

/// Why the module is not a loadable ELF. Every case names the offending value.
#[derive(Debug)]
#[allow(dead_code, reason = "the payloads are read through Debug in the error report")]
enum ElfError {
    /// Not `\x7fELF`, or not little-endian x86 / x86-64.
    NotElf,
    /// The program header table or a segment lies outside the file.
    OutOfFile(u64),
    /// A segment does not fit guest RAM.
    OutsideRam { paddr: u64, memsz: u64 },
    /// No entry point below 4 GiB (multiboot enters in 32-bit mode).
    Entry(u64),
}

struct Segment<'a> {
    paddr: u64,
    bytes: &'a [u8],
}

fn rd(b: &[u8], off: u64, n: usize) -> Result<u64, ElfError> {
    let o = usize::try_from(off).map_err(|_| ElfError::OutOfFile(off))?;
    let s = b.get(o..o.checked_add(n).ok_or(ElfError::OutOfFile(off))?).ok_or(ElfError::OutOfFile(off))?;
    Ok(s.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

/// Parses an ELF32 or ELF64 image; `f` receives each PT_LOAD segment. Returns the entry point.
fn parse_elf<'a>(b: &'a [u8], mut f: impl FnMut(Segment<'a>) -> Result<(), ElfError>) -> Result<u64, ElfError> {
    if b.len() < 52 || b[..4] != *b"\x7fELF" || b[5] != 1 {
        return Err(ElfError::NotElf);
    }
    let is64 = match b[4] {
        1 => false,
        2 => true,
        _ => return Err(ElfError::NotElf),
    };
    let w = if is64 { 8 } else { 4 };
    let entry = rd(b, 24, w)?;
    let phoff = rd(b, if is64 { 32 } else { 28 }, w)?;
    let phentsize = rd(b, if is64 { 54 } else { 42 }, 2)?;
    let phnum = rd(b, if is64 { 56 } else { 44 }, 2)?;
    for i in 0..phnum {
        let ph = phoff.checked_add(i * phentsize).ok_or(ElfError::OutOfFile(phoff))?;
        if rd(b, ph, 4)? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, paddr, filesz, memsz) = if is64 {
            (rd(b, ph + 8, 8)?, rd(b, ph + 24, 8)?, rd(b, ph + 32, 8)?, rd(b, ph + 40, 8)?)
        } else {
            (rd(b, ph + 4, 4)?, rd(b, ph + 12, 4)?, rd(b, ph + 16, 4)?, rd(b, ph + 20, 4)?)
        };
        if paddr.checked_add(memsz).is_none_or(|end| end > RAM) || filesz > memsz {
            return Err(ElfError::OutsideRam { paddr, memsz });
        }
        let start = usize::try_from(offset).map_err(|_| ElfError::OutOfFile(offset))?;
        let end = start.checked_add(filesz as usize).ok_or(ElfError::OutOfFile(offset))?;
        let bytes = b.get(start..end).ok_or(ElfError::OutOfFile(offset))?;
        f(Segment { paddr, bytes })?;
    }
    if entry >= 1 << 32 {
        return Err(ElfError::Entry(entry));
    }
    Ok(entry)
}

/// The multiboot information (flags: mem_lower/upper and mmap) and a three-entry memory map.
fn boot_info() -> ([u8; 52], [u8; 72]) {
    let mut info = [0u8; 52];
    let put = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put(&mut info, 0, 1 | (1 << 6));
    put(&mut info, 4, 639);
    put(&mut info, 8, ((RAM - 0x10_0000) / 1024) as u32);
    put(&mut info, 44, 72);
    put(&mut info, 48, MMAP as u32);
    let mut mmap = [0u8; 72];
    let regions: [(u64, u64, u32); 3] = [(0, 0x9_fc00, 1), (0x9_fc00, 0x400, 2), (0x10_0000, RAM - 0x10_0000, 1)];
    for (i, (base, len, kind)) in regions.iter().enumerate() {
        let e = &mut mmap[24 * i..24 * i + 24];
        e[0..4].copy_from_slice(&20u32.to_le_bytes());
        e[4..12].copy_from_slice(&base.to_le_bytes());
        e[12..20].copy_from_slice(&len.to_le_bytes());
        e[20..24].copy_from_slice(&kind.to_le_bytes());
    }
    (info, mmap)
}

/// Runs the guest; returns the status it wrote to port 0xf4.
pub fn run(frames: &'static Frames, m: Module) -> u32 {
    println!("twostage x86-hv: multiboot guest module at {:#x}..{:#x}", m.start, m.end);
    // SAFETY: GRUB loaded the module at these physical addresses, inside the identity map and
    // outside the frames the allocator manages; nothing writes it while this slice lives.
    let image = unsafe { core::slice::from_raw_parts(m.start as *const u8, (m.end - m.start) as usize) };
    // SAFETY: ring 0, interrupts off, and this is the only RealCpu the image creates.
    let cpu = unsafe { RealCpu::new() };
    let mut vcpu = match VmxVcpu::new(cpu, frames, VcpuConfig::default()) {
        Ok(v) => v,
        Err(e) => {
            println!("VMXON failed: {e:?}");
            return FAILED;
        }
    };
    let opts = vcpu.ept_capabilities().table_options(true);
    let mut space = match AddressSpace::<Ept4, _>::new(frames, opts) {
        Ok(s) => s,
        Err(e) => {
            println!("address space: {e:?}");
            return FAILED;
        }
    };
    let Some(ram) = GpaRange::from_start_len(GuestPhysAddr::new(0), RAM) else { return FAILED };
    match space.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero) {
        Ok((_, f)) => space.flush_unloaded(f),
        Err(e) => {
            println!("ram region: {e:?}");
            return FAILED;
        }
    }
    let entry = parse_elf(image, |s| {
        let f = space
            .load_image(GuestPhysAddr::new(s.paddr), s.bytes)
            .map_err(|_| ElfError::OutsideRam { paddr: s.paddr, memsz: s.bytes.len() as u64 })?;
        space.flush_unloaded(f);
        Ok(())
    });
    let entry = match entry {
        Ok(e) => e,
        Err(e) => {
            println!("guest ELF: {e:?}");
            return FAILED;
        }
    };
    let (info, mmap) = boot_info();
    for (gpa, bytes) in [(INFO, &info[..]), (MMAP, &mmap[..])] {
        match space.load_image(GuestPhysAddr::new(gpa), bytes) {
            Ok(f) => space.flush_unloaded(f),
            Err(e) => {
                println!("multiboot info: {e:?}");
                return FAILED;
            }
        }
    }
    if let Err(e) = vcpu.setup(space.root(), GuestEntry::Protected32 { eip: entry as u32, esp: 0 }) {
        println!("VMCS setup: {e:?}");
        return FAILED;
    }
    vcpu.regs.rax = 0x2BAD_B002;
    vcpu.regs.rbx = INFO;
    println!("twostage x86-hv: entering guest at {entry:#x} (EAX=0x2badb002, EBX={INFO:#x})");
    let mut faults = 0u64;
    let status = loop {
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) => {
                println!("VM entry failed: {e:?}");
                break FAILED;
            }
        };
        match exit {
            VmExit::EptViolation(v) => match space.handle_fault(v.nested_page_fault_info()) {
                FaultOutcome::Resolved { flush } => {
                    faults += 1;
                    space.flush(flush, |inv| {
                        let _ = vcpu.invalidate(inv);
                    });
                    // A fault taken while delivering an event: deliver it again.
                    let _ = vcpu.reinject_interrupted_event();
                }
                other => {
                    println!("guest fault at {:?} ({:?}): {other:?}", v.gpa, v.qualification);
                    break FAILED;
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
                let _ = vcpu.advance_rip();
                if !q.is_in() && port == 0xf4 {
                    break value as u32;
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
                let r = vcpu.hardware().cpuid(vcpu.regs.rax as u32, vcpu.regs.rcx as u32);
                vcpu.regs.rax = u64::from(r.eax);
                vcpu.regs.rbx = u64::from(r.ebx);
                vcpu.regs.rcx = u64::from(r.ecx);
                vcpu.regs.rdx = u64::from(r.edx);
                let _ = vcpu.advance_rip();
            }
            VmExit::Msr { write } => {
                // IA32_EFER lives in the VMCS; other MSRs read as 0 and ignore writes. A value
                // the CPU would refuse is #GP here too, so it never reaches the VMCS (where it
                // would fail the next entry).
                let efer = vcpu.regs.rcx as u32 == IA32_EFER;
                if write && efer {
                    let v = (vcpu.regs.rdx << 32) | (vcpu.regs.rax & 0xffff_ffff);
                    let cur = vcpu.vmread(VmcsField::GUEST_IA32_EFER).unwrap_or(0);
                    let paging = vcpu.vmread(VmcsField::GUEST_CR0).unwrap_or(0) & CR0_PG != 0;
                    match efer_write(cur, v, paging) {
                        Ok(v) => {
                            let _ = vcpu.vmwrite(VmcsField::GUEST_IA32_EFER, v);
                        }
                        Err(_) => {
                            // #GP(0), without advancing RIP (Intel SDM Vol. 2B "WRMSR").
                            if vcpu.inject_exception(13, Some(0)).is_err() {
                                break FAILED;
                            }
                            continue;
                        }
                    }
                } else if !write {
                    let v = if efer { vcpu.vmread(VmcsField::GUEST_IA32_EFER).unwrap_or(0) } else { 0 };
                    vcpu.regs.rax = v & 0xffff_ffff;
                    vcpu.regs.rdx = v >> 32;
                }
                let _ = vcpu.advance_rip();
            }
            VmExit::Vmcall => {
                vcpu.regs.rax = u64::MAX;
                let _ = vcpu.advance_rip();
            }
            VmExit::Hlt => {
                println!("twostage x86-hv: guest halted without writing port 0xf4");
                break HALTED;
            }
            other => {
                println!("twostage x86-hv: guest stopped: {other:?}");
                break FAILED;
            }
        }
    };
    println!(
        "twostage x86-hv: guest wrote {status:#x} to port 0xf4; {faults} EPT faults resolved by the address space"
    );
    println!("guest-exit-status: {status}");
    status
}
