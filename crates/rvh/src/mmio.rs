//! MMIO emulation: which access a guest-page fault was (htinst or the fetched instruction).

use crate::access::{self, GuestAccessError, GuestMemOps};
use crate::fault::{GuestPageFault, HtinstInfo};
use crate::insn::{self, InsnError, MemAccess};
use core::fmt;
use twostage_npt::GuestVirtAddr;

/// Why a faulting access could not be decoded for emulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioDecodeError {
    /// The fault came from the guest's own page-table walk, not from a load or store.
    Implicit,
    /// Fetching the instruction at the guest pc failed.
    Fetch(GuestAccessError),
    /// The instruction is not a load or store.
    Insn(InsnError),
}

impl fmt::Display for MmioDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Implicit => f.write_str("an implicit page-table access cannot be emulated"),
            Self::Fetch(e) => write!(f, "fetching the faulting instruction: {e}"),
            Self::Insn(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for MmioDecodeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Implicit => None,
            Self::Fetch(e) => Some(e),
            Self::Insn(e) => Some(e),
        }
    }
}

/// The load or store behind a guest-page fault: htinst's transformed instruction when the hart
/// gave one (Privileged 1.12 §8.6.3), else the instruction at `pc` fetched with HLVX (QEMU 7.2
/// writes htinst = 0 for explicit accesses).
pub fn decode_access(
    f: &GuestPageFault,
    pc: GuestVirtAddr,
    ops: &mut impl GuestMemOps,
) -> Result<MemAccess, MmioDecodeError> {
    match f.htinst {
        HtinstInfo::Implicit(_) => Err(MmioDecodeError::Implicit),
        HtinstInfo::Transformed(m) => Ok(m),
        HtinstInfo::None | HtinstInfo::Other(_) => {
            let i = access::fetch_guest_instruction(ops, pc).map_err(MmioDecodeError::Fetch)?;
            insn::decode_mem_access(i.raw).map_err(MmioDecodeError::Insn)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::tests::FakeGuest;
    use crate::fault::{decode_guest_page_fault, TrapCsrs};
    use crate::insn::MemOp;

    fn store_fault(htinst: u64) -> GuestPageFault {
        decode_guest_page_fault(&TrapCsrs {
            scause: 23,
            stval: 0x1000_0000,
            htval: 0x1000_0000 >> 2,
            htinst,
            gva_valid: true,
        })
        .unwrap()
    }

    #[test]
    fn htinst_first_then_the_fetched_instruction() {
        let mut g = FakeGuest::new(1);
        // c.sw a1, 4(a0) at pc 0x10.
        g.mem[0x10..0x12].copy_from_slice(&0xc14cu16.to_le_bytes());
        let m = decode_access(&store_fault(0), GuestVirtAddr::new(0x10), &mut g).unwrap();
        assert_eq!(m, MemAccess { op: MemOp::Store { rs2: 11 }, width: 4, insn_len: 2 });
        // A transformed sb needs no fetch (the fake's pc 0x800 holds garbage).
        let m = decode_access(&store_fault(0x00b0_0023), GuestVirtAddr::new(0x800), &mut g).unwrap();
        assert_eq!(m, MemAccess { op: MemOp::Store { rs2: 11 }, width: 1, insn_len: 4 });
        assert_eq!(
            decode_access(&store_fault(0x3020), GuestVirtAddr::new(0x10), &mut g),
            Err(MmioDecodeError::Implicit)
        );
        // A pc the guest cannot fetch from, and a non-memory instruction, are errors.
        g.absent_page = Some(0);
        assert!(matches!(
            decode_access(&store_fault(0), GuestVirtAddr::new(0x10), &mut g),
            Err(MmioDecodeError::Fetch(_))
        ));
        g.absent_page = None;
        g.mem[0x20..0x24].copy_from_slice(&0x0015_0513u32.to_le_bytes());
        assert!(matches!(
            decode_access(&store_fault(0), GuestVirtAddr::new(0x20), &mut g),
            Err(MmioDecodeError::Insn(_))
        ));
    }
}
