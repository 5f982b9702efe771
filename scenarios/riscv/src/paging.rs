//! Paging: what the hart offers, demand-zero paging, huge pages (split, protect, collapse),
//! remapping under a running guest, and the wider G-stage formats (Sv48x4, Sv57x4).

use crate::guest::{self, Routine, HC_REPORT};
use crate::{call, done, ensure, fault, gpa, peek, poke, test_vm, Check, Machine, Need, CODE, RAM_LEN};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use twostage_harness::{Pass, Scenario, Verdict};
use twostage_hv_riscv::hart::{frames, g_stage_options, hart};
use twostage_hv_riscv::println;
use twostage_hv_riscv::vm::{Exit, Vm};
use twostage_npt::{FrameAllocator, GpaRange, MapSize, MappingFlags, PageSize};
use twostage_npt::{Hgatp, HgatpMode};
use twostage_rvh::hw;

/// The paging scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("capabilities report", capabilities),
    Scenario::new("demand-zero paging", demand_zero),
    Scenario::new("huge pages and splitting", huge_pages),
    Scenario::new("remap while the guest runs", remap),
    Scenario::needing("Sv48x4 and Sv57x4 G-stage tables run the guest at high GPAs", &[Need::WideGStage], wide_formats),
];

fn capabilities(_: &mut Machine) -> Verdict {
    let h = hart();
    let c = h.caps;
    println!(
        "# H extension: hstatus readable={} isa lists h={}; hgatp modes: Sv39x4={} Sv48x4={} Sv57x4={}; VMIDLEN={}; timebase {} Hz",
        h.h_csrs, h.isa_h, c.sv39x4, c.sv48x4, c.sv57x4, c.vmid_bits, h.timebase
    );
    ensure!(h.h_csrs && h.isa_h, "no H extension");
    ensure!(c.sv39x4, "Sv39x4 not offered");
    // The widest VMID fits, one more bit does not.
    let root = twostage_npt::HostPhysAddr::new(0x8040_0000);
    let max = ((1u32 << c.vmid_bits) - 1) as u16;
    let g = Hgatp::new(HgatpMode::Sv39x4, max, root, &c).map_err(|e| format!("hgatp: {e}"))?;
    ensure!(g.vmid() == max && g.mode_bits() == 8, "hgatp fields {g:?}");
    if c.vmid_bits < 14 {
        ensure!(Hgatp::new(HgatpMode::Sv39x4, max + 1, root, &c).is_err(), "too-wide VMID accepted");
    }
    // The value a VM loads reads back unchanged.
    let vm = Vm::new(1);
    // SAFETY: loads the fresh VM's table; no guest runs.
    unsafe { hw::hgatp::write(vm.hgatp.bits()) };
    ensure!(hw::hgatp::read() == vm.hgatp.bits(), "hgatp read back {:#x}", hw::hgatp::read());
    Ok(Pass::Plain)
}

fn demand_zero(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    // First without demand paging: the load faults, and the fault names the GPA and the access.
    vm.demand_zero = None;
    let (f, t) = fault(call(&mut vm, Routine::Load64, &[0x8100_0010]))?;
    ensure!(f.info.fault_guest_paddr == gpa(0x8100_0010), "fault GPA {:?}", f.info.fault_guest_paddr);
    ensure!(f.info.access_flags == MappingFlags::READ && t.scause == 21, "fault {:?} scause {}", f.info, t.scause);
    ensure!(f.gva.map(|g| g.as_u64()) == Some(0x8100_0010), "GVA {:?}", f.gva);
    // Now with it: resuming at the same pc retries the load, which gets a fresh zero page.
    vm.demand_zero = GpaRange::from_start_len(gpa(CODE), RAM_LEN);
    let before = vm.stats.demand_zero;
    ensure!(done(vm.run())? == 0, "a fresh page is not zero");
    ensure!(vm.stats.demand_zero == before + 1, "one zero page expected");
    let leaf = vm.table().query(gpa(0x8100_0000)).ok_or("no leaf after the fault")?;
    ensure!(leaf.size == PageSize::Size4K, "leaf {leaf:?}");
    // A store to the same page needs no new page; one to another page does.
    done(call(&mut vm, Routine::Store64, &[0x8100_0008, 0x1234]))?;
    ensure!(peek(&vm, 0x8100_0008)? == 0x1234, "the guest's store is not in the page");
    done(call(&mut vm, Routine::Store64, &[0x8100_5000, 7]))?;
    ensure!(vm.stats.demand_zero == before + 2, "demand_zero {}", vm.stats.demand_zero);
    println!("# demand-zero: {} pages mapped on fault", vm.stats.demand_zero);
    Ok(Pass::Plain)
}

fn huge_pages(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    let base = 0x8600_0000;
    vm.map_new(gpa(base), 2 << 20, MappingFlags::RWX, PageSize::Size2M).map_err(String::from)?;
    let l = vm.table().query(gpa(base + 0x1234)).ok_or("no leaf")?;
    ensure!(l.size == PageSize::Size2M && l.hpa.is_aligned(2 << 20), "leaf {l:?}");
    poke(&vm, base + 0x1000, 0xaaaa)?;
    poke(&vm, base + 0x1f_f008, 0xbbbb)?;
    ensure!(done(call(&mut vm, Routine::Load64, &[base + 0x1000]))? == 0xaaaa, "guest read through the 2 MiB leaf");
    // Split: 512 4 KiB leaves over the same frames; the guest sees the same data.
    let f = vm.table_mut().split(gpa(base)).map_err(|e| format!("split: {e:?}"))?;
    vm.apply(f);
    let l2 = vm.table().query(gpa(base + 0x1f_f008)).ok_or("no leaf after split")?;
    ensure!(l2.size == PageSize::Size4K && l2.hpa == l.hpa + 0x1f_f000, "after split {l2:?}");
    let mut n = 0;
    vm.table().for_each_leaf(gpa(base), 2 << 20, |_| n += 1);
    ensure!(n == 512, "{n} leaves after split");
    ensure!(done(call(&mut vm, Routine::Load64, &[base + 0x1f_f008]))? == 0xbbbb, "guest read after split");
    // One page of it read-only: a store there faults, next door it does not.
    let f =
        vm.table_mut().protect(gpa(base + 0x3000), 4096, MappingFlags::RX).map_err(|e| format!("protect: {e:?}"))?;
    vm.apply(f);
    let (flt, _) = fault(call(&mut vm, Routine::Store64, &[base + 0x3008, 1]))?;
    ensure!(
        flt.info.fault_guest_paddr == gpa(base + 0x3008) && flt.info.access_flags == MappingFlags::WRITE,
        "{:?}",
        flt.info
    );
    done(call(&mut vm, Routine::Store64, &[base + 0x4008, 2]))?;
    // Same rights again: collapse back into one 2 MiB leaf; the guest still reads its data.
    let f =
        vm.table_mut().protect(gpa(base + 0x3000), 4096, MappingFlags::RWX).map_err(|e| format!("protect: {e:?}"))?;
    vm.apply(f);
    let f = vm.table_mut().collapse(gpa(base), PageSize::Size2M).map_err(|e| format!("collapse: {e:?}"))?;
    vm.apply(f);
    ensure!(vm.table().query(gpa(base)).map(|l| l.size) == Some(PageSize::Size2M), "not collapsed");
    ensure!(done(call(&mut vm, Routine::Load64, &[base + 0x4008]))? == 2, "guest read after collapse");
    println!("# huge page {:?}: split into 512, one protected, collapsed back", l.hpa);
    Ok(Pass::Plain)
}

fn remap(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    let p = 0x8a00_0000;
    vm.map_new(gpa(p), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    poke(&vm, p, 0x1111)?;
    let first = match call(&mut vm, Routine::LoadTwice, &[p]) {
        Exit::Test { fid: HC_REPORT, args } => args[0],
        other => return Err(format!("expected a report, got {}", crate::describe(&other))),
    };
    ensure!(first == 0x1111, "first read {first:#x}");
    // While the guest is stopped mid-routine: a new frame under the same GPA.
    let (old, _) = vm.table().translate(gpa(p)).ok_or("unmapped")?;
    let new = frames().allocate_frame().ok_or("no frame")?;
    // SAFETY: a fresh frame, identity-mapped.
    unsafe { core::ptr::write_bytes(new.as_u64() as *mut u8, 0, 4096) };
    // SAFETY: as above.
    unsafe { (new.as_u64() as *mut u64).write_volatile(0x2222) };
    let f = vm.table_mut().unmap(gpa(p), 4096).map_err(|e| format!("{e:?}"))?;
    vm.apply(f);
    let f = vm
        .table_mut()
        .map(gpa(p), new, 4096, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K))
        .map_err(|e| format!("{e:?}"))?;
    let before = vm.stats.gvma_addr + vm.stats.gvma_vmid;
    vm.apply(f);
    // SAFETY: `old` is unmapped and fenced.
    unsafe { frames().deallocate_frames(old, 1) };
    let second = done(vm.run())?;
    ensure!(second == 0x2222, "the guest still sees the old page: {second:#x}");
    ensure!(vm.stats.gvma_addr + vm.stats.gvma_vmid > before, "no fence was issued");
    Ok(Pass::Plain)
}

/// Runs the test guest's `r` on a bare nested table of format `F` (no VM around it) until the
/// done hypercall; any other exit is an error.
fn run_on_table<F: twostage_npt::GStageFormat>(
    table: &twostage_npt::PageTable<F, &'static twostage_baremetal::frames::Frames>,
    vmid: u16,
    r: Routine,
    args: &[u64],
) -> Result<u64, String> {
    use twostage_hv_riscv::trap::{self, VcpuRegs};
    use twostage_rvh::csr::cause;
    use twostage_rvh::hw;
    let caps = hart().caps;
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
fn wide_format<F: twostage_npt::GStageFormat>(high: u64) -> Check {
    use twostage_npt::{FrameAllocator, MapSize, PageSize, PageTable};
    let mut t = PageTable::<F, _>::new(frames(), g_stage_options::<F>(false)).map_err(|e| format!("{e:?}"))?;
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
    let mut result = (|| -> Check {
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
fn wide_formats(_: &mut Machine) -> Verdict {
    let caps = hart().caps;
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
    Ok(Pass::Plain)
}
