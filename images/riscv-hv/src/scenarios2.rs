//! The scenario suite (part 2): guest-virtual access, instruction fetch, recovered faults,
//! implicit walks, remapping, dirty tracking, A/D bits, timer, hostile guests, fork.

use crate::guest::{Routine, HC_REPORT};
use crate::scenarios::{call, done, ensure, fault, gpa, peek, poke, test_vm, Verdict, CODE};
use crate::trap::{self, VcpuRegs};
use crate::vm::{frames, hart, Exit, Vm};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use twostage_aspace::GuestMemory;
use twostage_npt::Hgatp;
use twostage_npt::{AdClear, FrameAllocator, GuestVirtAddr, MapSize, MappingFlags, PageSize, Sv39x4};
use twostage_rvh::access::{self, GuestFaultKind};
use twostage_rvh::csr::cause;
use twostage_rvh::fault::{decode_guest_page_fault, TrapCsrs};
use twostage_rvh::hw;

// The guest-virtual world: the guest's own Sv39 tables and the pages behind them.
const PT_ROOT: u64 = 0x8010_0000;
const PT_L1: u64 = 0x8010_1000;
const PT_L0: u64 = 0x8010_2000;
const PTE_LIST: u64 = 0x8010_3000;
const PAGE_A: u64 = 0x8800_0000;
const PAGE_B: u64 = 0x8800_2000;
const PAGE_RO: u64 = 0x8800_4000;
const PAGE_NX: u64 = 0x8800_5000;
const NOWHERE: u64 = 0x8900_0000;

/// A guest Sv39 leaf PTE for `gpa`: V R W X A D (Privileged 1.12 §4.4.1, Figure 4.21).
fn pte(gpa: u64) -> u64 {
    ((gpa >> 12) << 10) | 0xcf
}

/// A test VM whose guest has turned on Sv39 with virtual pages 0x0 -> B, 0x1000 -> A,
/// 0x2000 -> an unmapped GPA, 0x3000 invalid, 0x4000 -> read-only GPA, 0x5000 -> no-execute GPA.
fn gva_world() -> Result<Vm, String> {
    let mut vm = test_vm(1)?;
    for (p, fl) in [
        (PAGE_A, MappingFlags::RWX),
        (PAGE_B, MappingFlags::RWX),
        (PAGE_RO, MappingFlags::READ),
        (PAGE_NX, MappingFlags::RW),
        (PTE_LIST, MappingFlags::RW),
    ] {
        vm.map_new(gpa(p), 4096, fl, PageSize::Size4K).map_err(String::from)?;
    }
    let ptes = [pte(PAGE_B), pte(PAGE_A), pte(NOWHERE), 0, pte(PAGE_RO), pte(PAGE_NX)];
    let bytes: Vec<u8> = ptes.iter().flat_map(|p| p.to_le_bytes()).collect();
    vm.phys().write(gpa(PTE_LIST), &bytes).map_err(|e| format!("{e}"))?;
    done(call(&mut vm, Routine::SetupPaging, &[PT_ROOT, PT_L1, PT_L0, PTE_LIST, ptes.len() as u64]))?;
    ensure!(hw::vsatp::read() >> 60 == 8, "guest vsatp {:#x} is not Sv39", hw::vsatp::read());
    Ok(vm)
}

fn hlv() -> hw::Hlv {
    // SAFETY: called with the scenario's VM loaded (hgatp, vsatp); the trap handler applies the table.
    unsafe { hw::Hlv::new() }
}

pub fn gva_copies() -> Verdict {
    let mut vm = gva_world()?;
    let pa: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ 0xa5).collect();
    let pb: Vec<u8> = (0..4096u32).map(|i| (i * 3) as u8).collect();
    vm.phys().write(gpa(PAGE_A), &pa).map_err(|e| format!("{e}"))?;
    vm.phys().write(gpa(PAGE_B), &pb).map_err(|e| format!("{e}"))?;
    // GVA 0xff0..0x1020 is the end of B followed by the start of A.
    let mut buf = [0u8; 48];
    access::copy_from_guest_va(&mut hlv(), GuestVirtAddr::new(0xff0), &mut buf).map_err(|e| format!("{e}"))?;
    ensure!(buf[..16] == pb[0xff0..] && buf[16..] == pa[..32], "read across GVA pages");
    let data: Vec<u8> = (100..120u8).collect();
    access::copy_to_guest_va(&mut hlv(), GuestVirtAddr::new(0xffd), &data).map_err(|e| format!("{e}"))?;
    let mut b_end = [0u8; 3];
    let mut a_start = [0u8; 17];
    vm.phys().read(gpa(PAGE_B + 0xffd), &mut b_end).map_err(|e| format!("{e}"))?;
    vm.phys().read(gpa(PAGE_A), &mut a_start).map_err(|e| format!("{e}"))?;
    ensure!(b_end[..] == data[..3] && a_start[..] == data[3..], "write across GVA pages");
    // The guest, through its own tables, reads what the hypervisor wrote.
    let v = done(call(&mut vm, Routine::Load64, &[0x1000]))?;
    ensure!(v.to_le_bytes() == data[3..11], "guest reads {v:#x}");
    Ok(())
}

pub fn insn_fetch() -> Verdict {
    let mut vm = gva_world()?;
    // c.li a0, 5; c.jr ra at GVA 0x100 (page B).
    vm.phys().write(gpa(PAGE_B + 0x100), &[0x15, 0x45, 0x82, 0x80]).map_err(|e| format!("{e}"))?;
    // addi a0, a0, 1 (0x00150513) across GVA 0xffe..0x1002 (B's last parcel, A's first), then c.jr ra.
    vm.phys().write(gpa(PAGE_B + 0xffe), &[0x13, 0x05]).map_err(|e| format!("{e}"))?;
    vm.phys().write(gpa(PAGE_A), &[0x15, 0x00, 0x82, 0x80]).map_err(|e| format!("{e}"))?;
    let c = access::fetch_guest_instruction(&mut hlv(), GuestVirtAddr::new(0x100)).map_err(|e| format!("{e}"))?;
    ensure!(c.raw == 0x4515 && c.len == 2, "compressed fetch {c:?}");
    let w = access::fetch_guest_instruction(&mut hlv(), GuestVirtAddr::new(0xffe)).map_err(|e| format!("{e}"))?;
    ensure!(w.raw == 0x0015_0513 && w.len == 4, "page-crossing fetch {w:?}");
    let r = access::fetch_guest_instruction(&mut hlv(), GuestVirtAddr::new(0x1002)).map_err(|e| format!("{e}"))?;
    ensure!(r.raw == 0x8082 && r.len == 2, "fetch after the crossing {r:?}");
    // The hart agrees: the guest executes both.
    ensure!(done(call(&mut vm, Routine::Call, &[0x100]))? == 5, "compressed code");
    ensure!(done(call(&mut vm, Routine::Call, &[0xffe]))? == 0xfff, "page-crossing code");
    println!("# fetched {:#06x} (2 bytes) and {:#010x} (4 bytes, across GVA 0x1000)", c.raw, w.raw);
    Ok(())
}

pub fn recovered_faults() -> Verdict {
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
    Ok(())
}

pub fn implicit_walk() -> Verdict {
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
    Ok(())
}

pub fn remap() -> Verdict {
    let mut vm = test_vm(1)?;
    let p = 0x8a00_0000;
    vm.map_new(gpa(p), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    poke(&vm, p, 0x1111)?;
    let first = match call(&mut vm, Routine::LoadTwice, &[p]) {
        Exit::Test { fid: HC_REPORT, args } => args[0],
        other => return Err(format!("expected a report, got {}", crate::scenarios::describe(&other))),
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
    Ok(())
}

pub fn dirty_log() -> Verdict {
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
                other => return Err(crate::scenarios::describe(&other)),
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
    Ok(())
}

pub fn ad_bits() -> Verdict {
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
    Ok(())
}

pub fn virtual_timer() -> Verdict {
    let mut vm = test_vm(1)?;
    let deadline = hw::rdtime() + u64::from(hart().timebase / 1000); // 1 ms
    let vscause = done(call(&mut vm, Routine::WaitTimer, &[deadline]))?;
    ensure!(vscause == cause::INTERRUPT | 5, "guest trap cause {vscause:#x}");
    ensure!(vm.stats.timer_injections >= 1, "no VSTIP injected");
    ensure!(hw::rdtime() >= deadline, "interrupt before the deadline");
    Ok(())
}

pub fn hostile() -> Verdict {
    let mut vm = test_vm(1)?;
    // A jump far outside its memory: an unresolved fetch fault, reported, not fatal.
    let (f, _) = fault(call(&mut vm, Routine::Call, &[0x4000_0000]))?;
    ensure!(f.info.access_flags == MappingFlags::EXECUTE, "{:?}", f.info);
    // An illegal instruction (all zeros).
    let page = 0x8000_9000;
    vm.map_new(gpa(page), 4096, MappingFlags::RWX, PageSize::Size4K).map_err(String::from)?;
    match call(&mut vm, Routine::Call, &[page]) {
        Exit::Exception(t) if t.scause == cause::ILLEGAL_INSN => {}
        other => return Err(format!("illegal instruction: {}", crate::scenarios::describe(&other))),
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
    Ok(())
}

/// One run of a guest over an address space, resolving its faults through it.
fn run_space(
    space: &mut twostage_aspace::AddressSpace<Sv39x4, &'static twostage_baremetal::frames::Frames>,
    hgatp: Hgatp,
    regs: &mut VcpuRegs,
    r: Routine,
    args: &[u64],
) -> Result<u64, String> {
    regs.gpr[10..10 + args.len()].copy_from_slice(args);
    let mut pc = CODE + crate::guest::offset(r);
    let vmid = hgatp.vmid();
    // SAFETY: the space's table maps only its own frames; a fresh VS context.
    unsafe {
        hw::hgatp::write(hgatp.bits());
        hw::hedeleg::write(0);
    }
    hw::hfence_gvma_all();
    for _ in 0..1000 {
        // SAFETY: as above.
        let t = unsafe { trap::run_guest(regs, pc) };
        pc = t.sepc;
        match t.scause {
            cause::ECALL_VS if regs.gpr[17] == twostage_rvh::sbi::eid::TWOSTAGE_TEST => return Ok(regs.gpr[10]),
            cause::INSN_GUEST_PAGE | cause::LOAD_GUEST_PAGE | cause::STORE_GUEST_PAGE => {
                let c =
                    TrapCsrs { scause: t.scause, stval: t.stval, htval: t.htval, htinst: t.htinst, gva_valid: true };
                let f = decode_guest_page_fault(&c).map_err(|e| format!("{e}"))?;
                match space.handle_fault(f.info) {
                    twostage_aspace::FaultOutcome::Resolved { flush } => space.flush(flush, |inv| {
                        twostage_rvh::fence::plan_gvma(inv, vmid, hw::hfence_gvma);
                    }),
                    other => return Err(format!("fault {:?}: {other:?}", f.info)),
                }
            }
            other => return Err(format!("{} at {:#x}", cause::name(other), t.sepc)),
        }
    }
    Err("exit budget".into())
}

pub fn cow_fork() -> Verdict {
    use twostage_aspace::{AddressSpace, Backend};
    let caps = hart().caps;
    let free0 = frames().free();
    {
        let mut parent = AddressSpace::<Sv39x4, _>::new(frames(), crate::vm::g_stage_options::<Sv39x4>(true))
            .map_err(|e| format!("{e:?}"))?;
        let ram = twostage_npt::GpaRange::from_start_len(gpa(CODE), 16 << 20).ok_or("range")?;
        let (_, f) =
            parent.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero).map_err(|e| format!("{e:?}"))?;
        parent.flush_unloaded(f);
        let f = parent.load_image(gpa(CODE), crate::guest::blob()).map_err(|e| format!("{e:?}"))?;
        parent.flush_unloaded(f);
        let hp = Hgatp::new(twostage_npt::HgatpMode::Sv39x4, 2, parent.root(), &caps).map_err(|e| format!("{e}"))?;
        // SAFETY: a fresh VS context.
        unsafe { hw::vsatp::write(0) };
        let mut regs = VcpuRegs::new();
        let x = 0x8040_0000;
        let y = 0x8040_1000;
        run_space(&mut parent, hp, &mut regs, Routine::Store64, &[x, 0x1111])?;
        run_space(&mut parent, hp, &mut regs, Routine::Store64, &[y, 0x5555])?;
        let (mut child, f) = parent.fork().map_err(|e| format!("fork: {e:?}"))?;
        parent.flush(f, |inv| {
            twostage_rvh::fence::plan_gvma(inv, 2, hw::hfence_gvma);
        });
        let hc = Hgatp::new(twostage_npt::HgatpMode::Sv39x4, 3, child.root(), &caps).map_err(|e| format!("{e}"))?;
        let mut cregs = VcpuRegs::new();
        ensure!(
            run_space(&mut child, hc, &mut cregs, Routine::Load64, &[x])? == 0x1111,
            "child reads the parent's page"
        );
        run_space(&mut child, hc, &mut cregs, Routine::Store64, &[x, 0x2222])?;
        ensure!(run_space(&mut child, hc, &mut cregs, Routine::Load64, &[x])? == 0x2222, "child sees its write");
        ensure!(
            run_space(&mut parent, hp, &mut regs, Routine::Load64, &[x])? == 0x1111,
            "parent isolated from the child's write"
        );
        run_space(&mut parent, hp, &mut regs, Routine::Store64, &[y, 0x6666])?;
        ensure!(
            run_space(&mut child, hc, &mut cregs, Routine::Load64, &[y])? == 0x5555,
            "child isolated from the parent's write"
        );
        let (ps, cs) = (parent.stats(), child.stats());
        println!(
            "# fork: parent cow copies {} reuses {}, child cow copies {} reuses {}; frames in use {}",
            ps.cow_copies,
            ps.cow_reuses,
            cs.cow_copies,
            cs.cow_reuses,
            frames().in_use()
        );
        ensure!(ps.cow_copies + ps.cow_reuses + cs.cow_copies + cs.cow_reuses >= 2, "no copy-on-write breaks counted");
        // SAFETY: neither table stays loaded.
        unsafe { hw::hgatp::write(0) };
        hw::hfence_gvma_all();
    }
    ensure!(frames().free() == free0, "{} frames leaked by fork", free0 - frames().free());
    Ok(())
}
