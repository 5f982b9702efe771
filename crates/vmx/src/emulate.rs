//! Pure checks for instructions a hypervisor emulates on exit, so a guest value that the CPU
//! would refuse with #GP is refused here too, instead of reaching the VMCS and failing the next
//! VM entry (or worse).

use crate::caps::{FixedBits, CR4_VMXE};
use crate::controls::{CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE};

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

/// Why a guest's MOV to CR0 or CR4 is refused (#GP, Intel SDM Vol. 2B "MOV—Move to/from Control
/// Registers"), or cannot be run by this hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrWriteError {
    /// Reserved bits set (CR0 bits 63:32; CR4 bits the CPU does not offer, or VMXE, hidden from
    /// the guest): #GP.
    Reserved(u64),
    /// CR0.PG = 1 with CR0.PE = 0: #GP.
    PagingWithoutProtection,
    /// CR0.NW = 1 with CR0.CD = 0: #GP.
    NotWriteThroughWithoutCacheDisable,
    /// Paging turned on with EFER.LME = 1 and CR4.PAE = 0, or CR4.PAE cleared in IA-32e mode:
    /// #GP (Intel SDM Vol. 3A 10.8.5).
    LongModeWithoutPae,
    /// A valid value this vCPU cannot run: CR0.PE or CR0.PG cleared without unrestricted guest
    /// (Intel SDM Vol. 3C 27.3.1.1). Not a guest error: the hypervisor stops the guest.
    Unrepresentable(u64),
}

impl core::fmt::Display for CrWriteError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Reserved(b) => write!(f, "MOV to CR sets reserved bits {b:#x}"),
            Self::PagingWithoutProtection => f.write_str("MOV to CR0 sets PG without PE"),
            Self::NotWriteThroughWithoutCacheDisable => f.write_str("MOV to CR0 sets NW without CD"),
            Self::LongModeWithoutPae => f.write_str("IA-32e paging without CR4.PAE"),
            Self::Unrepresentable(v) => write!(f, "CR0 {v:#x} needs unrestricted guest"),
        }
    }
}

impl core::error::Error for CrWriteError {}

/// What a guest's MOV to CR0 leaves: the CR0 the processor runs with (fixed bits applied), the
/// value the guest reads back (the read shadow), and EFER (LMA follows paging when LME is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrWrite {
    /// GUEST_CR0 / GUEST_CR4.
    pub guest: u64,
    /// CR0_READ_SHADOW / CR4_READ_SHADOW: what the guest wrote.
    pub shadow: u64,
    /// GUEST_IA32_EFER after the write.
    pub efer: u64,
}

/// A guest's MOV to CR0 of `value`, the guest having `old` (its own view, the read shadow) and
/// `efer`, `cr4`; `fixed` are IA32_VMX_CR0_FIXED0/1 and `unrestricted` exempts PE and PG from them
/// (Intel SDM Vol. 3C 25.6.6, 27.3.1.1). Checks as the CPU does (Vol. 2B "MOV"; Vol. 3A 2.5, 10.8.5):
/// bits 63:32 reserved, PG needs PE, NW needs CD, paging with LME needs PAE; turning paging on with
/// LME sets EFER.LMA, turning it off clears it.
pub fn cr0_write(
    value: u64,
    old: u64,
    efer: u64,
    cr4: u64,
    fixed: FixedBits,
    unrestricted: bool,
) -> Result<CrWrite, CrWriteError> {
    if value >> 32 != 0 {
        return Err(CrWriteError::Reserved(value & !0xffff_ffff));
    }
    if value & CR0_PG != 0 && value & CR0_PE == 0 {
        return Err(CrWriteError::PagingWithoutProtection);
    }
    if value & CR0_NW != 0 && value & CR0_CD == 0 {
        return Err(CrWriteError::NotWriteThroughWithoutCacheDisable);
    }
    let paging_on = old & CR0_PG == 0 && value & CR0_PG != 0;
    if paging_on && efer & EFER_LME != 0 && cr4 & CR4_PAE == 0 {
        return Err(CrWriteError::LongModeWithoutPae);
    }
    let mut f = fixed;
    if unrestricted {
        f.fixed0 &= !(CR0_PE | CR0_PG);
    }
    let guest = f.apply(value);
    if guest & (CR0_PE | CR0_PG) != value & (CR0_PE | CR0_PG) {
        return Err(CrWriteError::Unrepresentable(value));
    }
    let efer = if value & CR0_PG == 0 {
        efer & !EFER_LMA
    } else if paging_on && efer & EFER_LME != 0 {
        efer | EFER_LMA
    } else {
        efer
    };
    Ok(CrWrite { guest, shadow: value, efer })
}

/// A guest's MOV to CR4 of `value` with `efer`; `fixed` are IA32_VMX_CR4_FIXED0/1. A bit the CPU
/// does not allow in VMX operation is reserved to the guest (#GP), and so is VMXE, since the guest
/// is shown no VMX (`crate::cpuid`); VMXE stays set in the CR4 the processor runs with (Intel SDM
/// Vol. 3D A.8) and hidden by the read shadow. CR4.PAE cannot be cleared in IA-32e mode.
pub fn cr4_write(value: u64, efer: u64, fixed: FixedBits) -> Result<CrWrite, CrWriteError> {
    let reserved = (value & !fixed.fixed1) | (value & CR4_VMXE);
    if reserved != 0 {
        return Err(CrWriteError::Reserved(reserved));
    }
    if efer & EFER_LMA != 0 && value & CR4_PAE == 0 {
        return Err(CrWriteError::LongModeWithoutPae);
    }
    Ok(CrWrite { guest: fixed.apply(value), shadow: value, efer })
}

/// Why a guest's XSETBV is refused with #GP(0) (Intel SDM Vol. 2C "XSETBV"; Vol. 1 13.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XsetbvError {
    /// ECX names an XCR other than XCR0.
    NotXcr0(u32),
    /// Bits the processor does not support (CPUID.(EAX=0DH,ECX=0):EDX:EAX clear).
    Unsupported(u64),
    /// Bit 0 (x87) clear.
    NoX87,
    /// AVX (bit 2) without SSE (bit 1).
    AvxWithoutSse,
    /// The AVX-512 bits 7:5 not all equal, or set without AVX.
    Avx512,
    /// AMX TILECFG (bit 17) and TILEDATA (bit 18) differ.
    Amx,
}

impl core::fmt::Display for XsetbvError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

impl core::error::Error for XsetbvError {}

/// Checks a guest's XSETBV of `value` to XCR`xcr` against the XCR0 bits the processor supports,
/// `supported` = CPUID.(EAX=0DH,ECX=0):EDX:EAX (Intel SDM Vol. 2C "XSETBV", Vol. 1 13.3).
pub fn xsetbv_check(xcr: u32, value: u64, supported: u64) -> Result<(), XsetbvError> {
    if xcr != 0 {
        return Err(XsetbvError::NotXcr0(xcr));
    }
    if value & !supported != 0 {
        return Err(XsetbvError::Unsupported(value & !supported));
    }
    if value & 1 == 0 {
        return Err(XsetbvError::NoX87);
    }
    if value & 4 != 0 && value & 2 == 0 {
        return Err(XsetbvError::AvxWithoutSse);
    }
    let avx512 = value & 0xe0;
    if avx512 != 0 && (avx512 != 0xe0 || value & 4 == 0) {
        return Err(XsetbvError::Avx512);
    }
    if (value >> 17) & 1 != (value >> 18) & 1 {
        return Err(XsetbvError::Amx);
    }
    Ok(())
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

#[cfg(test)]
mod cr_tests {
    use super::*;
    use crate::controls::*;

    const CR0_FIXED: FixedBits = FixedBits { fixed0: 0x8000_0021, fixed1: 0xffff_ffff };
    const CR4_FIXED: FixedBits = FixedBits { fixed0: 0x2000, fixed1: 0x3f_ffff };

    #[test]
    fn cr0_writes_keep_ne_and_follow_long_mode() {
        // Linux's CR0_STATE without NE: the processor keeps NE, the guest reads what it wrote.
        let v = CR0_PE | CR0_MP | CR0_ET | CR0_WP | (1 << 18) | CR0_PG;
        let cur = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
        let w = cr0_write(v, cur, EFER_LME | EFER_LMA, CR4_PAE, CR0_FIXED, false).unwrap();
        assert_eq!((w.guest, w.shadow, w.efer), (v | CR0_NE, v, EFER_LME | EFER_LMA));
        // Paging on with LME: LMA set; without PAE: #GP.
        let w = cr0_write(CR0_PE | CR0_PG, CR0_PE, EFER_LME, CR4_PAE, CR0_FIXED, true).unwrap();
        assert_eq!(w.efer, EFER_LME | EFER_LMA);
        assert_eq!(
            cr0_write(CR0_PE | CR0_PG, CR0_PE, EFER_LME, 0, CR0_FIXED, true),
            Err(CrWriteError::LongModeWithoutPae)
        );
        // Paging off clears LMA; allowed only with unrestricted guest.
        assert_eq!(
            cr0_write(CR0_PE, CR0_PE | CR0_PG, EFER_LME | EFER_LMA, CR4_PAE, CR0_FIXED, true).unwrap().efer,
            EFER_LME
        );
        assert_eq!(
            cr0_write(CR0_PE, CR0_PE | CR0_PG, 0, 0, CR0_FIXED, false),
            Err(CrWriteError::Unrepresentable(CR0_PE))
        );
        // The CPU's own #GP cases.
        assert_eq!(cr0_write(1 << 32, 0, 0, 0, CR0_FIXED, true), Err(CrWriteError::Reserved(1 << 32)));
        assert_eq!(cr0_write(CR0_PG, 0, 0, 0, CR0_FIXED, true), Err(CrWriteError::PagingWithoutProtection));
        assert_eq!(
            cr0_write(CR0_PE | CR0_NW, 0, 0, 0, CR0_FIXED, true),
            Err(CrWriteError::NotWriteThroughWithoutCacheDisable)
        );
    }

    #[test]
    fn cr4_writes_hide_vmxe_and_refuse_what_the_cpu_lacks() {
        let v = CR4_PAE | (1 << 7) | CR4_OSXSAVE;
        let w = cr4_write(v, EFER_LMA, CR4_FIXED).unwrap();
        assert_eq!((w.guest, w.shadow), (v | CR4_VMXE, v));
        assert_eq!(cr4_write(v | CR4_VMXE, 0, CR4_FIXED), Err(CrWriteError::Reserved(CR4_VMXE)));
        assert_eq!(cr4_write(v | (1 << 22), 0, CR4_FIXED), Err(CrWriteError::Reserved(1 << 22)));
        assert_eq!(cr4_write(0, EFER_LMA, CR4_FIXED), Err(CrWriteError::LongModeWithoutPae));
    }

    #[test]
    fn xsetbv_follows_the_sdm() {
        let sup = 0xe7; // x87, SSE, AVX, AVX-512
        assert_eq!(xsetbv_check(0, 7, sup), Ok(()));
        assert_eq!(xsetbv_check(0, 0xe7, sup), Ok(()));
        assert_eq!(xsetbv_check(1, 7, sup), Err(XsetbvError::NotXcr0(1)));
        assert_eq!(xsetbv_check(0, 0x207, sup), Err(XsetbvError::Unsupported(0x200)));
        assert_eq!(xsetbv_check(0, 6, sup), Err(XsetbvError::NoX87));
        assert_eq!(xsetbv_check(0, 5, sup), Err(XsetbvError::AvxWithoutSse));
        assert_eq!(xsetbv_check(0, 0x27, sup), Err(XsetbvError::Avx512));
        assert_eq!(xsetbv_check(0, 0xe3, sup), Err(XsetbvError::Avx512));
        assert_eq!(xsetbv_check(0, 0x20001, 0x60003), Err(XsetbvError::Amx));
    }
}
