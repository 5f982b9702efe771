//! Loading a guest: ELF64 PT_LOAD segments (ELF-64 Object File Format v1.5; RISC-V ELF psABI), or a raw binary.

use core::fmt;

/// One loadable segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Physical load address (p_paddr).
    pub paddr: u64,
    /// Offset of the bytes in the file.
    pub offset: u64,
    /// Bytes present in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zero).
    pub memsz: u64,
}

/// Why a file is not a loadable RISC-V ELF64 executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than its headers say.
    Truncated,
    /// Not ELF64 little-endian for EM_RISCV (243).
    NotRiscv64,
    /// A segment's file range or memory range overflows or lies outside the file.
    BadSegment {
        /// Index of the program header.
        index: usize,
    },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

fn u16at(b: &[u8], at: usize) -> Result<u16, ElfError> {
    Ok(u16::from_le_bytes(b.get(at..at + 2).ok_or(ElfError::Truncated)?.try_into().map_err(|_| ElfError::Truncated)?))
}
fn u32at(b: &[u8], at: usize) -> Result<u32, ElfError> {
    Ok(u32::from_le_bytes(b.get(at..at + 4).ok_or(ElfError::Truncated)?.try_into().map_err(|_| ElfError::Truncated)?))
}
fn u64at(b: &[u8], at: usize) -> Result<u64, ElfError> {
    Ok(u64::from_le_bytes(b.get(at..at + 8).ok_or(ElfError::Truncated)?.try_into().map_err(|_| ElfError::Truncated)?))
}

/// Whether `file` starts with the ELF magic.
pub fn is_elf(file: &[u8]) -> bool {
    file.starts_with(b"\x7fELF")
}

/// The entry point and the PT_LOAD segments of `file`, passed one by one to `seg`.
pub fn load_segments(file: &[u8], mut seg: impl FnMut(Segment)) -> Result<u64, ElfError> {
    // e_ident: ELFCLASS64 (2), ELFDATA2LSB (1); e_machine EM_RISCV = 243.
    if !is_elf(file) || file.get(4) != Some(&2) || file.get(5) != Some(&1) || u16at(file, 18)? != 243 {
        return Err(ElfError::NotRiscv64);
    }
    let entry = u64at(file, 24)?;
    let phoff = u64at(file, 32)? as usize;
    let phentsize = u16at(file, 54)? as usize;
    let phnum = u16at(file, 56)? as usize;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize).ok_or(ElfError::Truncated)?).ok_or(ElfError::Truncated)?;
        if u32at(file, ph)? != 1 {
            continue; // not PT_LOAD
        }
        let s = Segment {
            offset: u64at(file, ph + 8)?,
            paddr: u64at(file, ph + 24)?,
            filesz: u64at(file, ph + 32)?,
            memsz: u64at(file, ph + 40)?,
        };
        let end = s.offset.checked_add(s.filesz).ok_or(ElfError::BadSegment { index: i })?;
        if end > file.len() as u64 || s.filesz > s.memsz || s.paddr.checked_add(s.memsz).is_none() {
            return Err(ElfError::BadSegment { index: i });
        }
        seg(s);
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn elf(entry: u64, segs: &[(u64, u64, u64, u64)]) -> alloc::vec::Vec<u8> {
        let mut f = vec![0u8; 64 + 56 * segs.len()];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[18..20].copy_from_slice(&243u16.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, &(paddr, off, filesz, memsz)) in segs.iter().enumerate() {
            let p = 64 + 56 * i;
            f[p..p + 4].copy_from_slice(&1u32.to_le_bytes());
            f[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            f[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
            f[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            f[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        f
    }

    #[test]
    fn segments_and_entry() {
        let f = elf(0x8020_0000, &[(0x8020_0000, 0, 100, 4096)]);
        let mut got = vec![];
        assert_eq!(load_segments(&f, |s| got.push(s)), Ok(0x8020_0000));
        assert_eq!(got, [Segment { paddr: 0x8020_0000, offset: 0, filesz: 100, memsz: 4096 }]);
    }

    #[test]
    fn hostile_headers_are_errors() {
        assert_eq!(load_segments(b"\x7fELF", |_| {}), Err(ElfError::NotRiscv64));
        let f = elf(0, &[(0x8020_0000, 0, 1 << 40, 1 << 40)]);
        assert_eq!(load_segments(&f, |_| {}), Err(ElfError::BadSegment { index: 0 }));
        let f = elf(0, &[(u64::MAX - 1, 0, 1, 16)]);
        assert_eq!(load_segments(&f, |_| {}), Err(ElfError::BadSegment { index: 0 }));
        let mut f = elf(0, &[(0, 0, 1, 1)]);
        f[56..58].copy_from_slice(&1000u16.to_le_bytes());
        assert_eq!(load_segments(&f, |_| {}), Err(ElfError::Truncated));
    }
}
