//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst of Linux 6.1, "THE LINUX/x86 BOOT
//! PROTOCOL" and "64-bit BOOT PROTOCOL"): the bzImage setup header checked, the zero page
//! (`struct boot_params`) with its e820 memory map built, and the guest memory plan of a 64-bit
//! entry (identity page tables, a GDT with `__BOOT_CS`/`__BOOT_DS`, command line, initrd).
//!
//! Pure code over byte slices, tested on the host; the x86 hypervisor (`twostage-hv-x86`) copies
//! what [`plan_bzimage`] returns into guest RAM and starts the vCPU at [`LinuxPlan::entry`] with
//! RSI = [`LinuxPlan::boot_params_at`], in long mode, CR3 = [`LinuxPlan::cr3`]. xtask runs the
//! same checks before it builds an ISO, so a malformed file is refused with the same message.

use core::fmt;
use core::ops::Range;

/// "HdrS" at offset 0x202 (boot.rst, "The Real-Mode Kernel Header").
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// The oldest protocol version accepted: 2.12 (xloadflags and the 64-bit entry are described
/// from 2.12 on).
pub const MIN_VERSION: u16 = 0x020c;
/// loadflags bit 0: LOADED_HIGH, the protected-mode code is loaded at 0x100000.
pub const LOADED_HIGH: u8 = 1 << 0;
/// xloadflags bit 0: XLF_KERNEL_64, the kernel has the legacy 64-bit entry point at 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `__BOOT_CS`: the code selector the 32- and 64-bit boot protocols require (GDT entry 2).
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`: the data selector (GDT entry 3).
pub const BOOT_DS: u16 = 0x18;
/// Where the protected-mode kernel is loaded (LOADED_HIGH).
pub const KERNEL_AT: u64 = 0x10_0000;
/// e820 type 1: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type 2: reserved.
pub const E820_RESERVED: u32 = 2;
/// e820 type 3: ACPI tables (reclaimable after they are read).
pub const E820_ACPI: u32 = 3;
/// e820 type 4: ACPI non-volatile storage.
pub const E820_NVS: u32 = 4;
/// Where the firmware's low-memory areas end: the first MiB (the BIOS data areas, the EBDA, the
/// VGA hole, the option and BIOS ROMs).
pub const LOW_MEMORY_END: u64 = 0x10_0000;
/// The legacy hole (VGA memory, option and BIOS ROMs) reported reserved inside RAM.
pub const LEGACY_HOLE: Range<u64> = 0xa_0000..0x10_0000;

/// Where the hypervisor puts what it builds, all in the first 64 KiB (no kernel lives there).
const GDT_AT: u64 = 0x6000;
const BOOT_PARAMS_AT: u64 = 0x7000;
const CMDLINE_AT: u64 = 0x8000;
/// Longest command line accepted (bytes, without the NUL): the page it is placed in.
pub const CMDLINE_MAX: usize = 4095;
const PML4_AT: u64 = 0x9000;
/// e820 entries that fit `boot_params.e820_table` (E820_MAX_ENTRIES_ZEROPAGE).
pub const E820_MAX: usize = 128;

// Offsets in the file and in boot_params (arch/x86/include/uapi/asm/bootparam.h).
const SETUP_SECTS: usize = 0x1f1;
const BOOT_FLAG: usize = 0x1fe;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const CODE32_START: usize = 0x214;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22c;
const XLOADFLAGS: usize = 0x236;
const CMDLINE_SIZE: usize = 0x238;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;
const ACPI_RSDP_ADDR: usize = 0x070;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;

/// Why a file is not a bzImage this loader can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BzImageError {
    /// Shorter than the setup header, or than the setup sectors it announces.
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes there.
        len: u64,
    },
    /// No "HdrS" at 0x202 (or no 0xAA55 boot flag at 0x1FE): not a Linux x86 kernel.
    NotBzImage,
    /// Boot protocol older than 2.12.
    OldProtocol(u16),
    /// loadflags without LOADED_HIGH (a zImage).
    NotLoadedHigh,
    /// xloadflags without XLF_KERNEL_64: no 64-bit entry point.
    No64BitEntry,
    /// The kernel (loaded at 1 MiB, decompressing at `pref_address`, `init_size` bytes each)
    /// does not fit the guest RAM.
    DoesNotFit {
        /// RAM the kernel needs (end address).
        needed: u64,
        /// The guest RAM.
        ram: u64,
    },
    /// The command line is longer than the kernel accepts (`cmdline_size`) or than the page
    /// reserved for it.
    CommandLineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line holds a NUL byte.
    CommandLineNul,
    /// No room for the initrd below `initrd_addr_max` and above the kernel.
    InitrdDoesNotFit {
        /// Its size.
        size: u64,
    },
}

impl fmt::Display for BzImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated { needed, len } => {
                write!(f, "the bzImage is {len} bytes, shorter than the {needed} its setup header needs")
            }
            Self::NotBzImage => f.write_str("not a Linux bzImage (no \"HdrS\" setup header at 0x202)"),
            Self::OldProtocol(v) => {
                write!(f, "boot protocol {}.{:02} is older than 2.12 (no 64-bit entry described)", v >> 8, v & 0xff)
            }
            Self::NotLoadedHigh => f.write_str("the kernel is not loaded high (loadflags LOADED_HIGH clear: a zImage)"),
            Self::No64BitEntry => f.write_str("the kernel has no 64-bit entry point (xloadflags XLF_KERNEL_64 clear)"),
            Self::DoesNotFit { needed, ram } => write!(
                f,
                "the kernel needs guest RAM up to {needed:#x} ({} MiB) and the guest has {} MiB",
                needed.div_ceil(1 << 20),
                ram >> 20
            ),
            Self::CommandLineTooLong { len, max } => {
                write!(f, "the command line is {len} bytes; this kernel accepts at most {max}")
            }
            Self::CommandLineNul => f.write_str("the command line holds a NUL byte"),
            Self::InitrdDoesNotFit { size } => {
                write!(f, "no room for the {size}-byte initrd in guest RAM below initrd_addr_max, above the kernel")
            }
        }
    }
}

impl core::error::Error for BzImageError {}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// The checked setup header of a bzImage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// Boot protocol version (major << 8 | minor).
    pub version: u16,
    /// Offset of the protected-mode kernel in the file: (setup_sects + 1) * 512.
    pub kernel_offset: usize,
    /// `code32_start`: where the protected-mode kernel is loaded (0x100000 for LOADED_HIGH).
    pub code32_start: u64,
    /// `pref_address`: where the kernel decompresses itself when it is not relocatable.
    pub pref_address: u64,
    /// `init_size`: the memory the kernel needs from its load address during boot.
    pub init_size: u64,
    /// `cmdline_size`: the longest command line, without the NUL.
    pub cmdline_size: u32,
    /// `initrd_addr_max`: the highest address the initrd may reach.
    pub initrd_addr_max: u32,
    /// Length of the setup header: 0x202 + the byte at 0x201 (bytes 0x1f1.. are copied into
    /// boot_params, as boot.rst says a 64-bit loader does).
    pub header_end: usize,
}

/// Whether `file` looks like a bzImage (the "HdrS" magic at 0x202); [`parse_header`] checks it.
pub fn is_bzimage(file: &[u8]) -> bool {
    file.len() >= HEADER + 4 && u32_at(file, HEADER) == HDRS_MAGIC
}

/// Checks the setup header of `file`: magic and boot flag, protocol >= 2.12, LOADED_HIGH,
/// XLF_KERNEL_64, and a file long enough for the setup sectors it announces.
pub fn parse_header(file: &[u8]) -> Result<SetupHeader, BzImageError> {
    let len = file.len() as u64;
    if file.len() < INIT_SIZE + 4 {
        return Err(if is_bzimage(file) || file.len() < HEADER + 4 {
            BzImageError::Truncated { needed: (INIT_SIZE + 4) as u64, len }
        } else {
            BzImageError::NotBzImage
        });
    }
    if u32_at(file, HEADER) != HDRS_MAGIC || u16_at(file, BOOT_FLAG) != 0xaa55 {
        return Err(BzImageError::NotBzImage);
    }
    let version = u16_at(file, VERSION);
    if version < MIN_VERSION {
        return Err(BzImageError::OldProtocol(version));
    }
    if file[LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(BzImageError::NotLoadedHigh);
    }
    if u16_at(file, XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(BzImageError::No64BitEntry);
    }
    let sects = match file[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let kernel_offset = (sects + 1) * 512;
    if file.len() <= kernel_offset {
        return Err(BzImageError::Truncated { needed: kernel_offset as u64 + 1, len });
    }
    Ok(SetupHeader {
        version,
        kernel_offset,
        code32_start: u64::from(u32_at(file, CODE32_START)),
        pref_address: u64_at(file, PREF_ADDRESS),
        init_size: u64::from(u32_at(file, INIT_SIZE)),
        cmdline_size: u32_at(file, CMDLINE_SIZE),
        initrd_addr_max: u32_at(file, INITRD_ADDR_MAX),
        header_end: (HEADER + usize::from(file[0x201])).min(kernel_offset),
    })
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map of a guest whose address space has RAM at `ram` (sorted, disjoint ranges) and
/// device or otherwise non-RAM regions at `devices`: every RAM range usable except the legacy
/// hole ([`LEGACY_HOLE`], reserved as on a PC), every device range reserved; sorted by address.
/// Entries beyond [`E820_MAX`] are dropped (the caller's maps are far smaller).
pub fn e820_map(ram: &[Range<u64>], devices: &[Range<u64>]) -> ([E820Entry; E820_MAX], usize) {
    let mut out = [E820Entry { addr: 0, size: 0, kind: 0 }; E820_MAX];
    let mut n = 0;
    let mut push = |r: Range<u64>, kind: u32| {
        if r.end > r.start && n < E820_MAX {
            out[n] = E820Entry { addr: r.start, size: r.end - r.start, kind };
            n += 1;
        }
    };
    for r in ram {
        let before = r.start..r.end.min(LEGACY_HOLE.start);
        let hole = r.start.max(LEGACY_HOLE.start)..r.end.min(LEGACY_HOLE.end);
        let after = r.start.max(LEGACY_HOLE.end)..r.end;
        push(before, E820_RAM);
        push(hole, E820_RESERVED);
        push(after, E820_RAM);
    }
    for d in devices {
        push(d.clone(), E820_RESERVED);
    }
    out[..n].sort_unstable_by_key(|e| e.addr);
    (out, n)
}

/// The e820 map of a guest with `mem` bytes of RAM from address 0 on a PC whose firmware reported
/// `bios` (the machine's own map, as a boot loader passes it on): the firmware's layout of the
/// first MiB exactly as it reported it (RAM entries usable, its EBDA and ROM areas with their
/// types, which the hypervisor maps read-only from the machine, see `firmware_areas`), the
/// guest's RAM from 1 MiB to `mem`, and the firmware's reserved entries above the guest's RAM
/// (the BIOS ROM below 4 GiB). The firmware's own ACPI areas (types 3 and 4) above 1 MiB are
/// left out: they lie at the top of the machine's RAM, which belongs to the hypervisor, not the
/// guest. `acpi` is where the guest's copy of the tables is (`crate::acpi::guest_area`): that
/// part of the guest's RAM is an ACPI data entry (type 3), as the firmware reports its own.
/// Sorted by address; entries beyond [`E820_MAX`] are dropped.
pub fn firmware_e820(bios: &[E820Entry], mem: u64, acpi: Option<Range<u64>>) -> ([E820Entry; E820_MAX], usize) {
    let mut out = [E820Entry { addr: 0, size: 0, kind: 0 }; E820_MAX];
    let mut n = 0;
    let mut push = |start: u64, end: u64, kind: u32| {
        if end > start && n < E820_MAX {
            out[n] = E820Entry { addr: start, size: end - start, kind };
            n += 1;
        }
    };
    let low_end = LOW_MEMORY_END.min(mem);
    for e in bios {
        let end = e.addr.saturating_add(e.size);
        if e.kind == E820_RAM {
            push(e.addr, end.min(low_end), E820_RAM);
        } else {
            push(e.addr, end.min(LOW_MEMORY_END), e.kind);
            if !matches!(e.kind, E820_ACPI | E820_NVS) {
                push(e.addr.max(mem).max(LOW_MEMORY_END), end, e.kind);
            }
        }
    }
    match acpi.filter(|a| a.start >= LOW_MEMORY_END && a.start < a.end && a.end <= mem) {
        Some(a) => {
            push(LOW_MEMORY_END, a.start, E820_RAM);
            push(a.start, a.end, E820_ACPI);
            push(a.end, mem, E820_RAM);
        }
        None => push(LOW_MEMORY_END, mem, E820_RAM),
    }
    out[..n].sort_unstable_by_key(|e| e.addr);
    (out, n)
}

/// The highest usable RAM entry of `e820`, cut at `ram` (`0..ram` when the map has none): where a
/// loader's highest placement (the initrd) goes, below an ACPI area at the top of the guest's RAM.
pub fn highest_ram(e820: &[E820Entry], ram: u64) -> Range<u64> {
    e820.iter()
        .filter(|e| e.kind == E820_RAM && e.addr < ram)
        .map(|e| e.addr..e.addr.saturating_add(e.size).min(ram))
        .max_by_key(|r| r.end)
        .unwrap_or(0..ram)
}

/// `areas` (sorted, disjoint) without `hole`: the pieces of each area outside it.
pub fn without(areas: &[Range<u64>], hole: Range<u64>) -> alloc::vec::Vec<Range<u64>> {
    let mut out = alloc::vec::Vec::new();
    for a in areas {
        for piece in [a.start..a.end.min(hole.start), a.start.max(hole.end)..a.end] {
            if piece.end > piece.start {
                out.push(piece);
            }
        }
    }
    out
}

/// The firmware areas of a map from [`firmware_e820`] that the guest sees as they are in the
/// machine (read-only): everything in the first MiB that is not a RAM entry (the EBDA, the VGA
/// window and option ROMs the kernel probes, the BIOS area with its MP table), widened to whole
/// 4 KiB pages; sorted. RAM entries narrowed to whole pages never overlap them.
pub fn firmware_areas(map: &[E820Entry]) -> alloc::vec::Vec<Range<u64>> {
    let mut ram: alloc::vec::Vec<Range<u64>> = map
        .iter()
        .filter(|e| e.kind == E820_RAM && e.addr < LOW_MEMORY_END)
        .map(|e| e.addr.next_multiple_of(0x1000)..(e.addr.saturating_add(e.size).min(LOW_MEMORY_END) & !0xfff))
        .filter(|r| r.end > r.start)
        .collect();
    ram.sort_unstable_by_key(|r| r.start);
    let mut out = alloc::vec::Vec::new();
    let mut at = 0;
    for r in ram.iter().chain([&(LOW_MEMORY_END..LOW_MEMORY_END)]) {
        if r.start > at {
            out.push(at..r.start);
        }
        at = at.max(r.end);
    }
    out
}

/// Everything a 64-bit Linux entry needs in guest memory, and the entry state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxPlan<'a> {
    /// The checked header.
    pub header: SetupHeader,
    /// The protected-mode kernel's bytes, loaded at [`KERNEL_AT`].
    pub kernel: &'a [u8],
    /// The zero page, at [`LinuxPlan::boot_params_at`].
    pub boot_params: [u8; 4096],
    /// Guest-physical address of the zero page (RSI at entry).
    pub boot_params_at: u64,
    /// The command line, NUL-terminated, at [`LinuxPlan::cmdline_at`].
    pub cmdline_at: u64,
    /// The GDT (null, null, `__BOOT_CS` 64-bit code, `__BOOT_DS` data) at [`LinuxPlan::gdt_at`].
    pub gdt: [u64; 4],
    /// Where the GDT goes.
    pub gdt_at: u64,
    /// The identity page tables (PML4, PDPT, then one PD per GiB of RAM, 2 MiB pages), from
    /// [`LinuxPlan::cr3`] on, one 4 KiB table after another.
    pub tables: alloc::vec::Vec<[u64; 512]>,
    /// CR3 at entry.
    pub cr3: u64,
    /// Where [`LinuxPlan::kernel`] goes: `code32_start` ([`KERNEL_AT`] for every LOADED_HIGH kernel).
    pub kernel_at: u64,
    /// RIP at entry: the 64-bit entry, `code32_start` + 0x200.
    pub entry: u64,
    /// Where the initrd goes, when there is one.
    pub initrd_at: Option<u64>,
}

impl LinuxPlan<'_> {
    /// Names the guest's RSDP in the zero page: `acpi_rsdp_addr` (offset 0x070, "ALL" protocol
    /// versions in zero-page.rst). A kernel that reads it (the decompressor of Linux 5.0 and later
    /// does, before it would scan the BIOS areas) takes the RSDP from there.
    pub fn set_acpi_rsdp(&mut self, at: u64) {
        self.boot_params[ACPI_RSDP_ADDR..ACPI_RSDP_ADDR + 8].copy_from_slice(&at.to_le_bytes());
    }
}

/// Plans a 64-bit boot of the bzImage `file` in a guest with `ram` bytes of RAM from address 0
/// (the e820 map given as `e820`), with `cmdline` and an initrd of `initrd_len` bytes (0: none).
pub fn plan_bzimage<'a>(
    file: &'a [u8],
    ram: u64,
    e820: &[E820Entry],
    cmdline: &[u8],
    initrd_len: u64,
) -> Result<LinuxPlan<'a>, BzImageError> {
    let header = parse_header(file)?;
    let kernel = &file[header.kernel_offset..];
    let kernel_at = if header.code32_start == 0 { KERNEL_AT } else { header.code32_start };
    let kernel_end = (kernel_at + header.init_size.max(kernel.len() as u64))
        .max(header.pref_address.saturating_add(header.init_size));
    if kernel_end > ram {
        return Err(BzImageError::DoesNotFit { needed: kernel_end, ram });
    }
    let max = (header.cmdline_size as usize).min(CMDLINE_MAX);
    if cmdline.len() > max {
        return Err(BzImageError::CommandLineTooLong { len: cmdline.len(), max });
    }
    if cmdline.contains(&0) {
        return Err(BzImageError::CommandLineNul);
    }
    let initrd_at = if initrd_len == 0 {
        None
    } else {
        let room = highest_ram(e820, ram);
        let top = room.end.min(u64::from(header.initrd_addr_max) + 1);
        match top.checked_sub(initrd_len).map(|a| a & !0xfff) {
            Some(at) if at >= kernel_end.max(room.start) => Some(at),
            _ => return Err(BzImageError::InitrdDoesNotFit { size: initrd_len }),
        }
    };
    let mut bp = [0u8; 4096];
    bp[SETUP_SECTS..header.header_end].copy_from_slice(&file[SETUP_SECTS..header.header_end]);
    bp[TYPE_OF_LOADER] = 0xff;
    bp[CMD_LINE_PTR..CMD_LINE_PTR + 4].copy_from_slice(&(CMDLINE_AT as u32).to_le_bytes());
    if let Some(at) = initrd_at {
        bp[RAMDISK_IMAGE..RAMDISK_IMAGE + 4].copy_from_slice(&(at as u32).to_le_bytes());
        bp[RAMDISK_SIZE..RAMDISK_SIZE + 4].copy_from_slice(&(initrd_len as u32).to_le_bytes());
    }
    let n = e820.len().min(E820_MAX);
    bp[E820_ENTRIES] = n as u8;
    for (i, e) in e820[..n].iter().enumerate() {
        let at = E820_TABLE + 20 * i;
        bp[at..at + 8].copy_from_slice(&e.addr.to_le_bytes());
        bp[at + 8..at + 16].copy_from_slice(&e.size.to_le_bytes());
        bp[at + 16..at + 20].copy_from_slice(&e.kind.to_le_bytes());
    }
    Ok(LinuxPlan {
        header,
        kernel,
        boot_params: bp,
        boot_params_at: BOOT_PARAMS_AT,
        cmdline_at: CMDLINE_AT,
        gdt: boot_gdt(),
        gdt_at: GDT_AT,
        tables: identity_tables(PML4_AT, ram),
        cr3: PML4_AT,
        kernel_at,
        entry: kernel_at + 0x200,
        initrd_at,
    })
}

/// The boot GDT: entries 2 (`__BOOT_CS`, 64-bit code: L=1, P, S, type execute/read) and 3
/// (`__BOOT_DS`, flat 4 GiB read/write data) (Intel SDM Vol. 3A 3.4.5, Figure 3-8).
pub const fn boot_gdt() -> [u64; 4] {
    [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
}

/// Identity tables at `at` covering `ram` rounded up to GiB (at least 1, at most 512 GiB) with
/// 2 MiB pages: PML4, PDPT, then the page directories (Intel SDM Vol. 3A 5.5, Table 5-15, 5-17).
pub fn identity_tables(at: u64, ram: u64) -> alloc::vec::Vec<[u64; 512]> {
    let gibs = ram.div_ceil(1 << 30).clamp(1, 512) as usize;
    let mut t = alloc::vec![[0u64; 512]; 2 + gibs];
    // Present, writable.
    t[0][0] = (at + 0x1000) | 3;
    for g in 0..gibs {
        t[1][g] = (at + 0x2000 + 0x1000 * g as u64) | 3;
        for (i, e) in t[2 + g].iter_mut().enumerate() {
            // Present, writable, PS (2 MiB page).
            *e = (((g as u64) << 30) + ((i as u64) << 21)) | 0x83;
        }
    }
    t
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init, reason = "one RAM range, as a slice of ranges")]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// A minimal bzImage: setup header as Linux 6.1 writes it, 4 setup sectors, 64 KiB of kernel.
    fn bzimage() -> Vec<u8> {
        let mut f = alloc::vec![0u8; 5 * 512 + 0x10000];
        f[SETUP_SECTS] = 4;
        f[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x201] = 0x6a;
        f[HEADER..HEADER + 4].copy_from_slice(b"HdrS");
        f[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        f[LOADFLAGS] = LOADED_HIGH;
        f[CODE32_START..CODE32_START + 4].copy_from_slice(&0x10_0000u32.to_le_bytes());
        f[INITRD_ADDR_MAX..INITRD_ADDR_MAX + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        f[XLOADFLAGS..XLOADFLAGS + 2].copy_from_slice(&(XLF_KERNEL_64 | 2).to_le_bytes());
        f[CMDLINE_SIZE..CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        f[PREF_ADDRESS..PREF_ADDRESS + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[INIT_SIZE..INIT_SIZE + 4].copy_from_slice(&(28u32 << 20).to_le_bytes());
        f
    }

    #[test]
    fn the_header_is_checked() {
        let f = bzimage();
        let h = parse_header(&f).unwrap();
        assert_eq!((h.version, h.kernel_offset, h.pref_address), (0x020f, 5 * 512, 0x100_0000));
        assert_eq!(h.header_end, 0x26c);
        let with = |at: usize, v: &[u8]| {
            let mut g = f.clone();
            g[at..at + v.len()].copy_from_slice(v);
            parse_header(&g)
        };
        assert_eq!(with(HEADER, b"HdrX"), Err(BzImageError::NotBzImage));
        assert_eq!(with(VERSION, &0x020bu16.to_le_bytes()), Err(BzImageError::OldProtocol(0x020b)));
        assert_eq!(with(LOADFLAGS, &[0]), Err(BzImageError::NotLoadedHigh));
        assert_eq!(with(XLOADFLAGS, &[2, 0]), Err(BzImageError::No64BitEntry));
        assert_eq!(parse_header(&f[..0x300]), Err(BzImageError::Truncated { needed: 5 * 512 + 1, len: 0x300 }));
        assert_eq!(parse_header(&f[..5 * 512]), Err(BzImageError::Truncated { needed: 5 * 512 + 1, len: 5 * 512 }));
        assert_eq!(parse_header(&[0u8; 100]), Err(BzImageError::Truncated { needed: 0x264, len: 100 }));
        assert_eq!(parse_header(&[0x7fu8; 0x1000]), Err(BzImageError::NotBzImage));
        assert!(!is_bzimage(b"\x7fELF"));
    }

    #[test]
    fn e820_follows_the_address_space() {
        let (m, n) = e820_map(&[0..128 << 20], &[0xfee0_0000..0xfee0_1000]);
        assert_eq!(
            &m[..n],
            &[
                E820Entry { addr: 0, size: 0xa_0000, kind: E820_RAM },
                E820Entry { addr: 0xa_0000, size: 0x6_0000, kind: E820_RESERVED },
                E820Entry { addr: 0x10_0000, size: (128 << 20) - 0x10_0000, kind: E820_RAM },
                E820Entry { addr: 0xfee0_0000, size: 0x1000, kind: E820_RESERVED },
            ]
        );
    }

    /// The map Bochs' BIOS gives a 194 MiB machine (as GRUB passes it on).
    fn bochs_bios() -> Vec<E820Entry> {
        let e = |addr, end: u64, kind| E820Entry { addr, size: end - addr, kind };
        alloc::vec![
            e(0, 0x9_f000, E820_RAM),
            e(0x9_f000, 0xa_0000, E820_RESERVED),
            e(0xe_8000, 0x10_0000, E820_RESERVED),
            e(0x10_0000, 0xc1f_0000, E820_RAM),
            e(0xc1f_0000, 0xc20_0000, E820_ACPI),
            e(0xfffc_0000, 0x1_0000_0000, E820_RESERVED),
        ]
    }

    #[test]
    fn the_firmware_layout_is_kept_and_the_ram_is_the_guests() {
        let bios = bochs_bios();
        let (m, n) = firmware_e820(&bios, 128 << 20, None);
        let e = |addr, end: u64, kind| E820Entry { addr, size: end - addr, kind };
        assert_eq!(
            &m[..n],
            &[
                e(0, 0x9_f000, E820_RAM),
                e(0x9_f000, 0xa_0000, E820_RESERVED),
                e(0xe_8000, 0x10_0000, E820_RESERVED),
                e(0x10_0000, 128 << 20, E820_RAM),
                e(0xfffc_0000, 0x1_0000_0000, E820_RESERVED),
            ]
        );
        assert_eq!(firmware_areas(&m[..n]), [0x9_f000..0x10_0000]);
        // A firmware area that does not start or end on a page is widened to whole pages; a RAM
        // entry of the firmware's above the guest's RAM is not the guest's.
        let odd = [e(0, 0x9_fc00, E820_RAM), e(0x9_fc00, 0xa_0000, E820_RESERVED), e(0x10_0000, 1 << 30, E820_RAM)];
        let (m, n) = firmware_e820(&odd, 64 << 20, None);
        assert_eq!(&m[..n], &[odd[0], odd[1], e(0x10_0000, 64 << 20, E820_RAM)]);
        assert_eq!(firmware_areas(&m[..n]), [0x9_f000..0x10_0000]);
        let split = [e(0, 0x1000, E820_RAM), e(0x2800, 0x8000, E820_RAM), e(0x10_0000, 1 << 30, E820_RAM)];
        let (m, n) = firmware_e820(&split, 64 << 20, None);
        assert_eq!(firmware_areas(&m[..n]), [0x1000..0x3000, 0x8000..0x10_0000]);
        // A reserved range the guest's RAM covers is the guest's RAM.
        let (m, n) = firmware_e820(&[e(0x10_0000, 0x20_0000, E820_RESERVED)], 64 << 20, None);
        assert_eq!(&m[..n], &[e(0x10_0000, 64 << 20, E820_RAM)]);
    }

    #[test]
    fn the_guests_acpi_area_is_an_acpi_entry_and_the_initrd_stays_below_it() {
        let bios = bochs_bios();
        let e = |addr, end: u64, kind| E820Entry { addr, size: end - addr, kind };
        let acpi = 0x7ff_0000..0x800_0000;
        let (m, n) = firmware_e820(&bios, 128 << 20, Some(acpi.clone()));
        assert_eq!(
            &m[..n],
            &[
                e(0, 0x9_f000, E820_RAM),
                e(0x9_f000, 0xa_0000, E820_RESERVED),
                e(0xe_8000, 0x10_0000, E820_RESERVED),
                e(0x10_0000, 0x7ff_0000, E820_RAM),
                e(0x7ff_0000, 0x800_0000, E820_ACPI),
                e(0xfffc_0000, 0x1_0000_0000, E820_RESERVED),
            ]
        );
        // An area not inside the guest's RAM above 1 MiB is not reported.
        let (m2, n2) = firmware_e820(&bios, 64 << 20, Some(acpi));
        assert!(!m2[..n2].iter().any(|x| x.kind == E820_ACPI));
        assert_eq!(highest_ram(&m[..n], 128 << 20), 0x10_0000..0x7ff_0000);
        let f = bzimage();
        let mut p = plan_bzimage(&f, 128 << 20, &m[..n], b"", 0x3000).unwrap();
        assert_eq!(p.initrd_at, Some(0x7ff_0000 - 0x3000));
        // RAM above the area is the highest entry: an initrd that does not fit there is refused
        // rather than laid over the tables.
        let above = [
            e(0x10_0000, 0x700_0000, E820_RAM),
            e(0x700_0000, 0x701_0000, E820_ACPI),
            e(0x701_0000, 0x702_0000, E820_RAM),
        ];
        assert_eq!(plan_bzimage(&bzimage(), 0x702_0000, &above, b"", 0x8000).unwrap().initrd_at, Some(0x701_8000));
        assert_eq!(
            plan_bzimage(&bzimage(), 0x702_0000, &above, b"", 0x2_0000),
            Err(BzImageError::InitrdDoesNotFit { size: 0x2_0000 })
        );
        // The RSDP named in the zero page.
        assert_eq!(u64_at(&p.boot_params, ACPI_RSDP_ADDR), 0);
        p.set_acpi_rsdp(0xf_5a10);
        assert_eq!(u64_at(&p.boot_params, ACPI_RSDP_ADDR), 0xf_5a10);
    }

    #[test]
    fn a_hole_is_cut_out_of_the_areas() {
        let areas = [0x9_f000..0xa_0000, 0xe_8000..0x10_0000];
        assert_eq!(without(&areas, 0xf_5000..0xf_6000), [0x9_f000..0xa_0000, 0xe_8000..0xf_5000, 0xf_6000..0x10_0000]);
        assert_eq!(without(&areas, 0xe_8000..0xe_9000), [0x9_f000..0xa_0000, 0xe_9000..0x10_0000]);
        assert_eq!(without(&areas, 0x9_f000..0xa_0000), [0xe_8000..0x10_0000]);
        assert_eq!(without(&areas, 0x20_0000..0x20_1000), areas);
    }

    #[test]
    fn a_plan_fills_boot_params_and_tables() {
        let f = bzimage();
        let (m, n) = e820_map(&[0..128 << 20], &[]);
        let p = plan_bzimage(&f, 128 << 20, &m[..n], b"console=ttyS0", 4096).unwrap();
        assert_eq!(p.entry, 0x10_0200);
        assert_eq!(p.kernel.len(), 0x10000);
        let bp = &p.boot_params;
        assert_eq!(&bp[HEADER..HEADER + 4], b"HdrS");
        assert_eq!(bp[TYPE_OF_LOADER], 0xff);
        assert_eq!(u32_at(bp, CMD_LINE_PTR), 0x8000);
        assert_eq!(bp[E820_ENTRIES], 3);
        assert_eq!(u64_at(bp, E820_TABLE + 20 * 2 + 8), (128 << 20) - 0x10_0000);
        let initrd = p.initrd_at.unwrap();
        assert_eq!((u32_at(bp, RAMDISK_IMAGE) as u64, u32_at(bp, RAMDISK_SIZE)), (initrd, 4096));
        assert_eq!(initrd, (128 << 20) - 4096);
        // One GiB of 2 MiB identity pages.
        assert_eq!(p.tables.len(), 3);
        assert_eq!(p.tables[0][0], 0xa003);
        assert_eq!(p.tables[1][0], 0xb003);
        assert_eq!(p.tables[2][3], (3 << 21) | 0x83);
        // __BOOT_CS is 64-bit code (L set, D clear), __BOOT_DS writable data.
        let cs = p.gdt[usize::from(BOOT_CS >> 3)];
        assert_eq!((cs >> 53) & 3, 1);
        assert_eq!((p.gdt[usize::from(BOOT_DS >> 3)] >> 40) & 0xff, 0x93);
    }

    #[test]
    fn what_does_not_fit_is_refused() {
        let f = bzimage();
        let e = plan_bzimage(&f, 32 << 20, &[], b"", 0);
        assert_eq!(e, Err(BzImageError::DoesNotFit { needed: 44 << 20, ram: 32 << 20 }));
        let long = alloc::vec![b'x'; 2048];
        assert_eq!(
            plan_bzimage(&f, 64 << 20, &[], &long, 0),
            Err(BzImageError::CommandLineTooLong { len: 2048, max: 2047 })
        );
        assert_eq!(plan_bzimage(&f, 64 << 20, &[], b"a\0b", 0), Err(BzImageError::CommandLineNul));
        assert_eq!(
            plan_bzimage(&f, 64 << 20, &[], b"", 30 << 20),
            Err(BzImageError::InitrdDoesNotFit { size: 30 << 20 })
        );
        assert!(plan_bzimage(&f, 64 << 20, &[], b"", 20 << 20).is_ok());
    }
}
