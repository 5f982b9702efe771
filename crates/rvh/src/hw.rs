//! The instruction wrappers: CSRs, HFENCE, HLV/HSV/HLVX with exception-table recovery (riscv64 only).
//!
//! Everything here executes H-extension instructions and is compiled only for
//! `all(target_arch = "riscv64", target_os = "none")`; the logic that decides what to execute
//! lives in the portable modules ([`crate::access`], [`crate::fence`], [`crate::probe`]) and is
//! tested on the host. The gate is complementary: every other target gets `hw_host.rs`, the same
//! API with each function panicking with a clear message.
//!
//! The hypervisor runs in HS-mode with satp = Bare, so host-physical = host-virtual.

use crate::access::GuestMemOps;
use crate::extable::{ExTableEntry, HwFault, FAULT_SLOT};
use crate::fence::GvmaFence;
use core::arch::asm;
use twostage_npt::{GuestPhysAddr, GuestVirtAddr};

macro_rules! csr {
    ($(#[$doc:meta])* $name:ident, $csr:literal) => {
        $(#[$doc])*
        pub mod $name {
            use core::arch::asm;
            /// Reads the CSR.
            #[inline]
            pub fn read() -> u64 {
                let v: u64;
                // SAFETY: reading this CSR has no side effect in HS-mode.
                unsafe { asm!(concat!("csrr {0}, ", $csr), out(reg) v, options(nostack)) };
                v
            }
            /// Writes the CSR.
            ///
            /// # Safety
            /// The value changes how the hart translates, traps or enters the guest; the caller
            /// answers for the consequences.
            #[inline]
            pub unsafe fn write(v: u64) {
                // SAFETY: the caller's promise. No `nomem`: translation changes order with memory.
                unsafe { asm!(concat!("csrw ", $csr, ", {0}"), in(reg) v, options(nostack)) }
            }
            /// Sets bits (CSRRS).
            ///
            /// # Safety
            /// As for [`write()`].
            #[inline]
            pub unsafe fn set(bits: u64) {
                // SAFETY: the caller's promise.
                unsafe { asm!(concat!("csrs ", $csr, ", {0}"), in(reg) bits, options(nostack)) }
            }
            /// Clears bits (CSRRC).
            ///
            /// # Safety
            /// As for [`write()`].
            #[inline]
            pub unsafe fn clear(bits: u64) {
                // SAFETY: the caller's promise.
                unsafe { asm!(concat!("csrc ", $csr, ", {0}"), in(reg) bits, options(nostack)) }
            }
        }
    };
}

csr!(/// sstatus (Privileged 1.12 §4.1.1).
    sstatus, "sstatus");
csr!(/// stvec (§4.1.2).
    stvec, "stvec");
csr!(/// sie (§4.1.3).
    sie, "sie");
csr!(/// sip (§4.1.3).
    sip, "sip");
csr!(/// sscratch (§4.1.6).
    sscratch, "sscratch");
csr!(/// sepc (§4.1.7).
    sepc, "sepc");
csr!(/// scause (§4.1.9).
    scause, "scause");
csr!(/// stval (§4.1.10).
    stval, "stval");
csr!(/// hstatus (§8.2.1).
    hstatus, "hstatus");
csr!(/// hedeleg (§8.2.2).
    hedeleg, "hedeleg");
csr!(/// hideleg (§8.2.2).
    hideleg, "hideleg");
csr!(/// hvip (§8.2.3).
    hvip, "hvip");
csr!(/// hie (§8.2.3).
    hie, "hie");
csr!(/// hcounteren (§8.2.6).
    hcounteren, "hcounteren");
csr!(/// htval (§8.2.8).
    htval, "htval");
csr!(/// htinst (§8.2.9).
    htinst, "htinst");
csr!(/// hgatp (§8.2.10).
    hgatp, "hgatp");
csr!(/// vsstatus (§8.2.11).
    vsstatus, "vsstatus");
csr!(/// vsatp (§8.2.18).
    vsatp, "vsatp");
csr!(/// vstvec ("Virtual Supervisor Trap Vector Base Address Register (vstvec)").
    vstvec, "vstvec");
csr!(/// vsepc ("Virtual Supervisor Exception Program Counter (vsepc)").
    vsepc, "vsepc");
csr!(/// vscause ("Virtual Supervisor Cause Register (vscause)").
    vscause, "vscause");
csr!(/// vstval ("Virtual Supervisor Trap Value Register (vstval)").
    vstval, "vstval");
csr!(/// henvcfg ("Hypervisor Environment Configuration Register (henvcfg)"); by number, so that
    /// assemblers that predate the name accept it.
    henvcfg, "0x60a");
csr!(/// vsie ("Virtual Supervisor Interrupt Registers (vsip and vsie)").
    vsie, "vsie");
csr!(/// vsscratch ("Virtual Supervisor Scratch Register (vsscratch)").
    vsscratch, "vsscratch");
csr!(/// htimedelta ("Hypervisor Time Delta Registers (htimedelta, htimedeltah)"), by number.
    htimedelta, "0x605");
csr!(/// vstimecmp (the Sstc extension's "Virtual Supervisor Timer Compare (vstimecmp) Register"),
    /// by number.
    vstimecmp, "0x24d");

/// The `time` counter (Unprivileged ISA §10.1, Zicntr).
#[inline]
pub fn rdtime() -> u64 {
    let v: u64;
    // SAFETY: reading time has no side effect.
    unsafe { asm!("rdtime {0}", out(reg) v, options(nomem, nostack)) };
    v
}

/// The `cycle` counter (Unprivileged ISA §10.1; OpenSBI enables it for S-mode through mcounteren).
#[inline]
pub fn rdcycle() -> u64 {
    let v: u64;
    // SAFETY: reading cycle has no side effect.
    unsafe { asm!("rdcycle {0}", out(reg) v, options(nomem, nostack)) };
    v
}

/// HFENCE.GVMA as a [`GvmaFence`] says (Privileged 1.12 §8.3.2). The `fence`-like ordering with
/// earlier page-table stores comes from the instruction itself; the asm is not `nomem` so the
/// compiler keeps those stores before it.
pub fn hfence_gvma(f: GvmaFence) {
    let vmid = match f {
        GvmaFence::Address { vmid, .. } | GvmaFence::Vmid { vmid } => u64::from(vmid),
    };
    let rs1 = f.rs1();
    // SAFETY: a fence only discards cached translations.
    unsafe {
        match f {
            GvmaFence::Address { .. } => {
                asm!(".option push", ".option arch, +h", "hfence.gvma {0}, {1}", ".option pop", in(reg) rs1, in(reg) vmid, options(nostack))
            }
            GvmaFence::Vmid { .. } => {
                asm!(".option push", ".option arch, +h", "hfence.gvma zero, {0}", ".option pop", in(reg) vmid, options(nostack))
            }
        }
    }
}

/// HFENCE.GVMA x0, x0: every guest-physical translation of every VMID (§8.3.2).
pub fn hfence_gvma_all() {
    // SAFETY: a fence only discards cached translations.
    unsafe { asm!(".option push", ".option arch, +h", "hfence.gvma zero, zero", ".option pop", options(nostack)) }
}

/// HFENCE.VVMA x0, x0: every VS-stage translation of the current VMID (hgatp.VMID) (§8.3.2);
/// needed after the hypervisor changes vsatp or the guest's page tables behind its back.
pub fn hfence_vvma_all() {
    // SAFETY: a fence only discards cached translations.
    unsafe { asm!(".option push", ".option arch, +h", "hfence.vvma zero, zero", ".option pop", options(nostack)) }
}

/// One VS-stage fence for the guest on this hart ([`crate::smp::VsFence`]): FENCE.I, or
/// HFENCE.VVMA by address and/or ASID under the current VMID ("Hypervisor Memory-Management
/// Fence Instructions").
pub fn vs_fence(f: crate::smp::VsFence) {
    use crate::smp::VsFence;
    // SAFETY: fences only order memory and discard cached translations or instructions.
    unsafe {
        match f {
            VsFence::FenceI => asm!("fence.i", options(nostack)),
            VsFence::All => hfence_vvma_all(),
            VsFence::Asid(a) => {
                asm!(".option push", ".option arch, +h", "hfence.vvma zero, {0}", ".option pop", in(reg) u64::from(a), options(nostack))
            }
            VsFence::Page(va) => {
                asm!(".option push", ".option arch, +h", "hfence.vvma {0}, zero", ".option pop", in(reg) va, options(nostack))
            }
            VsFence::PageAsid(va, a) => {
                asm!(".option push", ".option arch, +h", "hfence.vvma {0}, {1}", ".option pop", in(reg) va, in(reg) u64::from(a), options(nostack))
            }
        }
    }
}

extern "C" {
    static __rvh_extable_start: ExTableEntry;
    static __rvh_extable_end: ExTableEntry;
}

/// The exception table the linker gathered (the image's linker script defines the bounds).
pub fn extable() -> &'static [ExTableEntry] {
    // SAFETY: the linker script places the `.rvh_extable` input sections, 16-byte entries
    // written by this module's asm, between the two symbols; nothing writes them at run time.
    unsafe {
        let start = &raw const __rvh_extable_start;
        let end = &raw const __rvh_extable_end;
        core::slice::from_raw_parts(start, (end as usize - start as usize) / core::mem::size_of::<ExTableEntry>())
    }
}

macro_rules! guarded {
    ($insn:literal, $out:expr, $($operands:tt)*) => {{
        let failed: u64;
        // SAFETY: HLV/HSV/HLVX reach guest memory only through the guest's translation; a fault
        // is recovered by the trap handler through the `.rvh_extable` entry emitted here.
        unsafe {
            asm!(
                ".option push",
                ".option arch, +h",
                concat!("1: ", $insn),
                ".option pop",
                "li {failed}, 0",
                "j 3f",
                "2: li {failed}, 1",
                "3:",
                ".pushsection .rvh_extable, \"a\"",
                ".balign 8",
                ".dword 1b, 2b",
                ".popsection",
                failed = out(reg) failed,
                $($operands)*
            )
        };
        if failed != 0 {
            // Recorded by the trap handler before it resumed at label 2.
            Err(FAULT_SLOT.take().unwrap_or(HwFault { scause: u64::MAX, stval: 0, htval: 0 }))
        } else {
            Ok($out)
        }
    }};
}

/// HLV/HSV/HLVX at hstatus.SPVP's privilege through the guest's vsatp and hgatp.
pub struct Hlv {
    _private: (),
}

impl Hlv {
    /// Sets hstatus.SPVP = 1 (accesses as VS-mode, §8.2.1) and returns the accessor.
    ///
    /// # Safety
    /// hgatp and vsatp must describe the guest whose memory is meant, and the image's trap
    /// handler must apply [`crate::extable::fixup_trap`] with [`extable`] to HS-mode traps.
    pub unsafe fn new() -> Self {
        // SAFETY: SPVP only selects the privilege of HLV/HSV (§8.2.1).
        unsafe { hstatus::set(crate::csr::hstatus::SPVP) };
        Self { _private: () }
    }
}

impl GuestMemOps for Hlv {
    fn load_u8(&mut self, gva: GuestVirtAddr) -> Result<u8, crate::extable::HwFault> {
        let v: u64;
        guarded!("hlv.bu {v}, ({a})", v, a = in(reg) gva.as_u64(), v = out(reg) v, options(nostack))
            .map(|v: u64| v as u8)
    }
    fn load_u64(&mut self, gva: GuestVirtAddr) -> Result<u64, crate::extable::HwFault> {
        let v: u64;
        guarded!("hlv.d {v}, ({a})", v, a = in(reg) gva.as_u64(), v = out(reg) v, options(nostack))
    }
    fn store_u8(&mut self, gva: GuestVirtAddr, x: u8) -> Result<(), crate::extable::HwFault> {
        guarded!("hsv.b {x}, ({a})", (), a = in(reg) gva.as_u64(), x = in(reg) u64::from(x), options(nostack))
    }
    fn store_u64(&mut self, gva: GuestVirtAddr, x: u64) -> Result<(), crate::extable::HwFault> {
        guarded!("hsv.d {x}, ({a})", (), a = in(reg) gva.as_u64(), x = in(reg) x, options(nostack))
    }
    fn fetch_u16(&mut self, gva: GuestVirtAddr) -> Result<u16, crate::extable::HwFault> {
        let v: u64;
        guarded!("hlvx.hu {v}, ({a})", v, a = in(reg) gva.as_u64(), v = out(reg) v, options(nostack))
            .map(|v: u64| v as u16)
    }
}

/// Reads hstatus with an exception-table guard: `Err` (an illegal-instruction trap) means the
/// hart has no H extension (Privileged 1.12 §8.2: the H CSRs exist only with it).
pub fn probe_hstatus() -> Result<u64, HwFault> {
    let v: u64;
    guarded!("csrr {v}, hstatus", v, v = out(reg) v, options(nostack))
}

/// hgatp and HFENCE.GVMA as [`crate::probe::HgatpAccess`].
pub struct CsrHgatp;

impl crate::probe::HgatpAccess for CsrHgatp {
    fn read(&mut self) -> u64 {
        hgatp::read()
    }
    fn write(&mut self, value: u64) {
        // SAFETY: probing happens before any guest runs (V=0, so hgatp translates nothing the
        // hypervisor does itself); [`crate::probe::probe_hgatp`] restores hgatp and fences.
        unsafe { hgatp::write(value) }
    }
    fn fence_all(&mut self) {
        hfence_gvma_all();
    }
}

/// Probes hgatp (modes, VMIDLEN) with [`crate::probe::probe_hgatp`], which restores it and fences.
pub fn probe() -> twostage_npt::HgatpCapabilities {
    crate::probe::probe_hgatp(&mut CsrHgatp)
}

/// Guest-physical read by swapping vsatp: vsatp = 0 and HFENCE.VVMA so that guest virtual =
/// guest physical, hlv copies, then vsatp restored and fenced again. Kept for comparison with
/// software translation through the nested table (`twostage_aspace::TableMemory`): this costs two
/// TLB flushes per copy, and needs the guest's VMID loaded.
///
/// # Safety
/// As for [`Hlv::new`]; hgatp must be the guest's.
pub unsafe fn copy_from_guest_swap(gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), crate::access::GuestAccessError> {
    let saved = vsatp::read();
    // SAFETY: vsatp Bare makes VS-stage translation the identity (§8.2.18); restored below.
    unsafe { vsatp::write(0) };
    hfence_vvma_all();
    // SAFETY: the caller's promise.
    let mut hlv = unsafe { Hlv::new() };
    let r = crate::access::copy_from_guest_va(&mut hlv, GuestVirtAddr::new(gpa.as_u64()), buf);
    // SAFETY: restores the guest's own value.
    unsafe { vsatp::write(saved) };
    hfence_vvma_all();
    r
}

/// Guest-physical write by swapping vsatp (see [`copy_from_guest_swap`]).
///
/// # Safety
/// As for [`copy_from_guest_swap`].
pub unsafe fn copy_to_guest_swap(gpa: GuestPhysAddr, data: &[u8]) -> Result<(), crate::access::GuestAccessError> {
    let saved = vsatp::read();
    // SAFETY: as in `copy_from_guest_swap`.
    unsafe { vsatp::write(0) };
    hfence_vvma_all();
    // SAFETY: the caller's promise.
    let mut hlv = unsafe { Hlv::new() };
    let r = crate::access::copy_to_guest_va(&mut hlv, GuestVirtAddr::new(gpa.as_u64()), data);
    // SAFETY: restores the guest's own value.
    unsafe { vsatp::write(saved) };
    hfence_vvma_all();
    r
}
