//! Every refusal of `elf::plan_elf` / `plan_raw`, on small ELF files built here byte by byte.

use twostage_baremetal::elf::{
    is_elf, plan_elf, plan_elf_or_raw, plan_raw, Class, LoadError, Machine, Place, EXIT_GUEST_STOPPED, EXIT_REFUSED,
    MAX_SEGMENTS,
};

mod common;
use common::*;

const RAM: std::ops::Range<u64> = 0x8000_0000..0x8400_0000;

fn refuse(f: &[u8]) -> LoadError {
    plan_elf(f, Machine::Riscv64, RAM).expect_err("refused")
}

#[test]
fn a_good_file_becomes_a_plan() {
    let mut e = riscv();
    e.phs.push(Ph { p_type: PT_NOTE, offset: 0, vaddr: 0, paddr: 0, filesz: 0x10, memsz: 0 });
    e.phs.push(load(0x8030_0000, 0x300, 0x10, 0x2000));
    let f = e.build();
    let plan = plan_elf(&f, Machine::Riscv64, RAM).unwrap();
    assert_eq!(plan.entry, 0x8020_0000);
    assert_eq!(plan.ram, (RAM.start, RAM.end));
    assert_eq!(plan.segments.len(), 2);
    let s = &plan.segments[0];
    assert_eq!(
        (s.index, s.gpa, s.offset, s.bytes.len(), s.memsz, s.end()),
        (0, 0x8020_0000, 0x200, 0x100, 0x1000, 0x8020_1000)
    );
    assert_eq!(plan.segments[1].index, 2);
    assert_eq!(plan.segments[1].bytes, &f[0x300..0x310]);
}

#[test]
fn x86_takes_elf32_i386_and_elf64_x86_64() {
    let mut e = Elf::new(EM_386, 0x10_0000, &[load(0x10_0000, 0x100, 0x80, 0x1000)]);
    e.class64 = false;
    let f = e.build();
    let plan = plan_elf(&f, Machine::X86, 0..16 << 20).unwrap();
    assert_eq!((plan.entry, plan.segments[0].gpa), (0x10_0000, 0x10_0000));
    let e = Elf::new(EM_X86_64, 0x10_0000, &[load(0x10_0000, 0x100, 0x80, 0x1000)]);
    assert!(plan_elf(&e.build(), Machine::X86, 0..16 << 20).is_ok());
}

#[test]
fn the_entry_point_is_found_by_virtual_address_as_grub_does() {
    // Linked at 0xc0100000, loaded at 0x100000: entered at the physical address.
    let ph = Ph { p_type: PT_LOAD, offset: 0x100, vaddr: 0xc010_0000, paddr: 0x10_0000, filesz: 0x80, memsz: 0x1000 };
    let mut e = Elf::new(EM_386, 0xc010_0040, &[ph]);
    e.class64 = false;
    assert_eq!(plan_elf(&e.build(), Machine::X86, 0..16 << 20).unwrap().entry, 0x10_0040);
}

#[test]
fn an_empty_file_is_refused() {
    assert_eq!(refuse(&[]), LoadError::Empty);
    assert_eq!(plan_raw(&[], 0x8020_0000, RAM), Err(LoadError::Empty));
    assert_eq!(plan_elf_or_raw(&[], Machine::Riscv64, RAM, 0x8020_0000), Err(LoadError::Empty));
    assert_eq!(LoadError::Empty.to_string(), "the file is empty");
}

#[test]
fn a_file_that_is_not_elf_is_refused_naming_its_first_bytes() {
    let e = refuse(b"MZ\x90\x00rest");
    assert_eq!(e, LoadError::NotElf { start: *b"MZ\x90\x00", len: 4 });
    assert_eq!(e.to_string(), "not an ELF file: it starts with 4d 5a 90 00, not 7f 45 4c 46 (\\x7fELF)");
    assert_eq!(refuse(b"ab"), LoadError::NotElf { start: *b"ab\0\0", len: 2 });
    assert!(refuse(b"ab").to_string().contains("starts with 61 62,"));
    assert!(!is_elf(b"\x7fEL"));
}

#[test]
fn truncated_files_are_refused() {
    assert_eq!(refuse(b"\x7fEL"), LoadError::Truncated { what: "ELF identification (e_ident)", need: 16, len: 3 });
    let f = riscv().build();
    let e = refuse(&f[..10]);
    assert_eq!(e, LoadError::Truncated { what: "ELF identification (e_ident)", need: 16, len: 10 });
    let e = refuse(&f[..40]);
    assert_eq!(e, LoadError::Truncated { what: "ELF header", need: 64, len: 40 });
    assert_eq!(e.to_string(), "the file is truncated: its ELF header needs 64 bytes, the file has 40");
    // Cut inside the program header table, then inside the segment's bytes.
    assert!(matches!(refuse(&f[..100]), LoadError::ProgramHeadersOutsideFile { offset: 64, count: 1, len: 100 }));
    let e = refuse(&f[..0x280]);
    assert_eq!(e, LoadError::SegmentOutsideFile { index: 0, offset: 0x200, filesz: 0x100, len: 0x280 });
    assert_eq!(e.to_string(), "segment 0: its bytes (offset 0x200, p_filesz 0x100) lie outside the file (0x280 bytes)");
}

#[test]
fn class_byte_order_and_version_are_checked() {
    let mut f = riscv().build();
    f[4] = 3;
    assert_eq!(refuse(&f), LoadError::BadClass(3));
    let mut f = riscv().build();
    f[5] = 2;
    assert_eq!(refuse(&f), LoadError::WrongEndianness(2));
    assert!(refuse(&f).to_string().contains("big-endian"));
    f[5] = 0;
    assert_eq!(refuse(&f), LoadError::WrongEndianness(0));
    let mut f = riscv().build();
    f[6] = 2;
    assert_eq!(refuse(&f), LoadError::BadVersion(2));
    let mut f = riscv().build();
    f[20] = 7;
    assert_eq!(refuse(&f), LoadError::BadVersion(7));
}

#[test]
fn the_class_must_match_the_machine() {
    let mut e = riscv();
    e.class64 = false;
    e.entry = 0x8020_0000;
    let err = refuse(&e.build());
    assert_eq!(err, LoadError::WrongClass { found: Class::Elf32, expected: Class::Elf64, e_machine: EM_RISCV });
    assert_eq!(err.to_string(), "an ELF32 file for RISC-V (e_machine 243): this hypervisor runs ELF64 files for it");
    let e = Elf::new(EM_386, 0x10_0000, &[load(0x10_0000, 0x100, 0x80, 0x1000)]);
    let err = plan_elf(&e.build(), Machine::X86, 0..16 << 20).unwrap_err();
    assert_eq!(err, LoadError::WrongClass { found: Class::Elf64, expected: Class::Elf32, e_machine: EM_386 });
}

#[test]
fn the_machine_is_checked_and_named() {
    let mut e = riscv();
    e.machine = EM_X86_64;
    let err = refuse(&e.build());
    assert_eq!(err, LoadError::WrongMachine { found: EM_X86_64, expected: Machine::Riscv64 });
    assert_eq!(
        err.to_string(),
        "the file is for x86-64 (e_machine 62), but this hypervisor runs RISC-V (ELF64, e_machine 243) guests"
    );
    // x86 code labelled RISC-V or ARM does not run on the x86 hypervisor.
    for m in [EM_RISCV, EM_ARM] {
        let e = Elf::new(m, 0x10_0000, &[load(0x10_0000, 0x100, 0x80, 0x1000)]);
        let err = plan_elf(&e.build(), Machine::X86, 0..16 << 20).unwrap_err();
        assert_eq!(err, LoadError::WrongMachine { found: m, expected: Machine::X86 });
    }
    let e = Elf::new(EM_ARM, 0x10_0000, &[load(0x10_0000, 0x100, 0x80, 0x1000)]);
    let msg = plan_elf(&e.build(), Machine::X86, 0..16 << 20).unwrap_err().to_string();
    assert!(msg.contains("ARM (32-bit) (e_machine 40)"), "{msg}");
    let mut e = riscv();
    e.machine = 9999;
    assert!(refuse(&e.build()).to_string().contains("an unknown machine (e_machine 9999)"));
}

#[test]
fn only_executables_are_loaded() {
    let mut e = riscv();
    e.e_type = 1;
    let err = refuse(&e.build());
    assert_eq!(err, LoadError::NotExecutable { e_type: 1 });
    assert!(err.to_string().starts_with("the file is a relocatable object (e_type 1)"));
    e.e_type = 4;
    assert_eq!(refuse(&e.build()), LoadError::NotExecutable { e_type: 4 });
    e.e_type = 3;
    assert!(plan_elf(&e.build(), Machine::Riscv64, RAM).is_ok());
}

#[test]
fn the_program_header_table_is_checked() {
    let mut f = riscv().build();
    f[54..56].copy_from_slice(&40u16.to_le_bytes());
    assert_eq!(refuse(&f), LoadError::BadProgramHeaderSize { found: 40, expected: 56 });
    let mut f = riscv().build();
    f[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
    assert_eq!(refuse(&f), LoadError::TooManyProgramHeaders);
    let mut f = riscv().build();
    f[56..58].copy_from_slice(&1000u16.to_le_bytes());
    assert_eq!(refuse(&f), LoadError::ProgramHeadersOutsideFile { offset: 64, count: 1000, len: 0x1000 });
    let mut f = riscv().build();
    f[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(refuse(&f), LoadError::ProgramHeadersOutsideFile { offset: u64::MAX, .. }));
}

#[test]
fn a_file_without_a_loadable_segment_is_refused() {
    let err = refuse(&Elf::new(EM_RISCV, 0x8020_0000, &[]).build());
    assert_eq!(err, LoadError::NoLoadableSegment);
    assert!(err.to_string().starts_with("no loadable segment"));
    let note = Ph { p_type: PT_NOTE, offset: 0x200, vaddr: 0, paddr: 0, filesz: 0x10, memsz: 0x10 };
    assert_eq!(refuse(&Elf::new(EM_RISCV, 0, &[note]).build()), LoadError::NoLoadableSegment);
    // PT_LOAD headers with nothing in memory load nothing.
    let empty = load(0x8020_0000, 0, 0, 0);
    assert_eq!(refuse(&Elf::new(EM_RISCV, 0x8020_0000, &[empty, empty]).build()), LoadError::NoLoadableSegment);
}

#[test]
fn file_size_must_not_exceed_memory_size() {
    let e = Elf::new(EM_RISCV, 0x8020_0000, &[load(0x8020_0000, 0x200, 0x100, 0x80)]);
    let err = refuse(&e.build());
    assert_eq!(err, LoadError::FileSizeExceedsMemSize { index: 0, filesz: 0x100, memsz: 0x80 });
    assert_eq!(err.to_string(), "segment 0: p_filesz 0x100 is larger than p_memsz 0x80");
    let e = Elf::new(EM_RISCV, 0x8020_0000, &[load(0x8020_0000, 0x200, 0x100, 0)]);
    assert!(matches!(refuse(&e.build()), LoadError::FileSizeExceedsMemSize { memsz: 0, .. }));
}

#[test]
fn every_segment_zero_fill_included_must_lie_in_guest_ram() {
    let ram = (RAM.start, RAM.end);
    // 1 TiB of zero-fill behind 0x100 file bytes.
    let e = Elf::new(EM_RISCV, 0x8020_0000, &[load(0x8020_0000, 0x200, 0x100, 1 << 40)]);
    let err = refuse(&e.build());
    assert_eq!(err, LoadError::SegmentOutsideRam { index: 0, gpa: 0x8020_0000, memsz: 1 << 40, ram });
    assert_eq!(
        err.to_string(),
        "segment 0 at 0x80200000..0x10080200000 (0x10000000000 bytes) lies outside guest RAM 0x80000000..0x84000000"
    );
    // Below RAM, just past its end, and past the end of the address space.
    let e = Elf::new(EM_RISCV, 0x1000, &[load(0x1000, 0x200, 0x100, 0x1000)]);
    assert!(matches!(refuse(&e.build()), LoadError::SegmentOutsideRam { gpa: 0x1000, .. }));
    let e = Elf::new(EM_RISCV, 0x83ff_f000, &[load(0x83ff_f000, 0x200, 0x100, 0x1001)]);
    assert!(matches!(refuse(&e.build()), LoadError::SegmentOutsideRam { gpa: 0x83ff_f000, memsz: 0x1001, .. }));
    let e = Elf::new(EM_RISCV, 0x83ff_f000, &[load(0x83ff_f000, 0x200, 0x100, 0x1000)]);
    assert!(plan_elf(&e.build(), Machine::Riscv64, RAM).is_ok());
    let e =
        Elf::new(EM_RISCV, 0x8020_0000, &[load(0x8020_0000, 0x200, 0x100, 0x1000), load(u64::MAX - 0xf, 0, 0, 0x20)]);
    let err = refuse(&e.build());
    assert!(err.to_string().contains("(past the end of the address space)"), "{err}");
}

#[test]
fn overlapping_segments_are_refused_naming_both() {
    // The second starts inside the first's zero-fill: the later one would not be zeroed, or the
    // earlier one's bytes would be lost.
    let a = load(0x8020_0000, 0x200, 0x100, 0x2000);
    let b = load(0x8020_1000, 0x300, 0x100, 0x1000);
    let err = refuse(&Elf::new(EM_RISCV, 0x8020_0000, &[a, b]).build());
    assert_eq!(
        err,
        LoadError::Overlap {
            first: 0,
            first_range: (0x8020_0000, 0x8020_2000),
            second: 1,
            second_range: (0x8020_1000, 0x8020_2000)
        }
    );
    assert_eq!(
        err.to_string(),
        "segments 0 (0x80200000..0x80202000) and 1 (0x80201000..0x80202000) overlap in guest memory"
    );
    // Identical, and one inside another further down the table (indices are program header indices).
    let note = Ph { p_type: PT_NOTE, offset: 0, vaddr: 0, paddr: 0, filesz: 0, memsz: 0 };
    let c = load(0x8030_0000, 0x300, 0x10, 0x10_0000);
    let d = load(0x8030_8000, 0x300, 0x10, 0x10);
    let err = refuse(&Elf::new(EM_RISCV, 0x8030_0000, &[c, note, d]).build());
    assert!(matches!(err, LoadError::Overlap { first: 0, second: 2, .. }), "{err:?}");
    assert!(matches!(refuse(&Elf::new(EM_RISCV, 0x8030_0000, &[c, c]).build()), LoadError::Overlap { .. }));
    // Touching is not overlapping.
    let e = load(0x8040_0000, 0x300, 0x10, 0x10_0000);
    assert!(plan_elf(&Elf::new(EM_RISCV, 0x8030_0000, &[c, e]).build(), Machine::Riscv64, RAM).is_ok());
}

#[test]
fn the_entry_point_must_be_inside_a_segment() {
    let mut e = riscv();
    e.entry = 0x8010_0000;
    let err = refuse(&e.build());
    assert_eq!(err, LoadError::EntryOutsideSegments { entry: 0x8010_0000 });
    assert_eq!(err.to_string(), "the entry point 0x80100000 is not inside any loadable segment");
    e.entry = 0x8020_1000;
    assert!(matches!(refuse(&e.build()), LoadError::EntryOutsideSegments { .. }));
    e.entry = 0x8020_0fff;
    assert!(plan_elf(&e.build(), Machine::Riscv64, RAM).is_ok());
}

#[test]
fn too_many_segments_are_refused() {
    let phs: Vec<Ph> = (0..MAX_SEGMENTS as u64 + 1).map(|i| load(0x8020_0000 + 0x1000 * i, 0, 0, 0x10)).collect();
    let mut e = Elf::new(EM_RISCV, 0x8020_0000, &phs);
    e.len = 64 + 56 * phs.len();
    assert_eq!(refuse(&e.build()), LoadError::TooManySegments { count: MAX_SEGMENTS + 1 });
    e.phs.pop();
    assert_eq!(plan_elf(&e.build(), Machine::Riscv64, RAM).unwrap().segments.len(), MAX_SEGMENTS);
}

#[test]
fn raw_images_must_fit_guest_ram() {
    let f = vec![0x13u8; 0x1000];
    let plan = plan_elf_or_raw(&f, Machine::Riscv64, RAM, 0x8020_0000).unwrap();
    assert_eq!((plan.entry, plan.segments.len(), plan.segments[0].memsz), (0x8020_0000, 1, 0x1000));
    let err = plan_raw(&f, 0x83ff_f800, RAM).unwrap_err();
    assert_eq!(err, LoadError::RawOutsideRam { gpa: 0x83ff_f800, len: 0x1000, ram: (RAM.start, RAM.end) });
    assert_eq!(
        err.to_string(),
        "the raw image, loaded at 0x83fff800..0x84000800 (0x1000 bytes), does not fit guest RAM 0x80000000..0x84000000"
    );
    assert!(plan_raw(&f, 0x7fff_ffff, RAM).is_err());
    // A file with the ELF magic is never taken as a raw image.
    let mut e = riscv();
    e.machine = EM_X86_64;
    assert!(matches!(
        plan_elf_or_raw(&e.build(), Machine::Riscv64, RAM, 0x8020_0000),
        Err(LoadError::WrongMachine { .. })
    ));
}

#[test]
fn free_slots_avoid_every_segment() {
    let a = load(0x8000_0000, 0x200, 0x10, 0x3000);
    let b = load(0x83f0_0000, 0x300, 0x10, 0x10_0000);
    let f = Elf::new(EM_RISCV, 0x8000_0000, &[a, b]).build();
    let plan = plan_elf(&f, Machine::Riscv64, RAM).unwrap();
    // The top MiB is taken: the highest 1 MiB-aligned place is the one below it.
    assert_eq!(plan.free_slot(RAM, 0x2000, 1 << 20, Place::Highest), Some(0x83e0_0000));
    assert_eq!(plan.free_slot(RAM, 0x2000, 0x1000, Place::Highest), Some(0x83ef_e000));
    assert_eq!(plan.free_slot(RAM, 0x80, 8, Place::Lowest), Some(0x8000_3000));
    assert_eq!(plan.free_slot(0x8000_1000..0x8000_4000, 0x80, 8, Place::Lowest), Some(0x8000_3000));
    assert_eq!(plan.free_slot(0x8000_0000..0x8000_3000, 0x80, 8, Place::Lowest), None);
    assert_eq!(plan.free_slot(0x8000_0000..0x8000_3000, 0x80, 8, Place::Highest), None);
    assert_eq!(plan.free_slot(0..0x9000_0000, 0x80, 8, Place::Lowest), Some(0x8000_3000));
    assert_eq!(plan.free_slot(RAM, 0, 8, Place::Lowest), None);
    // Each found place is free.
    for (size, align, place) in [(0x80, 8, Place::Lowest), (0x5000, 0x1000, Place::Highest), (1, 1, Place::Highest)] {
        let at = plan.free_slot(RAM, size, align, place).unwrap();
        assert!(plan.segment_in(at, at + size).is_none());
        assert_eq!(at % align, 0);
    }
    // Nowhere to go: one segment fills RAM.
    let full = load(0x8000_0000, 0x200, 0x10, 0x400_0000);
    let f = Elf::new(EM_RISCV, 0x8000_0000, &[full]).build();
    let plan = plan_elf(&f, Machine::Riscv64, RAM).unwrap();
    let err = plan.place("device tree", RAM, 0x1000, &[1 << 20, 8], Place::Highest).unwrap_err();
    assert_eq!(err, LoadError::NoRoomFor { what: "device tree", size: 0x1000 });
    assert_eq!(
        err.to_string(),
        "no room for the device tree (0x1000 bytes): the segments take every place in guest RAM it could go"
    );
}

#[test]
fn errors_are_std_errors_and_the_statuses_are_distinct() {
    let e: Box<dyn std::error::Error> = Box::new(LoadError::Empty);
    assert_eq!(e.to_string(), "the file is empty");
    assert_ne!(EXIT_REFUSED, EXIT_GUEST_STOPPED);
    assert!(![0, 1, 2, 101].contains(&EXIT_REFUSED));
}

/// Debian's S-mode U-Boot, when installed: a real file the RISC-V image runs.
#[test]
fn debian_u_boot_plans() {
    let Ok(f) = std::fs::read("/usr/lib/u-boot/qemu-riscv64_smode/uboot.elf") else { return };
    let plan = plan_elf(&f, Machine::Riscv64, RAM).unwrap();
    assert_eq!(plan.entry, 0x8020_0000);
    assert_eq!(plan.segments.len(), 1);
}
