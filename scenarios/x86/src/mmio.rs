//! MMIO: guest accesses to an emulated device exit as EPT violations, the instruction is fetched
//! through the guest's tables, decoded and emulated against a 16550-like UART.

use crate::guest::{GuestOps, Op};
use crate::{ctx, gpa, Machine};
use alloc::vec::Vec;
use twostage_harness::{ensure, Pass, Scenario, Verdict};
use twostage_hv_x86::hv::{FaultAction, Hv, MmioDevice};
use twostage_hv_x86::println;
use twostage_npt::GuestPhysAddr;
use twostage_vmx::exit::EptViolation;

/// The MMIO scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[Scenario::new("MMIO exits decoded: emulated UART", s_mmio)];

/// A 16550-like UART model: THR/RBR at 0, LSR at 5 (THR empty + transmitter empty), scratch at 7.
struct Uart {
    out: Vec<u8>,
    scratch: u8,
    accesses: u32,
}

impl MmioDevice for Uart {
    fn read(&mut self, gpa: GuestPhysAddr, _size: u8) -> u64 {
        self.accesses += 1;
        match gpa.as_u64() - gpa::MMIO {
            5 => 0x60,
            7 => u64::from(self.scratch),
            _ => 0,
        }
    }
    fn write(&mut self, gpa: GuestPhysAddr, _size: u8, value: u64) {
        self.accesses += 1;
        match gpa.as_u64() - gpa::MMIO {
            0 => self.out.push(value as u8),
            7 => self.scratch = value as u8,
            _ => {}
        }
    }
}

fn s_mmio(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    let mut uart = Uart { out: Vec::new(), scratch: 0, accesses: 0 };
    let mut handler = |_: &mut Hv, v: &EptViolation| {
        if (gpa::MMIO..gpa::MMIO + 0x1000).contains(&v.gpa.as_u64()) && v.qualification.entry_rights().is_empty() {
            FaultAction::Mmio
        } else {
            FaultAction::Fail("fault outside the device")
        }
    };
    let before = hv.stats.mmio_emulated;
    for b in *b"OK" {
        ctx(hv.op(Op::Write32(gpa::MMIO, u32::from(b)), &mut handler, &mut uart), "THR write")?;
    }
    let lsr = ctx(hv.op(Op::Read32(gpa::MMIO + 5), &mut handler, &mut uart), "LSR read")?;
    ctx(hv.op(Op::Write32(gpa::MMIO + 7, 0xA5), &mut handler, &mut uart), "scratch write")?;
    let scr32 = ctx(hv.op(Op::Read32(gpa::MMIO + 7), &mut handler, &mut uart), "scratch read (32-bit)")?;
    let scr64 = ctx(hv.op(Op::Read(gpa::MMIO + 7), &mut handler, &mut uart), "scratch read (64-bit)")?;
    println!(
        "   device saw {:?}, LSR {lsr:#x}, scratch {scr32:#x}/{scr64:#x}; {} accesses emulated",
        core::str::from_utf8(&uart.out).unwrap_or("?"),
        hv.stats.mmio_emulated - before
    );
    ensure!(uart.out == b"OK", "device output {:?}", uart.out);
    ensure!(lsr == 0x60 && scr32 == 0xA5 && scr64 == 0xA5, "reads: LSR {lsr:#x}, scratch {scr32:#x} {scr64:#x}");
    ensure!(hv.stats.mmio_emulated - before == 6 && uart.accesses == 6, "{} emulated", hv.stats.mmio_emulated - before);
    Ok(Pass::Plain)
}
