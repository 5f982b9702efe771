//! The emulated ns16550 UART: the device model and how a decoded guest load or store reaches it.
//!
//! Plain code with host tests: the instruction decoding that produces a [`MemAccess`] is
//! H-extension glue (`twostage_rvh::mmio::decode_access`); the device is this hypervisor's.
//!
//! The register file is the PC16550D's (National Semiconductor PC16550D datasheet, "Registers"),
//! with the behaviour QEMU's 16550A model shows a guest: a transmitter that sends at once (THR
//! and the transmitter are always empty again after a write), a 16-byte receive FIFO, IIR with
//! its FIFO-enabled bits (0xC0) once FCR enables the FIFOs, the divisor latch behind LCR.DLAB,
//! MCR loopback into the receiver, MSR reporting DCD, DSR and CTS. The interrupt output
//! ([`Ns16550::irq`]) is what IIR reports: receiver line status (an overrun) when IER.ELSI,
//! received data when IER.ERBFI (below the FIFO's trigger level it is reported as a character
//! timeout, 0x0C, at once rather than four character times later), THR empty when IER.ETBEI
//! (set by enabling it, cleared by reading IIR while it is the reported cause or by writing THR,
//! which sets it again as the byte leaves at once).

use twostage_rvh::insn::{self, MemAccess, MemOp};

/// Receive FIFO depth of a 16550A.
const FIFO: usize = 16;

/// IER bits: received data available, THR empty, receiver line status.
const IER_RDI: u8 = 1 << 0;
const IER_THRI: u8 = 1 << 1;
const IER_RLSI: u8 = 1 << 2;
/// IIR interrupt identifications.
const IIR_NONE: u8 = 0x01;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_CTI: u8 = 0x0c;
/// IIR bits 7:6 while the FIFOs are enabled.
const IIR_FIFOS: u8 = 0xc0;
/// FCR bits: FIFO enable, receive FIFO reset.
const FCR_FE: u8 = 1 << 0;
const FCR_RFR: u8 = 1 << 1;
/// LCR.DLAB: offsets 0 and 1 reach the divisor latch.
const LCR_DLAB: u8 = 1 << 7;
/// MCR.LOOP: the transmitter feeds the receiver.
const MCR_LOOP: u8 = 1 << 4;
/// LSR bits: data ready, overrun, THR empty and transmitter idle.
const LSR_DR: u8 = 1 << 0;
const LSR_OE: u8 = 1 << 1;
const LSR_THRE_TEMT: u8 = (1 << 5) | (1 << 6);
/// MSR: DCD, DSR and CTS asserted (nothing on the other side drops them).
const MSR_LINES: u8 = 0xb0;

/// The register state of an ns16550A-compatible UART.
#[derive(Clone, Debug, Default)]
pub struct Ns16550 {
    rx: [u8; FIFO],
    rx_head: usize,
    rx_len: usize,
    ier: u8,
    fcr: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    divisor: u16,
    overrun: bool,
    thr_pending: bool,
}

impl Ns16550 {
    /// A UART with nothing received, FIFOs off, every interrupt disabled.
    pub fn new() -> Self {
        Self::default()
    }

    fn capacity(&self) -> usize {
        if self.fcr & FCR_FE != 0 {
            FIFO
        } else {
            1
        }
    }

    /// The receive FIFO's trigger level (FCR bits 7:6: 1, 4, 8 or 14 bytes).
    fn trigger(&self) -> usize {
        [1, 4, 8, 14][usize::from(self.fcr >> 6)]
    }

    /// Whether the receiver has room for another byte.
    pub fn can_receive(&self) -> bool {
        self.rx_len < self.capacity()
    }

    /// Whether the line takes console input now: room in the receiver and no loopback.
    pub fn wants_input(&self) -> bool {
        self.can_receive() && self.mcr & MCR_LOOP == 0
    }

    /// A byte arrives on the line: into the FIFO, or an overrun when it is full (the byte is lost,
    /// the FIFO's contents are kept). Returns whether it was kept.
    pub fn receive(&mut self, byte: u8) -> bool {
        if !self.can_receive() {
            self.overrun = true;
            return false;
        }
        self.rx[(self.rx_head + self.rx_len) % FIFO] = byte;
        self.rx_len += 1;
        true
    }

    fn pop(&mut self) -> Option<u8> {
        if self.rx_len == 0 {
            return None;
        }
        let b = self.rx[self.rx_head];
        self.rx_head = (self.rx_head + 1) % FIFO;
        self.rx_len -= 1;
        Some(b)
    }

    /// What IIR's bits 3:0 report, by the 16550's priorities.
    fn cause(&self) -> u8 {
        if self.ier & IER_RLSI != 0 && self.overrun {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && self.rx_len > 0 {
            if self.fcr & FCR_FE != 0 && self.rx_len < self.trigger() {
                IIR_CTI
            } else {
                IIR_RDI
            }
        } else if self.ier & IER_THRI != 0 && self.thr_pending {
            IIR_THRI
        } else {
            IIR_NONE
        }
    }

    /// The interrupt output: high while IIR reports a cause.
    pub fn irq(&self) -> bool {
        self.cause() != IIR_NONE
    }

    /// A guest write of `value` at register `offset`; returns the byte to transmit, if any.
    pub fn write(&mut self, offset: u64, value: u64) -> Option<u8> {
        let v = value as u8;
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(v),
            0 => {
                // The byte leaves at once: THR is empty again, and says so if ETBEI is set.
                self.thr_pending = true;
                if self.mcr & MCR_LOOP != 0 {
                    self.receive(v);
                    return None;
                }
                return Some(v);
            }
            1 if dlab => self.divisor = (self.divisor & 0x00ff) | u16::from(v) << 8,
            1 => {
                self.ier = v & 0x0f;
                // THR is always empty: enabling ETBEI raises the interrupt.
                self.thr_pending = true;
            }
            2 => {
                let mut v = v;
                if (v ^ self.fcr) & FCR_FE != 0 {
                    v |= FCR_RFR; // switching the FIFOs on or off empties them
                }
                if v & FCR_RFR != 0 {
                    (self.rx_head, self.rx_len) = (0, 0);
                }
                // Only the enable and trigger-level bits stick (DMA mode is not reported).
                self.fcr = v & 0xc1;
            }
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scratch = v,
            _ => {}
        }
        None
    }

    /// A guest read of register `offset`; `input` supplies received bytes when the receiver is
    /// empty and the guest looks at it (a guest that polls LSR and RBR needs no interrupt).
    pub fn read(&mut self, offset: u64, mut input: impl FnMut() -> Option<u8>) -> u64 {
        let dlab = self.lcr & LCR_DLAB != 0;
        let mut fill = |u: &mut Self| {
            if u.rx_len == 0 && u.mcr & MCR_LOOP == 0 {
                if let Some(b) = input() {
                    u.receive(b);
                }
            }
        };
        let v = match offset {
            0 if dlab => self.divisor as u8,
            0 => {
                fill(self);
                self.pop().unwrap_or(0)
            }
            1 if dlab => (self.divisor >> 8) as u8,
            1 => self.ier,
            2 => {
                let cause = self.cause();
                if cause == IIR_THRI {
                    self.thr_pending = false;
                }
                cause | if self.fcr & FCR_FE != 0 { IIR_FIFOS } else { 0 }
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                fill(self);
                let lsr =
                    LSR_THRE_TEMT | if self.rx_len > 0 { LSR_DR } else { 0 } | if self.overrun { LSR_OE } else { 0 };
                self.overrun = false;
                lsr
            }
            6 if self.mcr & MCR_LOOP != 0 => {
                // Loopback: RTS -> CTS, DTR -> DSR, OUT1 -> RI, OUT2 -> DCD.
                let m = self.mcr;
                (m & 0x0c) << 4 | (m & 0x02) << 3 | (m & 0x01) << 5
            }
            6 => MSR_LINES,
            7 => self.scratch,
            _ => 0,
        };
        u64::from(v)
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
mod tests;
