//! The emulated ns16550 UART: the device model and how a decoded guest load or store reaches it.
//!
//! Plain code with host tests: the instruction decoding that produces a [`MemAccess`] is
//! H-extension glue (`twostage_rvh::mmio::decode_access`); the device is this hypervisor's.

use twostage_rvh::insn::{self, MemAccess, MemOp};

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
    use std::vec;

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
