//! Dirty tracking: a write-protection log kept by hand, A/D bits set by the hart, and an
//! address-space guest whose dirty log comes from the D bits (or write protection without them).

use crate::guest::{self, Routine};
use crate::{call, done, ensure, fresh_vs_context, gpa, peek, test_vm, Check, Machine, Need, CODE};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use twostage_aspace::{Backend, GuestMemory, SpaceFlush};
use twostage_harness::{Pass, Scenario, Verdict};
use twostage_hv_riscv::hart::{frames, g_stage_options};
use twostage_hv_riscv::println;
use twostage_hv_riscv::vm::{Exit, Space, Vm, UART_GPA};
use twostage_npt::{AdClear, GpaRange, MappingFlags, PageSize, Sv39x4};

/// The dirty-tracking scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("dirty tracking (write-protect log)", dirty_log),
    Scenario::needing("accessed/dirty bits set by the hardware", &[Need::HardwareAd], ad_bits),
    Scenario::new("address-space guest: demand-zero, MMIO region, dirty log from D bits", space_guest),
];

fn dirty_log(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    let base = 0x8b00_0000;
    let pages = 16u64;
    vm.map_new(gpa(base), pages * 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    let round = |vm: &mut Vm, start: u64, count: u64, stride: u64| -> Result<u32, String> {
        let f = vm.table_mut().protect(gpa(base), pages * 4096, MappingFlags::READ).map_err(|e| format!("{e:?}"))?;
        vm.apply(f);
        let mut log = 0u32;
        let mut exit = call(vm, Routine::StoreMany, &[base + start, count, stride, 0xd1]);
        loop {
            match exit {
                Exit::Test { .. } => break,
                Exit::Fault(f, _) if f.info.access_flags == MappingFlags::WRITE => {
                    let page = f.info.fault_guest_paddr.align_down(4096);
                    let idx = (page.as_u64().wrapping_sub(base)) / 4096;
                    ensure!(idx < pages, "write fault outside the logged range: {page:?}");
                    log |= 1 << idx;
                    let fl = vm.table_mut().protect(page, 4096, MappingFlags::RW).map_err(|e| format!("{e:?}"))?;
                    vm.apply(fl);
                    exit = vm.run();
                }
                other => return Err(crate::describe(&other)),
            }
        }
        Ok(log)
    };
    let log = round(&mut vm, 0x1000, 5, 0x3000)?;
    ensure!(log == (1 << 1) | (1 << 4) | (1 << 7) | (1 << 10) | (1 << 13), "dirty log {log:#b}");
    ensure!(peek(&vm, base + 0x7000)? == 0xd1, "logged writes landed");
    let log2 = round(&mut vm, 0x2000, 1, 0)?;
    ensure!(log2 == 1 << 2, "second round {log2:#b}");
    println!("# dirty log: round 1 pages {log:#018b}, round 2 {log2:#018b}");
    Ok(Pass::Plain)
}

fn ad_bits(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    let base = 0x8c00_0000;
    vm.map_new(gpa(base), 8 * 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    let harvest = |vm: &mut Vm, clear: AdClear| {
        let mut seen = Vec::new();
        let f = vm.table_mut().take_accessed_dirty(gpa(base), 8 * 4096, clear, |l| {
            seen.push(((l.gpa.as_u64() - base) / 4096, l.accessed, l.dirty))
        });
        vm.apply(f);
        seen
    };
    let start = harvest(&mut vm, AdClear::Both);
    ensure!(start.is_empty(), "fresh leaves report {start:?}");
    done(call(&mut vm, Routine::Load64, &[base]))?;
    done(call(&mut vm, Routine::Store64, &[base + 0x3000, 9]))?;
    let seen = harvest(&mut vm, AdClear::Both);
    ensure!(seen == [(0, true, false), (3, true, true)], "after a read of page 0 and a write of page 3: {seen:?}");
    done(call(&mut vm, Routine::Store64, &[base, 1]))?;
    let seen2 = harvest(&mut vm, AdClear::None);
    ensure!(seen2 == [(0, true, true)], "after clearing, a write of page 0: {seen2:?}");
    println!("# A/D set by the hart: {seen:?}, then {seen2:?}");
    Ok(Pass::Plain)
}

fn ok_flush<E: core::fmt::Debug>(vm: &mut Vm, r: Result<SpaceFlush<Sv39x4>, E>) -> Check {
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
fn space_guest(_: &mut Machine) -> Verdict {
    let free0 = frames().free();
    {
        let mut space = Space::new(frames(), g_stage_options::<Sv39x4>(true)).map_err(|e| format!("{e:?}"))?;
        let ram = GpaRange::from_start_len(gpa(CODE), 16 << 20).ok_or("range")?;
        let (_, f) =
            space.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero).map_err(|e| format!("{e}"))?;
        space.flush_unloaded(f).expect("its own token");
        let uart = GpaRange::from_start_len(gpa(UART_GPA), 0x1000).ok_or("range")?;
        let (_, f) = space.add_region("uart", uart, MappingFlags::RW, Backend::Mmio).map_err(|e| format!("{e}"))?;
        space.flush_unloaded(f).expect("its own token");
        let f = space.load_image(gpa(CODE), guest::blob()).map_err(|e| format!("{e:?}"))?;
        space.flush_unloaded(f).expect("its own token");
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
    Ok(Pass::Plain)
}
