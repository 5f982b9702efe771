//! Guest files: a checked loading plan from an ELF executable (or a raw image), or a refusal that
//! names the problem.
//!
//! Both hypervisor images load a guest file the same way: each loadable segment (`PT_LOAD`) is
//! copied to guest-physical `p_paddr` in a guest RAM that reads as zero where nothing was copied,
//! which gives the zero-fill between `p_filesz` and `p_memsz`, and the guest starts at the entry
//! point with paging off. [`plan_elf`] checks everything that could make that go wrong before a
//! byte is copied (ELF-64 Object File Format 1.5 and the System V gABI, "Program Header"):
//!
//! - the file is an ELF executable of the expected class, byte order and machine ([`Machine`]);
//! - its program header table and every segment's bytes lie inside the file;
//! - there is at least one loadable segment, each with `p_filesz <= p_memsz`, and the whole of
//!   each (`p_paddr .. p_paddr + p_memsz`, zero-fill included) lies inside guest RAM;
//! - no two segments overlap (one would silently win, and a later zero-fill would not zero);
//! - the entry point lies inside a segment. As GRUB's multiboot loader does, it is found by
//!   virtual address (`p_vaddr`) and entered at the matching guest-physical address; when
//!   `p_vaddr == p_paddr`, as in most bare-metal files, that is the entry point itself.
//!
//! The result is a [`LoadPlan`]: the segments with their bytes, the entry point, and
//! [`LoadPlan::free_slot`] to place what the hypervisor adds (a device tree, the multiboot
//! information) where no segment is. Every refusal is a [`LoadError`] whose message names the
//! problem and the values involved.
//!
//! Parsing uses the `elf` crate (no_std, no allocation); the checks are this module's.

use ::elf::abi;
use ::elf::endian::LittleEndian;
use ::elf::file::{Class as ElfClass, FileHeader};
use ::elf::parse::ParseAt;
use ::elf::segment::{ProgramHeader, SegmentTable};
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

/// The exit status of a hypervisor image (and of `cargo xtask run`) that refused a guest file:
/// nothing of the guest ran. The console says why.
pub const EXIT_REFUSED: u8 = 126;

/// The exit status of a hypervisor image whose guest ran and was stopped by the hypervisor: an
/// unresolved fault, an exception or exit it cannot serve, or a halt without an exit status.
pub const EXIT_GUEST_STOPPED: u8 = 125;

/// The most loadable segments a plan takes (a kernel has a handful).
pub const MAX_SEGMENTS: usize = 256;

/// The machine a hypervisor runs guests for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// RV64: ELF64 with `e_machine` EM_RISCV (243).
    Riscv64,
    /// x86 as GRUB's multiboot loader takes it: ELF32 with EM_386 (3), or ELF64 with EM_X86_64 (62).
    X86,
}

impl Machine {
    /// The class a file for `e_machine` must have, or `None` if this machine does not run it.
    fn class_for(self, e_machine: u16) -> Option<Class> {
        match (self, e_machine) {
            (Machine::Riscv64, abi::EM_RISCV) => Some(Class::Elf64),
            (Machine::X86, abi::EM_386) => Some(Class::Elf32),
            (Machine::X86, abi::EM_X86_64) => Some(Class::Elf64),
            _ => None,
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Machine::Riscv64 => f.write_str("RISC-V (ELF64, e_machine 243)"),
            Machine::X86 => f.write_str("x86 (ELF32 with e_machine 3 or ELF64 with e_machine 62)"),
        }
    }
}

/// An ELF file class (`e_ident[EI_CLASS]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// ELFCLASS32.
    Elf32,
    /// ELFCLASS64.
    Elf64,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::Elf32 => "ELF32",
            Class::Elf64 => "ELF64",
        })
    }
}

/// A readable name for an `e_machine` value.
pub fn machine_name(e_machine: u16) -> &'static str {
    match e_machine {
        abi::EM_NONE => "no machine",
        abi::EM_SPARC => "SPARC",
        abi::EM_386 => "x86 (i386)",
        abi::EM_68K => "m68k",
        abi::EM_MIPS => "MIPS",
        abi::EM_PPC => "PowerPC",
        abi::EM_PPC64 => "PowerPC64",
        abi::EM_S390 => "s390",
        abi::EM_ARM => "ARM (32-bit)",
        abi::EM_SPARCV9 => "SPARC V9",
        abi::EM_IA_64 => "IA-64",
        abi::EM_X86_64 => "x86-64",
        abi::EM_AARCH64 => "AArch64",
        abi::EM_RISCV => "RISC-V",
        abi::EM_BPF => "eBPF",
        abi::EM_LOONGARCH => "LoongArch",
        _ => "an unknown machine",
    }
}

fn type_name(e_type: u16) -> &'static str {
    match e_type {
        abi::ET_NONE => "no file type",
        abi::ET_REL => "a relocatable object",
        abi::ET_EXEC => "an executable",
        abi::ET_DYN => "a shared object",
        abi::ET_CORE => "a core dump",
        _ => "an unknown file type",
    }
}

/// Why a guest file is refused. The message ([`fmt::Display`]) names the problem and its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadError {
    /// The file has no bytes.
    Empty,
    /// The file does not start with the ELF magic `\x7fELF`.
    NotElf {
        /// The file's first bytes (up to four; `len` says how many).
        start: [u8; 4],
        /// How many of `start` the file has.
        len: usize,
    },
    /// The file ends inside a structure it must hold.
    Truncated {
        /// The structure.
        what: &'static str,
        /// Bytes the structure needs (from the start of the file).
        need: u64,
        /// Bytes the file has.
        len: u64,
    },
    /// `e_ident[EI_CLASS]` is neither ELFCLASS32 nor ELFCLASS64.
    BadClass(u8),
    /// The class does not match the machine (an RV32 file for an RV64 hypervisor, say).
    WrongClass {
        /// The file's class.
        found: Class,
        /// The class its machine needs here.
        expected: Class,
        /// The file's `e_machine`.
        e_machine: u16,
    },
    /// `e_ident[EI_DATA]` is not little-endian (ELFDATA2LSB).
    WrongEndianness(u8),
    /// `e_ident[EI_VERSION]` or `e_version` is not EV_CURRENT (1).
    BadVersion(u64),
    /// `e_machine` is not one this hypervisor runs.
    WrongMachine {
        /// The file's `e_machine`.
        found: u16,
        /// What the hypervisor runs.
        expected: Machine,
    },
    /// `e_type` is not ET_EXEC or ET_DYN.
    NotExecutable {
        /// The file's `e_type`.
        e_type: u16,
    },
    /// `e_phentsize` is not the size of a program header of the file's class.
    BadProgramHeaderSize {
        /// The file's `e_phentsize`.
        found: u16,
        /// The size for its class.
        expected: u16,
    },
    /// `e_phnum` is PN_XNUM: the count is in section header 0, which this loader does not read.
    TooManyProgramHeaders,
    /// The program header table does not lie inside the file.
    ProgramHeadersOutsideFile {
        /// `e_phoff`.
        offset: u64,
        /// `e_phnum`.
        count: u16,
        /// The file's size.
        len: u64,
    },
    /// No `PT_LOAD` segment with a non-zero memory size.
    NoLoadableSegment,
    /// More loadable segments than [`MAX_SEGMENTS`].
    TooManySegments {
        /// How many the file has.
        count: usize,
    },
    /// A segment has more bytes in the file than in memory.
    FileSizeExceedsMemSize {
        /// Index of its program header.
        index: usize,
        /// `p_filesz`.
        filesz: u64,
        /// `p_memsz`.
        memsz: u64,
    },
    /// A segment's bytes do not lie inside the file.
    SegmentOutsideFile {
        /// Index of its program header.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        filesz: u64,
        /// The file's size.
        len: u64,
    },
    /// A segment (zero-fill included) does not lie inside guest RAM.
    SegmentOutsideRam {
        /// Index of its program header.
        index: usize,
        /// `p_paddr`.
        gpa: u64,
        /// `p_memsz`.
        memsz: u64,
        /// Guest RAM.
        ram: (u64, u64),
    },
    /// A raw image does not fit guest RAM at its load address.
    RawOutsideRam {
        /// Where it would be loaded.
        gpa: u64,
        /// Its size.
        len: u64,
        /// Guest RAM.
        ram: (u64, u64),
    },
    /// Two segments overlap in guest memory.
    Overlap {
        /// Program header index of the first.
        first: usize,
        /// Its range.
        first_range: (u64, u64),
        /// Program header index of the second.
        second: usize,
        /// Its range.
        second_range: (u64, u64),
    },
    /// The entry point is not inside any loadable segment.
    EntryOutsideSegments {
        /// `e_entry`.
        entry: u64,
    },
    /// The hypervisor has nowhere to put something it must give the guest: every place in guest
    /// RAM it could go is taken by a segment.
    NoRoomFor {
        /// What.
        what: &'static str,
        /// Its size.
        size: u64,
    },
    /// The `elf` crate refused a structure the checks above let through.
    Malformed {
        /// The structure.
        what: &'static str,
    },
}

/// `start .. start + len`, shown as a range; `len` may run past the end of the address space.
struct Span(u64, u64);

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.checked_add(self.1) {
            Some(end) => write!(f, "{:#x}..{end:#x} ({:#x} bytes)", self.0, self.1),
            None => write!(f, "{:#x} + {:#x} bytes (past the end of the address space)", self.0, self.1),
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LoadError::Empty => f.write_str("the file is empty"),
            LoadError::NotElf { start, len } => {
                f.write_str("not an ELF file: it starts with")?;
                for b in &start[..len.min(4)] {
                    write!(f, " {b:02x}")?;
                }
                f.write_str(", not 7f 45 4c 46 (\\x7fELF)")
            }
            LoadError::Truncated { what, need, len } => {
                write!(f, "the file is truncated: its {what} needs {need} bytes, the file has {len}")
            }
            LoadError::BadClass(c) => write!(f, "e_ident[EI_CLASS] is {c}, neither ELFCLASS32 (1) nor ELFCLASS64 (2)"),
            LoadError::WrongClass { found, expected, e_machine } => write!(
                f,
                "an {found} file for {} (e_machine {e_machine}): this hypervisor runs {expected} files for it",
                machine_name(e_machine)
            ),
            LoadError::WrongEndianness(2) => {
                f.write_str("a big-endian file (EI_DATA 2): the guest must be little-endian (EI_DATA 1)")
            }
            LoadError::WrongEndianness(d) => {
                write!(f, "e_ident[EI_DATA] is {d}: the guest must be little-endian (EI_DATA 1)")
            }
            LoadError::BadVersion(v) => write!(f, "ELF version {v}, not 1 (EV_CURRENT)"),
            LoadError::WrongMachine { found, expected } => write!(
                f,
                "the file is for {} (e_machine {found}), but this hypervisor runs {expected} guests",
                machine_name(found)
            ),
            LoadError::NotExecutable { e_type } => write!(
                f,
                "the file is {} (e_type {e_type}): only an executable (ET_EXEC 2, or ET_DYN 3 run at its \
                 addresses) can be loaded",
                type_name(e_type)
            ),
            LoadError::BadProgramHeaderSize { found, expected } => {
                write!(f, "e_phentsize is {found}, but a program header of this class is {expected} bytes")
            }
            LoadError::TooManyProgramHeaders => f.write_str(
                "e_phnum is PN_XNUM (0xffff): more than 65534 program headers, which this loader does not take",
            ),
            LoadError::ProgramHeadersOutsideFile { offset, count, len } => write!(
                f,
                "the program header table ({count} entries at offset {offset:#x}) lies outside the file ({len:#x} \
                 bytes)"
            ),
            LoadError::NoLoadableSegment => f.write_str(
                "no loadable segment: the file has no PT_LOAD program header with a non-zero p_memsz, so there is \
                 nothing to run",
            ),
            LoadError::TooManySegments { count } => {
                write!(f, "{count} loadable segments: this loader takes at most {MAX_SEGMENTS}")
            }
            LoadError::FileSizeExceedsMemSize { index, filesz, memsz } => {
                write!(f, "segment {index}: p_filesz {filesz:#x} is larger than p_memsz {memsz:#x}")
            }
            LoadError::SegmentOutsideFile { index, offset, filesz, len } => write!(
                f,
                "segment {index}: its bytes (offset {offset:#x}, p_filesz {filesz:#x}) lie outside the file ({len:#x} \
                 bytes)"
            ),
            LoadError::SegmentOutsideRam { index, gpa, memsz, ram } => {
                write!(f, "segment {index} at {} lies outside guest RAM {:#x}..{:#x}", Span(gpa, memsz), ram.0, ram.1)
            }
            LoadError::RawOutsideRam { gpa, len, ram } => write!(
                f,
                "the raw image, loaded at {}, does not fit guest RAM {:#x}..{:#x}",
                Span(gpa, len),
                ram.0,
                ram.1
            ),
            LoadError::Overlap { first, first_range, second, second_range } => write!(
                f,
                "segments {first} ({:#x}..{:#x}) and {second} ({:#x}..{:#x}) overlap in guest memory",
                first_range.0, first_range.1, second_range.0, second_range.1
            ),
            LoadError::EntryOutsideSegments { entry } => {
                write!(f, "the entry point {entry:#x} is not inside any loadable segment")
            }
            LoadError::NoRoomFor { what, size } => write!(
                f,
                "no room for the {what} ({size:#x} bytes): the segments take every place in guest RAM it could go"
            ),
            LoadError::Malformed { what } => write!(f, "malformed {what}"),
        }
    }
}

impl core::error::Error for LoadError {}

/// One loadable segment of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Index of its program header (0 for a raw image).
    pub index: usize,
    /// Where it goes in guest-physical memory (`p_paddr`).
    pub gpa: u64,
    /// Its virtual address (`p_vaddr`), used only to find the entry point.
    pub vaddr: u64,
    /// Where its bytes start in the file (`p_offset`).
    pub offset: u64,
    /// Its bytes in the file (`p_filesz` of them).
    pub bytes: &'a [u8],
    /// Its size in memory (`p_memsz`): the bytes, then zeros.
    pub memsz: u64,
}

impl Segment<'_> {
    /// One past its last guest-physical byte (checked by the plan not to overflow).
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.memsz)
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.gpa < end && start < self.end()
    }
}

/// Where [`LoadPlan::free_slot`] looks first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// The lowest free address.
    Lowest,
    /// The highest free address.
    Highest,
}

/// A guest file that passed every check: what to copy where, and where to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadPlan<'a> {
    /// The guest-physical entry point (inside a segment).
    pub entry: u64,
    /// The segments with a non-zero memory size, in program header order; they do not overlap
    /// and lie inside guest RAM.
    pub segments: Vec<Segment<'a>>,
    /// Guest RAM, `start..end`.
    pub ram: (u64, u64),
}

impl LoadPlan<'_> {
    /// The first segment that overlaps `start..end`.
    pub fn segment_in(&self, start: u64, end: u64) -> Option<&Segment<'_>> {
        self.segments.iter().find(|s| s.overlaps(start, end))
    }

    /// A `size`-byte place, aligned to `align` (a power of two), inside both guest RAM and
    /// `within`, that no segment overlaps: the lowest or the highest such place.
    pub fn free_slot(&self, within: Range<u64>, size: u64, align: u64, place: Place) -> Option<u64> {
        let start = within.start.max(self.ram.0);
        let end = within.end.min(self.ram.1);
        let mask = align.max(1).checked_next_power_of_two()? - 1;
        if size == 0 || end.checked_sub(start)? < size {
            return None;
        }
        // Each step moves past one segment, so this ends within segments + 1 steps.
        match place {
            Place::Lowest => {
                let mut at = start.checked_add(mask)? & !mask;
                loop {
                    let top = at.checked_add(size).filter(|&t| t <= end)?;
                    match self.segment_in(at, top) {
                        None => return Some(at),
                        Some(s) => at = s.end().checked_add(mask)? & !mask,
                    }
                }
            }
            Place::Highest => {
                let mut at = (end - size) & !mask;
                loop {
                    if at < start {
                        return None;
                    }
                    match self.segment_in(at, at + size) {
                        None => return Some(at),
                        Some(s) => at = s.gpa.checked_sub(size)? & !mask,
                    }
                }
            }
        }
    }

    /// [`LoadPlan::free_slot`] trying each alignment of `aligns` in turn (the first that finds a
    /// place wins), or the [`LoadError::NoRoomFor`] refusal naming `what`.
    pub fn place(
        &self,
        what: &'static str,
        within: Range<u64>,
        size: u64,
        aligns: &[u64],
        place: Place,
    ) -> Result<u64, LoadError> {
        aligns
            .iter()
            .find_map(|&a| self.free_slot(within.clone(), size, a, place))
            .ok_or(LoadError::NoRoomFor { what, size })
    }
}

/// Whether `file` starts with the ELF magic.
pub fn is_elf(file: &[u8]) -> bool {
    file.starts_with(abi::ELFMAGIC.as_slice())
}

fn truncated(what: &'static str, need: u64, file: &[u8]) -> LoadError {
    LoadError::Truncated { what, need, len: file.len() as u64 }
}

/// The checked loading plan of an ELF executable for `machine` in guest RAM `ram`.
pub fn plan_elf(file: &[u8], machine: Machine, ram: Range<u64>) -> Result<LoadPlan<'_>, LoadError> {
    plan_elf_entered_at(file, machine, ram, None)
}

/// [`plan_elf`] for a file entered at the guest-physical address `physical_entry` rather than at
/// its header's `e_entry` (which is then not checked): the entry must lie inside a segment's
/// `p_paddr .. p_paddr + p_memsz`. A PVH kernel's entry comes from its notes (`crate::pvh`).
pub fn plan_elf_entered_at(
    file: &[u8],
    machine: Machine,
    ram: Range<u64>,
    physical_entry: Option<u64>,
) -> Result<LoadPlan<'_>, LoadError> {
    if file.is_empty() {
        return Err(LoadError::Empty);
    }
    if !is_elf(file) {
        if abi::ELFMAGIC.starts_with(file) {
            return Err(truncated("ELF identification (e_ident)", abi::EI_NIDENT as u64, file));
        }
        let mut start = [0u8; 4];
        let len = file.len().min(4);
        start[..len].copy_from_slice(&file[..len]);
        return Err(LoadError::NotElf { start, len });
    }
    let ident = file.get(..abi::EI_NIDENT).ok_or(truncated("ELF identification (e_ident)", 16, file))?;
    let (class, header_len, ph_len) = match ident[abi::EI_CLASS] {
        abi::ELFCLASS32 => (Class::Elf32, 52u64, 32u16),
        abi::ELFCLASS64 => (Class::Elf64, 64, 56),
        c => return Err(LoadError::BadClass(c)),
    };
    if ident[abi::EI_DATA] != abi::ELFDATA2LSB {
        return Err(LoadError::WrongEndianness(ident[abi::EI_DATA]));
    }
    if ident[abi::EI_VERSION] != abi::EV_CURRENT {
        return Err(LoadError::BadVersion(u64::from(ident[abi::EI_VERSION])));
    }
    let tail = file.get(abi::EI_NIDENT..header_len as usize).ok_or(truncated("ELF header", header_len, file))?;
    let malformed = |_| LoadError::Malformed { what: "ELF header" };
    let parsed = ::elf::file::parse_ident::<LittleEndian>(ident).map_err(malformed)?;
    let eh: FileHeader<LittleEndian> = FileHeader::parse_tail(parsed, tail).map_err(malformed)?;
    if eh.version != u32::from(abi::EV_CURRENT) {
        return Err(LoadError::BadVersion(u64::from(eh.version)));
    }
    let expected =
        machine.class_for(eh.e_machine).ok_or(LoadError::WrongMachine { found: eh.e_machine, expected: machine })?;
    if expected != class {
        return Err(LoadError::WrongClass { found: class, expected, e_machine: eh.e_machine });
    }
    if eh.e_type != abi::ET_EXEC && eh.e_type != abi::ET_DYN {
        return Err(LoadError::NotExecutable { e_type: eh.e_type });
    }
    if eh.e_phoff == 0 || eh.e_phnum == 0 {
        return Err(LoadError::NoLoadableSegment);
    }
    if eh.e_phnum == abi::PN_XNUM {
        return Err(LoadError::TooManyProgramHeaders);
    }
    if eh.e_phentsize != ph_len {
        return Err(LoadError::BadProgramHeaderSize { found: eh.e_phentsize, expected: ph_len });
    }
    let elf_class = if class == Class::Elf32 { ElfClass::ELF32 } else { ElfClass::ELF64 };
    debug_assert_eq!(ProgramHeader::size_for(elf_class), usize::from(ph_len));
    let table = eh
        .e_phoff
        .checked_add(u64::from(eh.e_phnum) * u64::from(ph_len))
        .and_then(|end| file.get(usize::try_from(eh.e_phoff).ok()?..usize::try_from(end).ok()?))
        .ok_or(LoadError::ProgramHeadersOutsideFile {
            offset: eh.e_phoff,
            count: eh.e_phnum,
            len: file.len() as u64,
        })?;
    let headers = SegmentTable::new(LittleEndian, elf_class, table);
    let loads = || headers.iter().enumerate().filter(|(_, ph)| ph.p_type == abi::PT_LOAD);
    let count = loads().filter(|(_, ph)| ph.p_memsz != 0 || ph.p_filesz != 0).count();
    if count > MAX_SEGMENTS {
        return Err(LoadError::TooManySegments { count });
    }
    let mut segments = Vec::with_capacity(count);
    for (index, ph) in loads() {
        let (offset, filesz, memsz, gpa) = (ph.p_offset, ph.p_filesz, ph.p_memsz, ph.p_paddr);
        if filesz > memsz {
            return Err(LoadError::FileSizeExceedsMemSize { index, filesz, memsz });
        }
        if memsz == 0 {
            continue;
        }
        let bytes = offset
            .checked_add(filesz)
            .and_then(|end| file.get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?))
            .ok_or(LoadError::SegmentOutsideFile { index, offset, filesz, len: file.len() as u64 })?;
        if gpa < ram.start || gpa.checked_add(memsz).is_none_or(|end| end > ram.end) {
            return Err(LoadError::SegmentOutsideRam { index, gpa, memsz, ram: (ram.start, ram.end) });
        }
        segments.push(Segment { index, gpa, vaddr: ph.p_vaddr, offset, bytes, memsz });
    }
    if segments.is_empty() {
        return Err(LoadError::NoLoadableSegment);
    }
    for (i, a) in segments.iter().enumerate() {
        if let Some(b) = segments[i + 1..].iter().find(|b| b.overlaps(a.gpa, a.end())) {
            return Err(LoadError::Overlap {
                first: a.index,
                first_range: (a.gpa, a.end()),
                second: b.index,
                second_range: (b.gpa, b.end()),
            });
        }
    }
    let entry = match physical_entry {
        None => segments
            .iter()
            .find_map(|s| eh.e_entry.checked_sub(s.vaddr).filter(|&d| d < s.memsz).map(|d| s.gpa + d))
            .ok_or(LoadError::EntryOutsideSegments { entry: eh.e_entry })?,
        Some(entry) => segments
            .iter()
            .any(|s| entry.checked_sub(s.gpa).is_some_and(|d| d < s.memsz))
            .then_some(entry)
            .ok_or(LoadError::EntryOutsideSegments { entry })?,
    };
    Ok(LoadPlan { entry, segments, ram: (ram.start, ram.end) })
}

/// The plan of a raw image: the whole file at `gpa`, entered at its first byte.
pub fn plan_raw(file: &[u8], gpa: u64, ram: Range<u64>) -> Result<LoadPlan<'_>, LoadError> {
    let len = file.len() as u64;
    if file.is_empty() {
        return Err(LoadError::Empty);
    }
    if gpa < ram.start || gpa.checked_add(len).is_none_or(|end| end > ram.end) {
        return Err(LoadError::RawOutsideRam { gpa, len, ram: (ram.start, ram.end) });
    }
    let segment = Segment { index: 0, gpa, vaddr: gpa, offset: 0, bytes: file, memsz: len };
    Ok(LoadPlan { entry: gpa, segments: alloc::vec![segment], ram: (ram.start, ram.end) })
}

/// [`plan_elf`] for a file that starts with the ELF magic, [`plan_raw`] at `raw_gpa` otherwise.
pub fn plan_elf_or_raw(
    file: &[u8],
    machine: Machine,
    ram: Range<u64>,
    raw_gpa: u64,
) -> Result<LoadPlan<'_>, LoadError> {
    if is_elf(file) {
        plan_elf(file, machine, ram)
    } else {
        plan_raw(file, raw_gpa, ram)
    }
}
