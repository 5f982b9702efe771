//! Hostile guests: deliberate bad actions (wild jumps, illegal instructions, bad SBI calls)
//! and random instruction words with random registers; the hypervisor reports and carries on.

use crate::guest::Routine;
use crate::{call, done, ensure, fault, fresh_vs_context, gpa, test_vm, Machine, CODE};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use twostage_aspace::GuestMemory;
use twostage_harness::{Pass, Scenario, Verdict};
use twostage_hv_riscv::hart::frames;
use twostage_hv_riscv::println;
use twostage_hv_riscv::vm::Exit;
use twostage_npt::{MappingFlags, PageSize};
use twostage_rvh::csr::cause;

/// The hostile-guest scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("hostile guest actions are contained", hostile),
    Scenario::new("random instructions and registers cannot crash or hang the hypervisor", random_guest),
];

fn hostile(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    // A jump far outside its memory: an unresolved fetch fault, reported, not fatal.
    let (f, _) = fault(call(&mut vm, Routine::Call, &[0x4000_0000]))?;
    ensure!(f.info.access_flags == MappingFlags::EXECUTE, "{:?}", f.info);
    // An illegal instruction (all zeros).
    let page = 0x8000_9000;
    vm.map_new(gpa(page), 4096, MappingFlags::RWX, PageSize::Size4K).map_err(String::from)?;
    match call(&mut vm, Routine::Call, &[page]) {
        Exit::Exception(t) if t.scause == cause::ILLEGAL_INSN => {}
        other => return Err(format!("illegal instruction: {}", crate::describe(&other))),
    }
    // ecall; c.jr ra: an unknown SBI extension gets SBI_ERR_NOT_SUPPORTED; a DBCN write from
    // memory the guest does not have gets SBI_ERR_INVALID_PARAM.
    vm.phys().write(gpa(page), &[0x73, 0, 0, 0, 0x82, 0x80]).map_err(|e| format!("{e}"))?;
    vm.regs.gpr[17] = 0x1234_5678;
    vm.regs.gpr[16] = 0;
    let r = done(call(&mut vm, Routine::Call, &[page]))?;
    ensure!(r as i64 == -2, "unknown extension returned {}", r as i64);
    vm.regs.gpr[17] = twostage_rvh::sbi::eid::DBCN;
    vm.regs.gpr[16] = 0;
    vm.regs.gpr[11] = 0x4000_0000;
    vm.regs.gpr[12] = 0;
    // a0 is the routine's argument (the code address) and also DBCN's length: fine, it is unmapped anyway.
    let r = done(call(&mut vm, Routine::Call, &[page]))?;
    ensure!(r as i64 == -3, "DBCN from unmapped memory returned {}", r as i64);
    // Store to the MMIO window with an instruction the decoder refuses is reported, not emulated.
    Ok(Pass::Plain)
}

/// Random instruction words and random registers, run in VS-mode: every run must end in an exit
/// the hypervisor reports (a watchdog ends loops and WFIs), and the hypervisor must carry on.
fn random_guest(_: &mut Machine) -> Verdict {
    use crate::{describe, test_vm};
    use twostage_hv_riscv::vm::Exit;
    use twostage_npt::PageSize;
    let free0 = frames().free();
    let mut kinds: [u32; 5] = [0; 5];
    let mut rng = twostage_harness::XorShift64Star::new(0x7477_6f73_7461_6765);
    const RUNS: u32 = 300;
    {
        let mut vm = test_vm(6)?;
        vm.uart.record = false;
        let page = 0x8000_a000;
        vm.map_new(gpa(page), 4096, MappingFlags::RWX, PageSize::Size4K).map_err(String::from)?;
        let mut steps = 0u32;
        for run in 0..RUNS {
            // Mostly well-formed 32-bit encodings of the major opcodes (loads, stores, ALU, jumps,
            // branches, SYSTEM incl. ecall/CSR/WFI/fences, AMOs), some raw and compressed words.
            const MAJOR: [u32; 12] = [0x03, 0x23, 0x13, 0x33, 0x37, 0x17, 0x63, 0x6f, 0x67, 0x73, 0x2f, 0x0f];
            let words: Vec<u8> = (0..1024)
                .flat_map(|_| {
                    let r = rng.next_u64();
                    let w = match r % 16 {
                        0 | 1 => r as u32 >> 8,
                        2 | 3 => (r >> 16) as u32 & 0xffff_fffc | 0x1,
                        4 | 5 => 0x0000_0073, // ecall
                        6 => 0x1050_0073,     // wfi
                        _ => (r >> 16) as u32 & !0x7f | MAJOR[(r >> 8) as usize % MAJOR.len()],
                    };
                    w.to_le_bytes()
                })
                .collect();
            vm.phys().write(gpa(page), &words).map_err(|e| format!("{e}"))?;
            for r in vm.regs.gpr.iter_mut().skip(1) {
                // Half the registers point into the guest's RAM, half are anything.
                *r = if rng.next_u64() & 1 == 0 { CODE + (rng.next_u64() % (8 << 20)) } else { rng.next_u64() };
            }
            // a7/a6: often an SBI extension and function the hypervisor serves.
            use twostage_rvh::sbi::eid;
            const EIDS: [u64; 8] = [0, 1, 2, eid::BASE, eid::TIME, eid::DBCN, eid::SRST, eid::TWOSTAGE_TEST];
            if rng.next_u64() & 1 == 0 {
                vm.regs.gpr[17] = EIDS[(rng.next_u64() % 8) as usize];
                vm.regs.gpr[16] = rng.next_u64() % 4;
            }
            fresh_vs_context(&vm);
            vm.pc = page + 4 * (rng.next_u64() % 1024);
            vm.watchdog = Some(twostage_rvh::hw::rdtime() + 20_000); // 2 ms at 10 MHz
                                                                     // Skip whatever the guest could not do and let it carry on, up to 16 exits per run.
            for _ in 0..16 {
                vm.budget = 64;
                let exit = vm.run();
                steps += 1;
                let k = match exit {
                    Exit::Fault(..) => 0,
                    Exit::Exception(..) => 1,
                    Exit::Budget => 2,
                    Exit::Reset(_) => 3,
                    Exit::Test { .. } => 4,
                };
                kinds[k] += 1;
                if run < 2 {
                    println!("# random run {run}: {}", describe(&exit));
                }
                match exit {
                    Exit::Budget => break,
                    Exit::Fault(..) | Exit::Exception(..) | Exit::Reset(_) => vm.pc = vm.pc.wrapping_add(4),
                    Exit::Test { .. } => {}
                }
            }
        }
        println!(
            "# {RUNS} random runs, {steps} exits handed back: {} unresolved guest-page faults, {} other exceptions, {} budget/watchdog, {} resets, {} hypercalls; {} pages demand-mapped, {} SBI calls, {} MMIO",
            kinds[0],
            kinds[1],
            kinds[2],
            kinds[3],
            kinds[4],
            vm.stats.demand_zero,
            vm.stats.sbi_calls,
            vm.stats.mmio_reads + vm.stats.mmio_writes
        );
    }
    ensure!(kinds[2] <= RUNS, "more budget ends than runs");
    ensure!(frames().free() == free0, "{} frames leaked", free0 - frames().free());
    Ok(Pass::Plain)
}
