//! ACPI tables for a guest: the machine's own tables, moved to the top of the guest's RAM the way
//! firmware relocates them, with every pointer between them rewritten and every checksum
//! recomputed.
//!
//! The structures and rules come from the ACPI specification (6.x), chapter "ACPI Software
//! Programming Model":
//! - "Finding the RSDP on IA-PC Systems": the Root System Description Pointer lies on a 16-byte
//!   boundary in the first KiB of the Extended BIOS Data Area (whose real-mode segment is the
//!   16-bit word at 0x40E), else in the BIOS read-only area 0xE0000-0xFFFFF ([`find_rsdp`]);
//! - "Root System Description Pointer (RSDP) Structure": "RSD PTR ", a checksum over its first 20
//!   bytes, the revision, the 32-bit RSDT address; from revision 2 on its length, the 64-bit XSDT
//!   address and an extended checksum over the whole structure;
//! - "System Description Table Header": every table but the FACS starts with a 36-byte header
//!   (signature, length, revision, checksum over the whole table, OEM fields);
//! - "Root System Description Table (RSDT)" and "Extended System Description Table (XSDT)":
//!   after the header, the tables' 32-bit (RSDT) or 64-bit (XSDT) physical addresses;
//! - "Fixed ACPI Description Table (FADT)" (signature "FACP"): FIRMWARE_CTRL (offset 36) and DSDT
//!   (offset 40), 32-bit, and X_FIRMWARE_CTRL (offset 132) and X_DSDT (offset 140), 64-bit, each
//!   present when the table is long enough to hold it;
//! - "Firmware ACPI Control Structure (FACS)": "FACS", a length of at least 64, no checksum,
//!   aligned on a 64-byte boundary;
//! - "Differentiated System Description Table (DSDT)": a header and AML code.
//!
//! Those are the pointers of the table tree, and [`relocate`] rewrites all of them. Another
//! table (MADT, SSDT, HPET, ...) is copied as it is: the tables a PC BIOS such as Bochs' builds
//! hold no other pointer into the area (AML code that names addresses inside it could not be
//! rewritten, and none does).
//!
//! The tables come from firmware, but nothing in them is trusted: a structure that runs out of
//! the area, a wrong signature or length, a bad checksum, a pointer outside the area, two tables
//! that overlap are each an [`AcpiError`] naming the problem, and the guest then gets no tables.
//! After the move the copy is walked again at its new address with the same checks, so what the
//! guest gets has passed them. Pure code over byte slices, tested on the host; the x86
//! hypervisor reads the machine's memory and copies the result into the guest
//! (`twostage-hv-x86`'s `linuxguest`).

use crate::linux_x86::{E820Entry, E820_ACPI, E820_NVS, E820_RAM, LOW_MEMORY_END};
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

/// The RSDP's signature ("Root System Description Pointer (RSDP) Structure").
pub const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
/// Bytes the RSDP's first checksum covers (the ACPI 1.0 structure).
pub const RSDP_V1_LEN: usize = 20;
/// Length of the revision-2 RSDP.
pub const RSDP_V2_LEN: usize = 36;
/// Length of a "System Description Table Header".
pub const HEADER_LEN: usize = 36;
/// The smallest FACS length the specification allows.
pub const FACS_MIN_LEN: usize = 64;
/// Where the BDA holds the EBDA's real-mode segment ("Finding the RSDP on IA-PC Systems").
pub const EBDA_POINTER: u64 = 0x40e;
/// Bytes of the EBDA searched.
pub const EBDA_SEARCH_LEN: u64 = 1024;
/// The BIOS read-only area searched after the EBDA.
pub const BIOS_SEARCH: Range<u64> = 0xe_0000..0x10_0000;

// Offsets in the RSDP.
const RSDP_CHECKSUM: usize = 8;
const RSDP_REVISION: usize = 15;
const RSDP_RSDT: usize = 16;
const RSDP_LENGTH: usize = 20;
const RSDP_XSDT: usize = 24;
const RSDP_XCHECKSUM: usize = 32;
// Offsets in a table header.
const LENGTH: usize = 4;
const CHECKSUM: usize = 9;
// FADT fields: (offset, width, what it points to, its name).
const FADT_POINTERS: [(usize, usize, Target, &str); 4] = [
    (36, 4, Target::Facs, "the FADT's FIRMWARE_CTRL"),
    (40, 4, Target::Dsdt, "the FADT's DSDT"),
    (132, 8, Target::Facs, "the FADT's X_FIRMWARE_CTRL"),
    (140, 8, Target::Dsdt, "the FADT's X_DSDT"),
];

/// Bytes of physical memory at a known address.
#[derive(Clone, Copy, Debug)]
pub struct Window<'a> {
    /// The physical address of `bytes[0]`.
    pub base: u64,
    /// The bytes.
    pub bytes: &'a [u8],
}

impl<'a> Window<'a> {
    /// `len` bytes at physical `addr`, if the window holds them all.
    pub fn get(&self, addr: u64, len: usize) -> Option<&'a [u8]> {
        let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        self.bytes.get(off..off.checked_add(len)?)
    }

    /// The physical range the window covers.
    pub fn range(&self) -> Range<u64> {
        self.base..self.base + self.bytes.len() as u64
    }
}

/// Why the guest gets no ACPI tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcpiError {
    /// The machine's memory map has no ACPI data entry (type 3) between 1 MiB and 4 GiB.
    NoArea,
    /// The machine's memory map has more than one ACPI data entry there.
    SeveralAreas,
    /// The guest's RAM is too small to hold the area at the machine's distance from the top.
    AreaDoesNotFit {
        /// The area's size.
        size: u64,
        /// Its distance from the top of the machine's RAM.
        from_top: u64,
        /// The guest's RAM.
        mem: u64,
    },
    /// The move would shift the tables by an amount that breaks the FACS's 64-byte alignment.
    MisalignedMove {
        /// The shift.
        delta: i64,
    },
    /// No valid RSDP in the EBDA's first KiB or in 0xE0000-0xFFFFF.
    NoRsdp,
    /// A pointer that points outside the ACPI area.
    OutsideArea {
        /// The pointer's name.
        what: &'static str,
        /// Its value.
        addr: u64,
    },
    /// A structure that runs past the end of the ACPI area.
    RunsOut {
        /// The structure.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// Its length (or the bytes of it needed to read its length).
        len: u64,
    },
    /// A structure whose signature is not the one its pointer promises.
    BadSignature {
        /// The structure.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// The signature found.
        found: [u8; 4],
    },
    /// A length shorter than the structure's fixed part, or a root table whose entries are not
    /// whole.
    BadLength {
        /// The structure.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// The length field.
        len: u64,
    },
    /// A checksum that does not sum to zero.
    BadChecksum {
        /// The structure.
        what: &'static str,
        /// Its address.
        addr: u64,
    },
    /// A FACS that is not on a 64-byte boundary.
    MisalignedFacs {
        /// Its address.
        addr: u64,
    },
    /// Two different tables share bytes (rewriting one would corrupt the other).
    Overlap {
        /// One table's address.
        first: u64,
        /// The other's.
        second: u64,
    },
    /// The RSDP names neither an RSDT nor an XSDT.
    NoRoot,
    /// A moved table would lie above what its 32-bit pointer can name.
    Above4G {
        /// The pointer's name.
        what: &'static str,
        /// The moved address.
        addr: u64,
    },
    /// The RSDP's page is not in the firmware areas the guest sees read-only from the machine,
    /// so no private copy of it can take its place.
    RsdpNotInFirmware {
        /// The RSDP's address.
        addr: u64,
    },
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoArea => f.write_str("the machine's memory map has no ACPI data area between 1 MiB and 4 GiB"),
            Self::SeveralAreas => {
                f.write_str("the machine's memory map has more than one ACPI data area between 1 MiB and 4 GiB")
            }
            Self::AreaDoesNotFit { size, from_top, mem } => write!(
                f,
                "the {size}-byte ACPI area, {from_top:#x} bytes below the top of the machine's RAM, does not fit \
                 above 1 MiB in {} MiB of guest RAM",
                mem >> 20
            ),
            Self::MisalignedMove { delta } => {
                write!(f, "moving the ACPI area by {delta:#x} bytes would break the FACS's 64-byte alignment")
            }
            Self::NoRsdp => {
                f.write_str("no valid RSDP in the EBDA's first KiB or in 0xE0000-0xFFFFF (on 16-byte boundaries)")
            }
            Self::OutsideArea { what, addr } => write!(f, "{what} ({addr:#x}) points outside the ACPI area"),
            Self::RunsOut { what, addr, len } => {
                write!(f, "the {what} at {addr:#x} ({len} bytes) runs past the end of the ACPI area")
            }
            Self::BadSignature { what, addr, found } => {
                write!(f, "the {what} at {addr:#x} has the signature {:?}", found.escape_ascii())
            }
            Self::BadLength { what, addr, len } => write!(f, "the {what} at {addr:#x} has a bad length ({len})"),
            Self::BadChecksum { what, addr } => write!(f, "the {what} at {addr:#x} fails its checksum"),
            Self::MisalignedFacs { addr } => write!(f, "the FACS at {addr:#x} is not on a 64-byte boundary"),
            Self::Overlap { first, second } => write!(f, "the tables at {first:#x} and {second:#x} overlap"),
            Self::NoRoot => f.write_str("the RSDP names neither an RSDT nor an XSDT"),
            Self::Above4G { what, addr } => {
                write!(f, "{what} would be {addr:#x}, above what its 32-bit field can hold")
            }
            Self::RsdpNotInFirmware { addr } => write!(
                f,
                "the RSDP at {addr:#x} is not in a firmware area of the first MiB, where the guest could be given a \
                 private copy of it"
            ),
        }
    }
}

impl core::error::Error for AcpiError {}

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    b[at..at + n].iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x))
}

fn put(b: &mut [u8], at: usize, n: usize, v: u64) {
    b[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
}

/// Sets `b[at]` so that the bytes of `b` sum to zero (the ACPI checksum rule).
fn set_checksum(b: &mut [u8], at: usize) {
    b[at] = 0;
    b[at] = 0u8.wrapping_sub(sum(b));
}

/// The length of the RSDP at the start of `b` if it is a valid one: its signature, its 20-byte
/// checksum, and for revision 2 and later a length of at least 36 that `b` holds and the extended
/// checksum over it ("Root System Description Pointer (RSDP) Structure").
pub fn rsdp_len(b: &[u8]) -> Option<usize> {
    if b.len() < RSDP_V1_LEN || &b[..8] != RSDP_SIGNATURE || sum(&b[..RSDP_V1_LEN]) != 0 {
        return None;
    }
    if b[RSDP_REVISION] < 2 {
        return Some(RSDP_V1_LEN);
    }
    if b.len() < RSDP_V2_LEN {
        return None;
    }
    let len = usize::try_from(le(b, RSDP_LENGTH, 4)).ok()?;
    (len >= RSDP_V2_LEN && sum(b.get(..len)?) == 0).then_some(len)
}

/// Finds the RSDP as "Finding the RSDP on IA-PC Systems" says, in `low` (the machine's first MiB,
/// or as much of it from 0x40E on as the caller can read): on 16-byte boundaries in the first KiB
/// of the EBDA (when the BDA names one above 0x400, as Linux also requires), then in
/// 0xE0000-0xFFFFF. Returns its address and length.
pub fn find_rsdp(low: Window<'_>) -> Option<(u64, usize)> {
    let scan = |r: Range<u64>| {
        (r.start.next_multiple_of(16)..r.end).step_by(16).find_map(|at| {
            let avail = low.range().end.min(r.end).checked_sub(at)?;
            rsdp_len(low.get(at, avail as usize)?).map(|n| (at, n))
        })
    };
    let ebda = low.get(EBDA_POINTER, 2).map_or(0, |w| le(w, 0, 2) << 4);
    let from_ebda = if ebda > 0x400 { scan(ebda..ebda + EBDA_SEARCH_LEN) } else { None };
    from_ebda.or_else(|| scan(BIOS_SEARCH))
}

/// The machine's ACPI area: its one ACPI data entry (type 3) between 1 MiB and 4 GiB.
pub fn machine_area(map: &[E820Entry]) -> Result<Range<u64>, AcpiError> {
    let mut areas = map.iter().filter(|e| {
        e.kind == E820_ACPI && e.addr >= LOW_MEMORY_END && e.addr.saturating_add(e.size) <= 1 << 32 && e.size > 0
    });
    let a = areas.next().ok_or(AcpiError::NoArea)?;
    if areas.next().is_some() {
        return Err(AcpiError::SeveralAreas);
    }
    Ok(a.addr..a.addr + a.size)
}

/// Where the ACPI area goes in a guest with RAM `0..mem`: as far below `mem` as the machine's
/// area is below the top of the machine's RAM under 4 GiB (the highest end of its RAM, ACPI and
/// NVS entries there), which is where the same firmware puts it in a machine with `mem` bytes of
/// RAM. Returns the machine's area and the guest's.
pub fn guest_area(map: &[E820Entry], mem: u64) -> Result<(Range<u64>, Range<u64>), AcpiError> {
    let area = machine_area(map)?;
    let top = map
        .iter()
        .filter(|e| matches!(e.kind, E820_RAM | E820_ACPI | E820_NVS))
        .map(|e| e.addr.saturating_add(e.size))
        .filter(|&end| end <= 1 << 32)
        .max()
        .unwrap_or(area.end)
        .max(area.end);
    let (size, from_top) = (area.end - area.start, top - area.start);
    let start = mem.checked_sub(from_top).filter(|&s| s >= LOW_MEMORY_END);
    let Some(start) = start else { return Err(AcpiError::AreaDoesNotFit { size, from_top, mem }) };
    let delta = start.wrapping_sub(area.start) as i64;
    if delta % 64 != 0 {
        return Err(AcpiError::MisalignedMove { delta });
    }
    Ok((area, start..start + size))
}

/// What a pointer of the table tree points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Rsdt,
    Xsdt,
    Table,
    Dsdt,
    Facs,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Rsdt => "RSDT",
            Self::Xsdt => "XSDT",
            Self::Table => "table",
            Self::Dsdt => "DSDT",
            Self::Facs => "FACS",
        }
    }

    fn signature(self) -> Option<&'static [u8; 4]> {
        match self {
            Self::Rsdt => Some(b"RSDT"),
            Self::Xsdt => Some(b"XSDT"),
            Self::Table => None,
            Self::Dsdt => Some(b"DSDT"),
            Self::Facs => Some(b"FACS"),
        }
    }
}

/// A pointer to rewrite: in the RSDP or in the area, at a byte offset, 4 or 8 bytes wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pointer {
    in_rsdp: bool,
    at: usize,
    width: usize,
    what: &'static str,
}

/// One table of the tree, as found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableInfo {
    /// Its signature.
    pub signature: [u8; 4],
    /// Its physical address.
    pub addr: u64,
    /// Its length.
    pub len: u32,
}

/// The checked tree: its tables (offsets into the area) and the pointers between them.
struct Tree {
    tables: Vec<(usize, usize, [u8; 4])>,
    pointers: Vec<Pointer>,
}

/// Checks the structure at physical `addr` that a pointer named `what` promises to be a
/// `target`, in `area`; returns its offset and length.
fn structure(area: Window<'_>, addr: u64, target: Target, what: &'static str) -> Result<(usize, usize), AcpiError> {
    let name = target.name();
    if !area.range().contains(&addr) {
        return Err(AcpiError::OutsideArea { what, addr });
    }
    let off = (addr - area.base) as usize;
    let head = if target == Target::Facs { 8 } else { HEADER_LEN };
    let Some(h) = area.get(addr, head) else { return Err(AcpiError::RunsOut { what: name, addr, len: head as u64 }) };
    let found: [u8; 4] = h[..4].try_into().expect("4 bytes");
    if target.signature().is_some_and(|s| *s != found) {
        return Err(AcpiError::BadSignature { what: name, addr, found });
    }
    let len = le(h, LENGTH, 4);
    let min = if target == Target::Facs { FACS_MIN_LEN } else { HEADER_LEN };
    let entry = match target {
        Target::Rsdt => 4,
        Target::Xsdt => 8,
        _ => 1,
    };
    if len < min as u64 || !(len - HEADER_LEN as u64).is_multiple_of(entry) {
        return Err(AcpiError::BadLength { what: name, addr, len });
    }
    let Some(bytes) = area.get(addr, len as usize) else { return Err(AcpiError::RunsOut { what: name, addr, len }) };
    if target == Target::Facs {
        if !addr.is_multiple_of(64) {
            return Err(AcpiError::MisalignedFacs { addr });
        }
    } else if sum(bytes) != 0 {
        return Err(AcpiError::BadChecksum { what: name, addr });
    }
    Ok((off, len as usize))
}

/// Walks the tree from the RSDP `rsdp` over `area`, checking every structure and pointer.
fn walk(rsdp: &[u8], area: Window<'_>) -> Result<Tree, AcpiError> {
    let mut tree = Tree { tables: Vec::new(), pointers: Vec::new() };
    let found = |tree: &mut Tree, addr: u64, target: Target, what, p: Pointer| -> Result<usize, AcpiError> {
        let (off, len) = structure(area, addr, target, what)?;
        if !tree.pointers.iter().any(|q| (q.in_rsdp, q.at) == (p.in_rsdp, p.at)) {
            tree.pointers.push(p);
        }
        // A table named twice (by the RSDT and the XSDT) is one table.
        if !tree.tables.iter().any(|t| t.0 == off) {
            let sig: [u8; 4] = area.bytes[off..off + 4].try_into().expect("4 bytes");
            tree.tables.push((off, len, sig));
        }
        Ok(off)
    };
    let rev2 = rsdp.len() >= RSDP_V2_LEN;
    let mut roots = Vec::new();
    let rsdt = le(rsdp, RSDP_RSDT, 4);
    if rsdt != 0 {
        let p = Pointer { in_rsdp: true, at: RSDP_RSDT, width: 4, what: "the RSDP's RSDT address" };
        roots.push((found(&mut tree, rsdt, Target::Rsdt, p.what, p)?, 4usize));
    }
    let xsdt = if rev2 { le(rsdp, RSDP_XSDT, 8) } else { 0 };
    if xsdt != 0 {
        let p = Pointer { in_rsdp: true, at: RSDP_XSDT, width: 8, what: "the RSDP's XSDT address" };
        roots.push((found(&mut tree, xsdt, Target::Xsdt, p.what, p)?, 8));
    }
    if roots.is_empty() {
        return Err(AcpiError::NoRoot);
    }
    let mut fadts = Vec::new();
    for (root, width) in roots {
        let len = le(area.bytes, root + LENGTH, 4) as usize;
        let what = if width == 4 { "an RSDT entry" } else { "an XSDT entry" };
        for at in (root + HEADER_LEN..root + len).step_by(width) {
            let addr = le(area.bytes, at, width);
            let off = found(&mut tree, addr, Target::Table, what, Pointer { in_rsdp: false, at, width, what })?;
            if &area.bytes[off..off + 4] == b"FACP" && !fadts.contains(&off) {
                fadts.push(off);
            }
        }
    }
    for fadt in fadts {
        let len = le(area.bytes, fadt + LENGTH, 4) as usize;
        for (field, width, target, what) in FADT_POINTERS {
            if field + width > len {
                continue;
            }
            let addr = le(area.bytes, fadt + field, width);
            if addr != 0 {
                found(&mut tree, addr, target, what, Pointer { in_rsdp: false, at: fadt + field, width, what })?;
            }
        }
    }
    // Distinct tables may not share bytes: rewriting or re-summing one would change the other.
    let mut spans: Vec<_> = tree.tables.iter().map(|t| (t.0, t.0 + t.1)).collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            let at = |o: usize| area.base + o as u64;
            return Err(AcpiError::Overlap { first: at(w[0].0), second: at(w[1].0) });
        }
    }
    Ok(tree)
}

/// The machine's tables moved for a guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relocated {
    /// Where the tables go in the guest (the guest's ACPI area).
    pub area: Range<u64>,
    /// The area's bytes, rewritten.
    pub tables: Vec<u8>,
    /// The RSDP's address (the same as in the machine).
    pub rsdp_at: u64,
    /// The RSDP, rewritten (20 bytes for revision 0, its length from revision 2).
    pub rsdp: Vec<u8>,
    /// The tables of the tree, at their new addresses, in the order they were found.
    pub found: Vec<TableInfo>,
}

/// Moves the ACPI tables whose RSDP is `rsdp` (at `rsdp_at`) and whose area is `area` to
/// physical address `to`: copies the area, adds the move to every pointer of the tree (the RSDP's
/// RSDT and XSDT addresses, the RSDT's and XSDT's entries, the FADT's FIRMWARE_CTRL, DSDT,
/// X_FIRMWARE_CTRL and X_DSDT), recomputes each table's checksum and the RSDP's two, then checks
/// the copy from its RSDP as the original was checked.
pub fn relocate(rsdp_at: u64, rsdp: &[u8], area: Window<'_>, to: u64) -> Result<Relocated, AcpiError> {
    let Some(len) = rsdp_len(rsdp) else { return Err(AcpiError::NoRsdp) };
    let rsdp = &rsdp[..len];
    let tree = walk(rsdp, area)?;
    let mut tables = Vec::from(area.bytes);
    let mut new_rsdp = Vec::from(rsdp);
    let size = area.bytes.len() as u64;
    for p in &tree.pointers {
        let buf = if p.in_rsdp { &mut new_rsdp[..] } else { &mut tables[..] };
        let moved = le(buf, p.at, p.width) - area.base + to;
        if p.width == 4 && moved > u64::from(u32::MAX) {
            return Err(AcpiError::Above4G { what: p.what, addr: moved });
        }
        put(buf, p.at, p.width, moved);
    }
    for &(off, len, sig) in &tree.tables {
        if &sig != b"FACS" {
            set_checksum(&mut tables[off..off + len], CHECKSUM);
        }
    }
    set_checksum(&mut new_rsdp[..RSDP_V1_LEN], RSDP_CHECKSUM);
    if len >= RSDP_V2_LEN {
        set_checksum(&mut new_rsdp, RSDP_XCHECKSUM);
    }
    // What the guest gets passes the same checks, at its new address.
    let moved = Window { base: to, bytes: &tables };
    let check = walk(&new_rsdp, moved)?;
    debug_assert_eq!(check.tables.len(), tree.tables.len());
    let found = check
        .tables
        .iter()
        .map(|&(off, len, signature)| TableInfo { signature, addr: to + off as u64, len: len as u32 })
        .collect();
    Ok(Relocated { area: to..to + size, tables, rsdp_at, rsdp: new_rsdp, found })
}

/// The machine's ACPI hardware the tables describe, which a guest that reads them will drive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hardware {
    /// The I/O port blocks of the FADT ("Fixed ACPI Description Table (FADT)"): SMI_CMD (1 byte),
    /// PM1a/PM1b event and control, PM2 control, the PM timer, GPE0 and GPE1, each with the
    /// length the FADT gives it; empty blocks (address or length 0) left out.
    pub ports: Vec<Range<u16>>,
    /// The HPET's register block, when the HPET table (IA-PC HPET specification, "Event Timer
    /// Block ID" and "BASE_ADDRESS" at offset 40, an ACPI Generic Address Structure) puts it in
    /// system memory (address space ID 0).
    pub hpet: Option<u64>,
}

/// The hardware that the moved tables `t` describe (see [`Hardware`]). The tables have passed
/// [`relocate`]'s checks; a field the table is too short to hold is taken as absent.
pub fn hardware(t: &Relocated) -> Hardware {
    let mut hw = Hardware::default();
    let table = |sig: &[u8; 4]| {
        t.found.iter().find(|i| &i.signature == sig).map(|i| {
            let off = (i.addr - t.area.start) as usize;
            &t.tables[off..off + i.len as usize]
        })
    };
    if let Some(f) = table(b"FACP") {
        let field = |at: usize, n: usize| (f.len() >= at + n).then(|| le(f, at, n));
        // (address offset, address width, length: a fixed byte count or the FADT's length field).
        let blocks: [(usize, usize, Result<u64, usize>); 9] = [
            (48, 4, Ok(1)),   // SMI_CMD
            (56, 4, Err(88)), // PM1a_EVT_BLK, PM1_EVT_LEN
            (60, 4, Err(88)), // PM1b_EVT_BLK
            (64, 4, Err(89)), // PM1a_CNT_BLK, PM1_CNT_LEN
            (68, 4, Err(89)), // PM1b_CNT_BLK
            (72, 4, Err(90)), // PM2_CNT_BLK, PM2_CNT_LEN
            (76, 4, Err(91)), // PM_TMR_BLK, PM_TMR_LEN
            (80, 4, Err(92)), // GPE0_BLK, GPE0_BLK_LEN
            (84, 4, Err(93)), // GPE1_BLK, GPE1_BLK_LEN
        ];
        for (at, n, len) in blocks {
            let len = match len {
                Ok(l) => Some(l),
                Err(l) => field(l, 1),
            };
            if let (Some(port), Some(len)) = (field(at, n), len) {
                let end = port + len;
                if port != 0 && len != 0 && end <= 0x1_0000 {
                    hw.ports.push(port as u16..end as u16);
                }
            }
        }
    }
    if let Some(h) = table(b"HPET") {
        if h.len() >= 52 && h[40] == 0 {
            hw.hpet = Some(le(h, 44, 8));
        }
    }
    hw
}

/// What a guest gets: its copy of the page(s) holding the RSDP, and the tables or why none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForGuest {
    /// The pages holding the machine's RSDP and the guest's private copy of their bytes: the RSDP
    /// rewritten when the tables were moved, wiped when they were refused (it points at the
    /// machine's tables, which are not the guest's). `None` when no RSDP was found, or it is not
    /// in a firmware area of the first MiB (where the guest sees the machine's bytes).
    pub rsdp_pages: Option<(Range<u64>, Vec<u8>)>,
    /// The moved tables, or why the guest gets none.
    pub tables: Result<Relocated, AcpiError>,
}

/// The ACPI tables of a guest with RAM `0..mem` on a machine whose firmware reported the memory
/// map `map`: its RSDP looked for in `low` (the first MiB, see [`find_rsdp`]), its tables read from
/// `area` (the machine's ACPI area, [`machine_area`]) and moved to [`guest_area`].
pub fn for_guest(map: &[E820Entry], mem: u64, low: Window<'_>, area: Option<Window<'_>>) -> ForGuest {
    let Some((at, len)) = find_rsdp(low) else { return ForGuest { rsdp_pages: None, tables: Err(AcpiError::NoRsdp) } };
    let pages = (at & !0xfff)..(at + len as u64).next_multiple_of(0x1000);
    let (firmware, n) = crate::linux_x86::firmware_e820(map, mem, None);
    let in_firmware =
        crate::linux_x86::firmware_areas(&firmware[..n]).iter().any(|a| a.start <= pages.start && pages.end <= a.end);
    let machine_bytes = low.get(pages.start, (pages.end - pages.start) as usize);
    let (Some(machine_bytes), true) = (machine_bytes, in_firmware) else {
        return ForGuest { rsdp_pages: None, tables: Err(AcpiError::RsdpNotInFirmware { addr: at }) };
    };
    let mut page = Vec::from(machine_bytes);
    let off = (at - pages.start) as usize;
    let tables = guest_area(map, mem).and_then(|(machine, guest)| {
        let area = area.filter(|w| w.range() == machine).ok_or(AcpiError::NoArea)?;
        relocate(at, &machine_bytes[off..off + len], area, guest.start)
    });
    match &tables {
        Ok(t) => page[off..off + t.rsdp.len()].copy_from_slice(&t.rsdp),
        Err(_) => page[off..off + len].fill(0),
    }
    ForGuest { rsdp_pages: Some((pages, page)), tables }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const BASE: u64 = 0x7ff_0000;
    const TO: u64 = 0x3ff_0000;

    fn header(sig: &[u8; 4], len: usize) -> Vec<u8> {
        let mut t = vec![0u8; len];
        t[..4].copy_from_slice(sig);
        put(&mut t, LENGTH, 4, len as u64);
        t[8] = 1;
        t[10..16].copy_from_slice(b"BOCHS ");
        t
    }

    /// A 64 KiB area laid out as the Bochs BIOS does: RSDT, XSDT, FADT (ACPI 2.0 length, with
    /// both 32- and 64-bit pointers), FACS (64-byte aligned), DSDT, MADT. Returns the area and a
    /// revision-2 RSDP.
    fn tables() -> (Vec<u8>, Vec<u8>) {
        let mut area = vec![0u8; 0x1_0000];
        let (rsdt, xsdt, fadt, facs, dsdt, madt) = (0x0, 0x40, 0x100, 0x200, 0x240, 0x800);
        let mut t = header(b"RSDT", HEADER_LEN + 8);
        put(&mut t, 36, 4, BASE + fadt);
        put(&mut t, 40, 4, BASE + madt);
        area[rsdt as usize..][..t.len()].copy_from_slice(&t);
        let mut t = header(b"XSDT", HEADER_LEN + 16);
        put(&mut t, 36, 8, BASE + fadt);
        put(&mut t, 44, 8, BASE + madt);
        area[xsdt as usize..][..t.len()].copy_from_slice(&t);
        let mut t = header(b"FACP", 244);
        put(&mut t, 36, 4, BASE + facs);
        put(&mut t, 40, 4, BASE + dsdt);
        put(&mut t, 132, 8, BASE + facs);
        put(&mut t, 140, 8, BASE + dsdt);
        put(&mut t, 148, 8, 0xb000); // X_PM1a_EVT_BLK's address (I/O space): not a pointer
        area[fadt as usize..][..t.len()].copy_from_slice(&t);
        let mut t = vec![0u8; 64];
        t[..4].copy_from_slice(b"FACS");
        put(&mut t, LENGTH, 4, 64);
        area[facs as usize..][..64].copy_from_slice(&t);
        let mut t = header(b"DSDT", 0x400);
        t[HEADER_LEN..].iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        area[dsdt as usize..][..t.len()].copy_from_slice(&t);
        let mut t = header(b"APIC", 0x50);
        put(&mut t, 36, 4, 0xfee0_0000);
        area[madt as usize..][..t.len()].copy_from_slice(&t);
        for (off, len) in [(rsdt, 44), (xsdt, 52), (fadt, 244), (dsdt, 0x400), (madt, 0x50)] {
            set_checksum(&mut area[off as usize..][..len], CHECKSUM);
        }
        (area, rsdp(2, BASE + rsdt, BASE + xsdt))
    }

    fn rsdp(revision: u8, rsdt: u64, xsdt: u64) -> Vec<u8> {
        let mut r = vec![0u8; if revision >= 2 { RSDP_V2_LEN } else { RSDP_V1_LEN }];
        r[..8].copy_from_slice(RSDP_SIGNATURE);
        r[9..15].copy_from_slice(b"BOCHS ");
        r[RSDP_REVISION] = revision;
        put(&mut r, RSDP_RSDT, 4, rsdt);
        if revision >= 2 {
            put(&mut r, RSDP_LENGTH, 4, RSDP_V2_LEN as u64);
            put(&mut r, RSDP_XSDT, 8, xsdt);
        }
        set_checksum(&mut r[..RSDP_V1_LEN], RSDP_CHECKSUM);
        if revision >= 2 {
            set_checksum(&mut r, RSDP_XCHECKSUM);
        }
        r
    }

    fn at(w: &[u8], base: u64, addr: u64, n: usize) -> u64 {
        le(w, (addr - base) as usize, n)
    }

    /// An independent check of a moved copy: every header's bytes sum to zero, and every
    /// pointer of the tree is the original one moved by `TO - BASE`.
    #[test]
    fn relocation_rewrites_every_pointer_and_checksum() {
        let (area, r) = tables();
        let out = relocate(0xf_5a10, &r, Window { base: BASE, bytes: &area }, TO).unwrap();
        assert_eq!(out.area, TO..TO + 0x1_0000);
        assert_eq!(out.rsdp_at, 0xf_5a10);
        let t = &out.tables;
        // The RSDP: both checksums, both pointers.
        assert_eq!(sum(&out.rsdp[..20]), 0);
        assert_eq!(sum(&out.rsdp), 0);
        assert_eq!((le(&out.rsdp, 16, 4), le(&out.rsdp, 24, 8)), (TO, TO + 0x40));
        // RSDT and XSDT entries.
        assert_eq!((at(t, TO, TO + 36, 4), at(t, TO, TO + 40, 4)), (TO + 0x100, TO + 0x800));
        assert_eq!((at(t, TO, TO + 0x40 + 36, 8), at(t, TO, TO + 0x40 + 44, 8)), (TO + 0x100, TO + 0x800));
        // The FADT's four pointers; its I/O register block stays.
        let f = TO + 0x100;
        assert_eq!(
            [at(t, TO, f + 36, 4), at(t, TO, f + 40, 4), at(t, TO, f + 132, 8), at(t, TO, f + 140, 8)],
            [TO + 0x200, TO + 0x240, TO + 0x200, TO + 0x240]
        );
        assert_eq!(at(t, TO, f + 148, 8), 0xb000);
        // Every table with a header sums to zero; the AML and the MADT's contents are untouched.
        for (off, len) in [(0, 44), (0x40, 52), (0x100, 244), (0x240, 0x400), (0x800, 0x50)] {
            assert_eq!(sum(&t[off..off + len]), 0, "table at {off:#x}");
        }
        assert_eq!(t[0x240 + HEADER_LEN..0x640], area[0x240 + HEADER_LEN..0x640]);
        assert_eq!(at(t, TO, TO + 0x800 + 36, 4), 0xfee0_0000);
        let sigs: Vec<_> = out.found.iter().map(|i| i.signature).collect();
        assert_eq!(sigs, [*b"RSDT", *b"XSDT", *b"FACP", *b"APIC", *b"FACS", *b"DSDT"]);
        // Moving back gives the machine's bytes again.
        let back = relocate(0xf_5a10, &out.rsdp, Window { base: TO, bytes: t }, BASE).unwrap();
        assert_eq!((back.tables, back.rsdp), (area, r));
    }

    #[test]
    fn an_acpi_1_rsdp_has_one_checksum_and_no_xsdt() {
        let (area, _) = tables();
        let r = rsdp(0, BASE, 0);
        let out = relocate(0xf_0000, &r, Window { base: BASE, bytes: &area }, TO).unwrap();
        assert_eq!(out.rsdp.len(), 20);
        assert_eq!((sum(&out.rsdp), le(&out.rsdp, 16, 4)), (0, TO));
        // The XSDT is not part of the tree: it is copied, not rewritten.
        assert!(!out.found.iter().any(|i| &i.signature == b"XSDT"));
        assert_eq!(le(&out.tables, 0x40 + 36, 8), BASE + 0x100);
    }

    #[test]
    fn the_rsdp_is_found_where_the_spec_says() {
        // A first MiB read from 0x400: the BDA's EBDA segment, an EBDA at 0x9fc00.
        let mut low = vec![0u8; 0x10_0000 - 0x400];
        let w = |low: &mut Vec<u8>, addr: u64, b: &[u8]| low[(addr - 0x400) as usize..][..b.len()].copy_from_slice(b);
        let r = rsdp(2, BASE, BASE + 0x40);
        w(&mut low, 0xf_5a10, &r);
        let view = |low: &Vec<u8>| find_rsdp(Window { base: 0x400, bytes: &low[..] });
        assert_eq!(view(&low), Some((0xf_5a10, 36)));
        // Not on a 16-byte boundary: not found.
        let mut odd = vec![0u8; low.len()];
        w(&mut odd, 0xf_5a18, &r);
        assert_eq!(view(&odd), None);
        // The EBDA's first KiB comes first, when the BDA names it.
        w(&mut low, 0x40e, &0x9fc0u16.to_le_bytes());
        w(&mut low, 0x9_fc40, &rsdp(0, BASE, 0));
        assert_eq!(view(&low), Some((0x9_fc40, 20)));
        // Beyond its first KiB it is not searched.
        let mut far = low.clone();
        w(&mut far, 0x9_fc40, &[0; 20]);
        w(&mut far, 0x9_fc00 + 1024, &rsdp(0, BASE, 0));
        assert_eq!(view(&far), Some((0xf_5a10, 36)));
        // A bad checksum, or a revision-2 RSDP whose extended checksum fails, is skipped.
        let mut bad = vec![0u8; low.len()];
        let mut r1 = rsdp(0, BASE, 0);
        r1[9] ^= 1;
        w(&mut bad, 0xe_0000, &r1);
        let mut r2 = r.clone();
        r2[35] ^= 1;
        w(&mut bad, 0xe_0010, &r2);
        assert_eq!(view(&bad), None);
        // An RSDP cut off by the end of what can be read is not one.
        let short = &low[..0x9_fc40 + 10 - 0x400];
        assert_eq!(find_rsdp(Window { base: 0x400, bytes: short }), None);
    }

    fn refused(area: &[u8], r: &[u8]) -> AcpiError {
        relocate(0xf_0000, r, Window { base: BASE, bytes: area }, TO).unwrap_err()
    }

    /// Rewrites a field of a table in place and fixes its checksum (over its length before the
    /// edit), so that only the planted fault is wrong.
    fn edit(area: &mut [u8], off: usize, at: usize, n: usize, v: u64) {
        let len = le(area, off + LENGTH, 4) as usize;
        put(area, off + at, n, v);
        set_checksum(&mut area[off..off + len], CHECKSUM);
    }

    #[test]
    fn hostile_tables_are_refused_with_the_reason() {
        let (good, r) = tables();
        // An RSDT entry that points outside the area.
        let mut a = good.clone();
        edit(&mut a, 0, 40, 4, 0x1000);
        assert_eq!(refused(&a, &r), AcpiError::OutsideArea { what: "an RSDT entry", addr: 0x1000 });
        // The RSDP's RSDT outside the area (an RSDP made for it, with good checksums).
        let e = refused(&good, &rsdp(2, 0xf_0000, BASE + 0x40));
        assert_eq!(e, AcpiError::OutsideArea { what: "the RSDP's RSDT address", addr: 0xf_0000 });
        // The FADT's DSDT pointing at the MADT: a bad signature.
        let mut a = good.clone();
        edit(&mut a, 0x100, 40, 4, BASE + 0x800);
        assert_eq!(refused(&a, &r), AcpiError::BadSignature { what: "DSDT", addr: BASE + 0x800, found: *b"APIC" });
        // A table that runs past the end of the area.
        let mut a = good.clone();
        edit(&mut a, 0x800, LENGTH, 4, 0x1_0000);
        assert_eq!(refused(&a, &r), AcpiError::RunsOut { what: "table", addr: BASE + 0x800, len: 0x1_0000 });
        // A header that starts in the area's last bytes.
        let mut a = good.clone();
        edit(&mut a, 0, 40, 4, BASE + 0xfff0);
        assert_eq!(refused(&a, &r), AcpiError::RunsOut { what: "table", addr: BASE + 0xfff0, len: 36 });
        // A length shorter than a header, and an RSDT whose entries are not whole.
        let mut a = good.clone();
        edit(&mut a, 0x800, LENGTH, 4, 20);
        assert_eq!(refused(&a, &r), AcpiError::BadLength { what: "table", addr: BASE + 0x800, len: 20 });
        let mut a = good.clone();
        edit(&mut a, 0, LENGTH, 4, 42);
        assert_eq!(refused(&a, &r), AcpiError::BadLength { what: "RSDT", addr: BASE, len: 42 });
        // A table whose checksum is wrong.
        let mut a = good.clone();
        a[0x240 + 100] ^= 0x55;
        assert_eq!(refused(&a, &r), AcpiError::BadChecksum { what: "DSDT", addr: BASE + 0x240 });
        // A FACS off its 64-byte boundary, and one too short.
        let mut a = good.clone();
        a.copy_within(0x200..0x240, 0x1010);
        edit(&mut a, 0x100, 36, 4, BASE + 0x1010);
        edit(&mut a, 0x100, 132, 8, BASE + 0x1010);
        assert_eq!(refused(&a, &r), AcpiError::MisalignedFacs { addr: BASE + 0x1010 });
        let mut a = good.clone();
        put(&mut a, 0x200 + LENGTH, 4, 32);
        assert_eq!(refused(&a, &r), AcpiError::BadLength { what: "FACS", addr: BASE + 0x200, len: 32 });
        // Two tables that overlap: the MADT entry moved into the DSDT.
        let mut a = good.clone();
        a.copy_within(0x800..0x850, 0x300);
        edit(&mut a, 0, 40, 4, BASE + 0x300);
        edit(&mut a, 0x40, 44, 8, BASE + 0x300);
        assert!(matches!(refused(&a, &r), AcpiError::BadChecksum { .. } | AcpiError::Overlap { .. }));
        // (A DSDT that still sums to zero with a table inside it: the overlap itself.)
        let mut a = good.clone();
        a.copy_within(0x800..0x850, 0x300);
        set_checksum(&mut a[0x240..0x640], CHECKSUM);
        edit(&mut a, 0, 40, 4, BASE + 0x300);
        edit(&mut a, 0x40, 44, 8, BASE + 0x300);
        assert_eq!(refused(&a, &r), AcpiError::Overlap { first: BASE + 0x240, second: BASE + 0x300 });
        // An RSDP naming no root table, and one that is not an RSDP at all.
        assert_eq!(refused(&good, &rsdp(0, 0, 0)), AcpiError::NoRoot);
        let mut nr = r.clone();
        nr[0] = b'X';
        assert_eq!(refused(&good, &nr), AcpiError::NoRsdp);
        // A move that would put a 32-bit pointer above 4 GiB.
        let e = relocate(0xf_0000, &r, Window { base: BASE, bytes: &good }, 1 << 32).unwrap_err();
        assert!(matches!(e, AcpiError::Above4G { .. }), "{e:?}");
        // A tree with a loop (the RSDT lists itself) is walked once, not forever.
        let mut a = good.clone();
        edit(&mut a, 0, 40, 4, BASE);
        assert!(relocate(0xf_0000, &r, Window { base: BASE, bytes: &a }, TO).is_ok());
        // Every message names the problem.
        assert!(alloc::format!("{}", AcpiError::RunsOut { what: "DSDT", addr: 1, len: 2 }).contains("runs past"));
    }

    #[test]
    fn every_cut_of_the_area_is_refused_or_relocated_without_panic() {
        let (good, r) = tables();
        for cut in (0..good.len()).step_by(7).chain([0x2b, 0x2c, 0x33, 0x34, 0x1f3, 0x1f4]) {
            let res = relocate(0xf_0000, &r, Window { base: BASE, bytes: &good[..cut] }, TO);
            assert!(res.is_err() || cut >= 0x850, "cut at {cut:#x}");
        }
        // Every single-byte corruption of the tables' bytes is either refused or (in a byte no
        // check covers: the FACS, the gaps) relocated with checksums that hold.
        for i in (0..0x900).step_by(3) {
            let mut a = good.clone();
            a[i] ^= 0xa5;
            if let Ok(out) = relocate(0xf_0000, &r, Window { base: BASE, bytes: &a }, TO) {
                for t in out.found.iter().filter(|t| &t.signature != b"FACS") {
                    let off = (t.addr - TO) as usize;
                    assert_eq!(sum(&out.tables[off..off + t.len as usize]), 0);
                }
            }
        }
    }

    #[test]
    fn the_guest_area_keeps_the_machines_distance_from_the_top() {
        let e = |addr, end: u64, kind| E820Entry { addr, size: end - addr, kind };
        let map = [
            e(0, 0x9_f000, E820_RAM),
            e(0x9_f000, 0xa_0000, 2),
            e(0x10_0000, 0xc1f_0000, E820_RAM),
            e(0xc1f_0000, 0xc20_0000, E820_ACPI),
            e(0xfffc_0000, 1 << 32, 2),
        ];
        assert_eq!(machine_area(&map), Ok(0xc1f_0000..0xc20_0000));
        assert_eq!(guest_area(&map, 128 << 20), Ok((0xc1f_0000..0xc20_0000, 0x7ff_0000..0x800_0000)));
        // An area below some RAM keeps its distance from the top.
        let map2 = [
            e(0x10_0000, 0x700_0000, E820_RAM),
            e(0x700_0000, 0x701_0000, E820_ACPI),
            e(0x701_0000, 0x800_0000, E820_RAM),
        ];
        assert_eq!(guest_area(&map2, 64 << 20).map(|g| g.1), Ok(0x300_0000..0x301_0000));
        assert_eq!(machine_area(&map[..3]), Err(AcpiError::NoArea));
        let two = [map[3], e(0xd00_0000, 0xd01_0000, E820_ACPI)];
        assert_eq!(machine_area(&two), Err(AcpiError::SeveralAreas));
        assert!(matches!(guest_area(&map2, 0x10_0000 + 0x1000), Err(AcpiError::AreaDoesNotFit { .. })));
        // A top of RAM that is not on a 64-byte boundary would misalign the FACS.
        let odd = [e(0x10_0000, 0xc1f_0000, E820_RAM), e(0xc1f_0000, 0xc20_0010, E820_ACPI)];
        assert!(matches!(guest_area(&odd, 128 << 20), Err(AcpiError::MisalignedMove { .. })));
    }

    #[test]
    fn a_guest_gets_the_moved_tables_and_its_own_rsdp_page_or_the_rsdp_wiped() {
        let e = |addr, end: u64, kind| E820Entry { addr, size: end - addr, kind };
        let map = [
            e(0, 0x9_f000, E820_RAM),
            e(0x9_f000, 0xa_0000, 2),
            e(0xe_8000, 0x10_0000, 2),
            e(0x10_0000, BASE, E820_RAM),
            e(BASE, BASE + 0x1_0000, E820_ACPI),
        ];
        let (area, r) = tables();
        let mut low = vec![0u8; 0x10_0000 - 0x400];
        low[(0xf_9fa0 - 0x400)..][..r.len()].copy_from_slice(&r);
        low[0xf_9000 - 0x400] = 0x5a; // a byte of the BIOS beside it, kept in the copy
        let lw = Window { base: 0x400, bytes: &low };
        let aw = Window { base: BASE, bytes: &area };
        let g = for_guest(&map, 64 << 20, lw, Some(aw));
        let t = g.tables.as_ref().unwrap();
        assert_eq!(t.area, (64 << 20) - 0x1_0000..64 << 20);
        let (pages, page) = g.rsdp_pages.unwrap();
        assert_eq!(pages, 0xf_9000..0xf_a000);
        assert_eq!((page[0], &page[0xfa0..0xfa0 + 36]), (0x5a, &t.rsdp[..]));
        assert_eq!(le(&page, 0xfa0 + 16, 4), t.area.start);
        // Refused tables (a bad checksum): the guest's copy of the page has no RSDP left.
        let mut bad = area.clone();
        bad[0x240 + 50] ^= 1;
        let g = for_guest(&map, 64 << 20, lw, Some(Window { base: BASE, bytes: &bad }));
        assert_eq!(g.tables, Err(AcpiError::BadChecksum { what: "DSDT", addr: BASE + 0x240 }));
        let (_, page) = g.rsdp_pages.unwrap();
        assert_eq!(find_rsdp(Window { base: 0xf_9000, bytes: &page }), None);
        assert_eq!((page[0], &page[0xfa0..0xfa0 + 36]), (0x5a, &[0u8; 36][..]));
        // No area given, or one that is not the map's: no tables, the RSDP wiped all the same.
        for w in [None, Some(Window { base: BASE + 0x1000, bytes: &area[..0x1000] })] {
            let g = for_guest(&map, 64 << 20, lw, w);
            assert_eq!(g.tables, Err(AcpiError::NoArea));
            assert!(g.rsdp_pages.is_some_and(|(_, p)| p[0xfa0..0xfa0 + 36] == [0; 36]));
        }
        // No RSDP: nothing to replace.
        let empty = vec![0u8; low.len()];
        let g = for_guest(&map, 64 << 20, Window { base: 0x400, bytes: &empty }, Some(aw));
        assert_eq!((g.rsdp_pages, g.tables), (None, Err(AcpiError::NoRsdp)));
        // An RSDP in a page the guest has as RAM (the map says so): no private copy can replace it.
        let mut in_ram = vec![0u8; low.len()];
        in_ram[0x9_e000 - 0x400 + 0x10..][..r.len()].copy_from_slice(&r);
        in_ram[0x40e - 0x400..][..2].copy_from_slice(&0x9e00u16.to_le_bytes());
        let g = for_guest(&map, 64 << 20, Window { base: 0x400, bytes: &in_ram }, Some(aw));
        assert_eq!((g.rsdp_pages, g.tables), (None, Err(AcpiError::RsdpNotInFirmware { addr: 0x9_e010 })));
    }

    #[test]
    fn the_fadt_names_the_acpi_ports_and_the_hpet_table_its_registers() {
        let (mut area, _) = tables();
        // The Bochs BIOS's blocks: SMI_CMD 0xb2, PM1a event 0xb000 (4), control 0xb004 (2), PM timer
        // 0xb008 (4), GPE0 0xafe0 (4); the rest absent.
        for (at, n, v) in [(48, 4, 0xb2), (56, 4, 0xb000), (64, 4, 0xb004), (76, 4, 0xb008), (80, 4, 0xafe0)] {
            put(&mut area, 0x100 + at, n, v);
        }
        for (at, v) in [(88, 4), (89, 2), (91, 4), (92, 4)] {
            area[0x100 + at] = v;
        }
        set_checksum(&mut area[0x100..0x100 + 244], CHECKSUM);
        // An HPET table listed by the RSDT (replacing the MADT): registers at 0xfed00000.
        let mut t = header(b"HPET", 56);
        put(&mut t, 44, 8, 0xfed0_0000);
        set_checksum(&mut t, CHECKSUM);
        area[0x900..0x900 + 56].copy_from_slice(&t);
        let mut r = rsdp(0, BASE, 0);
        let out = relocate(0xf_0000, &r, Window { base: BASE, bytes: &area }, TO).unwrap();
        let hw = hardware(&out);
        assert_eq!(hw.ports, [0xb2..0xb3, 0xb000..0xb004, 0xb004..0xb006, 0xb008..0xb00c, 0xafe0..0xafe4]);
        assert_eq!(hw.hpet, None, "the RSDT does not list it yet");
        put(&mut area, 40, 4, BASE + 0x900);
        set_checksum(&mut area[..44], CHECKSUM);
        r = rsdp(0, BASE, 0);
        let out = relocate(0xf_0000, &r, Window { base: BASE, bytes: &area }, TO).unwrap();
        assert_eq!(hardware(&out).hpet, Some(0xfed0_0000));
        // Registers in I/O space (address space ID 1) are not a page to map.
        area[0x900 + 40] = 1;
        set_checksum(&mut area[0x900..0x900 + 56], CHECKSUM);
        let out = relocate(0xf_0000, &r, Window { base: BASE, bytes: &area }, TO).unwrap();
        assert_eq!(hardware(&out).hpet, None);
    }
}
