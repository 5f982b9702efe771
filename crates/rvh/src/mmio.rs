//! MMIO emulation: which access a guest-page fault was (htinst or the fetched instruction), and an ns16550 model.

use crate::access::{self, GuestAccessError, GuestMemOps};
use crate::fault::{GuestPageFault, HtinstInfo};
use crate::insn::{self, InsnError, MemAccess, MemOp};
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

/// The register file of an ns16550-compatible UART as far as a console needs it (PC16550D
/// datasheet): THR/RBR at offset 0, LSR at 5, scratch at 7; the rest reads 0 and ignores writes.
#[derive(Clone, Debug, Default)]
pub struct Ns16550 {
    rx: Option<u8>,
    mcr: u8,
    scratch: u8,
}

/// LSR bit 0: data ready.
const LSR_DR: u64 = 1 << 0;
/// LSR bits 5 and 6: THR empty, transmitter idle.
const LSR_THRE_TEMT: u64 = (1 << 5) | (1 << 6);

impl Ns16550 {
    /// A UART with nothing received.
    pub fn new() -> Self {
        Self::default()
    }

    /// A guest write of `value` at register `offset`; returns the byte to transmit, if any.
    pub fn write(&mut self, offset: u64, value: u64) -> Option<u8> {
        match offset {
            0 => return Some(value as u8),
            4 => self.mcr = value as u8,
            7 => self.scratch = value as u8,
            _ => {}
        }
        None
    }

    /// A guest read of register `offset`; `input` supplies a received byte when asked.
    pub fn read(&mut self, offset: u64, mut input: impl FnMut() -> Option<u8>) -> u64 {
        let mut poll = |rx: &mut Option<u8>| {
            if rx.is_none() {
                *rx = input();
            }
            rx.is_some()
        };
        match offset {
            0 => {
                poll(&mut self.rx);
                self.rx.take().map_or(0, u64::from)
            }
            4 => u64::from(self.mcr),
            5 => LSR_THRE_TEMT | if poll(&mut self.rx) { LSR_DR } else { 0 },
            7 => u64::from(self.scratch),
            _ => 0,
        }
    }
}

/// Carries out a decoded access against `uart`: a store's data comes from `regs[rs2]`; a load's
/// result is extended and written to `regs[rd]` (x0 stays 0). Returns the byte transmitted, if any.
pub fn emulate_uart(
    uart: &mut Ns16550,
    offset: u64,
    m: MemAccess,
    regs: &mut [u64; 32],
    input: impl FnMut() -> Option<u8>,
) -> Option<u8> {
    match m.op {
        MemOp::Store { rs2 } => uart.write(offset, regs[rs2 as usize]),
        MemOp::Load { rd, signed } => {
            let v = uart.read(offset, input);
            if rd != 0 {
                regs[rd as usize] = insn::extend_loaded(v, m.width, signed);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::tests::FakeGuest;
    use crate::fault::{decode_guest_page_fault, TrapCsrs};
    use alloc::vec;

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

    #[test]
    fn uart_transmits_receives_and_reports_status() {
        let mut u = Ns16550::new();
        let mut regs = [0u64; 32];
        regs[11] = 0x141; // only the low byte is transmitted
        let sb = MemAccess { op: MemOp::Store { rs2: 11 }, width: 1, insn_len: 4 };
        assert_eq!(emulate_uart(&mut u, 0, sb, &mut regs, || None), Some(0x41));
        let lbu = |rd| MemAccess { op: MemOp::Load { rd, signed: false }, width: 1, insn_len: 4 };
        emulate_uart(&mut u, 5, lbu(10), &mut regs, || None);
        assert_eq!(regs[10], 0x60, "LSR: transmitter empty, nothing received");
        let mut input = vec![b'x'];
        emulate_uart(&mut u, 5, lbu(10), &mut regs, || input.pop());
        assert_eq!(regs[10], 0x61, "LSR: data ready");
        emulate_uart(&mut u, 0, lbu(12), &mut regs, || None);
        assert_eq!(regs[12], u64::from(b'x'), "RBR returns the byte once");
        emulate_uart(&mut u, 0, lbu(12), &mut regs, || None);
        assert_eq!(regs[12], 0);
        // Scratch round trip through a sign-extending load; x0 is never written.
        regs[5] = 0xff;
        emulate_uart(&mut u, 7, MemAccess { op: MemOp::Store { rs2: 5 }, width: 1, insn_len: 4 }, &mut regs, || None);
        emulate_uart(
            &mut u,
            7,
            MemAccess { op: MemOp::Load { rd: 6, signed: true }, width: 1, insn_len: 4 },
            &mut regs,
            || None,
        );
        assert_eq!(regs[6], u64::MAX);
        emulate_uart(&mut u, 7, lbu(0), &mut regs, || None);
        assert_eq!(regs[0], 0);
    }
}
