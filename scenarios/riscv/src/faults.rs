//! Faults: G-stage permission faults, faults in the hypervisor's own hlv/hsv/hlvx accesses
//! recovered through the exception table, and a guest's implicit VS-stage walk that faults.

use crate::guest::Routine;
use crate::guest_access::{gva_world, hlv, NOWHERE, PAGE_A, PAGE_NX, PAGE_RO, PT_L0};
use crate::{call, done, ensure, fault, gpa, peek, poke, test_vm, Machine};
use alloc::format;
use alloc::string::String;
use twostage_aspace::GuestMemory;
use twostage_harness::{Pass, Scenario, Verdict};
use twostage_hv_riscv::println;
use twostage_npt::{GuestVirtAddr, MapSize, MappingFlags, PageSize};
use twostage_rvh::access::{self, GuestFaultKind};
use twostage_rvh::csr::cause;
use twostage_rvh::hw;

/// The fault scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("permission faults (write to read-only, execute on no-execute)", permissions),
    Scenario::new("recovered faults in hlv/hsv/hlvx", recovered_faults),
    Scenario::new("implicit VS-stage walk fault resolved", implicit_walk),
];

fn permissions(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    let ro = 0x8700_0000;
    vm.map_new(gpa(ro), 4096, MappingFlags::READ, PageSize::Size4K).map_err(String::from)?;
    let (f, t) = fault(call(&mut vm, Routine::Store64, &[ro + 0x10, 0x5a5a]))?;
    ensure!(
        t.scause == 23 && f.info.fault_guest_paddr == gpa(ro + 0x10),
        "store fault {:?} scause {}",
        f.info,
        t.scause
    );
    ensure!(f.info.access_flags == MappingFlags::WRITE, "access {:?}", f.info.access_flags);
    ensure!(peek(&vm, ro + 0x10)? == 0, "the refused store landed");
    // Grant write and resume at the same pc: the store is retried and lands.
    let fl = vm.table_mut().protect(gpa(ro), 4096, MappingFlags::RW).map_err(|e| format!("{e:?}"))?;
    vm.apply(fl);
    done(vm.run())?;
    ensure!(peek(&vm, ro + 0x10)? == 0x5a5a, "the retried store did not land");
    // Execute on a no-execute page: `li a0, 42; ret`.
    let nx = 0x8700_1000;
    vm.map_new(gpa(nx), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    vm.phys().write(gpa(nx), &[0x13, 0x05, 0xa0, 0x02, 0x82, 0x80]).map_err(|e| format!("{e}"))?;
    let (f, t) = fault(call(&mut vm, Routine::Call, &[nx]))?;
    ensure!(
        t.scause == 20 && f.info.access_flags == MappingFlags::EXECUTE,
        "fetch fault {:?} scause {}",
        f.info,
        t.scause
    );
    ensure!(
        f.info.fault_guest_paddr == gpa(nx) && t.sepc == nx,
        "fetch fault at {:?} pc {:#x}",
        f.info.fault_guest_paddr,
        t.sepc
    );
    let fl = vm.table_mut().protect(gpa(nx), 4096, MappingFlags::RX).map_err(|e| format!("{e:?}"))?;
    vm.apply(fl);
    ensure!(done(vm.run())? == 42, "code did not run after granting execute");
    Ok(Pass::Plain)
}

fn recovered_faults(_: &mut Machine) -> Verdict {
    let vm = gva_world()?;
    let mut h = hlv();
    let mut buf = [0u8; 16];
    // The guest's own table says invalid: a VS-stage page fault (scause 13), no GPA. QEMU 7.2
    // reports it as a load access fault (scause 5) when HLV runs with V=0 and satp = Bare (it
    // consults satp instead of vsatp to choose between the two); both are recovered the same way.
    let e = access::copy_from_guest_va(&mut h, GuestVirtAddr::new(0x3000), &mut buf).unwrap_err();
    ensure!(
        matches!(e.kind, GuestFaultKind::GuestStage1 | GuestFaultKind::AccessFault)
            && e.gpa.is_none()
            && e.gva.as_u64() == 0x3000,
        "{e}"
    );
    println!("# VS-stage invalid PTE via hlv: {e}");
    // The nested table has nothing there: a guest-page fault naming the GPA.
    let e = access::copy_from_guest_va(&mut h, GuestVirtAddr::new(0x2008), &mut buf).unwrap_err();
    ensure!(e.kind == GuestFaultKind::GuestPage && e.gpa == Some(gpa(NOWHERE + 8)), "{e}");
    // A copy that runs into it stops at the boundary having done the first part.
    let e = access::copy_from_guest_va(&mut h, GuestVirtAddr::new(0x1ff8), &mut buf).unwrap_err();
    ensure!(e.done == 8 && e.gva.as_u64() == 0x2000 && e.gpa == Some(gpa(NOWHERE)), "{e}");
    // hsv to a read-only GPA.
    let e = access::copy_to_guest_va(&mut h, GuestVirtAddr::new(0x4010), &[1; 8]).unwrap_err();
    ensure!(
        e.kind == GuestFaultKind::GuestPage
            && e.access == twostage_npt::Access::Write
            && e.gpa == Some(gpa(PAGE_RO + 0x10)),
        "{e}"
    );
    // hlvx where the nested table maps nothing: a guest-page fault naming the GPA, as an execute.
    // QEMU 10 reports it as an instruction page fault (scause 12) with no GPA; recovered alike.
    let e = access::fetch_guest_instruction(&mut h, GuestVirtAddr::new(0x2010)).unwrap_err();
    if e.scause == cause::INSN_PAGE {
        println!("# hlvx on an unmapped GPA came back as an instruction page fault: {e}");
    } else {
        ensure!(
            e.kind == GuestFaultKind::GuestPage
                && e.access == twostage_npt::Access::Execute
                && e.gpa == Some(gpa(NOWHERE + 0x10)),
            "{e}"
        );
    }
    // hlvx on a GPA mapped without execute: the spec (§8.3.1) requires execute permission at
    // both stages; QEMU 7.2 checks only read at G-stage, so the fetch may succeed there.
    match access::fetch_guest_instruction(&mut h, GuestVirtAddr::new(0x5000)) {
        Err(e) if e.scause == cause::INSN_PAGE => {
            println!("# hlvx on a G-stage no-execute page came back as an instruction page fault: {e}")
        }
        Err(e) => ensure!(
            e.kind == GuestFaultKind::GuestPage
                && e.access == twostage_npt::Access::Execute
                && e.gpa == Some(gpa(PAGE_NX)),
            "{e}"
        ),
        Ok(i) => println!("# hlvx on a G-stage no-execute page was allowed by this emulator (read {:#x})", i.raw),
    }
    // A non-canonical address and an odd pc are errors too, and the hypervisor carries on.
    let e = access::copy_from_guest_va(&mut h, GuestVirtAddr::new(0xdead_beef_0000_0000), &mut buf).unwrap_err();
    println!("# non-canonical GVA: {e}");
    ensure!(access::fetch_guest_instruction(&mut h, GuestVirtAddr::new(0x101)).is_err(), "odd pc fetched");
    access::copy_from_guest_va(&mut h, GuestVirtAddr::new(0x1000), &mut buf)
        .map_err(|e| format!("after faults: {e}"))?;
    drop(vm);
    Ok(Pass::Plain)
}

fn implicit_walk(_: &mut Machine) -> Verdict {
    let mut vm = gva_world()?;
    poke(&vm, PAGE_A, 0x77)?;
    // Take the guest's level-0 table away from it: its walk for GVA 0x1000 now faults.
    let (l0_frame, _) = vm.table().translate(gpa(PT_L0)).ok_or("L0 not mapped")?;
    let f = vm.table_mut().unmap(gpa(PT_L0), 4096).map_err(|e| format!("{e:?}"))?;
    vm.apply(f);
    hw::hfence_vvma_all();
    vm.demand_zero = None;
    let (flt, t) = fault(call(&mut vm, Routine::Load64, &[0x1000]))?;
    println!(
        "# walk fault: scause {} htval {:#x} htinst {:#x} -> GPA {:?} ({:?}), implicit per htinst: {}",
        t.scause,
        t.htval,
        t.htinst,
        flt.info.fault_guest_paddr,
        flt.info.access_flags,
        flt.is_implicit()
    );
    ensure!(
        flt.info.fault_guest_paddr.align_down(4096) == gpa(PT_L0),
        "fault GPA {:?} is not the L0 table",
        flt.info.fault_guest_paddr
    );
    ensure!(flt.info.fault_guest_paddr.as_u64() & 0xff8 == 8, "PTE index 1 expected");
    // Give it back; the retried load walks and completes.
    let f = vm
        .table_mut()
        .map(gpa(PT_L0), l0_frame, 4096, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K))
        .map_err(|e| format!("{e:?}"))?;
    vm.apply(f);
    ensure!(done(vm.run())? == 0x77, "load after restoring the table");
    Ok(Pass::Plain)
}
