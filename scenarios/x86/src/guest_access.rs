//! Guest memory seen by the hypervisor: copies by guest-physical address across a page
//! boundary, copies by guest-virtual address through the guest's own tables (walked in software
//! through the EPT), and an instruction fetched across a page.

use crate::guest::{self, GuestOps, Op};
use crate::{ctx, Machine};
use twostage_harness::{ensure, Pass, Scenario, Verdict};
use twostage_hv_x86::println;
use twostage_npt::{Access, GuestPhysAddr, GuestVirtAddr};

/// The guest-access scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("guest memory by GPA across a page boundary", s_gpa_copy),
    Scenario::new("guest memory by GVA across a page boundary (software walk through EPT)", s_gva_copy),
    Scenario::new("instruction fetch across a page", s_fetch_across),
];

fn s_gpa_copy(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    let (p0, p1) = (hv.ept.translate(GuestPhysAddr::new(0x20000)), hv.ept.translate(GuestPhysAddr::new(0x21000)));
    let (Some((h0, _)), Some((h1, _))) = (p0, p1) else { return Err("guest RAM unmapped".into()) };
    ensure!(h1 != h0 + 0x1000, "pages adjacent in host memory: the test would not cross");
    let data: [u8; 16] = *b"0123456789abcdef";
    ctx(hv.copy_to_guest(GuestPhysAddr::new(0x20ff8), &data), "copy_to_guest")?;
    let lo = ctx(hv.op_plain(Op::Read(0x20ff8)), "read")?;
    let hi = ctx(hv.op_plain(Op::Read(0x21000)), "read")?;
    ensure!(lo.to_le_bytes() == data[..8] && hi.to_le_bytes() == data[8..], "guest sees {lo:#x} {hi:#x}");
    ctx(hv.op_plain(Op::Write(0x21ffc, 0x1122_3344_5566_7788)), "guest write across")?;
    let mut back = [0u8; 8];
    ctx(hv.copy_from_guest(GuestPhysAddr::new(0x21ffc), &mut back), "copy_from_guest")?;
    ensure!(u64::from_le_bytes(back) == 0x1122_3344_5566_7788, "read back {:#x}", u64::from_le_bytes(back));
    println!("   GPA 0x20000 -> {h0:?}, 0x21000 -> {h1:?}: 16-byte copies across the boundary both ways");
    Ok(Pass::Plain)
}

fn s_gva_copy(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    let w = guest::WINDOW_GVA;
    let data: [u8; 16] = *b"FEDCBA9876543210";
    ctx(hv.copy_to_guest_va(GuestVirtAddr::new(w + 0xff8), &data), "copy_to_guest_va")?;
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    ctx(hv.copy_from_guest(GuestPhysAddr::new(guest::WINDOW_GPAS[0] + 0xff8), &mut a), "gpa read")?;
    ctx(hv.copy_from_guest(GuestPhysAddr::new(guest::WINDOW_GPAS[1]), &mut b), "gpa read")?;
    ensure!(a == data[..8] && b == data[8..], "bytes did not land on the guest's scattered pages");
    let mid = ctx(hv.op_plain(Op::Read(w + 0xffc)), "guest read across its own pages")?;
    ensure!(mid.to_le_bytes() == data[4..12], "guest sees {mid:#x}");
    ctx(hv.op_plain(Op::Write(w + 0x1ffa, 0x0102_0304_0506_0708)), "guest write across")?;
    let mut back = [0u8; 8];
    ctx(hv.copy_from_guest_va(GuestVirtAddr::new(w + 0x1ffa), &mut back), "copy_from_guest_va")?;
    ensure!(u64::from_le_bytes(back) == 0x0102_0304_0506_0708, "read back {:#x}", u64::from_le_bytes(back));
    let g = ctx(hv.guest_va_to_pa(GuestVirtAddr::new(w + 0x1000), Access::Read), "walk")?;
    ensure!(g == GuestPhysAddr::new(guest::WINDOW_GPAS[1]), "walk gave {g:?}");
    println!(
        "   GVA {w:#x}+0xff8 spans GPA {:#x} and {:#x}; guest and hypervisor agree",
        guest::WINDOW_GPAS[0],
        guest::WINDOW_GPAS[1]
    );
    Ok(Pass::Plain)
}

fn s_fetch_across(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    // mov rax, imm64; ret  (11 bytes) starting 6 bytes before the end of window page 2.
    let imm: u64 = 0x5EED_F00D_0BAD_CAFE;
    let mut code = [0u8; 11];
    code[0] = 0x48;
    code[1] = 0xb8;
    code[2..10].copy_from_slice(&imm.to_le_bytes());
    code[10] = 0xc3;
    let at = guest::WINDOW_GVA + 0x2ffa;
    ctx(hv.copy_to_guest_va(GuestVirtAddr::new(at), &code), "write code")?;
    let insn = ctx(hv.fetch_guest_instruction(GuestVirtAddr::new(at)), "fetch")?;
    ensure!(insn.len() == 15 && insn.bytes()[..11] == code, "fetched {:02x?}", insn.bytes());
    let r = ctx(hv.op_plain(Op::Exec(at)), "guest call")?;
    ensure!(r == imm, "guest got {r:#x}");
    println!(
        "   11-byte instruction at GVA {at:#x} (GPA {:#x} / {:#x}) fetched and executed",
        guest::WINDOW_GPAS[2] + 0xffa,
        guest::WINDOW_GPAS[3]
    );
    Ok(Pass::Plain)
}
