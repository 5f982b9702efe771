//! How a staged guest boots: the staging header xtask writes, the guest's RAM size, where its
//! kernel, initrd and device tree go, and the device tree itself.
//!
//! Plain code with host tests, shared by the hypervisor's loader and by xtask (which runs the
//! same checks before booting, so that a refused file never boots).
//!
//! A raw file that starts with the Linux RISC-V image header (Documentation/riscv/boot-image-header.rst:
//! `code0 code1 text_offset image_size flags version res1 res2 magic "RISCV\0\0\0" magic2 "RSC\x05"
//! res3`) is placed at RAM base + text_offset with image_size bytes reserved; any other raw file
//! goes to [`RAW_LOAD`], as before.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::Range;
use twostage_baremetal::elf::{self, LoadPlan, Machine, Place, Segment};
use twostage_baremetal::fdt::FdtWriter;

/// Where the staged file starts in host RAM.
pub const STAGE_ADDR: u64 = 0x8800_0000;
/// The staging header page, just below the file.
pub const STAGE_HEADER: u64 = STAGE_ADDR - 0x1000;
/// "TSGUEST!" as a little-endian u64.
pub const STAGE_MAGIC: u64 = u64::from_le_bytes(*b"TSGUEST!");
/// Largest guest file accepted.
pub const MAX_FILE: u64 = 32 << 20;
/// Where the initrd is staged in host RAM: after the largest file.
pub const INITRD_STAGE: u64 = STAGE_ADDR + MAX_FILE;
/// Largest initrd accepted.
pub const MAX_INITRD: u64 = 64 << 20;
/// Longest kernel command line (bytes, without the NUL).
pub const MAX_BOOTARGS: usize = 2048;
/// Where the bootargs start in the header page.
const BOOTARGS_AT: usize = 64;

/// Guest RAM base (QEMU virt's).
pub const GUEST_RAM: u64 = 0x8000_0000;
/// Guest RAM when the header does not say.
pub const DEFAULT_MEM: u64 = 128 << 20;
/// Smallest guest RAM.
pub const MIN_MEM: u64 = 16 << 20;
/// Largest guest RAM (the hypervisor's frame bitmap covers 1 GiB of host RAM; a guest this large
/// runs as long as it does not touch all of it).
pub const MAX_MEM: u64 = 1 << 30;
/// Where a raw file without the Linux header goes, and starts.
pub const RAW_LOAD: u64 = 0x8020_0000;
/// The device tree goes at the top of guest RAM where nothing else is, at the first of these
/// alignments that finds room: 2 MiB first, where QEMU virt puts its own (the last 2 MiB boundary
/// below the end of RAM that leaves room for it).
pub const DTB_ALIGNS: [u64; 4] = [2 << 20, 1 << 20, 0x1000, 8];
/// Most vCPUs (SMP is not there yet).
pub const MAX_VCPUS: u64 = 8;

/// Guest-physical base of the emulated ns16550 UART.
pub const UART_GPA: u64 = 0x1000_0000;
/// The UART's interrupt source at the PLIC (QEMU virt's).
pub const UART_IRQ: u32 = 10;
/// Guest-physical base of the emulated PLIC (QEMU virt's).
pub const PLIC_GPA: u64 = 0x0c00_0000;
/// The PLIC window's size (QEMU virt's).
pub const PLIC_LEN: u64 = 0x60_0000;
/// Interrupt sources the PLIC offers, IDs 1..=96 (riscv,ndev; QEMU virt's).
pub const PLIC_NDEV: u32 = 96;

/// The guest's riscv,isa: RV64GC with Zicsr and Zifencei, and Sstc when the hart lets the guest
/// use it (henvcfg.STCE). No `h`: the guest gets no hypervisor extension of its own.
pub fn guest_isa(sstc: bool) -> &'static str {
    if sstc {
        "rv64imafdc_zicsr_zifencei_sstc"
    } else {
        "rv64imafdc_zicsr_zifencei"
    }
}

/// What the staging header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The guest file's size.
    pub file_len: u64,
    /// Guest RAM bytes.
    pub mem: u64,
    /// The initrd's size (0: none), staged at [`INITRD_STAGE`].
    pub initrd_len: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// The kernel command line.
    pub bootargs: String,
    /// A fork or a live migration of the running guest.
    pub live: LiveOp,
}

/// What the hypervisor does to a running one-vCPU guest besides running it (`cargo xtask run
/// --fork` / `--migrate`); each starts before the entry that follows the guest's `after`-th exit
/// from VU-mode (its user space), `after` at least 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LiveOp {
    /// Nothing: the guest runs to its end.
    #[default]
    None,
    /// Fork the VM there; the child runs to its end, then the parent ([`crate`]'s `vmfork`).
    Fork {
        /// Exits from VU-mode before the fork.
        after: u64,
    },
    /// Migrate the VM into a new one while it runs ([`crate`]'s `migrate`).
    Migrate {
        /// Exits from VU-mode before the migration starts.
        after: u64,
    },
}

impl LiveOp {
    /// The two header words: (kind, after).
    fn words(self) -> [u64; 2] {
        match self {
            LiveOp::None => [0, 0],
            LiveOp::Fork { after } => [1, after],
            LiveOp::Migrate { after } => [2, after],
        }
    }

    fn from_words(kind: u64, after: u64) -> Result<Self, String> {
        match kind {
            0 => Ok(LiveOp::None),
            1 => Ok(LiveOp::Fork { after }),
            2 => Ok(LiveOp::Migrate { after }),
            k => Err(format!("unknown live operation {k} in the staging header")),
        }
    }

    /// Checks it against the guest's vCPU count.
    pub fn check(self, vcpus: u64) -> Result<(), String> {
        match self {
            LiveOp::None => Ok(()),
            LiveOp::Fork { after: 0 } | LiveOp::Migrate { after: 0 } => {
                Err(String::from("a fork or migration point counts exits from user space from 1"))
            }
            LiveOp::Fork { .. } if vcpus > 1 => {
                Err(format!("--fork runs on one vCPU (the guest has {vcpus}): the child needs every vCPU's state"))
            }
            _ => Ok(()),
        }
    }
}

impl Header {
    /// A header for a file of `file_len` bytes and nothing else asked for.
    pub fn new(file_len: u64) -> Self {
        Self { file_len, mem: DEFAULT_MEM, initrd_len: 0, vcpus: 1, bootargs: String::new(), live: LiveOp::None }
    }

    /// The header page: magic, file size, RAM, initrd size, vCPUs, bootargs length at +0..+40,
    /// the live operation (kind, after) at +48 and +56, the bootargs at +64.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut page = alloc::vec![0u8; 4096];
        let [kind, after] = self.live.words();
        let words = [
            STAGE_MAGIC,
            self.file_len,
            self.mem,
            self.initrd_len,
            self.vcpus,
            self.bootargs.len() as u64,
            kind,
            after,
        ];
        for (i, w) in words.iter().enumerate() {
            page[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let n = self.bootargs.len().min(MAX_BOOTARGS);
        page[BOOTARGS_AT..BOOTARGS_AT + n].copy_from_slice(&self.bootargs.as_bytes()[..n]);
        page
    }

    /// Reads a header page; `None` without the magic. The values are checked by [`Header::check`].
    pub fn parse(page: &[u8]) -> Option<Result<Self, String>> {
        let word = |i: usize| page.get(i * 8..i * 8 + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if word(0)? != STAGE_MAGIC {
            return None;
        }
        let (file_len, mem, initrd_len, vcpus, args_len) = (word(1)?, word(2)?, word(3)?, word(4)?, word(5)?);
        let h = (|| {
            if args_len > MAX_BOOTARGS as u64 {
                return Err(format!("the command line is {args_len} bytes; at most {MAX_BOOTARGS} are passed"));
            }
            let raw = page.get(BOOTARGS_AT..BOOTARGS_AT + args_len as usize).ok_or("header page too short")?;
            let bootargs = core::str::from_utf8(raw).map_err(|_| String::from("the command line is not UTF-8"))?;
            if bootargs.contains('\0') {
                return Err(String::from("the command line contains a NUL byte"));
            }
            let live =
                LiveOp::from_words(word(6).ok_or("header page too short")?, word(7).ok_or("header page too short")?)?;
            let h = Self { file_len, mem, initrd_len, vcpus, bootargs: bootargs.into(), live };
            h.check()?;
            Ok(h)
        })();
        Some(h)
    }

    /// The checks on what was asked for (the file itself is checked by [`plan`]).
    pub fn check(&self) -> Result<(), String> {
        check_mem(self.mem)?;
        if self.initrd_len > MAX_INITRD {
            return Err(format!("the initrd is {} bytes; at most {MAX_INITRD} can be staged", self.initrd_len));
        }
        check_vcpus(self.vcpus)?;
        self.live.check(self.vcpus)?;
        if self.bootargs.len() > MAX_BOOTARGS || self.bootargs.contains('\0') {
            return Err(format!("the command line must be at most {MAX_BOOTARGS} bytes without NUL"));
        }
        Ok(())
    }
}

/// Checks a guest RAM size.
pub fn check_mem(mem: u64) -> Result<(), String> {
    if !(MIN_MEM..=MAX_MEM).contains(&mem) || !mem.is_multiple_of(2 << 20) {
        return Err(format!(
            "guest RAM of {mem:#x} bytes: it must be a multiple of 2 MiB from {} MiB to {} MiB",
            MIN_MEM >> 20,
            MAX_MEM >> 20
        ));
    }
    Ok(())
}

/// Checks a vCPU count.
pub fn check_vcpus(n: u64) -> Result<(), String> {
    match n {
        0 => Err(String::from("a guest needs at least one vCPU")),
        1..=MAX_VCPUS => Ok(()),
        _ => Err(format!("{n} vCPUs: at most {MAX_VCPUS} (one physical hart each)")),
    }
}

/// Parses a size like `128M`, `1G`, `65536K` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (like 256M or 1G)");
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// What the Linux RISC-V image header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxImage {
    /// Offset from the start of RAM where the image goes.
    pub text_offset: u64,
    /// Bytes the image occupies in memory (file plus bss), from its load address.
    pub image_size: u64,
}

/// The Linux image header of `file`, if it has the magic (either of the two): `Err` when the
/// magic is there but the header cannot be honoured.
pub fn linux_image(file: &[u8]) -> Option<Result<LinuxImage, String>> {
    let head = file.get(..64)?;
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
    if &head[48..56] != b"RISCV\0\0\0" && &head[56..60] != b"RSC\x05" {
        return None;
    }
    let (text_offset, image_size) = (u64_at(8), u64_at(16));
    Some(if !text_offset.is_multiple_of(4096) {
        Err(format!("Linux image header: text_offset {text_offset:#x} is not page-aligned"))
    } else if image_size < file.len() as u64 {
        Err(format!("Linux image header: image_size {image_size:#x} is smaller than the file ({:#x})", file.len()))
    } else {
        Ok(LinuxImage { text_offset, image_size })
    })
}

/// Guest RAM of `mem` bytes.
pub fn ram(mem: u64) -> Range<u64> {
    GUEST_RAM..GUEST_RAM + mem
}

/// The checked plan for `file` (ELF, Linux Image or other raw binary) in `mem` bytes of guest RAM,
/// with an initrd of `initrd` bytes placed at the top of RAM (kept as a segment of the plan, so
/// the device tree goes elsewhere); returns the plan and the initrd's place.
pub fn plan<'a>(file: &'a [u8], mem: u64, initrd: Option<&'a [u8]>) -> Result<(LoadPlan<'a>, Option<u64>), String> {
    let ram = ram(mem);
    let mut plan = match linux_image(file) {
        Some(Err(e)) => return Err(e),
        Some(Ok(img)) => {
            let at = GUEST_RAM + img.text_offset;
            let mut p = elf::plan_raw(file, at, ram.clone()).map_err(|e| e.to_string())?;
            if at.checked_add(img.image_size).is_none_or(|end| end > ram.end) {
                return Err(format!(
                    "Linux image header: {:#x} bytes at {at:#x} do not fit guest RAM {:#x}..{:#x}",
                    img.image_size, ram.start, ram.end
                ));
            }
            p.segments[0].memsz = img.image_size;
            p
        }
        None => elf::plan_elf_or_raw(file, Machine::Riscv64, ram.clone(), RAW_LOAD).map_err(|e| e.to_string())?,
    };
    let Some(bytes) = initrd.filter(|b| !b.is_empty()) else { return Ok((plan, None)) };
    let len = bytes.len() as u64;
    let at = plan.place("initrd", ram, len, &[1 << 21, 0x1000], Place::Highest).map_err(|e| e.to_string())?;
    let index = plan.segments.len();
    plan.segments.push(Segment { index, gpa: at, vaddr: at, offset: 0, bytes, memsz: len });
    Ok((plan, Some(at)))
}

/// Places a device tree of `len` bytes at the top of guest RAM where no segment (nor the initrd)
/// is.
pub fn place_dtb(plan: &LoadPlan<'_>, mem: u64, len: u64) -> Result<u64, String> {
    plan.place("device tree", ram(mem), len, &DTB_ALIGNS, Place::Highest).map_err(|e| e.to_string())
}

/// What the guest's device tree describes.
#[derive(Clone, Debug)]
pub struct TreeSpec<'a> {
    /// Guest RAM bytes.
    pub mem: u64,
    /// The timebase frequency (the host's).
    pub timebase: u32,
    /// riscv,isa of each vCPU.
    pub isa: &'a str,
    /// vCPUs.
    pub vcpus: u32,
    /// The kernel command line.
    pub bootargs: &'a str,
    /// The initrd's guest-physical range.
    pub initrd: Option<Range<u64>>,
    /// Whether the PLIC is there (and the UART's interrupt on it).
    pub plic: bool,
    /// The blob's least size in bytes: its totalsize is raised to this with free space at its
    /// end (which a device tree may carry, for in-place edits). The hypervisor gives the size of
    /// the tree the firmware handed it: Linux reserves its device tree's totalsize, so a guest
    /// tree as large as the one QEMU and OpenSBI give a bare kernel leaves the guest the same
    /// free memory as on bare QEMU (its `Memory:` line). 0: no padding.
    pub room: u64,
}

/// The guest's device tree, with QEMU virt's layout for what it has: RAM, the CPUs with their
/// local interrupt controllers, the PLIC and the ns16550 on it, /chosen with bootargs,
/// stdout-path and the initrd.
pub fn guest_tree(s: &TreeSpec<'_>) -> Vec<u8> {
    let hi = |v: u64| (v >> 32) as u32;
    let lo = |v: u64| v as u32;
    let plic_phandle = 1;
    let intc_phandle = |cpu: u32| 2 + cpu;
    let mut w = FdtWriter::new();
    w.begin_node("")
        .prop_cells("#address-cells", &[2])
        .prop_cells("#size-cells", &[2])
        .prop_str("compatible", "riscv-virtio")
        .prop_str("model", "riscv-virtio,qemu");
    w.begin_node("chosen").prop_str("bootargs", s.bootargs);
    w.prop_str("stdout-path", &format!("/soc/serial@{UART_GPA:x}"));
    if let Some(r) = &s.initrd {
        w.prop_cells("linux,initrd-start", &[hi(r.start), lo(r.start)]);
        w.prop_cells("linux,initrd-end", &[hi(r.end), lo(r.end)]);
    }
    w.end_node();
    w.begin_node(&format!("memory@{GUEST_RAM:x}"))
        .prop_str("device_type", "memory")
        .prop_cells("reg", &[hi(GUEST_RAM), lo(GUEST_RAM), hi(s.mem), lo(s.mem)])
        .end_node();
    w.begin_node("cpus")
        .prop_cells("#address-cells", &[1])
        .prop_cells("#size-cells", &[0])
        .prop_cells("timebase-frequency", &[s.timebase]);
    for cpu in 0..s.vcpus {
        w.begin_node(&format!("cpu@{cpu}"))
            .prop_str("device_type", "cpu")
            .prop_cells("reg", &[cpu])
            .prop_str("status", "okay")
            .prop_str("compatible", "riscv")
            .prop_str("riscv,isa", s.isa)
            .prop_str("mmu-type", "riscv,sv39");
        w.begin_node("interrupt-controller")
            .prop_cells("#interrupt-cells", &[1])
            .prop("interrupt-controller", &[])
            .prop_str("compatible", "riscv,cpu-intc")
            .prop_cells("phandle", &[intc_phandle(cpu)])
            .end_node();
        w.end_node();
    }
    w.end_node();
    w.begin_node("soc")
        .prop_cells("#address-cells", &[2])
        .prop_cells("#size-cells", &[2])
        .prop_str("compatible", "simple-bus")
        .prop("ranges", &[]);
    // Two contexts per vCPU as on QEMU virt: M-mode (11, absent here: the guest never claims it)
    // and S-mode (9), so context 2n+1 is vCPU n's supervisor context.
    let mut ext = Vec::new();
    for cpu in 0..s.vcpus {
        ext.extend_from_slice(&[intc_phandle(cpu), 11, intc_phandle(cpu), 9]);
    }
    if s.plic {
        w.begin_node(&format!("plic@{PLIC_GPA:x}"))
            .prop_cells("phandle", &[plic_phandle])
            .prop_cells("riscv,ndev", &[PLIC_NDEV])
            .prop_cells("reg", &[hi(PLIC_GPA), lo(PLIC_GPA), hi(PLIC_LEN), lo(PLIC_LEN)])
            .prop_cells("interrupts-extended", &ext)
            .prop("interrupt-controller", &[])
            .prop("compatible", b"sifive,plic-1.0.0\0riscv,plic0\0")
            .prop_cells("#address-cells", &[0])
            .prop_cells("#interrupt-cells", &[1])
            .end_node();
    }
    w.begin_node(&format!("serial@{UART_GPA:x}"));
    if s.plic {
        w.prop_cells("interrupts", &[UART_IRQ]).prop_cells("interrupt-parent", &[plic_phandle]);
    }
    w.prop_cells("clock-frequency", &[3_686_400])
        .prop_cells("reg", &[hi(UART_GPA), lo(UART_GPA), 0, 0x100])
        .prop_str("compatible", "ns16550a")
        .end_node();
    w.end_node();
    w.end_node();
    let mut blob = w.finish();
    pad_tree(&mut blob, s.room);
    blob
}

/// Raises a finished blob's totalsize (header offset 4, big-endian; Devicetree Specification,
/// "Header") to `room` bytes, zero-filled free space at the end, when it is smaller. Sizes that
/// do not fit the 32-bit field are left alone.
fn pad_tree(blob: &mut Vec<u8>, room: u64) {
    let Ok(room32) = u32::try_from(room) else { return };
    if (room32 as usize) <= blob.len() {
        return;
    }
    blob.resize(room32 as usize, 0);
    blob[4..8].copy_from_slice(&room32.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use twostage_baremetal::fdt::Fdt;

    fn linux_file(text_offset: u64, image_size: u64, len: usize) -> Vec<u8> {
        let mut f = alloc::vec![0u8; len];
        f[8..16].copy_from_slice(&text_offset.to_le_bytes());
        f[16..24].copy_from_slice(&image_size.to_le_bytes());
        f[48..56].copy_from_slice(b"RISCV\0\0\0");
        f[56..60].copy_from_slice(b"RSC\x05");
        f
    }

    #[test]
    fn header_round_trips_and_checks() {
        let h = Header {
            file_len: 5,
            mem: 256 << 20,
            initrd_len: 7,
            vcpus: 1,
            bootargs: "console=ttyS0 quiet".into(),
            live: LiveOp::Fork { after: 3 },
        };
        assert_eq!(Header::parse(&h.to_bytes()), Some(Ok(h.clone())));
        assert_eq!(Header::parse(&[0u8; 4096]), None);
        let mut bad = h.clone();
        bad.mem = 100 << 20 | 4096;
        assert!(Header::parse(&bad.to_bytes()).unwrap().unwrap_err().contains("multiple of 2 MiB"));
        bad = h.clone();
        bad.vcpus = 8;
        assert!(Header::parse(&bad.to_bytes()).unwrap().unwrap_err().contains("--fork runs on one vCPU"));
        bad.live = LiveOp::None;
        assert!(Header::parse(&bad.to_bytes()).unwrap().is_ok());
        bad.vcpus = 9;
        assert!(Header::parse(&bad.to_bytes()).unwrap().unwrap_err().contains("at most 8"));
        bad.vcpus = 0;
        assert!(Header::parse(&bad.to_bytes()).is_some_and(|r| r.is_err()));
        let mut page = h.to_bytes();
        page[40..48].copy_from_slice(&9999u64.to_le_bytes());
        assert!(Header::parse(&page).unwrap().is_err());
        // The live operation: round trip, an unknown kind, a point before user space.
        let m = Header { live: LiveOp::Migrate { after: 1 }, ..h.clone() };
        assert_eq!(Header::parse(&m.to_bytes()), Some(Ok(m.clone())));
        let mut page = m.to_bytes();
        page[48..56].copy_from_slice(&7u64.to_le_bytes());
        assert!(Header::parse(&page).unwrap().unwrap_err().contains("unknown live operation 7"));
        let smp = Header { vcpus: 4, ..m.clone() };
        assert_eq!(Header::parse(&smp.to_bytes()), Some(Ok(smp.clone())), "migration works on SMP guests");
        let zero = Header { live: LiveOp::Fork { after: 0 }, ..h.clone() };
        assert!(Header::parse(&zero.to_bytes()).unwrap().unwrap_err().contains("from 1"));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert!(check_mem(8 << 20).is_err());
        assert!(check_mem(2 << 30).is_err());
        assert!(check_mem(128 << 20).is_ok());
    }

    #[test]
    fn linux_image_goes_to_text_offset_with_its_bss() {
        let f = linux_file(0x20_0000, 0x40_0000, 0x1000);
        let (p, initrd) = plan(&f, 128 << 20, Some(&[1u8; 100])).unwrap();
        assert_eq!(p.entry, 0x8020_0000);
        assert_eq!(p.segments[0].memsz, 0x40_0000);
        let at = initrd.unwrap();
        assert!(at >= 0x8060_0000 && at + 100 <= 0x8800_0000);
        let dtb = place_dtb(&p, 128 << 20, 0x1000).unwrap();
        assert!(dtb + 0x1000 <= at || dtb >= at + 100, "the tree does not overlap the initrd");
        assert!(dtb >= 0x8060_0000);
        // Headers that cannot be honoured.
        assert!(plan(&linux_file(0x20_0100, 0x40_0000, 0x1000), 128 << 20, None).unwrap_err().contains("text_offset"));
        assert!(plan(&linux_file(0x20_0000, 0x10, 0x1000), 128 << 20, None).unwrap_err().contains("smaller"));
        assert!(plan(&linux_file(0x20_0000, 1 << 30, 0x1000), 128 << 20, None).unwrap_err().contains("do not fit"));
        // A raw file without the header still goes to RAW_LOAD.
        let (p, _) = plan(&[0x13, 0, 0, 0], 128 << 20, None).unwrap();
        assert_eq!(p.entry, RAW_LOAD);
    }

    #[test]
    fn tree_has_what_linux_reads() {
        let spec = TreeSpec {
            mem: 256 << 20,
            timebase: 10_000_000,
            isa: "rv64imafdc",
            vcpus: 1,
            bootargs: "console=ttyS0",
            initrd: Some(0x8700_0000..0x8710_0000),
            plic: true,
            room: 0,
        };
        let blob = guest_tree(&spec);
        let fdt = Fdt::new(&blob).unwrap();
        let mut mem = [(0, 0); 2];
        assert_eq!(fdt.memory(&mut mem), Ok(1));
        assert_eq!(mem[0], (GUEST_RAM, 256 << 20));
        assert_eq!(fdt.find("chosen", 1, "bootargs").unwrap(), Some(&b"console=ttyS0\0"[..]));
        assert_eq!(fdt.find("chosen", 1, "linux,initrd-end").unwrap(), Some(&[0, 0, 0, 0, 0x87, 0x10, 0, 0][..]));
        assert_eq!(fdt.find("cpu@", 2, "riscv,isa").unwrap(), Some(&b"rv64imafdc\0"[..]));
        assert_eq!(fdt.find("serial@", 2, "interrupts").unwrap(), Some(&UART_IRQ.to_be_bytes()[..]));
        assert_eq!(fdt.find("plic@", 2, "riscv,ndev").unwrap(), Some(&PLIC_NDEV.to_be_bytes()[..]));
        // Context 1 is hart 0's S-mode context: M (11) first, then S (9), as on QEMU virt.
        let ext = fdt.find("plic@", 2, "interrupts-extended").unwrap().unwrap();
        assert_eq!(ext, [2u32, 11, 2, 9].iter().flat_map(|c| c.to_be_bytes()).collect::<Vec<u8>>());
        assert!(!guest_isa(true).contains('h') && guest_isa(true).ends_with("_sstc"));
        assert!(!guest_isa(false).contains("sstc"));
        // Padded to the firmware tree's size: the same tree, with free space after it.
        let padded = guest_tree(&TreeSpec { room: 16 << 10, ..spec.clone() });
        assert_eq!(padded.len(), 16 << 10);
        assert_eq!(Fdt::total_size(&padded[..40]), Ok(16 << 10));
        assert_eq!(&padded[8..blob.len()], &blob[8..]);
        let fdt = Fdt::new(&padded).unwrap();
        assert_eq!(fdt.find("chosen", 1, "bootargs").unwrap(), Some(&b"console=ttyS0\0"[..]));
        assert_eq!(guest_tree(&TreeSpec { room: 100, ..spec }), blob, "a smaller room changes nothing");
    }

    #[test]
    fn dtb_goes_where_qemu_virt_puts_it() {
        let f = linux_file(0x20_0000, 0x40_0000, 0x1000);
        let (p, _) = plan(&f, 128 << 20, None).unwrap();
        assert_eq!(place_dtb(&p, 128 << 20, 4222).unwrap(), 0x87e0_0000);
    }
}
