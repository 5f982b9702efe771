//! The hypervisor core: one vCPU on one EPT, the exit loop, statistics, and guest-memory access
//! (by GPA through the EPT, by GVA through the guest's own tables walked in software).

use crate::frames::Frames;
use crate::serial;
use core::fmt;
use twostage_npt::{
    Access, Ept4, FrameAllocator, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, MapError, MapSize, MappingFlags,
    PageTable, RangeError, FRAME_SIZE,
};
use twostage_vmx::decode::{decode_mmio, DecodeError, MmioInstruction, MmioOp};
use twostage_vmx::hw::RealCpu;
use twostage_vmx::walk::{translate, GuestPaging, WalkError};
use twostage_vmx::{EntryError, EptViolation, IoQualification, VmExit, VmcsField, VmxVcpu};

/// The vCPU type of this image.
pub type Vcpu = VmxVcpu<RealCpu, &'static Frames>;
/// The EPT type of this image.
pub type Ept = PageTable<Ept4, &'static Frames>;

/// What the memory subsystem and the exit loop did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// EPT-violation exits.
    pub ept_violations: u64,
    /// EPT-misconfiguration exits.
    pub ept_misconfigs: u64,
    /// VMCALL exits.
    pub vmcalls: u64,
    /// I/O exits.
    pub io: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Other exits.
    pub other: u64,
    /// Faults resolved by mapping or changing rights.
    pub faults_resolved: u64,
    /// MMIO accesses emulated.
    pub mmio_emulated: u64,
    /// INVEPT instructions issued for flush tokens.
    pub invepts: u64,
    /// 4 KiB pages mapped.
    pub mapped_4k: u64,
    /// 2 MiB pages mapped.
    pub mapped_2m: u64,
}

/// Why a guest-memory access by the hypervisor failed: each names the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMemError {
    /// No EPT mapping at this guest-physical address.
    Unmapped(GuestPhysAddr),
    /// The guest's own tables do not translate this guest-virtual address.
    Walk(WalkError<GuestPhysAddrUnmapped>),
    /// Reading the guest's paging registers from the VMCS failed.
    Vmcs,
}

/// A guest page-table entry lies at an unmapped guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPhysAddrUnmapped(pub GuestPhysAddr);

impl fmt::Display for GuestMemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a guest run stopped.
#[derive(Debug)]
#[allow(dead_code, reason = "the payloads are read through Debug when a scenario reports a failure")]
pub enum RunError {
    /// VM entry failed.
    Entry(EntryError),
    /// An exit the loop does not resolve.
    Unhandled(VmExit),
    /// A fault handler gave up.
    Fault(&'static str, EptViolation),
    /// The MMIO instruction could not be fetched or decoded.
    Mmio(GuestMemError, Option<DecodeError>),
    /// The guest stopped with HLT.
    Halted,
    /// Too many exits without progress.
    Runaway,
}

/// What a fault handler decided.
pub enum FaultAction {
    /// The EPT was changed; retry the instruction.
    Retry,
    /// An emulated device at this address: decode and emulate the instruction.
    Mmio,
    /// Give up.
    Fail(&'static str),
}

/// An emulated MMIO device.
pub trait MmioDevice {
    /// A guest load of `size` bytes at `gpa`.
    fn read(&mut self, gpa: GuestPhysAddr, size: u8) -> u64;
    /// A guest store.
    fn write(&mut self, gpa: GuestPhysAddr, size: u8, value: u64);
}

/// One guest: its vCPU, its EPT, and the counters.
pub struct Hv {
    /// The vCPU.
    pub vcpu: Vcpu,
    /// The guest's EPT.
    pub ept: Ept,
    /// Host frames.
    pub frames: &'static Frames,
    /// Counters.
    pub stats: Stats,
}

impl Hv {
    /// Carries out a flush token: INVEPT when the change needs one, then frees retired frames.
    pub fn flush(&mut self, f: twostage_npt::Flush<Ept4>) {
        let Hv { vcpu, ept, stats, .. } = self;
        ept.flush(f, |inv| match vcpu.invalidate(inv) {
            Ok(Some(_)) => stats.invepts += 1,
            Ok(None) => {}
            Err(e) => crate::println!("  INVEPT failed: {e:?}"),
        });
    }

    /// Maps and flushes, counting pages by size.
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: HostPhysAddr,
        len: u64,
        flags: MappingFlags,
        size: MapSize,
    ) -> Result<(), MapError> {
        let f = self.ept.map(GuestPhysAddr::new(gpa), hpa, len, flags, size)?;
        self.flush(f);
        let mut a = GuestPhysAddr::new(gpa);
        let end = a + len;
        while a < end {
            let Some(l) = self.ept.query(a) else { break };
            match l.size {
                twostage_npt::PageSize::Size2M => self.stats.mapped_2m += 1,
                _ => self.stats.mapped_4k += 1,
            }
            a = l.gpa + l.size.bytes();
        }
        Ok(())
    }

    /// Changes rights and flushes.
    pub fn protect(&mut self, gpa: u64, len: u64, flags: MappingFlags) -> Result<(), RangeError> {
        let f = self.ept.protect(GuestPhysAddr::new(gpa), len, flags)?;
        self.flush(f);
        Ok(())
    }

    /// Unmaps and flushes.
    pub fn unmap(&mut self, gpa: u64, len: u64) -> Result<(), RangeError> {
        let f = self.ept.unmap(GuestPhysAddr::new(gpa), len)?;
        self.flush(f);
        Ok(())
    }

    /// A zeroed host frame.
    pub fn zeroed_frame(&self) -> Option<HostPhysAddr> {
        let f = self.frames.allocate_frame()?;
        // SAFETY: a frame just allocated to us, reached through the identity map.
        unsafe { core::ptr::write_bytes(self.frames.phys_to_virt(f).as_ptr(), 0, FRAME_SIZE) };
        Some(f)
    }

    /// Reads host-physical memory (a frame the hypervisor owns).
    pub fn host_read(&self, hpa: HostPhysAddr, buf: &mut [u8]) {
        // SAFETY: the caller names memory inside frames it owns; identity-mapped.
        unsafe { core::ptr::copy_nonoverlapping(self.frames.phys_to_virt(hpa).as_ptr(), buf.as_mut_ptr(), buf.len()) };
    }

    /// Writes host-physical memory (a frame the hypervisor owns).
    pub fn host_write(&self, hpa: HostPhysAddr, buf: &[u8]) {
        // SAFETY: as for `host_read`.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), self.frames.phys_to_virt(hpa).as_ptr(), buf.len()) };
    }

    /// Copies guest-physical memory out, page by page through the EPT.
    pub fn copy_from_guest(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let mut done = 0;
        while done < buf.len() {
            let a = gpa + done as u64;
            let (hpa, _) = self.ept.translate(a).ok_or(GuestMemError::Unmapped(a))?;
            let n = (FRAME_SIZE - (a.as_u64() as usize & (FRAME_SIZE - 1))).min(buf.len() - done);
            self.host_read(hpa, &mut buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Copies into guest-physical memory, page by page through the EPT.
    pub fn copy_to_guest(&self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        let mut done = 0;
        while done < buf.len() {
            let a = gpa + done as u64;
            let (hpa, _) = self.ept.translate(a).ok_or(GuestMemError::Unmapped(a))?;
            let n = (FRAME_SIZE - (a.as_u64() as usize & (FRAME_SIZE - 1))).min(buf.len() - done);
            self.host_write(hpa, &buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// The guest's paging registers.
    pub fn guest_paging(&self) -> Result<GuestPaging, GuestMemError> {
        let r = |f| self.vcpu.vmread(f).map_err(|_| GuestMemError::Vmcs);
        Ok(GuestPaging {
            cr0: r(VmcsField::GUEST_CR0)?,
            cr3: r(VmcsField::GUEST_CR3)?,
            cr4: r(VmcsField::GUEST_CR4)?,
            efer: r(VmcsField::GUEST_IA32_EFER)?,
        })
    }

    /// Translates a guest-virtual address with the guest's own tables, read through the EPT.
    pub fn guest_va_to_pa(&self, gva: GuestVirtAddr, access: Access) -> Result<GuestPhysAddr, GuestMemError> {
        let paging = self.guest_paging()?;
        let t = translate(&paging, gva, access, |gpa| {
            let mut b = [0u8; 8];
            self.copy_from_guest(gpa, &mut b).map_err(|_| GuestPhysAddrUnmapped(gpa))?;
            Ok(u64::from_le_bytes(b))
        })
        .map_err(GuestMemError::Walk)?;
        Ok(t.gpa)
    }

    fn va_chunks(
        &self,
        gva: GuestVirtAddr,
        len: usize,
        access: Access,
        mut f: impl FnMut(GuestPhysAddr, core::ops::Range<usize>) -> Result<(), GuestMemError>,
    ) -> Result<(), GuestMemError> {
        let mut done = 0;
        while done < len {
            let v = GuestVirtAddr::new_truncate(gva.as_u64().wrapping_add(done as u64));
            let gpa = self.guest_va_to_pa(v, access)?;
            let n = (FRAME_SIZE - (v.as_u64() as usize & (FRAME_SIZE - 1))).min(len - done);
            f(gpa, done..done + n)?;
            done += n;
        }
        Ok(())
    }

    /// Copies from guest-virtual memory (each page translated separately).
    pub fn copy_from_guest_va(&self, gva: GuestVirtAddr, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let len = buf.len();
        self.va_chunks(gva, len, Access::Read, |gpa, r| self.copy_from_guest(gpa, &mut buf[r]))
    }

    /// Copies into guest-virtual memory (each page translated separately).
    pub fn copy_to_guest_va(&self, gva: GuestVirtAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        self.va_chunks(gva, buf.len(), Access::Write, |gpa, r| self.copy_to_guest(gpa, &buf[r]))
    }

    /// Fetches up to 15 instruction bytes at `rip` (an instruction may cross into a page that is
    /// not mapped: the bytes before it are returned). Returns how many bytes were fetched.
    pub fn fetch_guest_instruction(&self, rip: GuestVirtAddr, buf: &mut [u8; 15]) -> Result<usize, GuestMemError> {
        let first = (FRAME_SIZE - (rip.as_u64() as usize & (FRAME_SIZE - 1))).min(15);
        let gpa = self.guest_va_to_pa(rip, Access::Execute)?;
        self.copy_from_guest(gpa, &mut buf[..first])?;
        if first == 15 {
            return Ok(15);
        }
        let next = GuestVirtAddr::new_truncate(rip.as_u64().wrapping_add(first as u64));
        match self.guest_va_to_pa(next, Access::Execute).and_then(|g| self.copy_from_guest(g, &mut buf[first..])) {
            Ok(()) => Ok(15),
            Err(_) => Ok(first),
        }
    }

    /// Emulates the MMIO instruction at the guest's RIP against `dev`, then skips it.
    pub fn emulate_mmio(&mut self, v: &EptViolation, dev: &mut dyn MmioDevice) -> Result<MmioInstruction, RunError> {
        let rip = self.vcpu.vmread(VmcsField::GUEST_RIP).map_err(|_| RunError::Mmio(GuestMemError::Vmcs, None))?;
        let mut bytes = [0u8; 15];
        let n = self
            .fetch_guest_instruction(GuestVirtAddr::new_truncate(rip), &mut bytes)
            .map_err(|e| RunError::Mmio(e, None))?;
        let insn = decode_mmio(&bytes[..n]).map_err(|d| RunError::Mmio(GuestMemError::Unmapped(v.gpa), Some(d)))?;
        let mask = if insn.size == 8 { u64::MAX } else { (1u64 << (8 * insn.size)) - 1 };
        match insn.op {
            MmioOp::Load { reg } => {
                let val = dev.read(v.gpa, insn.size) & mask;
                let old = self.vcpu.regs.gpr(reg).unwrap_or(0);
                // 32-bit loads zero-extend; 8- and 16-bit loads merge (Intel SDM Vol. 1 3.4.1.1).
                let new = if insn.size >= 4 { val } else { (old & !mask) | val };
                if self.vcpu.regs.set_gpr(reg, new).is_err() {
                    let _ = self.vcpu.vmwrite(VmcsField::GUEST_RSP, new);
                }
            }
            MmioOp::StoreReg { reg } => {
                let val = match self.vcpu.regs.gpr(reg) {
                    Some(v) => v,
                    None => self.vcpu.vmread(VmcsField::GUEST_RSP).unwrap_or(0),
                };
                dev.write(v.gpa, insn.size, val & mask);
            }
            MmioOp::StoreImm { value } => dev.write(v.gpa, insn.size, value & mask),
        }
        let _ = self.vcpu.vmwrite(VmcsField::GUEST_RIP, rip.wrapping_add(u64::from(insn.len)));
        self.stats.mmio_emulated += 1;
        Ok(insn)
    }

    /// Counts an exit by kind.
    pub fn count(&mut self, e: &VmExit) {
        let s = &mut self.stats;
        match e {
            VmExit::EptViolation(_) => s.ept_violations += 1,
            VmExit::EptMisconfig { .. } => s.ept_misconfigs += 1,
            VmExit::Vmcall => s.vmcalls += 1,
            VmExit::Io(_) => s.io += 1,
            VmExit::Hlt => s.hlt += 1,
            _ => s.other += 1,
        }
    }

    /// Forwards a non-string I/O access to COM1 to the real port; other ports read as all ones.
    pub fn forward_serial_io(&mut self, q: IoQualification) {
        let port = q.port();
        let com1 = (serial::COM1..serial::COM1 + 8).contains(&port);
        if q.is_in() {
            let v = if com1 { u64::from(serial::inb(port)) } else { 0xff };
            self.vcpu.regs.rax = (self.vcpu.regs.rax & !0xff) | v;
        } else if com1 {
            let b = self.vcpu.regs.rax as u8;
            if port == serial::COM1 {
                serial::putb(b);
            } else {
                // The guest may reprogram the UART; keep the host's settings (same console).
            }
        }
    }

    /// Prints the counters.
    pub fn report(&self, title: &str) {
        let s = &self.stats;
        let f = self.frames.stats();
        crate::println!("== {title}");
        crate::println!(
            "   exits: {} EPT violation, {} EPT misconfig, {} VMCALL, {} I/O, {} HLT, {} other",
            s.ept_violations,
            s.ept_misconfigs,
            s.vmcalls,
            s.io,
            s.hlt,
            s.other
        );
        crate::println!(
            "   pages mapped: {} x 4K, {} x 2M; faults resolved: {}; MMIO emulated: {}",
            s.mapped_4k,
            s.mapped_2m,
            s.faults_resolved,
            s.mmio_emulated
        );
        crate::println!("   flushes: {} INVEPT; EPT table frames: {}", s.invepts, self.ept.table_frames());
        crate::println!(
            "   host frames (from {:#x}): {} in use of {}, {} allocations, {} frees; heap {} KiB",
            f.base,
            f.in_use,
            f.frames,
            f.allocations,
            f.frees,
            crate::heap::used() / 1024
        );
    }
}
