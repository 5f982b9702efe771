//! The scenario suite (part 3): a test guest over a twostage-aspace address space.

use crate::guest::{self, Routine};
use crate::scenarios::{call, done, ensure, fresh_vs_context, gpa, Verdict, CODE};
use crate::vm::{frames, Space, Vm, UART_GPA};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use twostage_aspace::{Backend, GuestMemory, SpaceFlush};
use twostage_npt::{GpaRange, MappingFlags, Sv39x4};

fn ok_flush<E: core::fmt::Debug>(vm: &mut Vm, r: Result<SpaceFlush<Sv39x4>, E>) -> Verdict {
    match r {
        Ok(f) => {
            vm.apply_space(f);
            Ok(())
        }
        Err(e) => {
            // The partial change's flush is pending in the space: carry it out.
            vm.apply_space(SpaceFlush::none());
            Err(format!("{e:?}"))
        }
    }
}

/// The test guest over an address space: demand-zero RAM and an MMIO region resolved by the
/// space's fault handler, and a dirty log harvested from the D bits the hart sets.
pub fn space_guest() -> Verdict {
    let free0 = frames().free();
    {
        let mut space =
            Space::new(frames(), crate::vm::g_stage_options::<Sv39x4>(true)).map_err(|e| format!("{e:?}"))?;
        let ram = GpaRange::from_start_len(gpa(CODE), 16 << 20).ok_or("range")?;
        let (_, f) =
            space.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero).map_err(|e| format!("{e}"))?;
        space.flush_unloaded(f);
        let uart = GpaRange::from_start_len(gpa(UART_GPA), 0x1000).ok_or("range")?;
        let (_, f) = space.add_region("uart", uart, MappingFlags::RW, Backend::Mmio).map_err(|e| format!("{e}"))?;
        space.flush_unloaded(f);
        let f = space.load_image(gpa(CODE), guest::blob()).map_err(|e| format!("{e:?}"))?;
        space.flush_unloaded(f);
        let mut vm = Vm::with_space(space, 4);
        vm.uart.echo = false;
        vm.uart.record = true;
        fresh_vs_context(&vm);
        // Demand-zero through the space.
        done(call(&mut vm, Routine::Store64, &[0x8040_0000, 5]))?;
        ensure!(done(call(&mut vm, Routine::Load64, &[0x8040_0000]))? == 5, "store then load");
        ensure!(vm.stats.space_resolved >= 1, "no fault went through the space");
        // MMIO: the space says Mmio for the UART region; the run loop emulates it.
        let s = 0x8000_8000;
        let space = vm.space_mut().ok_or("not a space VM")?;
        space.write(gpa(s), b"via the address space\0").map_err(|e| format!("{e:?}"))?;
        vm.apply_space(SpaceFlush::none()); // The write's flush is pending in the space.
        done(call(&mut vm, Routine::UartPuts, &[UART_GPA, s]))?;
        ensure!(vm.uart.out == b"via the address space", "UART got {:?}", core::str::from_utf8(&vm.uart.out));
        // Dirty log over 16 pages: the guest writes pages 1, 3, 5 (first touches, too).
        let base = 0x8050_0000;
        let range = GpaRange::from_start_len(gpa(base), 16 * 4096).ok_or("range")?;
        let space = vm.space_mut().ok_or("not a space VM")?;
        let (mode, f) = match space.start_dirty_log(range) {
            Ok(x) => x,
            Err(e) => return Err(format!("{e:?}")),
        };
        vm.apply_space(f);
        done(call(&mut vm, Routine::StoreMany, &[base + 0x1000, 3, 0x2000, 7]))?;
        let harvest = |vm: &mut Vm| -> Result<Vec<u64>, String> {
            let space = vm.space_mut().ok_or("not a space VM")?;
            match space.harvest_dirty() {
                Ok((bits, f)) => {
                    vm.apply_space(f);
                    Ok(bits.iter().map(|g| (g.as_u64() - base) / 4096).collect())
                }
                Err(e) => Err(format!("{e:?}")),
            }
        };
        let first = harvest(&mut vm)?;
        ensure!(first == [1, 3, 5], "dirty pages {first:?} ({mode:?})");
        done(call(&mut vm, Routine::Store64, &[base + 0x3008, 1]))?;
        let second = harvest(&mut vm)?;
        ensure!(second == [3], "after one more write: {second:?}");
        let space = vm.space_mut().ok_or("not a space VM")?;
        let stop = space.stop_dirty_log();
        ok_flush(&mut vm, stop)?;
        println!(
            "# address space ({mode:?}): dirty {first:?} then {second:?}; {} faults resolved by it",
            vm.stats.space_resolved
        );
    }
    ensure!(frames().free() == free0, "{} frames leaked", free0 - frames().free());
    Ok(())
}

/// Runs the test guest's `r` on a bare nested table of format `F` (no VM around it) until the
/// done hypercall; any other exit is an error.
fn run_on_table<F: twostage_npt::GStageFormat>(
    table: &twostage_npt::PageTable<F, &'static twostage_baremetal::frames::Frames>,
    vmid: u16,
    r: Routine,
    args: &[u64],
) -> Result<u64, String> {
    use crate::trap::{self, VcpuRegs};
    use twostage_rvh::csr::cause;
    use twostage_rvh::hw;
    let caps = crate::vm::hart().caps;
    let hgatp = twostage_npt::Hgatp::for_table(table, vmid, &caps).map_err(|e| format!("{e}"))?;
    // SAFETY: the table maps only frames allocated for this scenario; fresh VS context.
    unsafe {
        hw::hgatp::write(hgatp.bits());
        hw::vsatp::write(0);
        hw::hedeleg::write(0);
    }
    hw::hfence_gvma_all();
    hw::hfence_vvma_all();
    let mut regs = VcpuRegs::new();
    regs.gpr[10..10 + args.len()].copy_from_slice(args);
    // SAFETY: as above.
    let t = unsafe { trap::run_guest(&mut regs, CODE + guest::offset(r)) };
    // SAFETY: leave no table loaded.
    unsafe { hw::hgatp::write(0) };
    hw::hfence_gvma_all();
    if t.scause == cause::ECALL_VS && regs.gpr[17] == twostage_rvh::sbi::eid::TWOSTAGE_TEST {
        Ok(regs.gpr[10])
    } else {
        Err(format!("{} at pc {:#x}, stval {:#x}, htval {:#x}", cause::name(t.scause), t.sepc, t.stval, t.htval))
    }
}

/// Maps the guest code and one data page at `high` (beyond Sv39x4's 41-bit range) in a table of
/// format `F`, runs a store and a load there, checks the value through the table, frees all.
fn wide_format<F: twostage_npt::GStageFormat>(high: u64) -> Verdict {
    use twostage_npt::{FrameAllocator, MapSize, PageSize, PageTable};
    let mut t =
        PageTable::<F, _>::new(frames(), crate::vm::g_stage_options::<F>(false)).map_err(|e| format!("{e:?}"))?;
    let blob = guest::blob();
    let code_len = (blob.len() as u64).next_multiple_of(4096);
    let code = frames().allocate_frames((code_len / 4096) as usize, 1).ok_or("no frames")?;
    let data = frames().allocate_frame().ok_or("no frame")?;
    // SAFETY: fresh frames, identity-mapped in HS-mode; the code is copied in, the data zeroed.
    unsafe {
        core::ptr::write_bytes(code.as_u64() as *mut u8, 0, code_len as usize);
        core::ptr::copy_nonoverlapping(blob.as_ptr(), code.as_u64() as *mut u8, blob.len());
        core::ptr::write_bytes(data.as_u64() as *mut u8, 0, 4096);
    }
    let mut result = (|| -> Verdict {
        t.map(gpa(CODE), code, code_len, MappingFlags::RWX, MapSize::Exactly(PageSize::Size4K))
            .map_err(|e| format!("{e:?}"))?
            .ignore();
        t.map(gpa(high), data, 4096, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K))
            .map_err(|e| format!("{e:?}"))?
            .ignore();
        run_on_table(&t, 5, Routine::Store64, &[high + 0x18, 0x4848])?;
        ensure!(run_on_table(&t, 5, Routine::Load64, &[high + 0x18])? == 0x4848, "load back");
        let (h, _) = t.translate(gpa(high + 0x18)).ok_or("unmapped")?;
        // SAFETY: the data frame, identity-mapped.
        let v = unsafe { (h.as_u64() as *const u64).read_volatile() };
        ensure!(v == 0x4848, "the store is not in the frame: {v:#x}");
        Ok(())
    })();
    // A GPA above the format's range faults rather than wrapping.
    if result.is_ok() && F::GPA_BITS < 64 {
        let beyond = 1u64 << F::GPA_BITS;
        if run_on_table(&t, 5, Routine::Load64, &[beyond | 0x18]).is_ok() {
            result = Err(format!("GPA {beyond:#x} beyond {} bits was accepted", F::GPA_BITS));
        }
    }
    drop(t);
    // SAFETY: the table is gone and no hgatp points at it.
    unsafe {
        frames().deallocate_frames(code, (code_len / 4096) as usize);
        frames().deallocate_frames(data, 1);
    }
    result
}

/// The wider G-stage formats on the hart, when it offers them: a guest store and load at a GPA
/// only Sv48x4 (50-bit) or Sv57x4 (59-bit) can map.
pub fn wide_formats() -> Verdict {
    let caps = crate::vm::hart().caps;
    let mut ran = Vec::new();
    if caps.sv48x4 {
        wide_format::<twostage_npt::Sv48x4>(1 << 48).map_err(|e| format!("Sv48x4: {e}"))?;
        ran.push("Sv48x4 at GPA 1<<48");
    }
    if caps.sv57x4 {
        wide_format::<twostage_npt::Sv57x4>(1 << 56).map_err(|e| format!("Sv57x4: {e}"))?;
        ran.push("Sv57x4 at GPA 1<<56");
    }
    println!("# wide G-stage formats run: {ran:?}");
    ensure!(!ran.is_empty() || !(caps.sv48x4 || caps.sv57x4), "nothing ran");
    Ok(())
}

/// xorshift64* (Marsaglia; Vigna's multiplier): a fixed-seed generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Random instruction words and random registers, run in VS-mode: every run must end in an exit
/// the hypervisor reports (a watchdog ends loops and WFIs), and the hypervisor must carry on.
pub fn random_guest() -> Verdict {
    use crate::scenarios::{describe, test_vm};
    use crate::vm::Exit;
    use twostage_npt::PageSize;
    let free0 = frames().free();
    let mut kinds: [u32; 5] = [0; 5];
    let mut rng = Rng(0x7477_6f73_7461_6765);
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
                    let r = rng.next();
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
                *r = if rng.next() & 1 == 0 { CODE + (rng.next() % (8 << 20)) } else { rng.next() };
            }
            // a7/a6: often an SBI extension and function the hypervisor serves.
            use twostage_rvh::sbi::eid;
            const EIDS: [u64; 8] = [0, 1, 2, eid::BASE, eid::TIME, eid::DBCN, eid::SRST, eid::TWOSTAGE_TEST];
            if rng.next() & 1 == 0 {
                vm.regs.gpr[17] = EIDS[(rng.next() % 8) as usize];
                vm.regs.gpr[16] = rng.next() % 4;
            }
            fresh_vs_context(&vm);
            vm.pc = page + 4 * (rng.next() % 1024);
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
    Ok(())
}
