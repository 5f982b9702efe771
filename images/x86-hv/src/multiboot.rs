//! Reading the multiboot (v1) information GRUB passes (Multiboot Specification 0.6.96, 3.3).

/// The multiboot magic in EAX at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

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
