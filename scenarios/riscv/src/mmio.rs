//! Devices: the UART's MMIO accesses decoded (htinst or the fetched instruction, compressed
//! too) and emulated, and the guest's virtual timer interrupt injected.

use crate::guest::Routine;
use crate::guest::HC_REPORT;
use crate::{call, describe, done, ensure, gpa, test_vm, Machine};
use alloc::format;
use alloc::string::String;
use twostage_aspace::GuestMemory;
use twostage_harness::{Pass, Scenario, Verdict};
use twostage_hv_riscv::boot::{PLIC_GPA, UART_IRQ};
use twostage_hv_riscv::hart::hart;
use twostage_hv_riscv::println;
use twostage_hv_riscv::vm::Exit;
use twostage_hv_riscv::vm::UART_GPA;
use twostage_npt::{MappingFlags, PageSize};
use twostage_rvh::csr::{cause, irq};
use twostage_rvh::hw;

/// The device scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("MMIO exit decoding with an emulated UART", mmio_uart),
    Scenario::new("virtual timer interrupt injected", virtual_timer),
    Scenario::new("UART receive interrupt through the PLIC as a VS external interrupt", uart_plic_irq),
];

fn mmio_uart(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    let text = b"hello from the guest's UART\0";
    let s = 0x8000_8000;
    vm.map_new(gpa(s), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    vm.phys().write(gpa(s), text).map_err(|e| format!("{e}"))?;
    let lsr = done(call(&mut vm, Routine::UartPuts, &[UART_GPA, s]))?;
    let out = core::str::from_utf8(&vm.uart.out).unwrap_or("?");
    println!("# guest UART said: {out:?} (LSR read {lsr:#x})");
    ensure!(vm.uart.out == text[..text.len() - 1], "UART got {:?}", out);
    ensure!(lsr == 0x60, "LSR emulation returned {lsr:#x}");
    ensure!(vm.stats.mmio_writes as usize == text.len() - 1 && vm.stats.mmio_reads == 1, "mmio counts {:?}", vm.stats);
    // Compressed c.sw / c.lw decoded from the instruction fetched with HLVX.
    // The register (MCR) keeps five bits, as QEMU's 16550A does: storing 0x1a5 keeps 0x05, which
    // c.lw reads back zero-extended from the register's width.
    let v = done(call(&mut vm, Routine::MmioCompressed, &[UART_GPA, 0x1a5]))?;
    ensure!(v == 0x05, "compressed MMIO round trip gave {v:#x}");
    ensure!(vm.table().query(gpa(UART_GPA)).is_none(), "the MMIO range got mapped");
    Ok(Pass::Plain)
}

fn virtual_timer(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    let deadline = hw::rdtime() + u64::from(hart().timebase / 1000); // 1 ms
    let vscause = done(call(&mut vm, Routine::WaitTimer, &[deadline]))?;
    ensure!(vscause == cause::INTERRUPT | 5, "guest trap cause {vscause:#x}");
    ensure!(vm.stats.timer_injections >= 1, "no VSTIP injected");
    ensure!(hw::rdtime() >= deadline, "interrupt before the deadline");
    Ok(Pass::Plain)
}

/// A byte waits in the UART; the guest programs the PLIC (priority, enable for its S-mode context,
/// threshold), enables the receive interrupt in IER and waits in WFI: the UART's line makes source
/// 10 pending, the PLIC's context 1 output becomes hvip.VSEIP, and the guest takes a supervisor
/// external interrupt, claims 10, reads the byte and completes; then nothing is claimable and
/// VSEIP is withdrawn.
fn uart_plic_irq(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    vm.watchdog = Some(hw::rdtime() + u64::from(hart().timebase)); // 1 s: a lost interrupt fails
    ensure!(vm.uart.dev.receive(b'k'), "the receiver took the byte");
    let reported = match call(&mut vm, Routine::WaitUartIrq, &[UART_GPA, PLIC_GPA]) {
        Exit::Test { fid: HC_REPORT, args } => args[0],
        other => return Err(format!("expected the handler's report, got {}", describe(&other))),
    };
    ensure!(reported == u64::from(UART_IRQ) << 8 | u64::from(b'k'), "handler saw {reported:#x}");
    let vscause = done(vm.run())?;
    ensure!(vscause == cause::INTERRUPT | irq::SEI, "guest trap cause {vscause:#x}");
    ensure!(!vm.uart.dev.irq() && !vm.plic.s_output(0), "the interrupt was not withdrawn");
    ensure!(hw::hvip::read() & (1 << irq::VSEI) == 0, "hvip.VSEIP left set");
    Ok(Pass::Plain)
}
