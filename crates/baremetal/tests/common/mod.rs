//! Small ELF files built byte by byte for the tests.
#![allow(dead_code)]

pub const EM_386: u16 = 3;
pub const EM_ARM: u16 = 40;
pub const EM_X86_64: u16 = 62;
pub const EM_RISCV: u16 = 243;
pub const PT_LOAD: u32 = 1;
pub const PT_NOTE: u32 = 4;

/// One program header.
#[derive(Clone, Copy)]
pub struct Ph {
    pub p_type: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// A loadable segment at `paddr` (= vaddr) whose bytes are at `offset`.
pub fn load(paddr: u64, offset: u64, filesz: u64, memsz: u64) -> Ph {
    Ph { p_type: PT_LOAD, offset, vaddr: paddr, paddr, filesz, memsz }
}

/// An ELF file: header, program headers right after it, then `data` bytes of 0xa5 (to `len`).
pub struct Elf {
    pub class64: bool,
    pub machine: u16,
    pub e_type: u16,
    pub entry: u64,
    pub phs: Vec<Ph>,
    pub len: usize,
}

impl Elf {
    pub fn new(machine: u16, entry: u64, phs: &[Ph]) -> Self {
        Elf { class64: true, machine, e_type: 2, entry, phs: phs.to_vec(), len: 0x1000 }
    }

    pub fn build(&self) -> Vec<u8> {
        let (eh, ph) = if self.class64 { (64usize, 56usize) } else { (52, 32) };
        let mut f = vec![0xa5u8; self.len.max(eh + ph * self.phs.len())];
        f[..eh].fill(0);
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = if self.class64 { 2 } else { 1 };
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&self.e_type.to_le_bytes());
        f[18..20].copy_from_slice(&self.machine.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        if self.class64 {
            f[24..32].copy_from_slice(&self.entry.to_le_bytes());
            f[32..40].copy_from_slice(&64u64.to_le_bytes());
            f[52..54].copy_from_slice(&64u16.to_le_bytes());
            f[54..56].copy_from_slice(&56u16.to_le_bytes());
            f[56..58].copy_from_slice(&(self.phs.len() as u16).to_le_bytes());
        } else {
            f[24..28].copy_from_slice(&(self.entry as u32).to_le_bytes());
            f[28..32].copy_from_slice(&52u32.to_le_bytes());
            f[40..42].copy_from_slice(&52u16.to_le_bytes());
            f[42..44].copy_from_slice(&32u16.to_le_bytes());
            f[44..46].copy_from_slice(&(self.phs.len() as u16).to_le_bytes());
        }
        for (i, p) in self.phs.iter().enumerate() {
            let o = eh + ph * i;
            let h = &mut f[o..o + ph];
            h.fill(0);
            h[0..4].copy_from_slice(&p.p_type.to_le_bytes());
            if self.class64 {
                h[8..16].copy_from_slice(&p.offset.to_le_bytes());
                h[16..24].copy_from_slice(&p.vaddr.to_le_bytes());
                h[24..32].copy_from_slice(&p.paddr.to_le_bytes());
                h[32..40].copy_from_slice(&p.filesz.to_le_bytes());
                h[40..48].copy_from_slice(&p.memsz.to_le_bytes());
            } else {
                h[4..8].copy_from_slice(&(p.offset as u32).to_le_bytes());
                h[8..12].copy_from_slice(&(p.vaddr as u32).to_le_bytes());
                h[12..16].copy_from_slice(&(p.paddr as u32).to_le_bytes());
                h[16..20].copy_from_slice(&(p.filesz as u32).to_le_bytes());
                h[20..24].copy_from_slice(&(p.memsz as u32).to_le_bytes());
            }
        }
        f
    }
}

/// A good RISC-V file: code at 0x80200000 (0x100 bytes from offset 0x200, 0x1000 in memory).
pub fn riscv() -> Elf {
    Elf::new(EM_RISCV, 0x8020_0000, &[load(0x8020_0000, 0x200, 0x100, 0x1000)])
}
