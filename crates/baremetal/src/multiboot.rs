//! Multiboot (v1) for a hypervisor that loads multiboot guests: the guest's loading plan
//! ([`plan_guest`]: the ELF checks of [`crate::elf`], the header check, a place for the boot
//! information), the boot information it gives the guest, and the kernel command line the
//! hypervisor itself is given (Multiboot Specification 0.6.96).
//!
//! A multiboot file carries a header in its first 8192 bytes, 4-byte aligned: the magic
//! 0x1BADB002, flags, and a checksum that makes the three sum to zero (3.1.1, 3.1.2). Flags 0-15
//! are requirements: a loader that cannot meet one must refuse the file. This loader meets bit 0
//! (page-aligned modules: it loads none) and bit 1 (memory information); it refuses bit 2 (video
//! mode information) and the other requirement bits, which it does not know, and bit 16 (load
//! addresses in the header instead of the ELF's program headers, the "a.out kludge"), which it
//! does not implement: it would load the file differently from GRUB.

use crate::elf::{self, LoadError, LoadPlan, Machine, Place};
use core::fmt;

/// The header's magic (3.1.2).
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The magic a multiboot loader leaves in EAX (3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie inside the file's first this many bytes (3.1.1).
pub const SEARCH_LEN: usize = 8192;
/// Flag 0: modules aligned on 4 KiB pages.
pub const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Flag 1: memory information (mem_lower/mem_upper, memory map).
pub const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Flag 2: video mode information.
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Flag 16: the header's address fields say where to load the file (the "a.out kludge").
pub const FLAG_ADDRESS_FIELDS: u32 = 1 << 16;
/// The flags this loader honours.
pub const SUPPORTED_FLAGS: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO;
/// The flags a loader must honour or refuse: the requirements (0-15) and the address fields.
const MUST_HONOUR: u32 = 0xffff | FLAG_ADDRESS_FIELDS;

/// A valid multiboot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Its offset in the file.
    pub offset: usize,
    /// Its flags.
    pub flags: u32,
}

/// Why a file's multiboot header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    /// No magic at a 4-byte boundary in the first [`SEARCH_LEN`] bytes.
    NotFound {
        /// The bytes searched.
        searched: usize,
    },
    /// The only magic found has a checksum that does not make the header sum to zero.
    BadChecksum {
        /// Its offset.
        offset: usize,
        /// Its flags.
        flags: u32,
        /// Its checksum.
        checksum: u32,
    },
    /// The header asks for something this loader does not provide.
    UnsupportedFlags {
        /// Its offset.
        offset: usize,
        /// Its flags.
        flags: u32,
        /// The flags this loader cannot honour.
        unsupported: u32,
    },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HeaderError::NotFound { searched } => write!(
                f,
                "no multiboot header: the magic {HEADER_MAGIC:#x} is not at any 4-byte boundary of the file's first \
                 {searched} bytes"
            ),
            HeaderError::BadChecksum { offset, flags, checksum } => write!(
                f,
                "the multiboot header at offset {offset:#x} has a bad checksum: magic {HEADER_MAGIC:#x} + flags \
                 {flags:#x} + checksum {checksum:#x} = {:#x}, not 0",
                HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum)
            ),
            HeaderError::UnsupportedFlags { offset, flags, unsupported } => {
                write!(f, "the multiboot header at offset {offset:#x} (flags {flags:#x}) asks for")?;
                let mut first = true;
                for bit in 0..32 {
                    if unsupported & (1 << bit) == 0 {
                        continue;
                    }
                    f.write_str(if first { " " } else { ", " })?;
                    first = false;
                    match 1u32 << bit {
                        FLAG_VIDEO_MODE => f.write_str("video mode information (flag 2)")?,
                        FLAG_ADDRESS_FIELDS => {
                            f.write_str("load addresses from the header instead of the ELF (flag 16, a.out kludge)")?
                        }
                        _ => write!(f, "requirement flag {bit}, which the specification does not define")?,
                    }
                }
                f.write_str("; this loader provides only page-aligned modules (flag 0) and memory information (flag 1)")
            }
        }
    }
}

impl core::error::Error for HeaderError {}

fn word(file: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(file.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// Finds and checks the multiboot header of `file`, as GRUB does: the first magic at a 4-byte
/// boundary of the first [`SEARCH_LEN`] bytes whose checksum is right.
pub fn find_header(file: &[u8]) -> Result<Header, HeaderError> {
    let searched = file.len().min(SEARCH_LEN);
    let mut bad = None;
    for offset in (0..searched.saturating_sub(11)).step_by(4) {
        if word(file, offset) != Some(HEADER_MAGIC) {
            continue;
        }
        let (Some(flags), Some(checksum)) = (word(file, offset + 4), word(file, offset + 8)) else { continue };
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            bad.get_or_insert(HeaderError::BadChecksum { offset, flags, checksum });
            continue;
        }
        let unsupported = flags & MUST_HONOUR & !SUPPORTED_FLAGS;
        if unsupported != 0 {
            return Err(HeaderError::UnsupportedFlags { offset, flags, unsupported });
        }
        return Ok(Header { offset, flags });
    }
    Err(bad.unwrap_or(HeaderError::NotFound { searched }))
}

/// Size of [`guest_information`]: the information structure up to the memory map fields (52
/// bytes, padded to 56), then a three-entry memory map.
pub const GUEST_INFO_LEN: usize = 128;

/// The multiboot information for a guest with `ram` bytes of RAM from address 0, for the
/// guest-physical address `at` (3.3): flags 0 (mem_lower, mem_upper) and 6 (memory map). The
/// memory map follows the structure at `at + 56`: 0..0x9fc00 available, 0x9fc00..0xa0000
/// reserved, 0x100000..`ram` available.
pub fn guest_information(at: u32, ram: u64) -> [u8; GUEST_INFO_LEN] {
    const MMAP: usize = 56;
    let mut b = [0u8; GUEST_INFO_LEN];
    let mut put = |o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put(0, 1 | (1 << 6));
    put(4, 639);
    put(8, u32::try_from(ram.saturating_sub(0x10_0000) / 1024).unwrap_or(u32::MAX));
    put(44, (GUEST_INFO_LEN - MMAP) as u32);
    put(48, at.wrapping_add(MMAP as u32));
    let regions: [(u64, u64, u32); 3] =
        [(0, 0x9_fc00, 1), (0x9_fc00, 0x400, 2), (0x10_0000, ram.saturating_sub(0x10_0000), 1)];
    for (i, (base, len, kind)) in regions.iter().enumerate() {
        let e = &mut b[MMAP + 24 * i..MMAP + 24 * (i + 1)];
        e[0..4].copy_from_slice(&20u32.to_le_bytes());
        e[4..12].copy_from_slice(&base.to_le_bytes());
        e[12..20].copy_from_slice(&len.to_le_bytes());
        e[20..24].copy_from_slice(&kind.to_le_bytes());
    }
    b
}

/// The value of the first `key=value` word of a kernel command line (`Some(b"")` for a bare
/// `key`); words are separated by spaces.
pub fn cmdline_arg<'a>(cmdline: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let key = key.as_bytes();
    cmdline.split(|&c| c == b' ').find_map(|w| match w.strip_prefix(key)? {
        [] => Some(&[][..]),
        [b'=', v @ ..] => Some(v),
        _ => None,
    })
}

/// Why a multiboot guest file is refused: its ELF, or its multiboot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestError {
    /// The ELF file (or where the boot information would go).
    Load(LoadError),
    /// The multiboot header.
    Header(HeaderError),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::Load(e) => e.fmt(f),
            GuestError::Header(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for GuestError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            GuestError::Load(e) => Some(e),
            GuestError::Header(e) => Some(e),
        }
    }
}

/// A multiboot guest that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestPlan<'a> {
    /// Its segments and (32-bit) entry point.
    pub load: LoadPlan<'a>,
    /// Its multiboot header.
    pub header: Header,
    /// Where [`guest_information`] goes: where no segment is, in conventional memory above the
    /// first page if there is room, else above 1 MiB.
    pub info_at: u32,
}

/// The loading plan of a multiboot ELF guest (x86: ELF32 i386 or ELF64 x86-64) in `ram` bytes
/// of guest RAM from address 0 (at most 4 GiB: the guest starts in 32-bit mode): the ELF checks
/// of [`elf::plan_elf`], then the multiboot header, then a place for the boot information.
pub fn plan_guest(file: &[u8], ram: u64) -> Result<GuestPlan<'_>, GuestError> {
    let ram = ram.min(1 << 32);
    let load = elf::plan_elf(file, Machine::X86, 0..ram).map_err(GuestError::Load)?;
    let header = find_header(file).map_err(GuestError::Header)?;
    let size = GUEST_INFO_LEN as u64;
    let info_at = load
        .free_slot(0x1000..0x9_fc00, size, 8, Place::Lowest)
        .or_else(|| load.free_slot(0x10_0000..ram, size, 8, Place::Lowest))
        .and_then(|at| u32::try_from(at).ok())
        .ok_or(GuestError::Load(LoadError::NoRoomFor { what: "multiboot information", size }))?;
    Ok(GuestPlan { load, header, info_at })
}
