//! Reading the multiboot (v1) information GRUB passes (Multiboot Specification 0.6.96, 3.3).

pub use twostage_baremetal::multiboot::BOOTLOADER_MAGIC;

/// The longest kernel command line read.
const CMDLINE_MAX: u64 = 4096;

/// One memory-map entry.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRegion {
    /// Physical base.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Type: 1 = available RAM.
    pub kind: u32,
}

/// A module GRUB loaded (`module` command).
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The parts of the information structure the image uses.
pub struct BootInfo {
    info: u64,
}

fn rd8(a: u64) -> u8 {
    // SAFETY: GRUB's information structures and strings lie in low memory, which the boot
    // identity map covers; they are only read.
    unsafe { (a as *const u8).read() }
}

fn rd32(a: u64) -> u32 {
    // SAFETY: GRUB's information structures lie in low memory, which the boot identity map
    // covers; they are only read.
    unsafe { (a as *const u32).read_unaligned() }
}

fn rd64(a: u64) -> u64 {
    // SAFETY: as for `rd32`.
    unsafe { (a as *const u64).read_unaligned() }
}

impl BootInfo {
    /// The structure at physical `info`, checked against the entry magic.
    pub fn new(magic: u32, info: u32) -> Option<Self> {
        (magic == BOOTLOADER_MAGIC).then_some(Self { info: u64::from(info) })
    }

    fn flags(&self) -> u32 {
        rd32(self.info)
    }

    /// The BIOS memory map (flags bit 6: mmap_length at offset 44, mmap_addr at 48).
    pub fn memory_map(&self) -> impl Iterator<Item = MemoryRegion> + '_ {
        let (mut at, end) = if self.flags() & (1 << 6) != 0 {
            let addr = u64::from(rd32(self.info + 48));
            (addr, addr + u64::from(rd32(self.info + 44)))
        } else {
            (0, 0)
        };
        core::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            // Each entry: size (u32, not counting itself), base_addr (u64), length (u64), type (u32).
            let size = u64::from(rd32(at));
            let r = MemoryRegion { base: rd64(at + 4), len: rd64(at + 12), kind: rd32(at + 20) };
            at += size + 4;
            Some(r)
        })
    }

    /// The kernel command line (flags bit 2: cmdline at 16, a NUL-terminated string), up to
    /// its first [`CMDLINE_MAX`] bytes.
    pub fn cmdline(&self) -> Option<&'static [u8]> {
        if self.flags() & (1 << 2) == 0 {
            return None;
        }
        let at = u64::from(rd32(self.info + 16));
        if at == 0 {
            return None;
        }
        let len = (0..CMDLINE_MAX).find(|&i| rd8(at + i) == 0).unwrap_or(CMDLINE_MAX);
        // SAFETY: `len` bytes from `at`, each just read through the identity map; GRUB's
        // command line is not written again while the image runs.
        Some(unsafe { core::slice::from_raw_parts(at as *const u8, len as usize) })
    }

    /// The modules (flags bit 3: mods_count at 20, mods_addr at 24; 16-byte entries).
    pub fn modules(&self) -> impl Iterator<Item = Module> + '_ {
        let (count, addr) =
            if self.flags() & (1 << 3) != 0 { (rd32(self.info + 20), u64::from(rd32(self.info + 24))) } else { (0, 0) };
        (0..u64::from(count)).map(move |i| {
            let e = addr + 16 * i;
            Module { start: u64::from(rd32(e)), end: u64::from(rd32(e + 4)) }
        })
    }
}
