//! Guest walks over hostile page tables: any table contents, any paging registers, any
//! addresses. Nothing may panic; every error must name an address inside the request.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use twostage_aspace::guest::{RiscvPaging, X86Cpu, X86Paging};
use twostage_aspace::*;
use twostage_npt::testing::HostRam;
use twostage_npt::{Access, GpaRange, GuestPhysAddr, GuestVirtAddr, MappingFlags, Sv39x4, TableOptions};

#[derive(Arbitrary, Debug)]
enum Mode {
    X86 { cr0: u64, cr3: u64, cr4: u64, efer: u64, user: bool, maxphy: u8, page_1g: bool },
    Riscv { vsatp: u64, vsstatus: u64, user: bool, update_ad: bool, svpbmt: bool },
    Bare,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Translate { gva: u64, access: u8 },
    Read { gva: u64, len: u16 },
    Write { gva: u64, len: u16, byte: u8 },
    Fetch { pc: u64, x86: bool },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Guest memory contents: (page, entry index, value) writes into 8 table pages.
    entries: Vec<(u8, u16, u64)>,
    mode: Mode,
    ops: Vec<Op>,
}

const PAGES: u64 = 16;

fuzz_target!(|input: Input| {
    let ram = Arc::new(HostRam::new(256));
    {
        let mut s = AddressSpace::<Sv39x4, _>::new(ram.clone(), TableOptions::for_format::<Sv39x4>()).unwrap();
        let r = |start: u64, len: u64| GpaRange::from_start_len(GuestPhysAddr::new(start), len).unwrap();
        let (_, f) = s.add_region("ram", r(0, PAGES * 4096), MappingFlags::RWX, Backend::DemandZero).unwrap();
        s.flush_unloaded(f).unwrap();
        let (_, f) = s.add_region("rom", r(PAGES * 4096, 4096), MappingFlags::READ, Backend::DemandZero).unwrap();
        s.flush_unloaded(f).unwrap();
        let (_, f) = s.add_region("mmio", r((PAGES + 1) * 4096, 4096), MappingFlags::RW, Backend::Mmio).unwrap();
        s.flush_unloaded(f).unwrap();
        for (page, idx, v) in input.entries.iter().take(256) {
            let at = u64::from(page % (PAGES as u8 + 1)) * 4096 + u64::from(idx % 512) * 8;
            let f = s.load_image(GuestPhysAddr::new(at), &v.to_le_bytes()).unwrap();
            s.flush_unloaded(f).unwrap();
        }
        let paging = match input.mode {
            Mode::X86 { cr0, cr3, cr4, efer, user, maxphy, page_1g } => {
                match GuestPaging::x86_64(cr0, cr3, cr4, efer, X86Cpu { maxphyaddr: maxphy, page_1g }) {
                    Ok(GuestPaging::X86_64(p)) => GuestPaging::X86_64(X86Paging { user, ..p }),
                    Ok(other) => other,
                    Err(_) => return,
                }
            }
            Mode::Riscv { vsatp, vsstatus, user, update_ad, svpbmt } => match GuestPaging::riscv(vsatp, vsstatus) {
                Ok(GuestPaging::Riscv(p)) => GuestPaging::Riscv(RiscvPaging { user, update_ad, svpbmt, ..p }),
                Ok(other) => other,
                Err(_) => return,
            },
            Mode::Bare => GuestPaging::Bare,
        };
        let mut mem = &mut s;
        let within = |e: &GuestVaError, start: u64, len: u64| {
            let off = e.gva().as_u64().wrapping_sub(start);
            assert!(off < len.max(1), "error {e} names an address outside the request {start:#x}+{len:#x}");
        };
        for op in input.ops.iter().take(32) {
            match *op {
                Op::Translate { gva, access } => {
                    let access = [Access::Read, Access::Write, Access::Execute][usize::from(access % 3)];
                    if let Err(e) = translate_gva(&mut mem, &paging, GuestVirtAddr::new(gva), access) {
                        within(&e, gva, 1);
                    }
                }
                Op::Read { gva, len } => {
                    let mut buf = vec![0u8; usize::from(len % 9000)];
                    if let Err(e) = copy_from_guest_va(&mut mem, &paging, GuestVirtAddr::new(gva), &mut buf) {
                        within(&e, gva, buf.len() as u64);
                    }
                }
                Op::Write { gva, len, byte } => {
                    let buf = vec![byte; usize::from(len % 9000)];
                    if let Err(e) = copy_to_guest_va(&mut mem, &paging, GuestVirtAddr::new(gva), &buf) {
                        within(&e, gva, buf.len() as u64);
                    }
                }
                Op::Fetch { pc, x86 } => {
                    let isa = if x86 { Isa::X86 } else { Isa::Riscv };
                    match fetch_guest_instruction(&mut mem, &paging, GuestVirtAddr::new(pc), isa) {
                        Ok(i) => {
                            assert!(!i.is_empty() && i.len() <= 15);
                            if !x86 {
                                assert_eq!(i.len(), if i.bytes()[0] & 3 == 3 { 4 } else { 2 });
                            }
                        }
                        Err(e) => within(&e, pc, 15),
                    }
                }
            }
        }
    }
    assert_eq!(ram.frames_in_use(), 0, "frames leaked");
});
