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
    /// Bit 12: NMI unblocking due to IRET.
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
    /// The seed's view of the fault, for the address space.
    pub fn nested_page_fault_info(&self) -> NestedPageFaultInfo {
        NestedPageFaultInfo { fault_guest_paddr: self.gpa, access_flags: self.qualification.access_flags() }
    }
}

/// An I/O-instruction exit qualification (Intel SDM Vol. 3C 28.2.1, Table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoQualification(pub u64);

impl IoQualification {
    /// Bits 2:0 + 1: access size in bytes (1, 2 or 4).
    pub const fn size(self) -> u8 {
        (self.0 & 7) as u8 + 1
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
        other => VmExit::Other { reason: other, qualification },
    }
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
