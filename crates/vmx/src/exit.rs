//! Decoding VM exits: reasons, qualifications, and the VM-instruction errors of failed entries.

use core::fmt;
use twostage_npt::{GuestPhysAddr, GuestVirtAddr, MappingFlags, NestedPageFaultInfo};

/// Basic exit reasons twostage handles (Intel SDM Vol. 3C Appendix C, Table C-1).
pub mod reason {
    /// Exception or NMI.
    pub const EXCEPTION_NMI: u16 = 0;
    /// External interrupt.
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    /// Triple fault.
    pub const TRIPLE_FAULT: u16 = 2;
    /// CPUID.
    pub const CPUID: u16 = 10;
    /// HLT.
    pub const HLT: u16 = 12;
    /// VMCALL.
    pub const VMCALL: u16 = 18;
    /// Control-register access.
    pub const CR_ACCESS: u16 = 28;
    /// I/O instruction.
    pub const IO_INSTRUCTION: u16 = 30;
    /// RDMSR.
    pub const RDMSR: u16 = 31;
    /// WRMSR.
    pub const WRMSR: u16 = 32;
    /// VM-entry failure due to invalid guest state.
    pub const ENTRY_FAILURE_GUEST_STATE: u16 = 33;
    /// VM-entry failure due to MSR loading.
    pub const ENTRY_FAILURE_MSR_LOADING: u16 = 34;
    /// VM-entry failure due to machine-check event.
    pub const ENTRY_FAILURE_MACHINE_CHECK: u16 = 41;
    /// EPT violation.
    pub const EPT_VIOLATION: u16 = 48;
    /// EPT misconfiguration.
    pub const EPT_MISCONFIG: u16 = 49;
    /// VMX-preemption timer expired.
    pub const PREEMPTION_TIMER: u16 = 52;
    /// XSETBV.
    pub const XSETBV: u16 = 55;

    /// The SDM's name for a basic exit reason (Intel SDM Vol. 3C Appendix C, Table C-1), or
    /// "unknown" for a number the table does not list. Any value is accepted.
    pub const fn name(reason: u16) -> &'static str {
        match reason {
            0 => "exception or NMI",
            1 => "external interrupt",
            2 => "triple fault",
            3 => "INIT",
            4 => "SIPI",
            5 => "I/O SMI",
            6 => "other SMI",
            7 => "interrupt window",
            8 => "NMI window",
            9 => "task switch",
            10 => "CPUID",
            11 => "GETSEC",
            12 => "HLT",
            13 => "INVD",
            14 => "INVLPG",
            15 => "RDPMC",
            16 => "RDTSC",
            17 => "RSM",
            18 => "VMCALL",
            19 => "VMCLEAR",
            20 => "VMLAUNCH",
            21 => "VMPTRLD",
            22 => "VMPTRST",
            23 => "VMREAD",
            24 => "VMRESUME",
            25 => "VMWRITE",
            26 => "VMXOFF",
            27 => "VMXON",
            28 => "CR access",
            29 => "MOV DR",
            30 => "I/O instruction",
            31 => "RDMSR",
            32 => "WRMSR",
            33 => "entry failure: guest state",
            34 => "entry failure: MSR loading",
            36 => "MWAIT",
            37 => "monitor trap flag",
            39 => "MONITOR",
            40 => "PAUSE",
            41 => "entry failure: machine check",
            43 => "TPR below threshold",
            44 => "APIC access",
            45 => "virtualized EOI",
            46 => "GDTR/IDTR access",
            47 => "LDTR/TR access",
            48 => "EPT violation",
            49 => "EPT misconfiguration",
            50 => "INVEPT",
            51 => "RDTSCP",
            52 => "preemption timer",
            53 => "INVVPID",
            54 => "WBINVD",
            55 => "XSETBV",
            56 => "APIC write",
            57 => "RDRAND",
            58 => "INVPCID",
            59 => "VMFUNC",
            60 => "ENCLS",
            61 => "RDSEED",
            62 => "page-modification log full",
            63 => "XSAVES",
            64 => "XRSTORS",
            _ => "unknown",
        }
    }
}

/// The exit-reason field (Intel SDM Vol. 3C 25.9.1, Table 25-18): bits 15:0 basic reason,
/// bit 31 VM-entry failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitReason(pub u32);

impl ExitReason {
    /// Bits 15:0.
    pub const fn basic(self) -> u16 {
        self.0 as u16
    }
    /// Bit 31: the exit is a failed VM entry.
    pub const fn entry_failed(self) -> bool {
        self.0 & (1 << 31) != 0
    }
}

/// An EPT-violation exit qualification (Intel SDM Vol. 3C 28.2.1, Table 28-7).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EptViolationQualification(pub u64);

impl EptViolationQualification {
    /// Bit 0: the access was a data read.
    pub const fn read(self) -> bool {
        self.0 & (1 << 0) != 0
    }
    /// Bit 1: the access was a data write.
    pub const fn write(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    /// Bit 2: the access was an instruction fetch.
    pub const fn fetch(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    /// Bits 5:3: the logical AND of the read/write/execute bits of the EPT entries walked,
    /// i.e. the rights the guest-physical address had (all zero when not present).
    pub fn entry_rights(self) -> MappingFlags {
        let mut f = MappingFlags::empty();
        f.set(MappingFlags::READ, self.0 & (1 << 3) != 0);
        f.set(MappingFlags::WRITE, self.0 & (1 << 4) != 0);
        f.set(MappingFlags::EXECUTE, self.0 & (1 << 5) != 0);
        f
    }
    /// Bit 7: the guest-linear-address field is valid.
    pub const fn linear_address_valid(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// Bit 8 (meaningful when bit 7 is set): 1 = the access was to the translated linear
    /// address, 0 = to one of the guest's own paging-structure entries during its walk.
    pub const fn linear_translation(self) -> bool {
        self.0 & (1 << 8) != 0
    }
    /// Bit 12: NMI unblocking due to IRET — the access was part of an IRET that had already
    /// unblocked NMIs (or virtual NMIs) when the EPT violation stopped it. Undefined when the
    /// exit interrupted event delivery, or with "NMI exiting" 1 and "virtual NMIs" 0: use
    /// [`restores_nmi_blocking`], which checks both.
    pub const fn nmi_unblocking(self) -> bool {
        self.0 & (1 << 12) != 0
    }
    /// The kind of access, as twostage flags (READ, WRITE or EXECUTE; a read-modify-write can
    /// set READ and WRITE together).
    pub fn access_flags(self) -> MappingFlags {
        let mut f = MappingFlags::empty();
        f.set(MappingFlags::READ, self.read());
        f.set(MappingFlags::WRITE, self.write());
        f.set(MappingFlags::EXECUTE, self.fetch());
        f
    }
}

impl fmt::Debug for EptViolationQualification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x} (access {:?}, entry {:?}", self.0, self.access_flags(), self.entry_rights())?;
        if self.linear_address_valid() {
            f.write_str(if self.linear_translation() { ", linear translation" } else { ", guest paging entry" })?;
        } else {
            f.write_str(", no linear address")?;
        }
        if self.nmi_unblocking() {
            f.write_str(", NMI unblocking due to IRET")?;
        }
        f.write_str(")")
    }
}

/// A decoded EPT violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptViolation {
    /// The faulting guest-physical address (VMCS field 0x2400).
    pub gpa: GuestPhysAddr,
    /// The guest-linear address (field 0x640A), when the qualification says it is valid.
    pub gva: Option<GuestVirtAddr>,
    /// The whole qualification.
    pub qualification: EptViolationQualification,
}

impl EptViolation {
    /// The fault as the address space takes it (`AddressSpace::handle_fault`): guest-physical
    /// address and access.
    pub fn nested_page_fault_info(&self) -> NestedPageFaultInfo {
        NestedPageFaultInfo { fault_guest_paddr: self.gpa, access_flags: self.qualification.access_flags() }
    }
}

/// Guest interruptibility state bit 3: blocking by NMI, or virtual-NMI blocking when the "virtual
/// NMIs" control is 1 (Intel SDM Vol. 3C 25.4.2, Table 25-3).
pub const INTERRUPTIBILITY_BLOCKING_BY_NMI: u64 = 1 << 3;

/// Whether the VMM must set blocking by NMI ([`INTERRUPTIBILITY_BLOCKING_BY_NMI`]) in the guest
/// interruptibility state before the next VM entry, after an exit with this EPT-violation
/// `qualification`, this IDT-vectoring information (VMCS 0x4408) and these pin-based controls.
///
/// An IRET that started with NMIs blocked unblocks them even if an EPT violation stops it, so
/// the state saved by the exit says "not blocked"; resuming the guest re-executes the IRET with
/// NMIs open, and an NMI arriving then would nest inside the handler that is still returning
/// (Intel SDM Vol. 3C 28.2.3 "Information About NMI Unblocking Due to IRET"). Qualification bit
/// 12 records that unblocking (Table 28-7); it is undefined, so this answers false, when the
/// exit set the IDT-vectoring valid bit (28.2.4), or when "NMI exiting" (pin-based bit 3) is 1
/// and "virtual NMIs" (bit 5) is 0 (Table 25-5).
pub const fn restores_nmi_blocking(
    qualification: EptViolationQualification,
    idt_vectoring_info: u32,
    pin_based_controls: u32,
) -> bool {
    let nmi_exiting = pin_based_controls & crate::controls::PIN_NMI_EXITING != 0;
    let virtual_nmis = pin_based_controls & crate::controls::PIN_VIRTUAL_NMIS != 0;
    // Bit 12 is defined unless NMI exiting is on without virtual NMIs.
    let bit12_defined = !nmi_exiting || virtual_nmis;
    qualification.nmi_unblocking() && idt_vectoring_info & (1 << 31) == 0 && bit12_defined
}

/// An I/O-instruction exit qualification (Intel SDM Vol. 3C 28.2.1, Table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoQualification(pub u64);

impl IoQualification {
    /// Bits 2:0: access size in bytes, 1, 2 or 4 (encodings 0, 1, 3). The other encodings are
    /// not used by the CPU; they read as 4 so that no caller ever sees another size.
    pub const fn size(self) -> u8 {
        match self.0 & 7 {
            0 => 1,
            1 => 2,
            _ => 4,
        }
    }

    /// The bits of RAX the access covers, at bit 0.
    pub const fn mask(self) -> u64 {
        match self.size() {
            1 => 0xff,
            2 => 0xffff,
            _ => 0xffff_ffff,
        }
    }

    /// RAX after an IN of `value`: 8- and 16-bit INs keep the rest of RAX, a 32-bit IN clears
    /// bits 63:32 (Intel SDM Vol. 1 3.4.1.1; Vol. 2A "IN").
    pub const fn merge_in(self, rax: u64, value: u64) -> u64 {
        let m = self.mask();
        if self.size() == 4 {
            value & m
        } else {
            (rax & !m) | (value & m)
        }
    }
    /// Bit 3: 1 = IN, 0 = OUT.
    pub const fn is_in(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// Bit 4: string instruction (INS/OUTS).
    pub const fn is_string(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// Bit 5: REP prefixed.
    pub const fn is_rep(self) -> bool {
        self.0 & (1 << 5) != 0
    }
    /// Bits 31:16: the port number.
    pub const fn port(self) -> u16 {
        (self.0 >> 16) as u16
    }
}

/// A control-register-access exit qualification (Intel SDM Vol. 3C 28.2.1, Table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrAccessQualification(pub u64);

/// What a control-register access did, from [`CrAccessQualification::access`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CR`cr` from general-purpose register `reg` (0..=15, Table 2-2 order; 4 = RSP).
    MovTo {
        /// Control register number (0, 3, 4 or 8).
        cr: u8,
        /// Source register.
        reg: u8,
    },
    /// MOV from CR`cr` to register `reg`.
    MovFrom {
        /// Control register number (3 or 8).
        cr: u8,
        /// Destination register.
        reg: u8,
    },
    /// CLTS.
    Clts,
    /// LMSW with its 16-bit source operand.
    Lmsw {
        /// Bits 31:16 of the qualification.
        source: u16,
    },
}

impl CrAccessQualification {
    /// Bits 3:0 control register, 5:4 access type, 11:8 register, 31:16 LMSW source data.
    pub const fn access(self) -> CrAccess {
        let cr = (self.0 & 0xf) as u8;
        let reg = ((self.0 >> 8) & 0xf) as u8;
        match (self.0 >> 4) & 3 {
            0 => CrAccess::MovTo { cr, reg },
            1 => CrAccess::MovFrom { cr, reg },
            2 => CrAccess::Clts,
            _ => CrAccess::Lmsw { source: (self.0 >> 16) as u16 },
        }
    }
}

/// A VM exit, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// Reason 48.
    EptViolation(EptViolation),
    /// Reason 49: an EPT entry on the walk to `gpa` is misconfigured (Intel SDM Vol. 3C 29.3.3.1).
    EptMisconfig {
        /// The guest-physical address being translated.
        gpa: GuestPhysAddr,
    },
    /// Reason 18.
    Vmcall,
    /// Reason 30.
    Io(IoQualification),
    /// Reason 12.
    Hlt,
    /// Reason 2.
    TripleFault,
    /// Reason 0, with the exit interruption information (Table 25-19).
    Exception {
        /// Bits 7:0: vector.
        vector: u8,
        /// Interruption-information field.
        info: u32,
    },
    /// Reason 10.
    Cpuid,
    /// Reason 31 / 32.
    Msr {
        /// WRMSR when true.
        write: bool,
    },
    /// Reason 28.
    CrAccess(CrAccessQualification),
    /// Reason 52: the VMX-preemption timer counted down to zero (Intel SDM Vol. 3C 26.5.1).
    PreemptionTimer,
    /// A VM entry that failed after its checks began (exit reason bit 31 set).
    EntryFailed(EntryFailure),
    /// Any other basic reason.
    Other {
        /// The basic exit reason.
        reason: u16,
        /// The exit qualification.
        qualification: u64,
    },
}

/// Why a VM entry failed once it had loaded guest state (Intel SDM Vol. 3C 27.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryFailure {
    /// Reason 33: a guest-state check failed. Qualification 0 = unspecified, 2 = PDPTE load,
    /// 3 = NMI injection, 4 = invalid VMCS link pointer (Intel SDM Vol. 3C 27.8).
    InvalidGuestState {
        /// The exit qualification.
        qualification: u64,
    },
    /// Reason 34: loading the MSR in the given entry (1-based) failed.
    MsrLoading {
        /// The exit qualification.
        entry: u64,
    },
    /// Reason 41.
    MachineCheck,
    /// Another basic reason with bit 31 set.
    Other(u16),
}

/// Decodes an exit from the VMCS fields the exit wrote: the exit reason (0x4402), the exit
/// qualification (0x6400), the guest-physical address (0x2400), the guest-linear address
/// (0x640A) and the exit interruption information (0x4404). Pure, so it is tested on the host.
pub fn decode_exit(exit_reason: u32, qualification: u64, gpa: u64, gla: u64, interruption_info: u32) -> VmExit {
    let r = ExitReason(exit_reason);
    if r.entry_failed() {
        return VmExit::EntryFailed(match r.basic() {
            reason::ENTRY_FAILURE_GUEST_STATE => EntryFailure::InvalidGuestState { qualification },
            reason::ENTRY_FAILURE_MSR_LOADING => EntryFailure::MsrLoading { entry: qualification },
            reason::ENTRY_FAILURE_MACHINE_CHECK => EntryFailure::MachineCheck,
            other => EntryFailure::Other(other),
        });
    }
    match r.basic() {
        reason::EPT_VIOLATION => {
            let q = EptViolationQualification(qualification);
            VmExit::EptViolation(EptViolation {
                gpa: GuestPhysAddr::new_truncate(gpa),
                gva: q.linear_address_valid().then(|| GuestVirtAddr::new_truncate(gla)),
                qualification: q,
            })
        }
        reason::EPT_MISCONFIG => VmExit::EptMisconfig { gpa: GuestPhysAddr::new_truncate(gpa) },
        reason::VMCALL => VmExit::Vmcall,
        reason::IO_INSTRUCTION => VmExit::Io(IoQualification(qualification)),
        reason::HLT => VmExit::Hlt,
        reason::TRIPLE_FAULT => VmExit::TripleFault,
        reason::EXCEPTION_NMI => VmExit::Exception { vector: interruption_info as u8, info: interruption_info },
        reason::CPUID => VmExit::Cpuid,
        reason::RDMSR => VmExit::Msr { write: false },
        reason::WRMSR => VmExit::Msr { write: true },
        reason::CR_ACCESS => VmExit::CrAccess(CrAccessQualification(qualification)),
        reason::PREEMPTION_TIMER => VmExit::PreemptionTimer,
        other => VmExit::Other { reason: other, qualification },
    }
}

/// An event whose delivery a VM exit interrupted, to be injected again at the next entry
/// (Intel SDM Vol. 3C 28.2.4 "Information for VM Exits During Event Delivery", 29.2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reinjection {
    /// The VM-entry interruption-information value: vector, type, error-code bit, valid bit;
    /// bits 30:12 cleared, as entry requires (27.2.1.3).
    pub info: u32,
    /// The error code to deliver, when bit 11 is set.
    pub error_code: Option<u32>,
    /// The VM-entry instruction length, for software interrupts and exceptions (types 4-6).
    pub instruction_length: Option<u32>,
}

/// The re-injection an IDT-vectoring information field (0x4408, Table 25-20) calls for, from
/// it, the IDT-vectoring error code (0x440A) and the VM-exit instruction length (0x440C);
/// `None` when its valid bit (31) is clear.
pub const fn reinjection(idt_vectoring_info: u32, error_code: u32, instruction_length: u32) -> Option<Reinjection> {
    if idt_vectoring_info & (1 << 31) == 0 {
        return None;
    }
    let info = idt_vectoring_info & 0x8000_0fff;
    let ty = (info >> 8) & 7;
    Some(Reinjection {
        info,
        error_code: if info & (1 << 11) != 0 { Some(error_code & 0xffff) } else { None },
        instruction_length: if ty >= 4 && ty <= 6 { Some(instruction_length) } else { None },
    })
}

/// A VM-instruction error number (Intel SDM Vol. 3C 31.4, Table 31-1).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VmInstructionError(pub u32);

impl VmInstructionError {
    /// The SDM's description, or `None` for a number the table does not list.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "VMCALL executed in VMX root operation",
            2 => "VMCLEAR with invalid physical address",
            3 => "VMCLEAR with VMXON pointer",
            4 => "VMLAUNCH with non-clear VMCS",
            5 => "VMRESUME with non-launched VMCS",
            6 => "VMRESUME after VMXOFF",
            7 => "VM entry with invalid control field(s)",
            8 => "VM entry with invalid host-state field(s)",
            9 => "VMPTRLD with invalid physical address",
            10 => "VMPTRLD with VMXON pointer",
            11 => "VMPTRLD with incorrect VMCS revision identifier",
            12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
            13 => "VMWRITE to read-only VMCS component",
            15 => "VMXON executed in VMX root operation",
            16 => "VM entry with invalid executive-VMCS pointer",
            17 => "VM entry with non-launched executive VMCS",
            18 => "VM entry with executive-VMCS pointer not VMXON pointer",
            19 => "VMCALL with non-clear VMCS",
            20 => "VMCALL with invalid VM-exit control fields",
            22 => "VMCALL with incorrect MSEG revision identifier",
            23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
            24 => "VMCALL with invalid SMM-monitor features",
            25 => "VM entry with invalid VM-execution control fields in executive VMCS",
            26 => "VM entry with events blocked by MOV SS",
            28 => "invalid operand to INVEPT/INVVPID",
            _ => return None,
        })
    }
}

impl fmt::Debug for VmInstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "VM-instruction error {} ({n})", self.0),
            None => write!(f, "VM-instruction error {} (not in Table 31-1)", self.0),
        }
    }
}

impl fmt::Display for VmInstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl core::error::Error for VmInstructionError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_violation_qualification_from_bochs() {
        // A write to an unmapped GPA through a linear translation: Bochs reported 0x182.
        let e = decode_exit(48, 0x182, 0x4000_1008, 0x4000_1008, 0);
        let VmExit::EptViolation(v) = e else { panic!("not an EPT violation: {e:?}") };
        assert!(v.qualification.write() && !v.qualification.read() && !v.qualification.fetch());
        assert_eq!(v.qualification.entry_rights(), MappingFlags::empty());
        assert!(v.qualification.linear_address_valid() && v.qualification.linear_translation());
        assert_eq!(v.gva, Some(GuestVirtAddr::new(0x4000_1008)));
        let info = v.nested_page_fault_info();
        assert_eq!(info.fault_guest_paddr, GuestPhysAddr::new(0x4000_1008));
        assert_eq!(info.access_flags, MappingFlags::WRITE);
    }

    #[test]
    fn ept_violation_on_a_present_read_only_page_and_a_paging_walk() {
        // Write (bit 1) to an entry that is readable and executable (bits 3 and 5).
        let q = EptViolationQualification(0b10_1010 | (1 << 7) | (1 << 8));
        assert_eq!(q.entry_rights(), MappingFlags::RX);
        // Fetch during the guest's own page walk: bit 7 set, bit 8 clear.
        let q = EptViolationQualification(0b1 | (1 << 7));
        assert!(q.linear_address_valid() && !q.linear_translation());
        // No linear address: the gva is dropped.
        let VmExit::EptViolation(v) = decode_exit(48, 0x4, 0x1000, 0xdead, 0) else { panic!() };
        assert_eq!(v.gva, None);
        assert_eq!(v.nested_page_fault_info().access_flags, MappingFlags::EXECUTE);
    }

    #[test]
    fn nmi_blocking_is_restored_only_where_bit_12_is_defined() {
        let q = EptViolationQualification(0x181 | (1 << 12));
        assert!(format!("{q:?}").contains("NMI unblocking due to IRET"));
        assert!(restores_nmi_blocking(q, 0, 0));
        assert!(!restores_nmi_blocking(EptViolationQualification(0x181), 0, 0));
        // The exit interrupted the delivery of a #PF: bit 12 is undefined.
        assert!(!restores_nmi_blocking(q, 0x8000_0b0e, 0));
        // NMI exiting without virtual NMIs: undefined; with virtual NMIs: virtual-NMI blocking.
        assert!(!restores_nmi_blocking(q, 0, 1 << 3));
        assert!(restores_nmi_blocking(q, 0, (1 << 3) | (1 << 5)));
    }

    #[test]
    fn io_qualification() {
        // OUT DX, AL to port 0x3f8: size 1, out, not string.
        let q = IoQualification(0x3f8 << 16);
        assert_eq!((q.size(), q.is_in(), q.is_string(), q.port()), (1, false, false, 0x3f8));
        // IN EAX, imm8 0xf4 (size 4, bit 3, bit 6 immediate).
        let q = IoQualification((0xf4 << 16) | (1 << 6) | (1 << 3) | 3);
        assert_eq!((q.size(), q.is_in(), q.port()), (4, true, 0xf4));
        // REP OUTSB.
        let q = IoQualification((0x80 << 16) | (1 << 4) | (1 << 5));
        assert!(q.is_string() && q.is_rep());
    }

    #[test]
    fn io_sizes_and_in_merging_survive_undefined_encodings() {
        // IN AL: keeps RAX 63:8.
        assert_eq!(IoQualification(8).merge_in(0x1122_3344_5566_7788, 0xffff_ffff), 0x1122_3344_5566_77ff);
        // IN AX.
        assert_eq!(IoQualification(8 | 1).merge_in(0x1122_3344_5566_7788, 0xabcd), 0x1122_3344_5566_abcd);
        // IN EAX zero-extends.
        assert_eq!(IoQualification(8 | 3).merge_in(u64::MAX, 0x1234_5678), 0x1234_5678);
        // Encodings 2, 4..7 are not used by the CPU: they must not give a size 3 or 8, whose mask
        // would be wrong or overflow a shift (1 << 64).
        for q in [2u64, 4, 5, 6, 7] {
            let q = IoQualification(q);
            assert!(matches!(q.size(), 1 | 2 | 4));
            assert_eq!(q.merge_in(u64::MAX, u64::MAX), 0xffff_ffff);
        }
    }

    #[test]
    fn interrupted_events_are_reinjected_as_they_were() {
        assert_eq!(reinjection(0x0000_0b0e, 2, 3), None, "valid bit clear");
        // A #PF with error code 2 interrupted by an EPT violation on the IDT.
        assert_eq!(
            reinjection(0x8000_0b0e, 2, 3),
            Some(Reinjection { info: 0x8000_0b0e, error_code: Some(2), instruction_length: None })
        );
        // INT 0x80 (type 4): the instruction length goes with it. Bit 12 (undefined here) and
        // bits 30:13 are cleared for the entry field.
        assert_eq!(
            reinjection(0xffff_f480, 0xdead_beef, 2),
            Some(Reinjection { info: 0x8000_0480, error_code: None, instruction_length: Some(2) })
        );
        // An NMI (type 2).
        assert_eq!(
            reinjection(0x8000_0202, 0, 0),
            Some(Reinjection { info: 0x8000_0202, error_code: None, instruction_length: None })
        );
    }

    #[test]
    fn cr_access_qualification() {
        // MOV CR4, R9 (Table 28-3: CR 4, type 0, register 9).
        let e = decode_exit(28, 4 | (9 << 8), 0, 0, 0);
        assert_eq!(e, VmExit::CrAccess(CrAccessQualification(4 | (9 << 8))));
        assert_eq!(CrAccessQualification(4 | (9 << 8)).access(), CrAccess::MovTo { cr: 4, reg: 9 });
        assert_eq!(CrAccessQualification(3 | (1 << 4) | (4 << 8)).access(), CrAccess::MovFrom { cr: 3, reg: 4 });
        assert_eq!(CrAccessQualification(2 << 4).access(), CrAccess::Clts);
        assert_eq!(CrAccessQualification((3 << 4) | (0xfff1 << 16)).access(), CrAccess::Lmsw { source: 0xfff1 });
        // Garbage in the high bits is ignored, never a panic.
        assert_eq!(CrAccessQualification(u64::MAX).access(), CrAccess::Lmsw { source: 0xffff });
    }

    #[test]
    fn every_reason_has_a_name_and_decodes() {
        assert_eq!(reason::name(48), "EPT violation");
        assert_eq!(reason::name(52), "preemption timer");
        assert_eq!(reason::name(35), "unknown");
        assert_eq!(reason::name(u16::MAX), "unknown");
        assert_eq!(decode_exit(52, 0, 0, 0, 0), VmExit::PreemptionTimer);
        for r in 0..=u16::MAX {
            let _ = decode_exit(u32::from(r), u64::MAX, u64::MAX, u64::MAX, u32::MAX);
            let _ = decode_exit(u32::from(r) | (1 << 31), u64::MAX, u64::MAX, u64::MAX, u32::MAX);
        }
    }

    #[test]
    fn other_reasons() {
        assert_eq!(
            decode_exit(49, 0, 0xfee0_0000, 0, 0),
            VmExit::EptMisconfig { gpa: GuestPhysAddr::new(0xfee0_0000) }
        );
        assert_eq!(decode_exit(18, 0, 0, 0, 0), VmExit::Vmcall);
        assert_eq!(decode_exit(12, 0, 0, 0, 0), VmExit::Hlt);
        assert_eq!(decode_exit(2, 0, 0, 0, 0), VmExit::TripleFault);
        assert_eq!(
            decode_exit((1 << 31) | 33, 0, 0, 0, 0),
            VmExit::EntryFailed(EntryFailure::InvalidGuestState { qualification: 0 })
        );
        assert_eq!(decode_exit((1 << 31) | 34, 3, 0, 0, 0), VmExit::EntryFailed(EntryFailure::MsrLoading { entry: 3 }));
        assert_eq!(decode_exit(0, 0, 0, 0, 0x8000_0b0e), VmExit::Exception { vector: 14, info: 0x8000_0b0e });
        assert_eq!(decode_exit(55, 7, 0, 0, 0), VmExit::Other { reason: 55, qualification: 7 });
    }

    #[test]
    fn vm_instruction_errors_are_named() {
        assert_eq!(VmInstructionError(7).name(), Some("VM entry with invalid control field(s)"));
        assert_eq!(VmInstructionError(8).name(), Some("VM entry with invalid host-state field(s)"));
        assert_eq!(VmInstructionError(28).name(), Some("invalid operand to INVEPT/INVVPID"));
        assert_eq!(VmInstructionError(14).name(), None);
        assert_eq!(VmInstructionError(21).name(), None);
        assert!(format!("{}", VmInstructionError(5)).contains("non-launched"));
    }
}
