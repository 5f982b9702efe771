//! PVH: starting an ELF kernel (Linux's `vmlinux` built with `CONFIG_PVH`) directly, without a
//! boot loader, the way Xen's PVH guests and other hypervisors' direct kernel boots do.
//!
//! The ABI (Xen's public headers `arch-x86/hvm/start_info.h` and `elfnote.h`, and the PVH
//! description in Xen's `docs/misc/pvh.pandoc`):
//! - the kernel's ELF file carries a note named "Xen" of type 18, `XEN_ELFNOTE_PHYS32_ENTRY`,
//!   whose descriptor (4 or 8 bytes, little-endian) is the guest-physical 32-bit entry point;
//! - the loader copies each `PT_LOAD` segment to its `p_paddr` (as [`crate::elf::plan_elf`]),
//!   and builds a `hvm_start_info` structure (version 1: magic 0x336EC578, flags, the module
//!   list, the command line, the RSDP, and a memory map in e820 terms) somewhere in guest RAM;
//! - the vCPU starts at the entry point in 32-bit protected mode with paging off: CS a flat
//!   32-bit code segment, DS/ES/SS flat 32-bit data segments, TR a 32-bit TSS with base 0 and
//!   limit 0x67, CR0.PE set and CR0.PG clear, CR4 0, EFLAGS.IF/TF/VM clear, and EBX holding the
//!   guest-physical address of `hvm_start_info`.
//!
//! [`plan_pvh`] checks the file and its notes before a byte is copied: a note segment outside
//! the file or not 4-byte aligned, a note that runs past its segment, an entry descriptor that is
//! not 4 or 8 bytes, an entry at or above 4 GiB or outside every loaded segment are refused with a
//! [`PvhError`] naming the problem. Pure code over byte slices, tested on the host; the x86
//! hypervisor copies what the plan holds into guest RAM.

use crate::elf::{self, LoadError, LoadPlan, Machine, Place};
use crate::linux_x86::{E820Entry, CMDLINE_MAX, E820_MAX, LOW_MEMORY_END};
use core::fmt;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note type of the 32-bit physical entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// The note name of Xen's notes ("Xen" and its NUL).
pub const XEN_NOTE_NAME: &[u8] = b"Xen\0";
/// `XEN_HVM_START_MAGIC_VALUE`: "xEn3" with the 0x80 bit of the "E" set.
pub const START_MAGIC: u32 = 0x336e_c578;
/// The `hvm_start_info` version built: 1, the first with the memory map.
pub const START_VERSION: u32 = 1;
/// Size of `hvm_start_info` version 1.
pub const START_INFO_LEN: usize = 56;
/// Size of one `hvm_modlist_entry`.
pub const MODLIST_ENTRY_LEN: usize = 32;
/// Size of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_LEN: usize = 24;
/// `PT_NOTE` (System V gABI, "Program Header").
const PT_NOTE: u32 = 4;

/// Why a file is not a PVH kernel this loader starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PvhError {
    /// The ELF checks of [`elf::plan_elf`] (or there is no room for what the loader adds).
    Load(LoadError),
    /// No `XEN_ELFNOTE_PHYS32_ENTRY` note: not a PVH kernel.
    NoEntryNote,
    /// A `PT_NOTE` segment whose bytes are not inside the file.
    NoteOutsideFile {
        /// Its program header index.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        size: u64,
    },
    /// A `PT_NOTE` segment that does not start on a 4-byte boundary of the file (notes are
    /// 4-byte aligned words).
    MisalignedNote {
        /// Its program header index.
        index: usize,
        /// `p_offset`.
        offset: u64,
    },
    /// A note whose header, name or descriptor runs past the end of its segment.
    TruncatedNote {
        /// Its program header index.
        index: usize,
        /// The note's offset inside the segment.
        at: u64,
    },
    /// The entry note's descriptor is neither 4 nor 8 bytes.
    BadEntrySize {
        /// Its size.
        size: u32,
    },
    /// The entry point is at or above 4 GiB: a 32-bit entry cannot reach it.
    EntryAbove4G {
        /// The entry.
        entry: u64,
    },
    /// The entry point is in no loaded segment (by guest-physical address).
    EntryOutsideSegments {
        /// The entry.
        entry: u64,
    },
    /// The command line is longer than the page reserved for it.
    CommandLineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line holds a NUL byte.
    CommandLineNul,
}

impl fmt::Display for PvhError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Load(e) => e.fmt(f),
            Self::NoEntryNote => {
                f.write_str("not a PVH kernel: no Xen note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY) in a PT_NOTE segment")
            }
            Self::NoteOutsideFile { index, offset, size } => write!(
                f,
                "the PT_NOTE segment (program header {index}) at file offset {offset:#x}, {size} bytes, is not \
                 inside the file"
            ),
            Self::MisalignedNote { index, offset } => write!(
                f,
                "the PT_NOTE segment (program header {index}) starts at file offset {offset:#x}, not on a 4-byte \
                 boundary"
            ),
            Self::TruncatedNote { index, at } => write!(
                f,
                "the note at offset {at:#x} of the PT_NOTE segment (program header {index}) runs past the segment's \
                 end"
            ),
            Self::BadEntrySize { size } => {
                write!(f, "the PVH entry note's descriptor is {size} bytes; it must be 4 or 8")
            }
            Self::EntryAbove4G { entry } => {
                write!(f, "the PVH entry point {entry:#x} is at or above 4 GiB, out of reach of a 32-bit entry")
            }
            Self::EntryOutsideSegments { entry } => {
                write!(f, "the PVH entry point {entry:#x} lies in no loadable segment (by physical address)")
            }
            Self::CommandLineTooLong { len, max } => {
                write!(f, "the command line is {len} bytes; at most {max} are accepted")
            }
            Self::CommandLineNul => f.write_str("the command line holds a NUL byte"),
        }
    }
}

impl core::error::Error for PvhError {}

fn le(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(n)?)?;
    Some(bytes.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
}

/// One program header's fields this module reads.
struct Phdr {
    p_type: u32,
    offset: u64,
    filesz: u64,
}

/// The program headers of an ELF file (entries outside the file are skipped: [`elf::plan_elf`]
/// refuses such a table before a plan is made).
fn program_headers(file: &[u8]) -> impl Iterator<Item = Phdr> + '_ {
    let is64 = file.get(4) == Some(&2);
    let (phoff, phnum) =
        if is64 { (le(file, 0x20, 8), le(file, 0x38, 2)) } else { (le(file, 0x1c, 4), le(file, 0x2c, 2)) };
    let (phoff, phnum) = (phoff.unwrap_or(0) as usize, phnum.unwrap_or(0) as usize);
    let entsize = if is64 { 56 } else { 32 };
    (0..phnum).filter_map(move |i| {
        let at = phoff.checked_add(i.checked_mul(entsize)?)?;
        let f = |o: usize, n: usize| le(file, at + o, n);
        Some(if is64 {
            Phdr { p_type: f(0, 4)? as u32, offset: f(8, 8)?, filesz: f(32, 8)? }
        } else {
            Phdr { p_type: f(0, 4)? as u32, offset: f(4, 4)?, filesz: f(16, 4)? }
        })
    })
}

/// Whether `file` is an x86 ELF file with a PVH entry note (its other checks are
/// [`plan_pvh`]'s): a hostile note makes this `Err`, so that such a file is refused rather than
/// taken for another kind of guest. A file the ELF checks refuse (its entry point aside) is not a
/// PVH kernel: whichever loader looks at it refuses it for that.
pub fn has_pvh_note(file: &[u8]) -> Result<bool, PvhError> {
    if !elf::is_elf(file) {
        return Ok(false);
    }
    match elf::plan_elf_entered_at(file, Machine::X86, 0..u64::MAX, Some(0)) {
        Ok(_) | Err(LoadError::EntryOutsideSegments { .. }) => {}
        Err(_) => return Ok(false),
    }
    match pvh_entry(file) {
        Ok(_) => Ok(true),
        Err(PvhError::NoEntryNote) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The entry point of the first `XEN_ELFNOTE_PHYS32_ENTRY` note in the file's `PT_NOTE`
/// segments (ELF notes: `namesz`, `descsz`, `type`, then the name and the descriptor, each padded
/// to 4 bytes; System V gABI, "Note Section").
pub fn pvh_entry(file: &[u8]) -> Result<u64, PvhError> {
    for (index, ph) in program_headers(file).enumerate() {
        if ph.p_type != PT_NOTE {
            continue;
        }
        let notes = usize::try_from(ph.offset)
            .ok()
            .zip(usize::try_from(ph.filesz).ok())
            .and_then(|(o, n)| file.get(o..o.checked_add(n)?))
            .ok_or(PvhError::NoteOutsideFile { index, offset: ph.offset, size: ph.filesz })?;
        if ph.offset % 4 != 0 {
            return Err(PvhError::MisalignedNote { index, offset: ph.offset });
        }
        let mut at = 0usize;
        while at < notes.len() {
            let truncated = PvhError::TruncatedNote { index, at: at as u64 };
            let word = |o: usize| le(notes, at + o, 4).ok_or(truncated);
            let (namesz, descsz, kind) = (word(0)? as usize, word(4)? as usize, word(8)? as u32);
            let name_at = at + 12;
            let desc_at = name_at.checked_add(namesz.next_multiple_of(4)).ok_or(truncated)?;
            let next = desc_at.checked_add(descsz.next_multiple_of(4)).ok_or(truncated)?;
            let name = notes.get(name_at..name_at + namesz).ok_or(truncated)?;
            let desc = notes.get(desc_at..desc_at.checked_add(descsz).ok_or(truncated)?).ok_or(truncated)?;
            if name == XEN_NOTE_NAME && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                if descsz != 4 && descsz != 8 {
                    return Err(PvhError::BadEntrySize { size: descsz as u32 });
                }
                return Ok(le(desc, 0, descsz).unwrap_or(0));
            }
            // A final note's padding may be cut off by the segment's end.
            at = next;
        }
    }
    Err(PvhError::NoEntryNote)
}

/// Everything a PVH start needs in guest memory, and the entry state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvhPlan<'a> {
    /// The kernel's segments (loaded at their `p_paddr`).
    pub load: LoadPlan<'a>,
    /// EIP at entry (guest-physical, paging off).
    pub entry: u32,
    /// The page holding `hvm_start_info`, then the module list, then the memory map; at
    /// [`PvhPlan::start_info_at`].
    pub start_info: [u8; 4096],
    /// EBX at entry.
    pub start_info_at: u64,
    /// The NUL-terminated command line goes to the page after the start info.
    pub cmdline_at: u64,
    /// Where the initrd goes (the module list's only entry), when there is one.
    pub initrd_at: Option<u64>,
}

impl PvhPlan<'_> {
    /// Names the guest's RSDP in `hvm_start_info.rsdp_paddr` (offset 32); Linux's PVH entry takes
    /// the RSDP from there (and scans the BIOS areas only when it is 0).
    pub fn set_rsdp(&mut self, at: u64) {
        self.start_info[32..40].copy_from_slice(&at.to_le_bytes());
    }
}

/// Plans a PVH start of the ELF kernel `file` in a guest with RAM `0..mem` and the e820 map
/// `e820` (see [`crate::linux_x86::firmware_e820`]), with `cmdline` and an initrd of
/// `initrd_len` bytes (0: none).
///
/// The start info and the command line take two pages in the RAM of the first MiB where no
/// segment is (the lowest such place above the first page); the initrd the highest free place
/// in the highest RAM entry of `e820` below `mem` and 4 GiB, page-aligned.
pub fn plan_pvh<'a>(
    file: &'a [u8],
    mem: u64,
    e820: &[E820Entry],
    cmdline: &[u8],
    initrd_len: u64,
) -> Result<PvhPlan<'a>, PvhError> {
    let checked = |entry| elf::plan_elf_entered_at(file, Machine::X86, 0..mem, Some(entry));
    // The ELF's own checks come first (class, machine, segments); only the entry is the note's.
    match checked(0) {
        Ok(_) | Err(LoadError::EntryOutsideSegments { .. }) => {}
        Err(e) => return Err(PvhError::Load(e)),
    }
    let entry = pvh_entry(file)?;
    let entry32 = u32::try_from(entry).map_err(|_| PvhError::EntryAbove4G { entry })?;
    // The entry is a physical address: inside a segment's p_paddr .. p_paddr + p_memsz.
    let load = checked(entry).map_err(|e| match e {
        LoadError::EntryOutsideSegments { entry } => PvhError::EntryOutsideSegments { entry },
        e => PvhError::Load(e),
    })?;
    if cmdline.len() > CMDLINE_MAX {
        return Err(PvhError::CommandLineTooLong { len: cmdline.len(), max: CMDLINE_MAX });
    }
    if cmdline.contains(&0) {
        return Err(PvhError::CommandLineNul);
    }
    // Two pages inside the RAM entry that holds the first page of the first MiB, else above it.
    let low_ram_end = e820
        .iter()
        .find(|e| e.kind == crate::linux_x86::E820_RAM && e.addr <= 0x1000 && e.addr + e.size > 0x1000)
        .map_or(LOW_MEMORY_END, |e| (e.addr + e.size).min(LOW_MEMORY_END));
    let start_info_at = load
        .place("the PVH start info and command line", 0x1000..low_ram_end & !0xfff, 0x2000, &[0x1000], Place::Lowest)
        .or_else(|_| {
            load.place("the PVH start info and command line", LOW_MEMORY_END..mem, 0x2000, &[0x1000], Place::Lowest)
        })
        .map_err(PvhError::Load)?;
    let cmdline_at = start_info_at + 0x1000;
    // The initrd goes in the highest RAM entry, below an ACPI area at the top of RAM.
    let room = crate::linux_x86::highest_ram(e820, mem);
    let initrd_room = room.start.max(LOW_MEMORY_END)..room.end;
    let initrd_at = match initrd_len {
        0 => None,
        n => Some(
            load.place("the initrd", initrd_room.start..initrd_room.end.min(1 << 32), n, &[0x1000], Place::Highest)
                .map_err(PvhError::Load)?,
        ),
    };
    let mut page = [0u8; 4096];
    let mut put = |at: usize, v: u64, n: usize| page[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
    let modlist_at = START_INFO_LEN;
    let memmap_at = modlist_at + MODLIST_ENTRY_LEN;
    let entries = e820.len().min(E820_MAX).min((4096 - memmap_at) / MEMMAP_ENTRY_LEN);
    put(0, u64::from(START_MAGIC), 4);
    put(4, u64::from(START_VERSION), 4);
    put(8, 0, 4);
    put(12, u64::from(initrd_at.is_some()), 4);
    put(16, if initrd_at.is_some() { start_info_at + modlist_at as u64 } else { 0 }, 8);
    put(24, cmdline_at, 8);
    put(32, 0, 8); // rsdp_paddr: none until `PvhPlan::set_rsdp`.
    put(40, start_info_at + memmap_at as u64, 8);
    put(48, entries as u64, 4);
    if let Some(at) = initrd_at {
        put(modlist_at, at, 8);
        put(modlist_at + 8, initrd_len, 8);
    }
    for (i, e) in e820[..entries].iter().enumerate() {
        let o = memmap_at + i * MEMMAP_ENTRY_LEN;
        put(o, e.addr, 8);
        put(o + 8, e.size, 8);
        put(o + 16, u64::from(e.kind), 4);
    }
    Ok(PvhPlan { load, entry: entry32, start_info: page, start_info_at, cmdline_at, initrd_at })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux_x86::{firmware_e820, E820_RAM, E820_RESERVED};
    const PT_LOAD: u32 = 1;
    use alloc::vec::Vec;

    /// An ELF64 x86-64 executable: one PT_LOAD of 0x1000 bytes at physical 0x100_0000 (virtual
    /// 0xffff_ffff_8100_0000), then a PT_NOTE at file offset 0x1000 holding `notes`.
    fn kernel(notes: &[u8]) -> Vec<u8> {
        let mut f = alloc::vec![0u8; 0x1000 + notes.len()];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little-endian
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        let ph = |f: &mut [u8], at: usize, kind: u32, off: u64, vaddr: u64, paddr: u64, size: u64| {
            f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&vaddr.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
        };
        ph(&mut f, 64, PT_LOAD, 0, 0xffff_ffff_8100_0000, 0x100_0000, 0x1000);
        ph(&mut f, 120, PT_NOTE, 0x1000, 0, 0, notes.len() as u64);
        f[0x1000..].copy_from_slice(notes);
        f
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    fn entry_note(entry: u64) -> Vec<u8> {
        note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY, &entry.to_le_bytes())
    }

    fn bios() -> Vec<E820Entry> {
        let e = |addr, end: u64, kind| E820Entry { addr, size: end - addr, kind };
        alloc::vec![e(0, 0x9_f000, E820_RAM), e(0x9_f000, 0xa_0000, E820_RESERVED), e(0x10_0000, 1 << 30, E820_RAM)]
    }

    #[test]
    fn the_entry_note_is_found_among_others() {
        let mut notes = note(b"GNU\0", 3, &[1; 20]);
        notes.extend(note(b"Xen\0", 5, b"xen-3.0\0"));
        notes.extend(entry_note(0x100_0480));
        let f = kernel(&notes);
        assert_eq!(pvh_entry(&f), Ok(0x100_0480));
        assert_eq!(has_pvh_note(&f), Ok(true));
        // A 4-byte descriptor is accepted too.
        let f = kernel(&note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY, &0x100_0010u32.to_le_bytes()));
        assert_eq!(pvh_entry(&f), Ok(0x100_0010));
        // Type 18 under another name is not the entry.
        let f = kernel(&note(b"Linux\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 8]));
        assert_eq!(pvh_entry(&f), Err(PvhError::NoEntryNote));
        assert_eq!(has_pvh_note(&f), Ok(false));
        assert_eq!(has_pvh_note(b"HdrS"), Ok(false));
        // A file the ELF checks refuse is not a PVH kernel, whatever its notes: a note segment
        // with no loadable segment left is refused as such by the loader that looks at it.
        let mut f = kernel(&entry_note(0x100_0480)[..6]);
        assert!(pvh_entry(&f).is_err());
        f[64..68].copy_from_slice(&PT_NOTE.to_le_bytes());
        assert_eq!(has_pvh_note(&f), Ok(false));
    }

    #[test]
    fn hostile_notes_are_refused() {
        let good = kernel(&entry_note(0x100_0480));
        // Truncated: the segment ends inside the note's descriptor, or inside its header.
        for cut in [4u64, 14, 20] {
            let mut f = good.clone();
            f[120 + 32..120 + 40].copy_from_slice(&cut.to_le_bytes());
            assert_eq!(pvh_entry(&f), Err(PvhError::TruncatedNote { index: 1, at: 0 }), "cut at {cut}");
        }
        // A descriptor size that overflows.
        let mut f = good.clone();
        f[0x1004..0x1008].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&f), Err(PvhError::TruncatedNote { index: 1, at: 0 }));
        // Misaligned: the note segment at an odd offset.
        let mut f = good.clone();
        f.insert(0x1000, 0);
        f[120 + 8..120 + 16].copy_from_slice(&0x1001u64.to_le_bytes());
        assert_eq!(pvh_entry(&f), Err(PvhError::MisalignedNote { index: 1, offset: 0x1001 }));
        // Outside the file.
        let mut f = good.clone();
        f[120 + 8..120 + 16].copy_from_slice(&0x10_0000u64.to_le_bytes());
        assert!(matches!(pvh_entry(&f), Err(PvhError::NoteOutsideFile { index: 1, offset: 0x10_0000, .. })));
        assert!(has_pvh_note(&f).is_err(), "a hostile note is not taken for another kind of file");
        // A descriptor of the wrong size.
        let f = kernel(&note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY, &[0; 2]));
        assert_eq!(pvh_entry(&f), Err(PvhError::BadEntrySize { size: 2 }));
        let (m, n) = firmware_e820(&bios(), 64 << 20, None);
        // The entry outside every segment, and above 4 GiB.
        let f = kernel(&entry_note(0x200_0000));
        assert_eq!(plan_pvh(&f, 64 << 20, &m[..n], b"", 0), Err(PvhError::EntryOutsideSegments { entry: 0x200_0000 }));
        let f = kernel(&entry_note(0x1_0100_0000));
        assert_eq!(plan_pvh(&f, 64 << 20, &m[..n], b"", 0), Err(PvhError::EntryAbove4G { entry: 0x1_0100_0000 }));
        // The ELF's own checks come first: the segment outside a 16 MiB guest.
        assert!(matches!(plan_pvh(&good, 16 << 20, &m[..n], b"", 0), Err(PvhError::Load(_))));
        assert_eq!(plan_pvh(&good, 64 << 20, &m[..n], b"a\0", 0), Err(PvhError::CommandLineNul));
        let long = alloc::vec![b'x'; CMDLINE_MAX + 1];
        assert!(matches!(plan_pvh(&good, 64 << 20, &m[..n], &long, 0), Err(PvhError::CommandLineTooLong { .. })));
        assert!(matches!(plan_pvh(&good, 64 << 20, &m[..n], b"", 60 << 20), Err(PvhError::Load(_))));
    }

    #[test]
    fn the_start_info_describes_the_guest() {
        let f = kernel(&entry_note(0x100_0480));
        let (m, n) = firmware_e820(&bios(), 128 << 20, None);
        let p = plan_pvh(&f, 128 << 20, &m[..n], b"console=ttyS0", 0x3000).unwrap();
        assert_eq!(p.entry, 0x100_0480);
        assert_eq!((p.start_info_at, p.cmdline_at), (0x1000, 0x2000));
        assert_eq!(p.initrd_at, Some((128 << 20) - 0x3000));
        let s = &p.start_info;
        let rd = |at: usize, n: usize| le(s, at, n).unwrap();
        assert_eq!((rd(0, 4), rd(4, 4), rd(8, 4), rd(12, 4)), (u64::from(START_MAGIC), 1, 0, 1));
        assert_eq!((rd(16, 8), rd(24, 8), rd(32, 8)), (0x1000 + 56, 0x2000, 0));
        assert_eq!((rd(40, 8), rd(48, 4)), (0x1000 + 88, n as u64));
        assert_eq!((rd(56, 8), rd(64, 8)), ((128 << 20) - 0x3000, 0x3000));
        for (i, e) in m[..n].iter().enumerate() {
            let o = 88 + 24 * i;
            assert_eq!((rd(o, 8), rd(o + 8, 8), rd(o + 16, 4)), (e.addr, e.size, u64::from(e.kind)));
        }
        // With the guest's ACPI area at the top of RAM: the initrd below it, the RSDP named.
        let (m, n) = firmware_e820(&bios(), 128 << 20, Some((128 << 20) - 0x1_0000..128 << 20));
        let mut p = plan_pvh(&f, 128 << 20, &m[..n], b"", 0x3000).unwrap();
        assert_eq!(p.initrd_at, Some((128 << 20) - 0x1_0000 - 0x3000));
        assert_eq!(le(&p.start_info, 32, 8), Some(0));
        p.set_rsdp(0xf_5a10);
        assert_eq!(le(&p.start_info, 32, 8), Some(0xf_5a10));
        // Without an initrd: no module.
        let p = plan_pvh(&f, 128 << 20, &m[..n], b"", 0).unwrap();
        assert_eq!((le(&p.start_info, 12, 4), le(&p.start_info, 16, 8)), (Some(0), Some(0)));
    }
}
