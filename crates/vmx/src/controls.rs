//! VMX control bits twostage sets (Intel SDM Vol. 3C 25.6-25.8).

/// Pin-based control bit 0: external-interrupt exiting (Intel SDM Vol. 3C 25.6.1, Table 25-5).
pub const PIN_EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
/// Pin-based control bit 3: NMI exiting (Table 25-5).
pub const PIN_NMI_EXITING: u32 = 1 << 3;
/// Pin-based control bit 5: virtual NMIs (Table 25-5).
pub const PIN_VIRTUAL_NMIS: u32 = 1 << 5;
/// Pin-based control bit 6: activate VMX-preemption timer (Table 25-5).
pub const PIN_PREEMPTION_TIMER: u32 = 1 << 6;

/// Primary processor-based control bit 7: HLT exiting (Intel SDM Vol. 3C 25.6.2, Table 25-6).
pub const PROC_HLT_EXITING: u32 = 1 << 7;
/// Primary control bit 10: MWAIT exiting (Table 25-6).
pub const PROC_MWAIT_EXITING: u32 = 1 << 10;
/// Primary control bit 29: MONITOR exiting (Table 25-6).
pub const PROC_MONITOR_EXITING: u32 = 1 << 29;
/// Primary control bit 24: unconditional I/O exiting (Table 25-6).
pub const PROC_UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
/// Primary control bit 25: use I/O bitmaps (Table 25-6).
pub const PROC_USE_IO_BITMAPS: u32 = 1 << 25;
/// Primary control bit 28: use MSR bitmaps (Table 25-6).
pub const PROC_USE_MSR_BITMAPS: u32 = 1 << 28;
/// Primary control bit 31: activate secondary controls (Table 25-6).
pub const PROC_ACTIVATE_SECONDARY: u32 = 1 << 31;

/// Secondary control bit 1: enable EPT (Intel SDM Vol. 3C 25.6.2, Table 25-7).
pub const PROC2_ENABLE_EPT: u32 = 1 << 1;
/// Secondary control bit 3: enable RDTSCP (Table 25-7); without it RDTSCP raises #UD.
pub const PROC2_ENABLE_RDTSCP: u32 = 1 << 3;
/// Secondary control bit 5: enable VPID (Table 25-7).
pub const PROC2_ENABLE_VPID: u32 = 1 << 5;
/// Secondary control bit 7: unrestricted guest (Table 25-7); needs EPT.
pub const PROC2_UNRESTRICTED_GUEST: u32 = 1 << 7;

/// Secondary control bit 12: enable INVPCID (Table 25-7); without it INVPCID raises #UD.
pub const PROC2_ENABLE_INVPCID: u32 = 1 << 12;
/// Secondary control bit 20: enable XSAVES/XRSTORS (Table 25-7); without it they raise #UD.
pub const PROC2_ENABLE_XSAVES: u32 = 1 << 20;

/// VM-exit control bit 2: save debug controls (Intel SDM Vol. 3C 25.7.1, Table 25-13).
pub const EXIT_SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
/// VM-exit control bit 9: host address-space size, i.e. return to 64-bit mode (Table 25-13).
pub const EXIT_HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
/// VM-exit control bit 18: save IA32_PAT (Table 25-13).
pub const EXIT_SAVE_PAT: u32 = 1 << 18;
/// VM-exit control bit 19: load IA32_PAT (Table 25-13).
pub const EXIT_LOAD_PAT: u32 = 1 << 19;
/// VM-exit control bit 20: save IA32_EFER (Table 25-13).
pub const EXIT_SAVE_EFER: u32 = 1 << 20;
/// VM-exit control bit 21: load IA32_EFER (Table 25-13).
pub const EXIT_LOAD_EFER: u32 = 1 << 21;
/// VM-exit control bit 22: save VMX-preemption timer value (Table 25-13).
pub const EXIT_SAVE_PREEMPTION_TIMER: u32 = 1 << 22;

/// VM-entry control bit 2: load debug controls (Intel SDM Vol. 3C 25.8.1, Table 25-15).
pub const ENTRY_LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
/// VM-entry control bit 9: IA-32e mode guest (Table 25-15).
pub const ENTRY_IA32E_MODE_GUEST: u32 = 1 << 9;
/// VM-entry control bit 14: load IA32_PAT (Table 25-15).
pub const ENTRY_LOAD_PAT: u32 = 1 << 14;
/// VM-entry control bit 15: load IA32_EFER (Table 25-15).
pub const ENTRY_LOAD_EFER: u32 = 1 << 15;

/// CR0.PE, protection enable (Intel SDM Vol. 3A 2.5).
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET, extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE, numeric error; required in VMX operation (IA32_VMX_CR0_FIXED0).
pub const CR0_NE: u64 = 1 << 5;
/// CR0.MP, monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.TS, task switched.
pub const CR0_TS: u64 = 1 << 3;
/// CR0.WP, write protect.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.NW, not write-through.
pub const CR0_NW: u64 = 1 << 29;
/// CR0.CD, cache disable.
pub const CR0_CD: u64 = 1 << 30;
/// CR0.PG, paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE, physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.OSXSAVE, XSAVE and XSETBV enabled (Intel SDM Vol. 3A 2.5).
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.PCIDE, process-context identifiers.
pub const CR4_PCIDE: u64 = 1 << 17;
/// EFER.LME, long mode enable (Intel SDM Vol. 3A 2.2.1, Figure 2-4).
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA, long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE, execute-disable enable.
pub const EFER_NXE: u64 = 1 << 11;

/// Segment access rights as the VMCS holds them (Intel SDM Vol. 3C 25.4.1, Table 25-2):
/// bits 3:0 type, 4 S, 6:5 DPL, 7 P, 13 L, 14 D/B, 15 G, 16 unusable.
pub mod access_rights {
    /// 64-bit code: type 11 (execute/read, accessed), S, P, L, G.
    pub const CODE64: u32 = 0xB | (1 << 4) | (1 << 7) | (1 << 13) | (1 << 15);
    /// 32-bit flat code: type 11, S, P, D, G.
    pub const CODE32: u32 = 0xB | (1 << 4) | (1 << 7) | (1 << 14) | (1 << 15);
    /// Flat data: type 3 (read/write, accessed), S, P, D/B, G.
    pub const DATA: u32 = 0x3 | (1 << 4) | (1 << 7) | (1 << 14) | (1 << 15);
    /// Busy 64-bit TSS (type 11), P. A guest TR must be usable (Intel SDM Vol. 3C 27.3.1.2).
    pub const TSS_BUSY: u32 = 0xB | (1 << 7);
    /// An unusable segment (bit 16).
    pub const UNUSABLE: u32 = 1 << 16;
}
