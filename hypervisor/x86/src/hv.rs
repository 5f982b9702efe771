//! The hypervisor core: one vCPU on one EPT, the exit loop, statistics, and guest-memory access
//! (by GPA through the EPT, by GVA through the guest's own tables walked in software).

use crate::serial;
use core::fmt;
use twostage_aspace::guest::{PagingModeError, X86Cpu};
use twostage_aspace::{
    copy_from_guest_va, copy_to_guest_va, fetch_guest_instruction, translate_gva, GuestMemError, GuestMemory,
    GuestPaging, GuestVaError, Instruction, Isa, TableMemory,
};
use twostage_baremetal::frames::Frames;
use twostage_npt::{
    Access, Ept4, EptInvalidation, FrameAllocator, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, MapError, MapSize,
    MappingFlags, PageTable, RangeError, FRAME_SIZE,
};
use twostage_vmx::decode::{decode_mmio, DecodeError, MmioInstruction, MmioOp};
use twostage_vmx::hw::{InveptKind, RealCpu, VmxHardware};
use twostage_vmx::{EntryError, EptViolation, IoQualification, VmExit, VmcsField, VmxInstructionFailure, VmxVcpu};

/// The vCPU type of this image.
pub type Vcpu = VmxVcpu<RealCpu, &'static Frames>;
/// The EPT type of this image.
pub type Ept = PageTable<Ept4, &'static Frames>;

/// Carries out the INVEPT an EPT flush token asks for on `vcpu`; returns the type used, or
/// `None` when nothing was needed.
///
/// A failure stops the image with a message naming the token and the reason: the engine frees
/// the table frames the change retired as soon as the token has been carried out, and a CPU
/// that kept the old translations (a missed INVEPT) could still reach them and the pages they
/// mapped. No guest may run on after that, so nothing is returned to carry on with.
pub fn invept(vcpu: &mut Vcpu, inv: &EptInvalidation) -> Option<InveptKind> {
    match vcpu.invalidate(inv) {
        Ok(kind) => kind,
        Err(e) => panic!("stale EPT translation: {inv:?} could not be carried out: {e}; stopping every guest"),
    }
}

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

/// Why a guest-virtual access by the hypervisor failed: each names the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GvaError {
    /// Reading the guest's paging registers from the VMCS failed.
    Vmcs,
    /// The guest's paging mode is not one the walker models.
    Mode(PagingModeError),
    /// The guest's own tables, or the EPT under them, refused the access.
    Va(GuestVaError),
}

impl fmt::Display for GvaError {
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
    /// The instruction that touched MMIO could not be fetched.
    MmioFetch(GvaError),
    /// The instruction that touched MMIO at this address is not one the decoder emulates.
    MmioDecode(GuestPhysAddr, DecodeError),
    /// An EPT violation with no MOV to emulate: a fetch, the guest's own page walk, or bytes
    /// at RIP that do not match the access.
    NotEmulable(EptViolation),
    /// A VMCS access the next entry depends on failed (what it was for, and the failure):
    /// resuming would run the guest in a state it did not reach, so the run stops.
    Vmcs(&'static str, VmxInstructionFailure),
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
    /// Carries out a flush token: INVEPT when the change needs one (see [`invept`]: a failure
    /// stops the image), then frees retired frames.
    pub fn flush(&mut self, f: twostage_npt::Flush<Ept4>) {
        let Hv { vcpu, ept, stats, .. } = self;
        ept.flush(f, |inv| {
            if invept(vcpu, inv).is_some() {
                stats.invepts += 1;
            }
        })
        .expect("token of this EPT");
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

    /// The guest's memory through its EPT, as `twostage-aspace`'s [`GuestMemory`]: accesses
    /// are checked against the EPT leaf's rights, page crossing is handled there.
    pub fn memory(&self) -> TableMemory<'_, Ept4, &'static Frames> {
        // SAFETY: every EPT leaf maps frames from `self.frames` (identity-mapped RAM), which the
        // table's allocator (`self.frames`) reaches.
        unsafe { TableMemory::new(&self.ept) }
    }

    /// Copies guest-physical memory out (the EPT must allow reading every byte).
    pub fn copy_from_guest(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GuestMemError> {
        self.memory().read(gpa, buf)
    }

    /// Copies into guest-physical memory (the EPT must allow writing every byte).
    pub fn copy_to_guest(&self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        self.memory().write(gpa, buf)
    }

    /// What this processor's paging offers (MAXPHYADDR, 1 GiB pages): the guest's tables are
    /// walked by this processor, so a software walk checks them against the same.
    pub fn paging_cpu(&self) -> X86Cpu {
        let hw = self.vcpu.hardware();
        let max_ext = hw.cpuid(0x8000_0000, 0).eax;
        X86Cpu::from_cpuid(max_ext, hw.cpuid(0x8000_0001, 0).edx, hw.cpuid(0x8000_0008, 0).eax)
    }

    /// The guest's paging mode, from its CR0, CR3, CR4 and EFER in the VMCS.
    pub fn guest_paging(&self) -> Result<GuestPaging, GvaError> {
        let r = |f| self.vcpu.vmread(f).map_err(|_| GvaError::Vmcs);
        GuestPaging::x86_64(
            r(VmcsField::GUEST_CR0)?,
            r(VmcsField::GUEST_CR3)?,
            r(VmcsField::GUEST_CR4)?,
            r(VmcsField::GUEST_IA32_EFER)?,
            self.paging_cpu(),
        )
        .map_err(GvaError::Mode)
    }

    /// Translates a guest-virtual address with the guest's own tables, read through the EPT
    /// (A/D bits in the guest's entries are updated as the CPU would).
    pub fn guest_va_to_pa(&self, gva: GuestVirtAddr, access: Access) -> Result<GuestPhysAddr, GvaError> {
        let paging = self.guest_paging()?;
        translate_gva(&mut self.memory(), &paging, gva, access).map(|t| t.gpa).map_err(GvaError::Va)
    }

    /// Copies from guest-virtual memory (each page translated separately).
    pub fn copy_from_guest_va(&self, gva: GuestVirtAddr, buf: &mut [u8]) -> Result<(), GvaError> {
        let paging = self.guest_paging()?;
        copy_from_guest_va(&mut self.memory(), &paging, gva, buf).map_err(GvaError::Va)
    }

    /// Copies into guest-virtual memory (each page translated separately).
    pub fn copy_to_guest_va(&self, gva: GuestVirtAddr, buf: &[u8]) -> Result<(), GvaError> {
        let paging = self.guest_paging()?;
        copy_to_guest_va(&mut self.memory(), &paging, gva, buf).map_err(GvaError::Va)
    }

    /// Fetches up to 15 instruction bytes at `rip`; an instruction may end before a page that
    /// cannot be reached, so fewer bytes can come back.
    pub fn fetch_guest_instruction(&self, rip: GuestVirtAddr) -> Result<Instruction, GvaError> {
        let paging = self.guest_paging()?;
        fetch_guest_instruction(&mut self.memory(), &paging, rip, Isa::X86).map_err(GvaError::Va)
    }

    /// Emulates the MMIO instruction at the guest's RIP against `dev`, then skips it.
    pub fn emulate_mmio(&mut self, v: &EptViolation, dev: &mut dyn MmioDevice) -> Result<MmioInstruction, RunError> {
        let q = v.qualification;
        // Only a data access to the translated address has an instruction to emulate: not a
        // fetch, not the CPU's walk of the guest's own tables (Intel SDM Vol. 3C 28.2.1, Table 28-7),
        // not the delivery of an event (28.2.4).
        let delivering = self.vcpu.vmread(VmcsField::IDT_VECTORING_INFO).unwrap_or(0) & (1 << 31) != 0;
        if q.fetch() || !q.linear_address_valid() || !q.linear_translation() || delivering {
            return Err(RunError::NotEmulable(*v));
        }
        let rip = self.vcpu.vmread(VmcsField::GUEST_RIP).map_err(|_| RunError::MmioFetch(GvaError::Vmcs))?;
        let fetched = self.fetch_guest_instruction(GuestVirtAddr::new_truncate(rip)).map_err(RunError::MmioFetch)?;
        let insn = decode_mmio(fetched.bytes()).map_err(|d| RunError::MmioDecode(v.gpa, d))?;
        if insn.is_store() != q.write() {
            // The bytes at RIP are not what exited (rewritten since, or a read-modify-write).
            return Err(RunError::NotEmulable(*v));
        }
        match insn.op {
            MmioOp::Load { reg } => {
                let val = dev.read(v.gpa, insn.size) & insn.mask();
                let old = self.read_gpr(reg.num);
                self.write_gpr(reg.num, insn.merge_load(old, val))
                    .map_err(|e| RunError::Vmcs("RSP not written with the value loaded from MMIO", e))?;
            }
            MmioOp::StoreReg { reg } => {
                let val = insn.store_value(self.read_gpr(reg.num));
                dev.write(v.gpa, insn.size, val);
            }
            MmioOp::StoreImm { .. } => dev.write(v.gpa, insn.size, insn.store_value(0)),
        }
        self.vcpu
            .vmwrite(VmcsField::GUEST_RIP, rip.wrapping_add(u64::from(insn.len)))
            .map_err(|e| RunError::Vmcs("RIP not advanced past the emulated MMIO instruction", e))?;
        self.stats.mmio_emulated += 1;
        Ok(insn)
    }

    /// A guest register by ModRM number, RSP (4) from the VMCS.
    pub fn read_gpr(&self, n: u8) -> u64 {
        match self.vcpu.regs.gpr(n) {
            Some(v) => v,
            None => self.vcpu.vmread(VmcsField::GUEST_RSP).unwrap_or(0),
        }
    }

    /// Writes a guest register by ModRM number, RSP (4) into the VMCS; fails only when that
    /// VMWRITE does (the guest's RSP is then not what it should be).
    pub fn write_gpr(&mut self, n: u8, v: u64) -> Result<(), VmxInstructionFailure> {
        if self.vcpu.regs.set_gpr(n, v).is_err() {
            self.vcpu.vmwrite(VmcsField::GUEST_RSP, v)?;
        }
        Ok(())
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
            let v = if com1 { 0xffff_ff00 | u64::from(serial::inb(port)) } else { u64::MAX };
            self.vcpu.regs.rax = q.merge_in(self.vcpu.regs.rax, v);
        } else if com1 {
            let b = self.vcpu.regs.rax as u8;
            if port == serial::COM1 {
                serial::putb(b);
            } else {
                // The guest may reprogram the UART; keep the host's settings (same console).
            }
        }
    }

    /// Prints the counters; `heap_in_use` is the bytes in live heap allocations (the image owns
    /// the heap).
    pub fn report(&self, title: &str, heap_in_use: usize) {
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
        // What the hardware path costs: EPT violations per 4 KiB page mapped, and
        // INVEPTs per resolved fault (a not-present -> present change needs none).
        let pages = (s.mapped_4k + 512 * s.mapped_2m).max(1) as f64;
        crate::println!(
            "   hardware path cost: {:.2} EPT violations per 4 KiB page mapped; {:.2} INVEPT per resolved fault",
            s.ept_violations as f64 / pages,
            s.invepts as f64 / (s.faults_resolved.max(1) as f64)
        );
        crate::println!(
            "   host frames (from {:#x}): {} in use of {}, {} allocations ({:.1} bitmap words searched each), {} frees; heap {} KiB",
            f.base,
            f.in_use,
            f.frames,
            f.allocations,
            f.words_searched as f64 / f.allocations.max(1) as f64,
            f.frees,
            heap_in_use / 1024
        );
    }
}
