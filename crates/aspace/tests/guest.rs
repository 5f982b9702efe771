//! Guest-virtual access: x86-64 and RISC-V walks, A/D updates, hostile tables, instruction fetch.

mod common;
use common::*;
use twostage_aspace::guest::{PageFaultKind, RiscvPaging, X86Paging};
use twostage_aspace::*;
use twostage_npt::{Access, AdMode, GuestVirtAddr, MappingFlags, Sv39x4};

/// A processor with 52 physical-address bits and 1 GiB pages.
const CPU: twostage_aspace::guest::X86Cpu = twostage_aspace::guest::X86Cpu { maxphyaddr: 52, page_1g: true };

type Space = AddressSpace<Sv39x4, Ram>;

fn space(ram: &Ram) -> Space {
    let mut s: Space = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (_, f) = s.add_region("ram", range(0, 1 << 20), MappingFlags::RWX, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let (_, f) = s.add_region("mmio", range(0x1000_0000, 0x1000), MappingFlags::RW, Backend::Mmio).unwrap();
    s.flush_unloaded(f).unwrap();
    s
}

fn put(s: &mut Space, at: u64, v: u64) {
    s.write(gpa(at), &v.to_le_bytes()).unwrap();
    s.flush_pending(|_| {});
}

fn get(s: &Space, at: u64) -> u64 {
    let mut b = [0u8; 8];
    s.read(gpa(at), &mut b).unwrap();
    u64::from_le_bytes(b)
}

fn va(a: u64) -> GuestVirtAddr {
    GuestVirtAddr::new(a)
}

// x86 entry bits (Intel SDM Vol. 3A 4.5).
const P: u64 = 1;
const W: u64 = 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
/// gva 0x40_0000 -> gpa 0x1_0000 (4K, rw), 0x40_1000 -> 0x3_0000 (4K, read-only, XD),
/// gva 0x20_0000 -> gpa 0 (2M), gva 0x4000_0000 -> gpa 0 (1G), PML4[1] -> MMIO, PML4[2] -> PML4.
fn x86_tables(s: &mut Space) -> GuestPaging {
    put(s, 0x1000, 0x2000 | P | W);
    put(s, 0x1000 + 8, 0x1000_0000 | P | W);
    put(s, 0x1000 + 16, 0x1000 | P | W);
    put(s, 0x2000, 0x3000 | P | W);
    put(s, 0x2000 + 8, PS | P | W); // 1 GiB at 0x4000_0000
    put(s, 0x3000 + 8, PS | P | W); // 2 MiB at 0x20_0000
    put(s, 0x3000 + 16, 0x4000 | P | W);
    put(s, 0x4000, 0x1_0000 | P | W);
    put(s, 0x4000 + 8, 0x3_0000 | P | XD);
    // CR0.PG|PE|WP, CR4.PAE, EFER.LME|LMA|NXE.
    GuestPaging::x86_64(1 << 31 | 1 << 16 | 1, 0x1000, 1 << 5, 1 << 8 | 1 << 10 | 1 << 11, CPU).unwrap()
}

#[test]
fn x86_walk_copies_across_pages_and_sets_accessed_dirty() {
    let ram = ram(512);
    let mut s = space(&ram);
    let paging = x86_tables(&mut s);
    let mut mem = &mut s;
    let t = translate_gva(&mut mem, &paging, va(0x40_0123), Access::Read).unwrap();
    assert_eq!(t.gpa, gpa(0x1_0123));
    assert_eq!(translate_gva(&mut mem, &paging, va(0x20_0042), Access::Read).unwrap().gpa, gpa(0x42));
    assert_eq!(translate_gva(&mut mem, &paging, va(0x4000_5008), Access::Read).unwrap().gpa, gpa(0x5008));
    // A write that crosses from the rw page into the read-only one fails before writing anything.
    let err = copy_to_guest_va(&mut mem, &paging, va(0x40_0ff0), &[0xaa; 32]).unwrap_err();
    assert_eq!(
        err,
        GuestVaError::PageFault {
            gva: va(0x40_1000),
            access: Access::Write,
            kind: PageFaultKind::Protection,
            level: 0
        }
    );
    let mut b = [0u8; 16];
    mem.read(gpa(0x1_0ff0), &mut b).unwrap();
    assert_eq!(b, [0; 16]);
    // Reading across the boundary gathers both pages.
    mem.write(gpa(0x3_0000), &[7; 16]).unwrap();
    copy_to_guest_va(&mut mem, &paging, va(0x40_0ff0), &[9; 16]).unwrap();
    let mut got = [0u8; 32];
    copy_from_guest_va(&mut mem, &paging, va(0x40_0ff0), &mut got).unwrap();
    assert_eq!(&got[..16], &[9; 16]);
    assert_eq!(&got[16..], &[7; 16]);

    // A set along the path, D in the written leaf only.
    assert_eq!(get(&s, 0x1000) & (A | D), A);
    assert_eq!(get(&s, 0x3000 + 16) & (A | D), A);
    assert_eq!(get(&s, 0x4000) & (A | D), A | D);
    assert_eq!(get(&s, 0x4000 + 8) & (A | D), A);
}

#[test]
fn x86_protection_reserved_canonical_and_hostile_tables() {
    let ram = ram(512);
    let mut s = space(&ram);
    let GuestPaging::X86_64(p) = x86_tables(&mut s) else { panic!() };
    let mut mem = &mut s;
    let pg = GuestPaging::X86_64(p);
    let fault = |gva: u64, access, kind, level| GuestVaError::PageFault { gva: va(gva), access, kind, level };
    // Execute on an XD page, user access to a supervisor page.
    assert_eq!(
        translate_gva(&mut mem, &pg, va(0x40_1000), Access::Execute),
        Err(fault(0x40_1000, Access::Execute, PageFaultKind::Protection, 0))
    );
    let user = GuestPaging::X86_64(X86Paging { user: true, ..p });
    assert_eq!(
        translate_gva(&mut mem, &user, va(0x40_0000), Access::Read),
        Err(fault(0x40_0000, Access::Read, PageFaultKind::Protection, 0))
    );
    // CR0.WP = 0: supervisor may write the read-only page.
    let nowp = GuestPaging::X86_64(X86Paging { wp: false, ..p });
    assert!(translate_gva(&mut mem, &nowp, va(0x40_1000), Access::Write).is_ok());
    // Non-canonical.
    assert_eq!(
        translate_gva(&mut mem, &pg, va(0x0000_8000_0000_0000), Access::Read),
        Err(GuestVaError::NonCanonical { gva: va(0x0000_8000_0000_0000), access: Access::Read })
    );
    // A PML4 entry pointing into MMIO: the walk names the entry and the MMIO error.
    match translate_gva(&mut mem, &pg, va(0x80_0000_0000), Access::Read) {
        Err(GuestVaError::TableAccess { entry, error: GuestMemError::Mmio { .. }, .. }) => {
            assert_eq!(entry, gpa(0x1000_0000))
        }
        other => panic!("{other:?}"),
    }
    // PML4[2] points back at the PML4: the walk is bounded by four levels. PML4 used as PDPT:
    // entry 0 -> 0x2000 as a PD; PD entry 0 -> 0x3000 as a PT; PT entry 0 has PS set, which at
    // level 0 is PAT: a 4 KiB page at 0x3000's entry 0's address... whatever it is, no panic.
    for a in [0x100_0000_0000u64, 0x100_4000_0000, 0x100_0020_0000, 0x1ff_ffff_f000] {
        let _ = translate_gva(&mut mem, &pg, va(a), Access::Write);
    }
    // Reserved bits: bit 51 with MAXPHYADDR 48.
    mem.write(gpa(0x4000 + 16), &(0x5_0000 | P | 1 << 51).to_le_bytes()).unwrap();
    let narrow = GuestPaging::X86_64(X86Paging { maxphyaddr: 48, ..p });
    assert_eq!(
        translate_gva(&mut mem, &narrow, va(0x40_2000), Access::Read),
        Err(fault(0x40_2000, Access::Read, PageFaultKind::Reserved, 0))
    );
    // Paging off is bare; 32-bit paging is refused.
    assert_eq!(GuestPaging::x86_64(1, 0, 0, 0, CPU), Ok(GuestPaging::Bare));
    assert!(GuestPaging::x86_64(1 << 31 | 1, 0x1000, 0, 0, CPU).is_err());
}

#[test]
fn x86_fetch_is_cut_at_an_unreachable_page() {
    let ram = ram(512);
    let mut s = space(&ram);
    let GuestPaging::X86_64(p) = x86_tables(&mut s) else { panic!() };
    // 0x40_2000 is not present: a fetch at 0x40_0ff8 gets 8 bytes then stops.
    let mut mem = &mut s;
    mem.write(gpa(0x1_0ff8), &[0x90; 8]).unwrap();
    let pg = GuestPaging::X86_64(X86Paging { nxe: true, ..p });
    let insn = fetch_guest_instruction(&mut mem, &pg, va(0x40_0ff8), Isa::X86).unwrap();
    assert_eq!(insn.bytes(), &[0x90; 8]);
    // The next page (0x40_1000) is XD: the fetch stopped there and says why.
    assert!(matches!(insn.truncated_by, Some(GuestVaError::PageFault { kind: PageFaultKind::Protection, .. })));
    // Fully inside one page: 15 bytes.
    let insn = fetch_guest_instruction(&mut mem, &pg, va(0x40_0100), Isa::X86).unwrap();
    assert_eq!(insn.len(), 15);
    // The first byte unreachable: an error.
    assert!(fetch_guest_instruction(&mut mem, &pg, va(0x40_2000), Isa::X86).is_err());
}

// RISC-V PTE bits (RISC-V Privileged §4.4.1).
const V: u64 = 1;
const R: u64 = 2;
const WW: u64 = 4;
const X: u64 = 8;
const RA: u64 = 1 << 6;
const RD: u64 = 1 << 7;

fn pte(pa: u64, flags: u64) -> u64 {
    (pa >> 12) << 10 | flags
}

/// Sv39 root 0x1000, L1 0x2000, L0 0x3000.
/// gva 0x1000 -> 0x2_0000 (rx, A), gva 0x2000 -> 0x3_0000 (rx, A), gva 0x3000 -> 0x4_0000 (rw, no A/D),
/// gva 0x20_0000 -> 0 (2 MiB, rwx, A D), gva 0x40_0000 -> misaligned 2 MiB superpage.
fn rv_tables(s: &mut Space) -> RiscvPaging {
    put(s, 0x1000, pte(0x2000, V));
    put(s, 0x2000, pte(0x3000, V));
    put(s, 0x2000 + 8, pte(0, V | R | WW | X | RA | RD));
    put(s, 0x2000 + 16, pte(0x1000, V | R | RA));
    put(s, 0x3000 + 8, pte(0x2_0000, V | R | X | RA));
    put(s, 0x3000 + 16, pte(0x3_0000, V | R | X | RA));
    put(s, 0x3000 + 24, pte(0x4_0000, V | R | WW));
    let GuestPaging::Riscv(p) = GuestPaging::riscv(8 << 60 | 1, 0).unwrap() else { panic!() };
    p
}

#[test]
fn riscv_fetch_reads_a_second_parcel_only_for_32_bit_instructions_across_pages() {
    let ram = ram(512);
    let mut s = space(&ram);
    let p = rv_tables(&mut s);
    let pg = GuestPaging::Riscv(p);
    let mut mem = &mut s;
    // 0x1ffc: c.nop (0x0001); 0x1ffe: low parcel of addi (0x00000013) -> second parcel at 0x2000.
    mem.write(gpa(0x2_0ffc), &[0x01, 0x00, 0x13, 0x00]).unwrap();
    mem.write(gpa(0x3_0000), &[0x00, 0x00]).unwrap();
    let c = fetch_guest_instruction(&mut mem, &pg, va(0x1ffc), Isa::Riscv).unwrap();
    assert_eq!((c.len(), c.riscv_bits()), (2, 0x0001));
    let i = fetch_guest_instruction(&mut mem, &pg, va(0x1ffe), Isa::Riscv).unwrap();
    assert_eq!((i.len(), i.riscv_bits()), (4, 0x0000_0013));
    // Misaligned pc.
    assert_eq!(
        fetch_guest_instruction(&mut mem, &pg, va(0x1fff), Isa::Riscv),
        Err(GuestVaError::Misaligned { gva: va(0x1fff) })
    );
    // A 32-bit instruction whose second parcel is on an unmapped page names pc + 2.
    mem.write(gpa(0x3_0ffe), &[0x13, 0x00]).unwrap();
    let err = fetch_guest_instruction(&mut mem, &pg, va(0x2ffe), Isa::Riscv).unwrap_err();
    assert_eq!(err.gva(), va(0x3000));
    assert_eq!(err.riscv_cause(), Some(12));
    // Execute on a non-executable page.
    assert!(matches!(
        fetch_guest_instruction(&mut mem, &pg, va(0x3000), Isa::Riscv),
        Err(GuestVaError::PageFault { kind: PageFaultKind::Protection, .. })
    ));
}

#[test]
fn riscv_accessed_dirty_svade_faults_svadu_updates() {
    let ram = ram(512);
    let mut s = space(&ram);
    let p = rv_tables(&mut s);
    {
        let mut mem = &mut s;
        let svade = GuestPaging::Riscv(p);
        assert!(matches!(
            translate_gva(&mut mem, &svade, va(0x3008), Access::Write),
            Err(GuestVaError::PageFault { kind: PageFaultKind::AccessedDirty, level: 0, .. })
        ));
        let svadu = GuestPaging::Riscv(RiscvPaging { update_ad: true, ..p });
        copy_to_guest_va(&mut mem, &svadu, va(0x3008), &[5; 8]).unwrap();
        // Superpage: 2 MiB at 0x20_0000 -> 0.
        assert_eq!(translate_gva(&mut mem, &svadu, va(0x20_1234), Access::Read).unwrap().gpa, gpa(0x1234));
        // Misaligned superpage.
        assert!(matches!(
            translate_gva(&mut mem, &svadu, va(0x40_0000), Access::Read),
            Err(GuestVaError::PageFault { kind: PageFaultKind::MisalignedSuperpage, level: 1, .. })
        ));
        // Upper bits not a sign extension of bit 38.
        assert!(matches!(
            translate_gva(&mut mem, &svadu, va(1 << 40), Access::Read),
            Err(GuestVaError::NonCanonical { .. })
        ));
    }
    assert_eq!(get(&s, 0x3000 + 24) & (RA | RD), RA | RD);
    assert_eq!(get(&s, 0x4_0008), u64::from_le_bytes([5; 8]));
}

#[test]
fn bare_mode_and_shared_space_work_through_the_trait() {
    let ram = ram(512);
    let s = space(&ram);
    let shared = SharedAddressSpace::new(s, Box::new(|_| {}), cpu_index).relax_with(std::thread::yield_now);
    let mut m = &shared;
    copy_to_guest_va(&mut m, &GuestPaging::Bare, va(0x5ffc), &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let v: u64 = m.read_obj(gpa(0x5ffc)).unwrap();
    assert_eq!(v, u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]));
    m.write_obj(gpa(0x6000), &0x1122_3344u32).unwrap();
    assert_eq!(m.read_obj::<[u8; 4]>(gpa(0x6000)).unwrap(), [0x44, 0x33, 0x22, 0x11]);
    assert!(matches!(m.read_obj::<u64>(gpa(0x1000_0000)), Err(GuestMemError::Mmio { .. })));
    assert!(matches!(
        copy_from_guest_va(&mut m, &GuestPaging::Bare, va(u64::MAX - 3), &mut [0u8; 8]),
        Err(GuestVaError::NonCanonical { .. })
    ));
}

/// A multi-page copy (walk cache, merged guest pages) moves the same bytes as page-by-page
/// translations, and stops at the first page the guest's tables refuse, naming it.
#[test]
fn multi_page_va_copies_match_page_by_page_translation() {
    let ram = ram(512);
    let mut s = space(&ram);
    // PT at 0x4000 maps gva 0x40_0000 + i*4K: pages 0..6 present, scattered and partly contiguous
    // in GPA; page 6 not present. The 2 MiB page at gva 0x20_0000 sits in the same PD.
    let targets = [0x1_0000u64, 0x1_1000, 0x1_2000, 0x3_0000, 0x2_0000, 0x2_1000];
    let paging = x86_tables(&mut s);
    for (i, t) in targets.iter().enumerate() {
        put(&mut s, 0x4000 + 8 * i as u64, t | P | W);
    }
    put(&mut s, 0x4000 + 8 * 6, 0);
    for (i, t) in targets.iter().enumerate() {
        let bytes: Vec<u8> = (0..4096u32).map(|b| (b as u8) ^ (i as u8 * 37)).collect();
        s.write(gpa(*t), &bytes).unwrap();
        s.flush_pending(|_| {});
    }
    let start = 0x40_0000 + 0x7f8u64;
    let len = 5 * 4096;
    let mut mem = &mut s;
    let mut whole = vec![0u8; len];
    copy_from_guest_va(&mut mem, &paging, va(start), &mut whole).unwrap();
    let mut expect = vec![0u8; len];
    let mut off = 0;
    while off < len {
        let t = translate_gva(&mut mem, &paging, va(start + off as u64), Access::Read).unwrap();
        let n = (t.page_remaining as usize).min(len - off);
        mem.read(t.gpa, &mut expect[off..off + n]).unwrap();
        off += n;
    }
    assert_eq!(whole, expect);
    // Write the same span back shifted, then read it page by page.
    let data: Vec<u8> = (0..len as u32).map(|b| (b * 7) as u8).collect();
    copy_to_guest_va(&mut mem, &paging, va(start), &data).unwrap();
    let mut back = vec![0u8; len];
    copy_from_guest_va(&mut mem, &paging, va(start), &mut back).unwrap();
    assert_eq!(back, data);
    // Into the 2 MiB page and past the PT's last present page: the fault names page 6.
    let mut big = vec![0u8; 7 * 4096];
    let err = copy_from_guest_va(&mut mem, &paging, va(0x40_0000), &mut big).unwrap_err();
    assert!(
        matches!(err, GuestVaError::PageFault { gva, kind: PageFaultKind::NotPresent, .. } if gva == va(0x40_6000)),
        "{err:?}"
    );
    let mut huge = vec![0u8; 3 * 4096];
    copy_from_guest_va(&mut mem, &paging, va(0x20_1000), &mut huge).unwrap();
    let mut direct = vec![0u8; 3 * 4096];
    mem.read(gpa(0x1000), &mut direct).unwrap();
    assert_eq!(huge, direct, "a 2 MiB guest page maps gva 0x20_1000 to gpa 0x1000");
}

/// The walker's reserved bits come from the processor, never from a guessed default: a guest
/// entry with an address bit at or above the CPU's MAXPHYADDR is a reserved-bit fault there.
#[test]
fn x86_reserved_bits_follow_the_processor() {
    use twostage_aspace::guest::{X86Cpu, X86Paging};
    let cpu = X86Cpu::from_cpuid(0x8000_0008, 1 << 26, 0x3027);
    assert_eq!(cpu, X86Cpu { maxphyaddr: 39, page_1g: true });
    assert_eq!(X86Cpu::from_cpuid(0x8000_0004, 0, 0x30), X86Cpu { maxphyaddr: 36, page_1g: false });
    let regs = (1u64 << 31 | 1 << 16 | 1, 0x1000u64, 1u64 << 5, 1u64 << 8 | 1 << 10 | 1 << 11);
    match GuestPaging::x86_64(regs.0, regs.1, regs.2, regs.3, cpu).unwrap() {
        GuestPaging::X86_64(X86Paging { maxphyaddr: 39, page_1g: true, .. }) => {}
        other => panic!("{other:?}"),
    }
}
