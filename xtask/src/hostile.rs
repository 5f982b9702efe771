//! Hostile guest files for the emulator checks, written at test time: small ELF files built byte by
//! byte, and two probe guests (hand-assembled) that check that the hypervisor put nothing of its
//! own on top of their segments.

use std::path::{Path, PathBuf};

/// e_machine values.
pub const EM_386: u16 = 3;
/// ARM (32-bit).
pub const EM_ARM: u16 = 40;
/// x86-64.
pub const EM_X86_64: u16 = 62;
/// RISC-V.
pub const EM_RISCV: u16 = 243;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// One program header and the bytes it covers in the file.
pub struct Seg<'a> {
    p_type: u32,
    paddr: u64,
    bytes: &'a [u8],
    memsz: u64,
}

/// A loadable segment at `paddr` (= `p_vaddr`).
pub fn load(paddr: u64, bytes: &[u8], memsz: u64) -> Seg<'_> {
    Seg { p_type: PT_LOAD, paddr, bytes, memsz }
}

/// An executable ELF file (little-endian, ET_EXEC): the header, the program headers, then each
/// segment's bytes at a 16-byte-aligned offset.
pub fn build_elf(class64: bool, machine: u16, entry: u64, segs: &[Seg<'_>]) -> Vec<u8> {
    let (eh, ph) = if class64 { (64, 56) } else { (52, 32) };
    let mut f = vec![0u8; eh + ph * segs.len()];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = if class64 { 2 } else { 1 };
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&machine.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    let n = segs.len() as u16;
    if class64 {
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&(eh as u64).to_le_bytes());
        f[52..54].copy_from_slice(&(eh as u16).to_le_bytes());
        f[54..56].copy_from_slice(&(ph as u16).to_le_bytes());
        f[56..58].copy_from_slice(&n.to_le_bytes());
    } else {
        f[24..28].copy_from_slice(&(entry as u32).to_le_bytes());
        f[28..32].copy_from_slice(&(eh as u32).to_le_bytes());
        f[40..42].copy_from_slice(&(eh as u16).to_le_bytes());
        f[42..44].copy_from_slice(&(ph as u16).to_le_bytes());
        f[44..46].copy_from_slice(&n.to_le_bytes());
    }
    for (i, s) in segs.iter().enumerate() {
        f.resize(f.len().next_multiple_of(16), 0);
        let offset = f.len() as u64;
        f.extend_from_slice(s.bytes);
        let h = &mut f[eh + ph * i..eh + ph * (i + 1)];
        h[0..4].copy_from_slice(&s.p_type.to_le_bytes());
        let filesz = s.bytes.len() as u64;
        if class64 {
            h[4..8].copy_from_slice(&7u32.to_le_bytes());
            h[8..16].copy_from_slice(&offset.to_le_bytes());
            h[16..24].copy_from_slice(&s.paddr.to_le_bytes());
            h[24..32].copy_from_slice(&s.paddr.to_le_bytes());
            h[32..40].copy_from_slice(&filesz.to_le_bytes());
            h[40..48].copy_from_slice(&s.memsz.to_le_bytes());
            h[48..56].copy_from_slice(&16u64.to_le_bytes());
        } else {
            h[4..8].copy_from_slice(&(offset as u32).to_le_bytes());
            h[8..12].copy_from_slice(&(s.paddr as u32).to_le_bytes());
            h[12..16].copy_from_slice(&(s.paddr as u32).to_le_bytes());
            h[16..20].copy_from_slice(&(filesz as u32).to_le_bytes());
            h[20..24].copy_from_slice(&(s.memsz as u32).to_le_bytes());
            h[24..28].copy_from_slice(&7u32.to_le_bytes());
            h[28..32].copy_from_slice(&16u32.to_le_bytes());
        }
    }
    f
}

/// `file` with its e_machine changed to `machine`.
pub fn relabel(mut file: Vec<u8>, machine: u16) -> Vec<u8> {
    if file.len() >= 20 {
        file[18..20].copy_from_slice(&machine.to_le_bytes());
    }
    file
}

/// Writes `bytes` to `dir/name`; returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}

/// ELF64 files for `machine` that every hypervisor refuses, with code at `base` in guest RAM:
/// no loadable segment, two overlapping segments, a segment with 1 TiB of zero-fill.
fn refused(machine: u16, base: u64) -> Vec<(&'static str, Vec<u8>)> {
    let code = [0x13u8, 0, 0, 0].repeat(4);
    let note = Seg { p_type: PT_NOTE, paddr: 0, bytes: b"note", memsz: 0 };
    let overlap = [load(base, &code, 0x2000), load(base + 0x1000, &code, 0x1000)];
    vec![
        ("no-segment.elf", build_elf(true, machine, base, &[note])),
        ("overlap.elf", build_elf(true, machine, base, &overlap)),
        ("huge-memsz.elf", build_elf(true, machine, base, &[load(base, &code, 1 << 40)])),
    ]
}

/// [`refused`] for the RISC-V hypervisor (guest RAM from 0x80000000).
pub fn riscv_refused() -> Vec<(&'static str, Vec<u8>)> {
    refused(EM_RISCV, 0x8020_0000)
}

/// [`refused`] for the x86 hypervisor (guest RAM from 0).
pub fn x86_refused() -> Vec<(&'static str, Vec<u8>)> {
    refused(EM_X86_64, 0x10_0000)
}

/// What the probe guests find when nothing overwrote their data.
const PROBE_MAGIC: u64 = 0x5453_4542_4f52_5021;
/// The status a probe guest exits with when its data and the hypervisor's are where they should be.
pub const PROBE_OK: i32 = 42;

// RV64 encodings (The RISC-V Instruction Set Manual, Volume I, 2.2-2.5).
fn i_type(op: u32, f3: u32, rd: u32, rs1: u32, imm: i32) -> u32 {
    ((imm as u32 & 0xfff) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op
}
fn u_type(op: u32, rd: u32, imm20: u32) -> u32 {
    (imm20 << 12) | (rd << 7) | op
}
fn bne(rs1: u32, rs2: u32, off: i32) -> u32 {
    let o = off as u32;
    (((o >> 12) & 1) << 31)
        | (((o >> 5) & 0x3f) << 25)
        | (rs2 << 20)
        | (rs1 << 15)
        | (1 << 12)
        | (((o >> 1) & 0xf) << 8)
        | (((o >> 11) & 1) << 7)
        | 0x63
}

/// A RISC-V guest with data at the last 2 MiB boundary of its default 128 MiB of RAM at 0x80000000
/// (where QEMU virt, and so the hypervisor, would put the device tree) and code at 0x80200000 that exits through SBI SRST with [`PROBE_OK`] when
/// that data is intact and a1 points at a device tree, 43 when the data was overwritten, 44 when
/// a1 holds no device tree.
pub fn riscv_probe() -> Vec<u8> {
    const ADDI: u32 = 0x13;
    let (s0, t0, t1, t2, t3, t4, t5, t6) = (8, 5, 6, 7, 28, 29, 30, 31);
    let (a0, a1, a6, a7) = (10, 11, 16, 17);
    let data_gpa: u64 = 0x87e0_0000;
    let insns = [
        i_type(ADDI, 0, s0, a1, 0),                                // 00 s0 = a1 (the device tree)
        u_type(0x17, t0, ((data_gpa - 0x8020_0000) >> 12) as u32), // 04 auipc t0: data + 4
        i_type(0x03, 3, t1, t0, -4),                               // 08 ld t1, data
        u_type(0x17, t2, 0),                                       // 0c auipc t2, 0
        i_type(0x03, 3, t3, t2, 0x60 - 0x0c),                      // 10 ld t3, PROBE_MAGIC
        i_type(ADDI, 0, a1, 0, 43),                                // 14 a1 = 43
        bne(t1, t3, 0x30 - 0x18),                                  // 18 data overwritten: exit
        i_type(0x03, 2, t4, s0, 0),                                // 1c lw t4, 0(s0)
        i_type(0x03, 2, t5, t2, 0x68 - 0x0c),                      // 20 lw t5, FDT magic
        i_type(ADDI, 0, a1, 0, 44),                                // 24 a1 = 44
        bne(t4, t5, 0x30 - 0x28),                                  // 28 no device tree: exit
        i_type(ADDI, 0, a1, 0, PROBE_OK),                          // 2c a1 = 42
        u_type(0x37, t6, 0xf0000),                                 // 30 lui t6, 0xf0000
        0x33 | (a1 << 7) | (6 << 12) | (a1 << 15) | (t6 << 20),    // 34 or a1, a1, t6: reason
        i_type(ADDI, 0, a0, 0, 0),                                 // 38 a0 = 0: shutdown
        u_type(0x37, a7, 0x53525),                                 // 3c lui a7, "SRST" >> 12
        i_type(ADDI, 0, a7, a7, 0x354),                            // 40 a7 = 0x53525354
        i_type(ADDI, 0, a6, 0, 0),                                 // 44 a6 = 0: system_reset
        0x73,                                                      // 48 ecall
        0x6f,                                                      // 4c j .
    ];
    let mut code: Vec<u8> = insns.iter().flat_map(|i| i.to_le_bytes()).collect();
    code.resize(0x60, 0);
    code.extend_from_slice(&PROBE_MAGIC.to_le_bytes());
    code.extend_from_slice(&[0xd0, 0x0d, 0xfe, 0xed]);
    let data = PROBE_MAGIC.to_le_bytes();
    build_elf(true, EM_RISCV, 0x8020_0000, &[load(0x8020_0000, &code, 0x1000), load(data_gpa, &data, 0x1000)])
}

/// An ELF32 i386 multiboot guest with data at 0x9000 and 0x9100 (where the multiboot information
/// and its memory map used to go) and code at 1 MiB that writes [`PROBE_OK`] to port 0xf4 when
/// EAX holds the multiboot magic, its data is intact and EBX points at boot information with
/// flags 0x41; 43 otherwise.
pub fn x86_probe() -> Vec<u8> {
    let magic = (PROBE_MAGIC as u32).to_le_bytes();
    let magic2 = ((PROBE_MAGIC >> 32) as u32).to_le_bytes();
    let mut code = Vec::new();
    // Multiboot header: flags 3 (page-aligned modules, memory information).
    for w in [0x1BAD_B002u32, 3, 0u32.wrapping_sub(0x1BAD_B002 + 3)] {
        code.extend_from_slice(&w.to_le_bytes());
    }
    // Assembled with GNU as (--32, Intel syntax).
    let body: Vec<u8> = [
        &[0x3d, 0x02, 0xb0, 0xad, 0x2b][..],   // cmp eax, 0x2badb002
        &[0x75, 0x22],                         // jne bad
        &[0x81, 0x3d, 0x00, 0x90, 0x00, 0x00], // cmp dword ptr [0x9000], magic
        &magic,
        &[0x75, 0x16],                         // jne bad
        &[0x81, 0x3d, 0x00, 0x91, 0x00, 0x00], // cmp dword ptr [0x9100], magic2
        &magic2,
        &[0x75, 0x0a],                       // jne bad
        &[0x83, 0x3b, 0x41],                 // cmp dword ptr [ebx], 0x41
        &[0x75, 0x05],                       // jne bad
        &[0xb0, PROBE_OK as u8, 0xe6, 0xf4], // mov al, 42; out 0xf4, al
        &[0xf4],                             // hlt
        &[0xb0, 43, 0xe6, 0xf4, 0xf4],       // bad: mov al, 43; out 0xf4, al; hlt
    ]
    .concat();
    code.extend_from_slice(&body);
    let mut data = vec![0u8; 0x200];
    data[..4].copy_from_slice(&magic);
    data[0x100..0x104].copy_from_slice(&magic2);
    build_elf(false, EM_386, 0x10_000c, &[load(0x10_0000, &code, 0x1000), load(0x9000, &data, 0x200)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use twostage_baremetal::elf::{plan_elf, Machine};
    use twostage_baremetal::multiboot::plan_guest;

    #[test]
    fn the_probes_are_loadable_and_the_hostile_files_are_not() {
        let ram = 0x8000_0000..0x8800_0000;
        let probe = riscv_probe();
        let plan = plan_elf(&probe, Machine::Riscv64, ram.clone()).unwrap();
        assert_eq!((plan.entry, plan.segments[1].gpa), (0x8020_0000, 0x87e0_0000));
        let probe = x86_probe();
        let as_output: [u8; 46] = [
            0x3d, 0x02, 0xb0, 0xad, 0x2b, 0x75, 0x22, 0x81, 0x3d, 0x00, 0x90, 0x00, 0x00, 0x21, 0x50, 0x52, 0x4f, 0x75,
            0x16, 0x81, 0x3d, 0x00, 0x91, 0x00, 0x00, 0x42, 0x45, 0x53, 0x54, 0x75, 0x0a, 0x83, 0x3b, 0x41, 0x75, 0x05,
            0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xb0, 0x2b, 0xe6, 0xf4, 0xf4,
        ];
        let plan = plan_guest(&probe, 16 << 20).unwrap();
        assert_eq!(plan.load.segments[0].bytes[12..], as_output);
        assert_eq!((plan.load.entry, plan.info_at), (0x10_000c, 0x1000));
        for (name, f) in riscv_refused() {
            assert!(plan_elf(&f, Machine::Riscv64, ram.clone()).is_err(), "{name}");
        }
        for (name, f) in x86_refused() {
            assert!(plan_guest(&f, 16 << 20).is_err(), "{name}");
        }
    }

    #[test]
    fn the_riscv_probe_is_what_the_assembler_makes() {
        // The probe's instructions as written in its comments, assembled by rustc's LLVM
        // (riscv64gc-unknown-none-elf, `.option norvc`).
        let expected: [u32; 20] = [
            0x00058413, 0x07c00297, 0xffc2b303, 0x00000397, 0x0543be03, 0x02b00593, 0x01c31c63, 0x00042e83, 0x05c3af03,
            0x02c00593, 0x01ee9463, 0x02a00593, 0xf0000fb7, 0x01f5e5b3, 0x00000513, 0x535258b7, 0x35488893, 0x00000813,
            0x00000073, 0x0000006f,
        ];
        let f = riscv_probe();
        let plan = plan_elf(&f, Machine::Riscv64, 0x8000_0000..0x8800_0000).unwrap();
        let code = plan.segments[0].bytes;
        let words: Vec<u32> = code[..80].chunks(4).map(|w| u32::from_le_bytes(w.try_into().unwrap())).collect();
        assert_eq!(words, expected);
    }
}
