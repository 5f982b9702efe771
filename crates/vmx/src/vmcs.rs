//! VMCS field encodings (Intel SDM Vol. 3C Appendix B, "Field Encoding in VMCS").

use core::fmt;

/// The encoding of one VMCS field, as VMREAD and VMWRITE take it (Intel SDM Vol. 3C 25.11.2).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmcsField(pub u32);

impl fmt::Debug for VmcsField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmcsField({:#06x})", self.0)
    }
}

impl VmcsField {
    /// Width of the field, bits 14:13 of the encoding (Intel SDM Vol. 3C 25.11.2, Table 25-21):
    /// 0 = 16-bit, 1 = 64-bit, 2 = 32-bit, 3 = natural width.
    pub const fn width_bits(self) -> u32 {
        match (self.0 >> 13) & 3 {
            0 => 16,
            2 => 32,
            _ => 64,
        }
    }

    /// Whether the field is read-only (type bits 11:10 = 1, "VM-exit information").
    pub const fn is_read_only(self) -> bool {
        (self.0 >> 10) & 3 == 1
    }

    // 16-bit control fields (Appendix B.1.1).
    /// Virtual-processor identifier.
    pub const VPID: Self = Self(0x0000);
    // 16-bit guest-state fields (B.1.2).
    /// Guest ES selector.
    pub const GUEST_ES_SELECTOR: Self = Self(0x0800);
    /// Guest CS selector.
    pub const GUEST_CS_SELECTOR: Self = Self(0x0802);
    /// Guest SS selector.
    pub const GUEST_SS_SELECTOR: Self = Self(0x0804);
    /// Guest DS selector.
    pub const GUEST_DS_SELECTOR: Self = Self(0x0806);
    /// Guest FS selector.
    pub const GUEST_FS_SELECTOR: Self = Self(0x0808);
    /// Guest GS selector.
    pub const GUEST_GS_SELECTOR: Self = Self(0x080A);
    /// Guest LDTR selector.
    pub const GUEST_LDTR_SELECTOR: Self = Self(0x080C);
    /// Guest TR selector.
    pub const GUEST_TR_SELECTOR: Self = Self(0x080E);
    // 16-bit host-state fields (B.1.3).
    /// Host ES selector.
    pub const HOST_ES_SELECTOR: Self = Self(0x0C00);
    /// Host CS selector.
    pub const HOST_CS_SELECTOR: Self = Self(0x0C02);
    /// Host SS selector.
    pub const HOST_SS_SELECTOR: Self = Self(0x0C04);
    /// Host DS selector.
    pub const HOST_DS_SELECTOR: Self = Self(0x0C06);
    /// Host FS selector.
    pub const HOST_FS_SELECTOR: Self = Self(0x0C08);
    /// Host GS selector.
    pub const HOST_GS_SELECTOR: Self = Self(0x0C0A);
    /// Host TR selector.
    pub const HOST_TR_SELECTOR: Self = Self(0x0C0C);

    // 64-bit control fields (B.2.1).
    /// I/O bitmap A address.
    pub const IO_BITMAP_A: Self = Self(0x2000);
    /// I/O bitmap B address.
    pub const IO_BITMAP_B: Self = Self(0x2002);
    /// MSR bitmaps address.
    pub const MSR_BITMAPS: Self = Self(0x2004);
    /// EPT pointer (Intel SDM Vol. 3C 25.6.11).
    pub const EPT_POINTER: Self = Self(0x201A);
    // 64-bit read-only data field (B.2.2).
    /// Guest-physical address of an EPT violation or misconfiguration.
    pub const GUEST_PHYSICAL_ADDRESS: Self = Self(0x2400);
    // 64-bit guest-state fields (B.2.3).
    /// VMCS link pointer (must be all ones when unused, 27.3.1.5).
    pub const VMCS_LINK_POINTER: Self = Self(0x2800);
    /// Guest IA32_DEBUGCTL.
    pub const GUEST_IA32_DEBUGCTL: Self = Self(0x2802);
    /// XSS-exiting bitmap (Intel SDM Vol. 3C 25.6.20).
    pub const XSS_EXITING_BITMAP: Self = Self(0x202C);
    /// Guest IA32_PAT.
    pub const GUEST_IA32_PAT: Self = Self(0x2804);
    /// Guest IA32_EFER.
    pub const GUEST_IA32_EFER: Self = Self(0x2806);
    // 64-bit host-state fields (B.2.4).
    /// Host IA32_PAT.
    pub const HOST_IA32_PAT: Self = Self(0x2C00);
    /// Host IA32_EFER.
    pub const HOST_IA32_EFER: Self = Self(0x2C02);

    // 32-bit control fields (B.3.1).
    /// Pin-based VM-execution controls.
    pub const PIN_BASED_CONTROLS: Self = Self(0x4000);
    /// Primary processor-based VM-execution controls.
    pub const PRIMARY_PROCBASED_CONTROLS: Self = Self(0x4002);
    /// Exception bitmap.
    pub const EXCEPTION_BITMAP: Self = Self(0x4004);
    /// Page-fault error-code mask.
    pub const PAGE_FAULT_ERROR_CODE_MASK: Self = Self(0x4006);
    /// Page-fault error-code match.
    pub const PAGE_FAULT_ERROR_CODE_MATCH: Self = Self(0x4008);
    /// CR3-target count.
    pub const CR3_TARGET_COUNT: Self = Self(0x400A);
    /// Primary VM-exit controls.
    pub const EXIT_CONTROLS: Self = Self(0x400C);
    /// VM-exit MSR-store count.
    pub const EXIT_MSR_STORE_COUNT: Self = Self(0x400E);
    /// VM-exit MSR-load count.
    pub const EXIT_MSR_LOAD_COUNT: Self = Self(0x4010);
    /// VM-entry controls.
    pub const ENTRY_CONTROLS: Self = Self(0x4012);
    /// VM-entry MSR-load count.
    pub const ENTRY_MSR_LOAD_COUNT: Self = Self(0x4014);
    /// VM-entry interruption-information field.
    pub const ENTRY_INTERRUPTION_INFO: Self = Self(0x4016);
    /// VM-entry exception error code (B.3.1).
    pub const ENTRY_EXCEPTION_ERROR_CODE: Self = Self(0x4018);
    /// VM-entry instruction length (B.3.1).
    pub const ENTRY_INSTRUCTION_LENGTH: Self = Self(0x401A);
    /// Secondary processor-based VM-execution controls.
    pub const SECONDARY_PROCBASED_CONTROLS: Self = Self(0x401E);
    // 32-bit read-only data fields (B.3.2).
    /// VM-instruction error.
    pub const VM_INSTRUCTION_ERROR: Self = Self(0x4400);
    /// Exit reason.
    pub const EXIT_REASON: Self = Self(0x4402);
    /// VM-exit interruption information.
    pub const EXIT_INTERRUPTION_INFO: Self = Self(0x4404);
    /// VM-exit interruption error code.
    pub const EXIT_INTERRUPTION_ERROR_CODE: Self = Self(0x4406);
    /// IDT-vectoring information (B.3.2).
    pub const IDT_VECTORING_INFO: Self = Self(0x4408);
    /// IDT-vectoring error code (B.3.2).
    pub const IDT_VECTORING_ERROR_CODE: Self = Self(0x440A);
    /// VM-exit instruction length.
    pub const EXIT_INSTRUCTION_LENGTH: Self = Self(0x440C);
    /// VM-exit instruction information.
    pub const EXIT_INSTRUCTION_INFO: Self = Self(0x440E);
    // 32-bit guest-state fields (B.3.3).
    /// Guest ES limit.
    pub const GUEST_ES_LIMIT: Self = Self(0x4800);
    /// Guest CS limit.
    pub const GUEST_CS_LIMIT: Self = Self(0x4802);
    /// Guest SS limit.
    pub const GUEST_SS_LIMIT: Self = Self(0x4804);
    /// Guest DS limit.
    pub const GUEST_DS_LIMIT: Self = Self(0x4806);
    /// Guest FS limit.
    pub const GUEST_FS_LIMIT: Self = Self(0x4808);
    /// Guest GS limit.
    pub const GUEST_GS_LIMIT: Self = Self(0x480A);
    /// Guest LDTR limit.
    pub const GUEST_LDTR_LIMIT: Self = Self(0x480C);
    /// Guest TR limit.
    pub const GUEST_TR_LIMIT: Self = Self(0x480E);
    /// Guest GDTR limit.
    pub const GUEST_GDTR_LIMIT: Self = Self(0x4810);
    /// Guest IDTR limit.
    pub const GUEST_IDTR_LIMIT: Self = Self(0x4812);
    /// Guest ES access rights.
    pub const GUEST_ES_ACCESS_RIGHTS: Self = Self(0x4814);
    /// Guest CS access rights.
    pub const GUEST_CS_ACCESS_RIGHTS: Self = Self(0x4816);
    /// Guest SS access rights.
    pub const GUEST_SS_ACCESS_RIGHTS: Self = Self(0x4818);
    /// Guest DS access rights.
    pub const GUEST_DS_ACCESS_RIGHTS: Self = Self(0x481A);
    /// Guest FS access rights.
    pub const GUEST_FS_ACCESS_RIGHTS: Self = Self(0x481C);
    /// Guest GS access rights.
    pub const GUEST_GS_ACCESS_RIGHTS: Self = Self(0x481E);
    /// Guest LDTR access rights.
    pub const GUEST_LDTR_ACCESS_RIGHTS: Self = Self(0x4820);
    /// Guest TR access rights.
    pub const GUEST_TR_ACCESS_RIGHTS: Self = Self(0x4822);
    /// Guest interruptibility state.
    pub const GUEST_INTERRUPTIBILITY: Self = Self(0x4824);
    /// Guest activity state.
    pub const GUEST_ACTIVITY_STATE: Self = Self(0x4826);
    /// Guest IA32_SYSENTER_CS.
    pub const GUEST_SYSENTER_CS: Self = Self(0x482A);
    /// VMX-preemption timer value (B.3.3).
    pub const PREEMPTION_TIMER_VALUE: Self = Self(0x482E);
    // 32-bit host-state field (B.3.4).
    /// Host IA32_SYSENTER_CS.
    pub const HOST_SYSENTER_CS: Self = Self(0x4C00);

    // Natural-width control fields (B.4.1).
    /// CR0 guest/host mask.
    pub const CR0_GUEST_HOST_MASK: Self = Self(0x6000);
    /// CR4 guest/host mask.
    pub const CR4_GUEST_HOST_MASK: Self = Self(0x6002);
    /// CR0 read shadow.
    pub const CR0_READ_SHADOW: Self = Self(0x6004);
    /// CR4 read shadow.
    pub const CR4_READ_SHADOW: Self = Self(0x6006);
    // Natural-width read-only data fields (B.4.2).
    /// Exit qualification.
    pub const EXIT_QUALIFICATION: Self = Self(0x6400);
    /// Guest-linear address.
    pub const GUEST_LINEAR_ADDRESS: Self = Self(0x640A);
    // Natural-width guest-state fields (B.4.3).
    /// Guest CR0.
    pub const GUEST_CR0: Self = Self(0x6800);
    /// Guest CR3.
    pub const GUEST_CR3: Self = Self(0x6802);
    /// Guest CR4.
    pub const GUEST_CR4: Self = Self(0x6804);
    /// Guest ES base.
    pub const GUEST_ES_BASE: Self = Self(0x6806);
    /// Guest CS base.
    pub const GUEST_CS_BASE: Self = Self(0x6808);
    /// Guest SS base.
    pub const GUEST_SS_BASE: Self = Self(0x680A);
    /// Guest DS base.
    pub const GUEST_DS_BASE: Self = Self(0x680C);
    /// Guest FS base.
    pub const GUEST_FS_BASE: Self = Self(0x680E);
    /// Guest GS base.
    pub const GUEST_GS_BASE: Self = Self(0x6810);
    /// Guest LDTR base.
    pub const GUEST_LDTR_BASE: Self = Self(0x6812);
    /// Guest TR base.
    pub const GUEST_TR_BASE: Self = Self(0x6814);
    /// Guest GDTR base.
    pub const GUEST_GDTR_BASE: Self = Self(0x6816);
    /// Guest IDTR base.
    pub const GUEST_IDTR_BASE: Self = Self(0x6818);
    /// Guest DR7.
    pub const GUEST_DR7: Self = Self(0x681A);
    /// Guest RSP.
    pub const GUEST_RSP: Self = Self(0x681C);
    /// Guest RIP.
    pub const GUEST_RIP: Self = Self(0x681E);
    /// Guest RFLAGS.
    pub const GUEST_RFLAGS: Self = Self(0x6820);
    /// Guest pending debug exceptions.
    pub const GUEST_PENDING_DEBUG: Self = Self(0x6822);
    /// Guest IA32_SYSENTER_ESP.
    pub const GUEST_SYSENTER_ESP: Self = Self(0x6824);
    /// Guest IA32_SYSENTER_EIP.
    pub const GUEST_SYSENTER_EIP: Self = Self(0x6826);
    // Natural-width host-state fields (B.4.4).
    /// Host CR0.
    pub const HOST_CR0: Self = Self(0x6C00);
    /// Host CR3.
    pub const HOST_CR3: Self = Self(0x6C02);
    /// Host CR4.
    pub const HOST_CR4: Self = Self(0x6C04);
    /// Host FS base.
    pub const HOST_FS_BASE: Self = Self(0x6C06);
    /// Host GS base.
    pub const HOST_GS_BASE: Self = Self(0x6C08);
    /// Host TR base.
    pub const HOST_TR_BASE: Self = Self(0x6C0A);
    /// Host GDTR base.
    pub const HOST_GDTR_BASE: Self = Self(0x6C0C);
    /// Host IDTR base.
    pub const HOST_IDTR_BASE: Self = Self(0x6C0E);
    /// Host IA32_SYSENTER_ESP.
    pub const HOST_SYSENTER_ESP: Self = Self(0x6C10);
    /// Host IA32_SYSENTER_EIP.
    pub const HOST_SYSENTER_EIP: Self = Self(0x6C12);
    /// Host RSP.
    pub const HOST_RSP: Self = Self(0x6C14);
    /// Host RIP.
    pub const HOST_RIP: Self = Self(0x6C16);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_and_types_follow_the_encoding() {
        assert_eq!(VmcsField::VPID.width_bits(), 16);
        assert_eq!(VmcsField::EPT_POINTER.width_bits(), 64);
        assert_eq!(VmcsField::EXIT_REASON.width_bits(), 32);
        assert_eq!(VmcsField::GUEST_RIP.width_bits(), 64);
        assert!(VmcsField::EXIT_REASON.is_read_only());
        assert!(VmcsField::GUEST_PHYSICAL_ADDRESS.is_read_only());
        assert!(VmcsField::EXIT_QUALIFICATION.is_read_only());
        assert!(!VmcsField::GUEST_RIP.is_read_only());
        assert!(!VmcsField::EPT_POINTER.is_read_only());
    }
}
