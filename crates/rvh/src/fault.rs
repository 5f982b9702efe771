//! Guest-page fault decoding: scause/stval/htval/htinst into [`NestedPageFaultInfo`] plus detail.

use crate::csr::cause;
use crate::insn::{self, MemAccess};
use core::fmt;
use twostage_npt::{Access, GuestPhysAddr, GuestVirtAddr, MappingFlags, NestedPageFaultInfo};

/// The trap CSRs a hypervisor reads on a trap into HS-mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrapCsrs {
    /// scause (Privileged 1.12 §4.1.9).
    pub scause: u64,
    /// stval: the faulting (guest) virtual address for memory faults (§4.1.10).
    pub stval: u64,
    /// htval: the guest-physical address shifted right by 2, or 0 (§8.2.8).
    pub htval: u64,
    /// htinst: 0, a transformed instruction, or a pseudo-instruction (§8.2.9, §8.6.3).
    pub htinst: u64,
    /// hstatus.GVA: whether stval holds a guest virtual address (§8.2.1).
    pub gva_valid: bool,
}

/// An implicit VS-stage page-table access that took the guest-page fault (§8.6.3: the
/// pseudo-instructions htinst reports for them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImplicitAccess {
    /// 32-bit read of a VS-stage PTE (htinst 0x00002000).
    Read32,
    /// 32-bit write of a VS-stage PTE, an A/D update (htinst 0x00002020).
    Write32,
    /// 64-bit read of a VS-stage PTE (htinst 0x00003000).
    Read64,
    /// 64-bit write of a VS-stage PTE, an A/D update (htinst 0x00003020).
    Write64,
}

impl ImplicitAccess {
    /// Recognises the pseudo-instruction values of Privileged 1.12 §8.6.3 Table 8.12.
    pub const fn from_htinst(htinst: u64) -> Option<Self> {
        match htinst {
            0x0000_2000 => Some(Self::Read32),
            0x0000_2020 => Some(Self::Write32),
            0x0000_3000 => Some(Self::Read64),
            0x0000_3020 => Some(Self::Write64),
            _ => None,
        }
    }

    /// The G-stage access the walker made: a PTE read, or a PTE write for an A/D update.
    pub const fn access(self) -> Access {
        match self {
            Self::Read32 | Self::Read64 => Access::Read,
            Self::Write32 | Self::Write64 => Access::Write,
        }
    }
}

/// What htinst said about the faulting instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HtinstInfo {
    /// htinst was 0 (QEMU 7.2 always writes 0): the hypervisor must fetch the instruction.
    None,
    /// A transformed load or store, already decoded.
    Transformed(MemAccess),
    /// An implicit VS-stage page-table access (a pseudo-instruction).
    Implicit(ImplicitAccess),
    /// A value this decoder does not interpret (custom or a transformed non-load/store).
    Other(u64),
}

/// A decoded guest-page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPageFault {
    /// The engine-facing part: guest-physical address and the access that faulted.
    pub info: NestedPageFaultInfo,
    /// The guest virtual address of the original access, when hstatus.GVA says stval holds one.
    pub gva: Option<GuestVirtAddr>,
    /// The original access type (from scause); for an implicit access this differs from
    /// `info.access_flags`, which names the page-table read or write itself.
    pub original: Access,
    /// What htinst told us.
    pub htinst: HtinstInfo,
}

impl GuestPageFault {
    /// Whether the fault came from the guest's own page-table walk rather than the access itself.
    pub fn is_implicit(&self) -> bool {
        matches!(self.htinst, HtinstInfo::Implicit(_))
    }
}

/// Why a trap could not be decoded as a guest-page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultDecodeError {
    /// scause is not 20, 21 or 23.
    NotGuestPageFault {
        /// The scause value.
        scause: u64,
    },
    /// htval << 2 does not fit a guest-physical address.
    GpaOutOfRange {
        /// The htval value.
        htval: u64,
    },
    /// htval is 0: the hart did not report the guest-physical address (the spec allows htval to
    /// be written with zero for any guest-page fault), which is not the same as GPA 0. The caller
    /// finds the GPA by walking the guest's own tables from stval and completes the fault with
    /// [`UnreportedGpa::with_gpa`], or gives up; it must never act on GPA 0.
    GpaNotReported(UnreportedGpa),
}

/// A guest-page fault whose guest-physical address the hart did not report (htval = 0):
/// everything else the trap said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnreportedGpa {
    /// The guest virtual address of the original access, when hstatus.GVA says stval holds one:
    /// where a software walk of the guest's VS-stage tables starts.
    pub gva: Option<GuestVirtAddr>,
    /// The original access type (from scause): what to walk for.
    pub original: Access,
    /// What htinst told us (an implicit access means the fault is on a VS-stage PTE, whose
    /// address the walk finds as the entry it cannot read).
    pub htinst: HtinstInfo,
}

impl UnreportedGpa {
    /// Whether the fault came from the guest's own page-table walk (htinst's pseudo-instruction).
    pub fn is_implicit(&self) -> bool {
        matches!(self.htinst, HtinstInfo::Implicit(_))
    }

    /// The fault with the guest-physical address found by software: for an explicit access the
    /// address the guest's tables translate the GVA to, for an implicit one the address of the
    /// VS-stage PTE the walk could not reach.
    pub fn with_gpa(self, gpa: GuestPhysAddr) -> GuestPageFault {
        let access = match self.htinst {
            HtinstInfo::Implicit(imp) => imp.access(),
            _ => self.original,
        };
        GuestPageFault {
            info: NestedPageFaultInfo { fault_guest_paddr: gpa, access_flags: MappingFlags::from(access) },
            gva: self.gva,
            original: self.original,
            htinst: self.htinst,
        }
    }
}

impl fmt::Display for FaultDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotGuestPageFault { scause } => write!(f, "scause {scause} is not a guest-page fault"),
            Self::GpaOutOfRange { htval } => write!(f, "htval {htval:#x} gives an out-of-range GPA"),
            Self::GpaNotReported(u) => {
                write!(f, "guest-page fault on a guest {} with no GPA reported (htval 0)", u.original)?;
                match u.gva {
                    Some(gva) => write!(f, " at {gva}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl core::error::Error for FaultDecodeError {}

/// Decodes a guest-page fault (scause 20, 21, 23; Privileged spec, "Guest-Page Faults" and
/// "Trap Cause Codes").
///
/// The faulting GPA is `htval << 2` (Privileged spec, "Hypervisor Trap Value Register (htval)")
/// plus, for an explicit access, the low two bits of the virtual address in stval, which htval
/// does not carry. For an implicit access the GPA is the PTE's own address and stval's low bits
/// do not apply. htval may also be 0, "GPA not reported": that is
/// [`FaultDecodeError::GpaNotReported`], never GPA 0.
pub fn decode_guest_page_fault(t: &TrapCsrs) -> Result<GuestPageFault, FaultDecodeError> {
    let original = match t.scause {
        cause::INSN_GUEST_PAGE => Access::Execute,
        cause::LOAD_GUEST_PAGE => Access::Read,
        cause::STORE_GUEST_PAGE => Access::Write,
        other => return Err(FaultDecodeError::NotGuestPageFault { scause: other }),
    };
    let htinst = if let Some(imp) = ImplicitAccess::from_htinst(t.htinst) {
        HtinstInfo::Implicit(imp)
    } else if t.htinst == 0 {
        HtinstInfo::None
    } else if let Some(m) = insn::decode_transformed(t.htinst) {
        HtinstInfo::Transformed(m)
    } else {
        HtinstInfo::Other(t.htinst)
    };
    if t.htval == 0 {
        return Err(FaultDecodeError::GpaNotReported(UnreportedGpa {
            gva: t.gva_valid.then(|| GuestVirtAddr::new(t.stval)),
            original,
            htinst,
        }));
    }
    let base = t
        .htval
        .checked_shl(2)
        .filter(|v| v >> 2 == t.htval)
        .ok_or(FaultDecodeError::GpaOutOfRange { htval: t.htval })?;
    let (gpa, access) = match htinst {
        HtinstInfo::Implicit(imp) => (base, imp.access()),
        _ => (base | (t.stval & 3), original),
    };
    let gpa = GuestPhysAddr::try_new(gpa).map_err(|_| FaultDecodeError::GpaOutOfRange { htval: t.htval })?;
    Ok(GuestPageFault {
        info: NestedPageFaultInfo { fault_guest_paddr: gpa, access_flags: MappingFlags::from(access) },
        gva: t.gva_valid.then(|| GuestVirtAddr::new(t.stval)),
        original,
        htinst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insn::MemOp;

    #[test]
    fn store_fault_combines_htval_and_stval() {
        // Seen on QEMU: a store to unmapped GPA 0x1000_0003 from GVA 0xffff_0003.
        let t = TrapCsrs { scause: 23, stval: 0xffff_0003, htval: 0x1000_0003 >> 2, htinst: 0, gva_valid: true };
        let f = decode_guest_page_fault(&t).unwrap();
        assert_eq!(f.info.fault_guest_paddr, GuestPhysAddr::new(0x1000_0003));
        assert_eq!(f.info.access_flags, MappingFlags::WRITE);
        assert_eq!(f.gva, Some(GuestVirtAddr::new(0xffff_0003)));
        assert_eq!(f.htinst, HtinstInfo::None);
        assert!(!f.is_implicit());
    }

    #[test]
    fn fetch_and_load_faults() {
        let t = TrapCsrs { scause: 20, stval: 0x8000_1000, htval: 0x8000_1000 >> 2, htinst: 0, gva_valid: true };
        let f = decode_guest_page_fault(&t).unwrap();
        assert_eq!(f.info.access_flags, MappingFlags::EXECUTE);
        assert_eq!(f.original, Access::Execute);
        let t = TrapCsrs { scause: 21, stval: 0x10, htval: 0x4000, htinst: 0x0005_2603 & !0xf8000, gva_valid: false };
        let f = decode_guest_page_fault(&t).unwrap();
        assert_eq!(f.info.fault_guest_paddr, GuestPhysAddr::new(0x1_0000));
        assert_eq!(f.gva, None);
        assert!(matches!(
            f.htinst,
            HtinstInfo::Transformed(MemAccess { op: MemOp::Load { rd: 12, .. }, width: 4, .. })
        ));
    }

    #[test]
    fn implicit_walk_access_uses_the_pte_address() {
        // A load whose VS-stage walk hit an unmapped PTE page at GPA 0x8020_0ff8 wanting A/D update.
        let t = TrapCsrs { scause: 21, stval: 0x4000_0007, htval: 0x8020_0ff8 >> 2, htinst: 0x3020, gva_valid: true };
        let f = decode_guest_page_fault(&t).unwrap();
        assert!(f.is_implicit());
        assert_eq!(f.info.fault_guest_paddr, GuestPhysAddr::new(0x8020_0ff8));
        assert_eq!(f.info.access_flags, MappingFlags::WRITE);
        assert_eq!(f.original, Access::Read);
        assert_eq!(ImplicitAccess::from_htinst(0x2000), Some(ImplicitAccess::Read32));
    }

    #[test]
    fn other_causes_and_bad_htval_are_errors() {
        assert_eq!(
            decode_guest_page_fault(&TrapCsrs { scause: 13, ..Default::default() }),
            Err(FaultDecodeError::NotGuestPageFault { scause: 13 })
        );
        let t = TrapCsrs { scause: 21, htval: u64::MAX >> 1, ..Default::default() };
        assert!(matches!(decode_guest_page_fault(&t), Err(FaultDecodeError::GpaOutOfRange { .. })));
    }

    #[test]
    fn htval_zero_is_gpa_not_reported_not_gpa_zero() {
        // A store from GVA 0x4000_1003 whose GPA the hart did not report.
        let t = TrapCsrs { scause: 23, stval: 0x4000_1003, htval: 0, htinst: 0, gva_valid: true };
        let Err(FaultDecodeError::GpaNotReported(u)) = decode_guest_page_fault(&t) else {
            panic!("htval 0 decoded as a GPA: {:?}", decode_guest_page_fault(&t));
        };
        assert_eq!(u.gva, Some(GuestVirtAddr::new(0x4000_1003)));
        assert_eq!(u.original, Access::Write);
        assert!(!u.is_implicit());
        // The walk found GPA 0x8123_4003: the fault completes as if htval had said so.
        let f = u.with_gpa(GuestPhysAddr::new(0x8123_4003));
        let reported = TrapCsrs { htval: 0x8123_4003 >> 2, ..t };
        assert_eq!(Ok(f), decode_guest_page_fault(&reported));
        // An implicit PTE write (A/D update) with no GPA: the walk's entry address, as a write.
        let t = TrapCsrs { scause: 21, stval: 0x4000_0000, htval: 0, htinst: 0x3020, gva_valid: true };
        let Err(FaultDecodeError::GpaNotReported(u)) = decode_guest_page_fault(&t) else { panic!("implicit") };
        assert!(u.is_implicit());
        let f = u.with_gpa(GuestPhysAddr::new(0x8020_0ff8));
        assert_eq!(f.info.access_flags, MappingFlags::WRITE);
        assert_eq!(f.original, Access::Read);
        std::println!("{}", FaultDecodeError::GpaNotReported(u));
    }
}
