//! Pure checks for instructions a hypervisor emulates on exit, so a guest value that the CPU
//! would refuse with #GP is refused here too, instead of reaching the VMCS and failing the next
//! VM entry (or worse).

use crate::controls::{EFER_LMA, EFER_LME, EFER_NXE};

/// EFER.SCE, SYSCALL enable (Intel SDM Vol. 3A 2.2.1, Figure 2-4).
pub const EFER_SCE: u64 = 1 << 0;

/// Why a guest's WRMSR to IA32_EFER is refused (the CPU raises #GP; Intel SDM Vol. 4 Table 2-2
/// "IA32_EFER", Vol. 3A 10.8.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EferWriteError {
    /// A reserved bit (anything but SCE, LME, LMA, NXE) is set.
    Reserved(u64),
    /// LME changed while paging is on (CR0.PG = 1).
    LmeWithPaging,
}

impl core::fmt::Display for EferWriteError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Reserved(bits) => write!(f, "WRMSR to IA32_EFER sets reserved bits {bits:#x}"),
            Self::LmeWithPaging => f.write_str("WRMSR to IA32_EFER changes LME while paging is on"),
        }
    }
}

impl core::error::Error for EferWriteError {}

/// The EFER value a guest's WRMSR of `requested` leaves, given the `current` value and whether
/// the guest has paging on. LMA is read-only: it keeps its current value whatever is written.
pub fn efer_write(current: u64, requested: u64, paging: bool) -> Result<u64, EferWriteError> {
    let known = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    if requested & !known != 0 {
        return Err(EferWriteError::Reserved(requested & !known));
    }
    if paging && (requested ^ current) & EFER_LME != 0 {
        return Err(EferWriteError::LmeWithPaging);
    }
    Ok((requested & !EFER_LMA) | (current & EFER_LMA))
}

/// Whether MOV to CR3 of `value` is allowed with CR4.PCIDE = 0: bits 63:MAXPHYADDR must be 0
/// (Intel SDM Vol. 3A 4.5.2, Vol. 2A "MOV to/from control registers"); the VM-entry check of
/// guest CR3 is the same (Vol. 3C 27.3.1.1). `maxphyaddr` comes from CPUID.80000008H:EAX bits 7:0;
/// any number is accepted.
pub const fn cr3_load_allowed(value: u64, maxphyaddr: u32) -> bool {
    maxphyaddr >= 64 || value >> maxphyaddr == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efer_writes_follow_the_cpu() {
        let long = EFER_LME | EFER_LMA;
        // SCE and NXE may change in long mode; LMA stays.
        assert_eq!(efer_write(long, long | EFER_SCE | EFER_NXE, true), Ok(long | EFER_SCE | EFER_NXE));
        assert_eq!(efer_write(long, EFER_LME, true), Ok(long), "LMA is read-only");
        // Clearing LME with paging on: #GP. Setting it with paging off (the multiboot path): fine.
        assert_eq!(efer_write(long, 0, true), Err(EferWriteError::LmeWithPaging));
        assert_eq!(efer_write(0, EFER_LME, false), Ok(EFER_LME));
        // Reserved bits: #GP, never into the VMCS.
        assert_eq!(efer_write(long, long | (1 << 9), true), Err(EferWriteError::Reserved(1 << 9)));
        assert_eq!(efer_write(long, u64::MAX, false), Err(EferWriteError::Reserved(!0xd01)));
    }

    #[test]
    fn cr3_loads_respect_maxphyaddr() {
        assert!(cr3_load_allowed(0x1000, 36));
        assert!(cr3_load_allowed((1 << 36) - 0x1000, 36));
        assert!(!cr3_load_allowed(1 << 36, 36));
        assert!(!cr3_load_allowed(u64::MAX, 52));
        // Nonsense widths do not overflow the shift.
        assert!(cr3_load_allowed(u64::MAX, 64));
        assert!(cr3_load_allowed(u64::MAX, u32::MAX));
        assert!(!cr3_load_allowed(1, 0));
    }
}
