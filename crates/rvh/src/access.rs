//! Guest memory through the guest's own translation (hlv/hsv/hlvx): copies and instruction fetch.
//!
//! The algorithms here are generic over [`GuestMemOps`], the five instruction-level operations;
//! `hw::Hlv` implements them with the real instructions on riscv64 and host tests use a
//! fake. A copy uses byte accesses for the unaligned head and tail and doubleword accesses for
//! the aligned middle (an aligned doubleword never crosses a page, so each access faults or not
//! as a whole).

use crate::csr::cause;
use crate::extable::HwFault;
use core::fmt;
use twostage_npt::{Access, GuestPhysAddr, GuestVirtAddr};

/// The instruction-level guest accesses (Privileged 1.12 §8.3.1: HLV.BU, HLV.D, HSV.B, HSV.D,
/// HLVX.HU), each either completing or returning the fault it took.
pub trait GuestMemOps {
    /// HLV.BU.
    fn load_u8(&mut self, gva: GuestVirtAddr) -> Result<u8, HwFault>;
    /// HLV.D; `gva` is 8-byte aligned.
    fn load_u64(&mut self, gva: GuestVirtAddr) -> Result<u64, HwFault>;
    /// HSV.B.
    fn store_u8(&mut self, gva: GuestVirtAddr, v: u8) -> Result<(), HwFault>;
    /// HSV.D; `gva` is 8-byte aligned.
    fn store_u64(&mut self, gva: GuestVirtAddr, v: u64) -> Result<(), HwFault>;
    /// HLVX.HU: a 16-bit read that needs execute permission; `gva` is 2-byte aligned.
    fn fetch_u16(&mut self, gva: GuestVirtAddr) -> Result<u16, HwFault>;
}

/// Which translation stage refused a guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFaultKind {
    /// The nested (G-stage) table: a guest-page fault (scause 20, 21, 23).
    GuestPage,
    /// The guest's own VS-stage table: a page fault (scause 12, 13, 15).
    GuestStage1,
    /// A physical-memory-protection or bus access fault (scause 1, 5, 7).
    AccessFault,
    /// A misaligned access (scause 4, 6).
    Misaligned,
    /// Any other cause.
    Other(u64),
}

/// A guest access that faulted, with everything known about where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestAccessError {
    /// The guest virtual address of the access that faulted.
    pub gva: GuestVirtAddr,
    /// The guest-physical address, when the fault reported one (guest-page faults with a
    /// non-zero htval).
    pub gpa: Option<GuestPhysAddr>,
    /// What the hypervisor was doing.
    pub access: Access,
    /// Which stage refused it.
    pub kind: GuestFaultKind,
    /// Bytes that were transferred before the fault.
    pub done: usize,
    /// The raw scause of the trap (0 when no trap was taken, e.g. a misaligned pc).
    pub scause: u64,
}

impl GuestAccessError {
    /// Classifies a recorded hardware fault.
    pub fn from_fault(f: HwFault, gva: GuestVirtAddr, access: Access, done: usize) -> Self {
        let kind = match f.scause {
            cause::INSN_GUEST_PAGE | cause::LOAD_GUEST_PAGE | cause::STORE_GUEST_PAGE => GuestFaultKind::GuestPage,
            cause::INSN_PAGE | cause::LOAD_PAGE | cause::STORE_PAGE => GuestFaultKind::GuestStage1,
            cause::INSN_ACCESS | cause::LOAD_ACCESS | cause::STORE_ACCESS => GuestFaultKind::AccessFault,
            cause::LOAD_MISALIGNED | cause::STORE_MISALIGNED => GuestFaultKind::Misaligned,
            other => GuestFaultKind::Other(other),
        };
        // htval = GPA >> 2 for guest-page faults, or 0 when the hart does not report it
        // (Privileged spec, "Hypervisor Trap Value Register (htval)"); stval keeps the low bits.
        // 0 is "not reported", never GPA 0.
        let gpa = (kind == GuestFaultKind::GuestPage && f.htval != 0)
            .then(|| GuestPhysAddr::try_new((f.htval << 2) | (f.stval & 3)).ok())
            .flatten();
        Self { gva, gpa, access, kind, done, scause: f.scause }
    }
}

impl GuestAccessError {
    /// The cause to reflect into the guest for this fault: an HLVX fetch made on the guest's
    /// behalf ([`Access::Execute`]) reports its faults with load causes (Privileged spec,
    /// "Hypervisor Virtual-Machine Load and Store Instructions": HLVX is a load that needs
    /// execute permission), while the guest's own fetch would have taken the instruction cause;
    /// see [`fetch_cause`]. Reads and writes keep the cause they took.
    pub fn guest_cause(&self) -> u64 {
        match self.access {
            Access::Execute => fetch_cause(self.scause),
            Access::Read | Access::Write => self.scause,
        }
    }
}

/// The instruction-fetch cause matching a load cause taken by an HLVX (Privileged spec, "Supervisor
/// Cause Register (scause)" and "Trap Cause Codes"): load page fault 13 -> instruction page fault
/// 12, load access fault 5 -> instruction access fault 1, load guest-page fault 21 -> instruction
/// guest-page fault 20. Any other cause (already an instruction cause, a misaligned address)
/// is returned unchanged.
pub const fn fetch_cause(scause: u64) -> u64 {
    match scause {
        cause::LOAD_PAGE => cause::INSN_PAGE,
        cause::LOAD_ACCESS => cause::INSN_ACCESS,
        cause::LOAD_GUEST_PAGE => cause::INSN_GUEST_PAGE,
        other => other,
    }
}

impl fmt::Display for GuestAccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest {} at {}", self.access, self.gva)?;
        if let Some(gpa) = self.gpa {
            write!(f, " ({gpa})")?;
        }
        write!(f, " faulted: {:?} (scause {}) after {} bytes", self.kind, self.scause, self.done)
    }
}

impl core::error::Error for GuestAccessError {}

fn gva_at(base: GuestVirtAddr, off: usize) -> GuestVirtAddr {
    GuestVirtAddr::new(base.as_u64().wrapping_add(off as u64))
}

/// How a copy of `len` bytes at `addr` splits: head bytes, doublewords, tail bytes.
pub fn split_copy(addr: u64, len: usize) -> (usize, usize, usize) {
    let head = ((8 - (addr & 7) as usize) & 7).min(len);
    let words = (len - head) / 8;
    (head, words, len - head - words * 8)
}

/// Reads `buf.len()` bytes of guest virtual memory at `gva`.
pub fn copy_from_guest_va(
    ops: &mut impl GuestMemOps,
    gva: GuestVirtAddr,
    buf: &mut [u8],
) -> Result<(), GuestAccessError> {
    let (head, words, _) = split_copy(gva.as_u64(), buf.len());
    let mut off = 0;
    let err = |f, off| GuestAccessError::from_fault(f, gva_at(gva, off), Access::Read, off);
    while off < head {
        buf[off] = ops.load_u8(gva_at(gva, off)).map_err(|f| err(f, off))?;
        off += 1;
    }
    for _ in 0..words {
        let v = ops.load_u64(gva_at(gva, off)).map_err(|f| err(f, off))?;
        buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
        off += 8;
    }
    while off < buf.len() {
        buf[off] = ops.load_u8(gva_at(gva, off)).map_err(|f| err(f, off))?;
        off += 1;
    }
    Ok(())
}

/// Writes `data` to guest virtual memory at `gva`. On a fault the
/// bytes before it have been written.
pub fn copy_to_guest_va(ops: &mut impl GuestMemOps, gva: GuestVirtAddr, data: &[u8]) -> Result<(), GuestAccessError> {
    let (head, words, _) = split_copy(gva.as_u64(), data.len());
    let mut off = 0;
    let err = |f, off| GuestAccessError::from_fault(f, gva_at(gva, off), Access::Write, off);
    while off < head {
        ops.store_u8(gva_at(gva, off), data[off]).map_err(|f| err(f, off))?;
        off += 1;
    }
    for _ in 0..words {
        let mut w = [0u8; 8];
        w.copy_from_slice(&data[off..off + 8]);
        ops.store_u64(gva_at(gva, off), u64::from_le_bytes(w)).map_err(|f| err(f, off))?;
        off += 8;
    }
    while off < data.len() {
        ops.store_u8(gva_at(gva, off), data[off]).map_err(|f| err(f, off))?;
        off += 1;
    }
    Ok(())
}

/// An instruction fetched from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchedInsn {
    /// The instruction bits (upper half zero for a compressed instruction).
    pub raw: u32,
    /// 2 or 4.
    pub len: u8,
}

/// Fetches the instruction at `gva` with HLVX.HU (execute permission checked at both stages):
/// one 16-bit parcel, and a second one only when the first's low bits are 0b11; the second parcel
/// may lie on the next page, which is translated on its own.
pub fn fetch_guest_instruction(
    ops: &mut impl GuestMemOps,
    gva: GuestVirtAddr,
) -> Result<FetchedInsn, GuestAccessError> {
    if gva.as_u64() & 1 != 0 {
        return Err(GuestAccessError {
            gva,
            gpa: None,
            access: Access::Execute,
            kind: GuestFaultKind::Misaligned,
            done: 0,
            scause: 0,
        });
    }
    let lo = ops.fetch_u16(gva).map_err(|f| GuestAccessError::from_fault(f, gva, Access::Execute, 0))?;
    if crate::insn::insn_len(lo) == 2 {
        return Ok(FetchedInsn { raw: u32::from(lo), len: 2 });
    }
    let next = gva_at(gva, 2);
    let hi = ops.fetch_u16(next).map_err(|f| GuestAccessError::from_fault(f, next, Access::Execute, 2))?;
    Ok(FetchedInsn { raw: u32::from(lo) | (u32::from(hi) << 16), len: 4 })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A fake guest: pages of 4 KiB at GVA 0.., each present/absent, writable, executable.
    pub struct FakeGuest {
        pub mem: Vec<u8>,
        pub absent_page: Option<u64>,
        pub noexec_page: Option<u64>,
        pub byte_ops: usize,
        pub word_ops: usize,
    }

    impl FakeGuest {
        pub fn new(pages: usize) -> Self {
            let mem = (0..pages * 4096).map(|i| (i * 7 + 3) as u8).collect();
            Self { mem, absent_page: None, noexec_page: None, byte_ops: 0, word_ops: 0 }
        }
        fn check(&self, gva: GuestVirtAddr, scause: u64) -> Result<usize, HwFault> {
            let page = gva.as_u64() / 4096;
            if Some(page) == self.absent_page || gva.as_u64() as usize >= self.mem.len() {
                // Map GVA page p to GPA 0x8000_0000 + p * 4096 in the fake.
                let gpa = 0x8000_0000 + gva.as_u64();
                return Err(HwFault { scause, stval: gva.as_u64(), htval: gpa >> 2 });
            }
            Ok(gva.as_u64() as usize)
        }
    }

    impl GuestMemOps for FakeGuest {
        fn load_u8(&mut self, gva: GuestVirtAddr) -> Result<u8, HwFault> {
            self.byte_ops += 1;
            let i = self.check(gva, cause::LOAD_GUEST_PAGE)?;
            Ok(self.mem[i])
        }
        fn load_u64(&mut self, gva: GuestVirtAddr) -> Result<u64, HwFault> {
            assert_eq!(gva.as_u64() % 8, 0, "doubleword accesses must be aligned");
            self.word_ops += 1;
            let i = self.check(gva, cause::LOAD_GUEST_PAGE)?;
            Ok(u64::from_le_bytes(self.mem[i..i + 8].try_into().unwrap()))
        }
        fn store_u8(&mut self, gva: GuestVirtAddr, v: u8) -> Result<(), HwFault> {
            self.byte_ops += 1;
            let i = self.check(gva, cause::STORE_GUEST_PAGE)?;
            self.mem[i] = v;
            Ok(())
        }
        fn store_u64(&mut self, gva: GuestVirtAddr, v: u64) -> Result<(), HwFault> {
            assert_eq!(gva.as_u64() % 8, 0, "doubleword accesses must be aligned");
            self.word_ops += 1;
            let i = self.check(gva, cause::STORE_GUEST_PAGE)?;
            self.mem[i..i + 8].copy_from_slice(&v.to_le_bytes());
            Ok(())
        }
        fn fetch_u16(&mut self, gva: GuestVirtAddr) -> Result<u16, HwFault> {
            if Some(gva.as_u64() / 4096) == self.noexec_page {
                return Err(HwFault {
                    scause: cause::LOAD_GUEST_PAGE,
                    stval: gva.as_u64(),
                    htval: (0x8000_0000 + gva.as_u64()) >> 2,
                });
            }
            let i = self.check(gva, cause::LOAD_GUEST_PAGE)?;
            Ok(u16::from_le_bytes([self.mem[i], self.mem[i + 1]]))
        }
    }

    #[test]
    fn split_shapes() {
        assert_eq!(split_copy(0x1003, 30), (5, 3, 1));
        assert_eq!(split_copy(0x1000, 16), (0, 2, 0));
        assert_eq!(split_copy(0x1001, 3), (3, 0, 0));
        assert_eq!(split_copy(0x1007, 0), (0, 0, 0));
    }

    #[test]
    fn copies_cross_pages_with_word_accesses() {
        let mut g = FakeGuest::new(2);
        let start = GuestVirtAddr::new(4096 - 13);
        let mut buf = vec![0u8; 40];
        copy_from_guest_va(&mut g, start, &mut buf).unwrap();
        assert_eq!(&buf[..], &g.mem[4096 - 13..4096 + 27]);
        assert_eq!((g.byte_ops, g.word_ops), (5 + 3, 4), "head 5 bytes, 4 words, tail 3 bytes");
        let data: Vec<u8> = (0..40u8).collect();
        copy_to_guest_va(&mut g, start, &data).unwrap();
        assert_eq!(&g.mem[4096 - 13..4096 + 27], &data[..]);
    }

    #[test]
    fn faults_name_the_address_and_progress() {
        let mut g = FakeGuest::new(3);
        g.absent_page = Some(1);
        let mut buf = vec![0u8; 64];
        let e = copy_from_guest_va(&mut g, GuestVirtAddr::new(4096 - 16), &mut buf).unwrap_err();
        assert_eq!(e.gva, GuestVirtAddr::new(4096));
        assert_eq!(e.gpa, Some(GuestPhysAddr::new(0x8000_1000)));
        assert_eq!(e.kind, GuestFaultKind::GuestPage);
        assert_eq!(e.access, Access::Read);
        assert_eq!(e.done, 16);
        let e = copy_to_guest_va(&mut g, GuestVirtAddr::new(4096 - 3), &[1, 2, 3, 4]).unwrap_err();
        assert_eq!((e.gva, e.access, e.done), (GuestVirtAddr::new(4096), Access::Write, 3));
        assert_eq!(&g.mem[4093..4096], &[1, 2, 3]);
    }

    #[test]
    fn fetch_compressed_full_and_page_crossing() {
        let mut g = FakeGuest::new(2);
        g.mem[0..2].copy_from_slice(&0x4505u16.to_le_bytes()); // c.li a0, 1
        g.mem[4094..4098].copy_from_slice(&0x0015_0513u32.to_le_bytes()); // addi a0,a0,1 across the page
        assert_eq!(
            fetch_guest_instruction(&mut g, GuestVirtAddr::new(0)).unwrap(),
            FetchedInsn { raw: 0x4505, len: 2 }
        );
        assert_eq!(
            fetch_guest_instruction(&mut g, GuestVirtAddr::new(4094)).unwrap(),
            FetchedInsn { raw: 0x0015_0513, len: 4 }
        );
        // The second parcel's page refuses execution: the error names the second parcel.
        g.noexec_page = Some(1);
        let e = fetch_guest_instruction(&mut g, GuestVirtAddr::new(4094)).unwrap_err();
        assert_eq!((e.gva, e.access, e.done), (GuestVirtAddr::new(4096), Access::Execute, 2));
        assert_eq!(
            fetch_guest_instruction(&mut g, GuestVirtAddr::new(3)).unwrap_err().kind,
            GuestFaultKind::Misaligned
        );
    }

    #[test]
    fn htval_zero_leaves_the_gpa_unknown() {
        let f = HwFault { scause: cause::LOAD_GUEST_PAGE, stval: 0x4000_1003, htval: 0 };
        let e = GuestAccessError::from_fault(f, GuestVirtAddr::new(0x4000_1003), Access::Read, 0);
        assert_eq!((e.kind, e.gpa), (GuestFaultKind::GuestPage, None));
        let f = HwFault { htval: 0x8000_1000 >> 2, ..f };
        let e = GuestAccessError::from_fault(f, GuestVirtAddr::new(0x4000_1003), Access::Read, 0);
        assert_eq!(e.gpa, Some(GuestPhysAddr::new(0x8000_1003)));
    }

    #[test]
    fn hlvx_faults_reflect_as_instruction_causes() {
        let at = GuestVirtAddr::new(0x1000);
        for (taken, reflected) in [
            (cause::LOAD_PAGE, cause::INSN_PAGE),
            (cause::LOAD_ACCESS, cause::INSN_ACCESS),
            (cause::LOAD_GUEST_PAGE, cause::INSN_GUEST_PAGE),
            (cause::INSN_PAGE, cause::INSN_PAGE),
        ] {
            let f = HwFault { scause: taken, stval: 0x1000, htval: 0x8000_1000 >> 2 };
            assert_eq!(GuestAccessError::from_fault(f, at, Access::Execute, 0).guest_cause(), reflected);
            assert_eq!(GuestAccessError::from_fault(f, at, Access::Read, 0).guest_cause(), taken);
        }
        // Through the fetch itself: the fake's no-execute page faults with a load cause.
        let mut g = FakeGuest::new(1);
        g.noexec_page = Some(0);
        let e = fetch_guest_instruction(&mut g, GuestVirtAddr::new(0x10)).unwrap_err();
        assert_eq!((e.scause, e.guest_cause()), (cause::LOAD_GUEST_PAGE, cause::INSN_GUEST_PAGE));
        assert_eq!(fetch_cause(cause::STORE_PAGE), cause::STORE_PAGE);
    }
}
