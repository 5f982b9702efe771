//! The hypervisor's access to guest memory: copies by guest-physical address (software
//! translation and the vsatp swap), copies by guest-virtual address (hlv/hsv through the guest's
//! own Sv39 tables), and instruction fetch (hlvx).

use crate::guest::Routine;
use crate::{call, done, ensure, gpa, test_vm, Machine};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use twostage_aspace::{GuestMemError, GuestMemory};
use twostage_harness::{Pass, Scenario, Verdict};
use twostage_hv_riscv::hart::frames;
use twostage_hv_riscv::println;
use twostage_hv_riscv::vm::Vm;
use twostage_npt::{FrameAllocator, GuestVirtAddr, MappingFlags, PageSize};
use twostage_rvh::access;
use twostage_rvh::hw;

/// The guest-access scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("guest-physical copies across page boundaries (software translation vs vsatp swap)", gpa_copies),
    Scenario::new("guest-virtual copies across page boundaries (hlv/hsv)", gva_copies),
    Scenario::new("instruction fetch: compressed and page-crossing (hlvx)", insn_fetch),
];

// The guest-virtual world: the guest's own Sv39 tables and the pages behind them.
// The guest-virtual world: the guest's own Sv39 tables and the pages behind them.
pub(crate) const PT_ROOT: u64 = 0x8010_0000;
pub(crate) const PT_L1: u64 = 0x8010_1000;
pub(crate) const PT_L0: u64 = 0x8010_2000;
pub(crate) const PTE_LIST: u64 = 0x8010_3000;
pub(crate) const PAGE_A: u64 = 0x8800_0000;
pub(crate) const PAGE_B: u64 = 0x8800_2000;
pub(crate) const PAGE_RO: u64 = 0x8800_4000;
pub(crate) const PAGE_NX: u64 = 0x8800_5000;
pub(crate) const NOWHERE: u64 = 0x8900_0000;

/// A guest Sv39 leaf PTE for `gpa`: V R W X A D (Privileged 1.12 §4.4.1, Figure 4.21).
fn pte(gpa: u64) -> u64 {
    ((gpa >> 12) << 10) | 0xcf
}

/// A test VM whose guest has turned on Sv39 with virtual pages 0x0 -> B, 0x1000 -> A,
/// 0x2000 -> an unmapped GPA, 0x3000 invalid, 0x4000 -> read-only GPA, 0x5000 -> no-execute GPA.
pub(crate) fn gva_world() -> Result<Vm, String> {
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

pub(crate) fn hlv() -> hw::Hlv {
    // SAFETY: called with the scenario's VM loaded (hgatp, vsatp); the trap handler applies the table.
    unsafe { hw::Hlv::new() }
}

fn gpa_copies(_: &mut Machine) -> Verdict {
    let mut vm = test_vm(1)?;
    let a = 0x8800_0000;
    vm.map_new(gpa(a), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    let spacer = frames().allocate_frame().ok_or("no frame")?;
    vm.map_new(gpa(a + 4096), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    // SAFETY: the spacer only kept the two pages' frames apart; never mapped.
    unsafe { frames().deallocate_frames(spacer, 1) };
    let (h0, _) = vm.table().translate(gpa(a)).ok_or("unmapped")?;
    let (h1, _) = vm.table().translate(gpa(a + 4096)).ok_or("unmapped")?;
    ensure!(h1 != h0 + 4096, "test needs discontiguous frames");
    let data: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(1)).collect();
    vm.phys().write(gpa(a + 4096 - 24), &data).map_err(|e| format!("copy_to_guest: {e}"))?;
    // The guest reads what was written, on both sides of the boundary.
    let g0 = done(call(&mut vm, Routine::Load64, &[a + 4096 - 8]))?;
    let g1 = done(call(&mut vm, Routine::Load64, &[a + 4096]))?;
    ensure!(g0.to_le_bytes() == data[16..24] && g1.to_le_bytes() == data[24..32], "guest sees {g0:#x} {g1:#x}");
    let mut back = [0u8; 64];
    vm.phys().read(gpa(a + 4096 - 24), &mut back).map_err(|e| format!("copy_from_guest: {e}"))?;
    ensure!(back[..] == data[..], "software copy round trip");
    // The vsatp-swap approach (hw::copy_from_guest_swap) reads the same bytes.
    let mut swap = [0u8; 64];
    // SAFETY: this VM's hgatp is loaded and the trap handler applies the exception table.
    unsafe { hw::copy_from_guest_swap(gpa(a + 4096 - 24), &mut swap) }.map_err(|e| format!("swap copy: {e}"))?;
    ensure!(swap[..] == data[..], "swap copy differs");
    // Unmapped and read-only GPAs are typed errors.
    let e = vm.phys().read(gpa(a + 8192 - 4), &mut back).unwrap_err();
    ensure!(matches!(e, GuestMemError::Unmapped { gpa: g, .. } if g == gpa(a + 8192)), "error {e:?}");
    // Measure: N copies of 64 bytes each way.
    const N: u64 = 2000;
    let t0 = (hw::rdtime(), hw::rdcycle());
    for i in 0..N {
        vm.phys().read(gpa(a + 4096 - 24 - (i & 7)), &mut back).map_err(|e| format!("{e}"))?;
    }
    let t1 = (hw::rdtime(), hw::rdcycle());
    for i in 0..N {
        // SAFETY: as above.
        unsafe { hw::copy_from_guest_swap(gpa(a + 4096 - 24 - (i & 7)), &mut swap) }.map_err(|e| format!("{e}"))?;
    }
    let t2 = (hw::rdtime(), hw::rdcycle());
    let per = |d: u64| d * 1000 / N;
    println!(
        "# {N} x 64-byte GPA reads: software translation {} time ticks ({} cycles), vsatp swap + 2x hfence.vvma {} ticks ({} cycles); per copy x1000: {} vs {} ticks",
        t1.0 - t0.0,
        t1.1 - t0.1,
        t2.0 - t1.0,
        t2.1 - t1.1,
        per(t1.0 - t0.0),
        per(t2.0 - t1.0)
    );
    Ok(Pass::Plain)
}

fn gva_copies(_: &mut Machine) -> Verdict {
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
    Ok(Pass::Plain)
}

fn insn_fetch(_: &mut Machine) -> Verdict {
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
    Ok(Pass::Plain)
}
