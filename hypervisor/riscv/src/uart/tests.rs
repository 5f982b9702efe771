//! Host tests of the ns16550 model.

use super::*;
use std::vec;

fn lbu(rd: u8) -> MemAccess {
    MemAccess { op: MemOp::Load { rd, signed: false }, width: 1, insn_len: 4 }
}

fn rd(u: &mut Ns16550, offset: u64) -> u64 {
    u.read(offset, || None)
}

#[test]
fn uart_transmits_receives_and_reports_status() {
    let mut u = Ns16550::new();
    let mut regs = [0u64; 32];
    regs[11] = 0x141; // only the low byte is transmitted
    let sb = MemAccess { op: MemOp::Store { rs2: 11 }, width: 1, insn_len: 4 };
    assert_eq!(emulate_uart(&mut u, 0, sb, &mut regs, || None), Some(0x41));
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

#[test]
fn iir_reports_no_interrupt_until_enabled_and_fifo_bits_with_fcr() {
    let mut u = Ns16550::new();
    assert_eq!(rd(&mut u, 2), 0x01);
    assert!(u.receive(b'a'));
    assert!(!u.irq(), "ERBFI off");
    u.write(2, 0x01); // FIFOs on: they are emptied
    assert_eq!(rd(&mut u, 2), 0xc1, "FIFO bits, no interrupt");
    assert_eq!(rd(&mut u, 5) & 1, 0, "the FIFO switch emptied the receiver");
    u.write(1, 0x01); // ERBFI
    assert!(!u.irq());
    u.receive(b'a');
    assert!(u.irq());
    assert_eq!(rd(&mut u, 2), 0xc4, "one byte at trigger level 1: received data");
    assert_eq!(rd(&mut u, 0), u64::from(b'a'));
    assert!(!u.irq(), "reading RBR empties the FIFO and drops the interrupt");
    assert_eq!(rd(&mut u, 2), 0xc1);
}

#[test]
fn below_the_trigger_level_data_is_a_character_timeout() {
    let mut u = Ns16550::new();
    u.write(2, 0x81); // FIFOs on, trigger level 8 (what Linux asks of a 16550A)
    u.write(1, 0x01);
    for b in b"hello" {
        u.receive(*b);
    }
    assert_eq!(rd(&mut u, 2), 0xcc);
    for b in b"abc" {
        u.receive(*b);
    }
    assert_eq!(rd(&mut u, 2), 0xc4, "eight bytes: at the trigger level");
    u.write(2, 0x83); // receive FIFO reset
    assert!(!u.irq());
}

#[test]
fn thr_empty_is_raised_by_enabling_it_and_cleared_by_reading_iir() {
    let mut u = Ns16550::new();
    u.write(1, 0x02); // ETBEI
    assert!(u.irq());
    assert_eq!(rd(&mut u, 2), 0x02);
    assert!(!u.irq(), "reading IIR while it reports THR empty clears it");
    assert_eq!(rd(&mut u, 2), 0x01);
    assert_eq!(u.write(0, u64::from(b'z')), Some(b'z'));
    assert!(u.irq(), "the byte left at once: THR empty again");
    // Received data outranks THR empty.
    u.write(1, 0x03);
    u.receive(b'q');
    assert_eq!(rd(&mut u, 2), 0x04);
    rd(&mut u, 0);
    assert_eq!(rd(&mut u, 2), 0x02);
    u.write(1, 0);
    assert!(!u.irq());
}

#[test]
fn overrun_is_a_line_status_interrupt_and_lsr_clears_it() {
    let mut u = Ns16550::new();
    u.write(1, 0x05); // ERBFI | ELSI
    assert!(u.receive(b'1'));
    assert!(!u.receive(b'2'), "no FIFO: one byte of room");
    assert_eq!(rd(&mut u, 2), 0x06);
    assert_eq!(rd(&mut u, 5), 0x63, "data ready and overrun");
    assert_eq!(rd(&mut u, 2), 0x04, "the overrun was cleared by reading LSR");
    assert_eq!(rd(&mut u, 0), u64::from(b'1'), "the first byte was kept");
    // A 16-byte FIFO.
    u.write(2, 0x01);
    assert!((0..16).all(|i| u.receive(i)));
    assert!(!u.can_receive());
}

#[test]
fn divisor_latch_loopback_and_modem_status() {
    let mut u = Ns16550::new();
    u.write(3, 0x83); // DLAB, 8N1
    assert_eq!(u.write(0, 0x01), None, "the divisor's low byte is not transmitted");
    u.write(1, 0x00);
    assert_eq!((rd(&mut u, 0), rd(&mut u, 1)), (0x01, 0x00));
    u.write(3, 0x03);
    assert_eq!(rd(&mut u, 1), 0, "IER untouched by the divisor writes");
    assert_eq!(rd(&mut u, 6), 0xb0, "DCD, DSR, CTS");
    u.write(4, 0x1f); // loopback with every output
    assert_eq!(rd(&mut u, 4), 0x1f);
    assert_eq!(rd(&mut u, 6), 0xf0);
    assert_eq!(u.write(0, u64::from(b'L')), None, "looped back, not sent");
    let mut input = vec![b'x'];
    assert_eq!(u.read(0, || input.pop()), u64::from(b'L'));
    assert_eq!(input, vec![b'x'], "no console input while in loopback");
    u.write(4, 0x1a5);
    assert_eq!(rd(&mut u, 4), 0x05, "MCR keeps five bits");
}
