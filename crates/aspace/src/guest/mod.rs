//! The guest's own paging: walking its page tables for GVA copies and instruction fetch.
//!
//! Everything here works through the [`GuestMemory`] trait, so it runs on any architecture and
//! over any implementation (the address space, a test double). The walkers read the guest's
//! page-table entries as guest-physical reads, update accessed/dirty bits with an atomic
//! compare-exchange as the hardware would, and bound every walk by the number of levels of the
//! mode: cycles, reserved bits, entries pointing into MMIO or unmapped space give a typed
//! [`GuestVaError`] naming the guest-virtual address, the access and (where there is one) the
//! guest-physical address that failed. No value a guest controls can make them panic.
#![forbid(unsafe_code)]

mod riscv;
mod tlb;
mod x86;

pub use riscv::RiscvPaging;
pub use tlb::GuestTlb;
pub use x86::{X86Cpu, X86Paging};

use crate::mem::{GuestMemError, GuestMemory, PageHint};
use core::error::Error;
use core::fmt;
use twostage_npt::{Access, AddrOutOfRange, GuestPhysAddr, GuestVirtAddr};

/// How the guest translates its virtual addresses right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestPaging {
    /// No translation: a guest-virtual address is the guest-physical address (x86 with CR0.PG=0,
    /// RISC-V vsatp.MODE=Bare).
    Bare,
    /// x86-64 4-level paging (Intel SDM Vol. 3A 4.5).
    X86_64(X86Paging),
    /// RISC-V Sv39, Sv48 or Sv57 (RISC-V Privileged §4.3-4.6), the guest's VS-stage.
    Riscv(RiscvPaging),
}

/// Why a paging mode cannot be used from the given register values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingModeError {
    /// x86: paging is on but not in IA-32e mode (32-bit or PAE paging), which is not supported.
    X86NotLongMode,
    /// x86: CR4.LA57 asks for 5-level paging, which is not supported.
    X86FiveLevel,
    /// RISC-V: vsatp.MODE is reserved or not supported (the value).
    RiscvMode(u8),
    /// The root table's address does not fit a guest-physical address.
    RootOutOfRange(AddrOutOfRange),
}

impl fmt::Display for PagingModeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::X86NotLongMode => f.write_str("x86 paging outside IA-32e mode (32-bit or PAE) is not supported"),
            Self::X86FiveLevel => f.write_str("x86 5-level paging (CR4.LA57) is not supported"),
            Self::RiscvMode(m) => write!(f, "vsatp.MODE {m} is reserved or not supported"),
            Self::RootOutOfRange(e) => write!(f, "the root table's address is not a guest-physical address ({e})"),
        }
    }
}

impl Error for PagingModeError {}

/// `v` as a guest-physical address, or the error `fault` makes when it does not fit. For values
/// the guest controls (an entry's address bits, a translated address): the architecture defines
/// what an out-of-range value is (a reserved-bit page fault, a non-canonical address), and that
/// error names the address, so the range error adds nothing to it.
pub(crate) fn guest_gpa<E>(v: u64, fault: impl FnOnce() -> E) -> Result<GuestPhysAddr, E> {
    match GuestPhysAddr::try_new(v) {
        Ok(a) => Ok(a),
        Err(AddrOutOfRange { .. }) => Err(fault()),
    }
}

impl GuestPaging {
    /// From the guest's x86 control registers on a processor described by `cpu` (see
    /// [`X86Paging::from_regs`]).
    pub fn x86_64(cr0: u64, cr3: u64, cr4: u64, efer: u64, cpu: X86Cpu) -> Result<Self, PagingModeError> {
        X86Paging::from_regs(cr0, cr3, cr4, efer, cpu)
    }

    /// From the guest's vsatp and vsstatus (see [`RiscvPaging::from_regs`]).
    pub fn riscv(vsatp: u64, vsstatus: u64) -> Result<Self, PagingModeError> {
        RiscvPaging::from_regs(vsatp, vsstatus)
    }
}

impl fmt::Display for PageFaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotPresent => "an entry is not present",
            Self::Reserved => "an entry has reserved bits set",
            Self::Protection => "the rights do not allow the access",
            Self::AccessedDirty => "A or D clear and not updated by the hart",
            Self::MisalignedSuperpage => "misaligned superpage",
            Self::NoLeaf => "no leaf at the last level",
        })
    }
}

/// Why the guest's own translation refused an access: the fault the guest itself would take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageFaultKind {
    /// An entry on the path is not present (x86 P=0, RISC-V V=0).
    NotPresent,
    /// An entry has reserved bits or a reserved encoding set (x86 #PF with RSVD; RISC-V W without R,
    /// reserved PTE bits, A/D/U on a non-leaf entry).
    Reserved,
    /// The leaf's rights do not allow the access (write to read-only, user/supervisor, no-execute).
    Protection,
    /// RISC-V: A is clear, or D is clear on a store, and the hart does not update them (Svade).
    AccessedDirty,
    /// RISC-V: a superpage whose low PPN bits are not zero.
    MisalignedSuperpage,
    /// RISC-V: the walk ran out of levels without finding a leaf.
    NoLeaf,
}

/// A guest-virtual access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestVaError {
    /// The guest's page tables refuse the access: the guest would take a page fault.
    PageFault {
        /// The address.
        gva: GuestVirtAddr,
        /// The access.
        access: Access,
        /// Why.
        kind: PageFaultKind,
        /// Level of the entry that decided it (0 = the 4 KiB level).
        level: u8,
    },
    /// The address is not canonical for the mode (x86: #GP; RISC-V: a page fault).
    NonCanonical {
        /// The address.
        gva: GuestVirtAddr,
        /// The access.
        access: Access,
    },
    /// A guest page-table entry could not be read or its A/D bits updated at the guest-physical
    /// level (it lies in MMIO or unmapped space, or is read-only).
    TableAccess {
        /// The address being translated.
        gva: GuestVirtAddr,
        /// The access.
        access: Access,
        /// Guest-physical address of the entry.
        entry: GuestPhysAddr,
        /// What the guest-physical access said.
        error: GuestMemError,
    },
    /// The translation succeeded but the guest-physical access did not.
    Memory {
        /// The address.
        gva: GuestVirtAddr,
        /// The access.
        access: Access,
        /// Where it translated to.
        gpa: GuestPhysAddr,
        /// What the guest-physical access said.
        error: GuestMemError,
    },
    /// An instruction fetch from an address not aligned to the ISA's instruction alignment.
    Misaligned {
        /// The address.
        gva: GuestVirtAddr,
    },
}

impl GuestVaError {
    /// The guest-virtual address the error is about.
    pub fn gva(&self) -> GuestVirtAddr {
        match *self {
            Self::PageFault { gva, .. }
            | Self::NonCanonical { gva, .. }
            | Self::TableAccess { gva, .. }
            | Self::Memory { gva, .. }
            | Self::Misaligned { gva } => gva,
        }
    }

    /// The RISC-V exception cause the guest would take for a page fault (12 instruction,
    /// 13 load, 15 store/AMO page fault; RISC-V Privileged §3.1.15, Table 3.6), if it is one.
    pub fn riscv_cause(&self) -> Option<u64> {
        match self {
            Self::PageFault { access, .. } | Self::NonCanonical { access, .. } => Some(match access {
                Access::Execute => 12,
                Access::Read => 13,
                Access::Write => 15,
            }),
            _ => None,
        }
    }
}

impl fmt::Display for GuestVaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PageFault { gva, access, kind, level } => {
                write!(f, "{access} at {gva}: guest page fault ({kind}, level {level})")
            }
            Self::NonCanonical { gva, access } => write!(f, "{access} at {gva}: not canonical"),
            Self::TableAccess { gva, access, entry, .. } => {
                write!(f, "{access} at {gva}: the guest page-table entry at {entry} is unreachable")
            }
            Self::Memory { gva, access, gpa, .. } => write!(f, "{access} at {gva}: guest-physical {gpa} unreachable"),
            Self::Misaligned { gva } => write!(f, "instruction fetch at {gva}: misaligned"),
        }
    }
}

impl Error for GuestVaError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::TableAccess { error, .. } | Self::Memory { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A translation: the guest-physical address and the bytes left in the guest page from there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Where the address translated to.
    pub gpa: GuestPhysAddr,
    /// Bytes from `gpa` to the end of the guest's page (4 KiB, 2 MiB, 1 GiB...).
    pub page_remaining: u64,
}

/// The tables that held the leaves of earlier translations, reused by the next translation
/// they cover: a paging-structure cache (Intel SDM Vol. 3A 4.10.3; RISC-V Privileged §4.3.2
/// lets an implementation cache non-leaf PTEs likewise), so consecutive guest pages cost one
/// entry read each instead of a walk from the root. Only a walk whose entries all allowed the
/// access and had their A bits set is remembered.
///
/// The free functions keep one table for one copy call and no longer: across calls the guest
/// may have changed its tables and fenced its own TLB, which the hypervisor does not see. A
/// [`GuestTlb`] keeps [`tlb::TABLES`] of them across calls, dropped on the guest's fences.
pub(crate) struct WalkCache<'a> {
    slots: &'a mut [Option<CachedTable>],
}

/// See [`WalkCache`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct CachedTable {
    /// The address bits above the range the table covers.
    prefix: u64,
    /// The table's level (0 = the 4 KiB level).
    pub(crate) level: u32,
    /// Guest-physical address of the table.
    pub(crate) table: GuestPhysAddr,
    /// Architecture bits folded from the entries above it (x86: RW, US, XD).
    pub(crate) bits: u64,
    /// The memory's host view of the table's page (see [`crate::PageHint`]).
    pub(crate) hint: PageHint,
}

impl<'a> WalkCache<'a> {
    fn new(slots: &'a mut [Option<CachedTable>]) -> Self {
        debug_assert!(!slots.is_empty());
        Self { slots }
    }

    fn prefix(va: u64, level: u32) -> u64 {
        va >> (12 + 9 * (level + 1))
    }

    fn slot(&self, va: u64) -> usize {
        ((va >> 21) as usize) % self.slots.len()
    }

    /// The cached table if it covers `va`.
    pub(crate) fn hit(&self, va: u64) -> Option<CachedTable> {
        self.slots[self.slot(va)].filter(|c| Self::prefix(va, c.level) == c.prefix)
    }

    /// Remembers the table at `level` that held the leaf for `va`.
    pub(crate) fn store(&mut self, va: u64, level: u32, table: GuestPhysAddr, bits: u64, hint: PageHint) {
        let i = self.slot(va);
        self.slots[i] = Some(CachedTable { prefix: Self::prefix(va, level), level, table, bits, hint });
    }

    /// Forgets every table.
    fn clear(&mut self) {
        self.slots.fill(None);
    }
}

/// A walk's result: the translation, the level of the leaf (0 = 4 KiB page), and whether it
/// settled (every A bit, and D for a write, seen set: else the entries kept changing under the
/// walk and the translation is not to be cached).
pub(crate) struct Walk {
    pub(crate) t: Translation,
    pub(crate) level: u32,
    pub(crate) settled: bool,
}

/// Translates `gva` for `access` through the guest's paging, updating A/D bits as the
/// hardware would (x86 always; RISC-V when the mode says the hart updates them).
pub fn translate_gva<M: GuestMemory + ?Sized>(
    mem: &mut M,
    paging: &GuestPaging,
    gva: GuestVirtAddr,
    access: Access,
) -> Result<Translation, GuestVaError> {
    let mut one = [None];
    translate_cached(mem, paging, gva, access, &mut WalkCache::new(&mut one)).map(|w| w.t)
}

/// A translation through `tlb` (made current by [`GuestTlb::begin`]): its page entry, or a walk
/// (through its tables) that is then remembered.
fn translate_through<M: GuestMemory + ?Sized>(
    mem: &mut M,
    paging: &GuestPaging,
    gva: GuestVirtAddr,
    access: Access,
    tlb: &mut GuestTlb,
) -> Result<Translation, GuestVaError> {
    let v = gva.as_u64();
    if let Some(t) = tlb.lookup(v, access) {
        return Ok(t);
    }
    let w = translate_cached(mem, paging, gva, access, &mut WalkCache::new(tlb.tables()))?;
    if w.settled && !matches!(paging, GuestPaging::Bare) {
        tlb.insert(v, access, w.t, w.level);
    }
    Ok(w.t)
}

/// [`translate_gva`] with a walk cache kept across the translations of one copy.
fn translate_cached<M: GuestMemory + ?Sized>(
    mem: &mut M,
    paging: &GuestPaging,
    gva: GuestVirtAddr,
    access: Access,
    cache: &mut WalkCache<'_>,
) -> Result<Walk, GuestVaError> {
    match paging {
        GuestPaging::Bare => {
            let gpa = guest_gpa(gva.as_u64(), || GuestVaError::NonCanonical { gva, access })?;
            Ok(Walk { t: Translation { gpa, page_remaining: 4096 - gva.offset_in(4096) }, level: 0, settled: true })
        }
        GuestPaging::X86_64(p) => x86::translate(mem, p, gva, access, cache),
        GuestPaging::Riscv(p) => riscv::translate(mem, p, gva, access, cache),
    }
}

/// Calls `f(gpa, offset, len)` for each guest page piece of `gva..gva+len`, after translating
/// all of them (so a failing translation is reported before any byte moves); through `tlb` if
/// given (made current by [`GuestTlb::begin`]).
fn for_each_piece<M: GuestMemory + ?Sized>(
    mem: &mut M,
    paging: &GuestPaging,
    gva: GuestVirtAddr,
    len: usize,
    access: Access,
    mut tlb: Option<&mut GuestTlb>,
    mut f: impl FnMut(&mut M, GuestPhysAddr, usize, usize) -> Result<(), GuestVaError>,
) -> Result<(), GuestVaError> {
    if let Some(tlb) = tlb.as_deref_mut() {
        // The common case through a TLB: the span is contiguous in guest-physical memory (one
        // guest page, or pages that follow each other), so it is one piece and needs no list.
        let mut off = 0usize;
        let mut piece: Option<(GuestPhysAddr, usize)> = None;
        while off < len {
            let va = GuestVirtAddr::new(gva.as_u64().wrapping_add(off as u64));
            let t = translate_through(mem, paging, va, access, tlb)?;
            let chunk = (t.page_remaining.min((len - off) as u64)) as usize;
            piece = match piece {
                None => Some((t.gpa, chunk)),
                Some((g, c)) if g.checked_add(c as u64) == Some(t.gpa) => Some((g, c + chunk)),
                // Not contiguous: the general way below (the pages translated so far hit).
                Some(_) => break,
            };
            off += chunk;
        }
        if off >= len {
            return match piece {
                Some((g, c)) => f(mem, g, 0, c),
                None => Ok(()),
            };
        }
    }
    // Translate everything first: at most one translation per 4 KiB page is kept on the stack
    // in small batches, so very long copies do not allocate. Guest pages that follow each other
    // in guest-physical memory make one piece.
    const BATCH: usize = 16;
    let mut one = [None];
    let mut cache = WalkCache::new(&mut one);
    let mut done = 0usize;
    while done < len {
        if access == Access::Write && tlb.is_none() {
            // The previous batch's bytes may have overwritten the guest's own tables. (A
            // `GuestTlb`, like the processor's, keeps its entries until the guest fences.)
            cache.clear();
        }
        let mut pieces = [(GuestPhysAddr::ZERO, 0usize, 0usize); BATCH];
        let mut n = 0;
        let mut off = done;
        while off < len && n < BATCH {
            let va = GuestVirtAddr::new(gva.as_u64().wrapping_add(off as u64));
            let t = match tlb.as_deref_mut() {
                Some(tlb) => translate_through(mem, paging, va, access, tlb)?,
                None => translate_cached(mem, paging, va, access, &mut cache)?.t,
            };
            let chunk = (t.page_remaining.min((len - off) as u64)) as usize;
            match n.checked_sub(1).map(|i| &mut pieces[i]) {
                Some((g, _, c)) if g.checked_add(*c as u64) == Some(t.gpa) => *c += chunk,
                _ => {
                    pieces[n] = (t.gpa, off, chunk);
                    n += 1;
                }
            }
            off += chunk;
        }
        for &(gpa, o, c) in &pieces[..n] {
            f(mem, gpa, o, c)?;
        }
        done = off;
    }
    Ok(())
}

/// The guest-virtual address of the byte a failed piece access names: the piece at offset `o`
/// of a copy from `gva` covers `c` bytes from `gpa` (several guest pages merged).
fn gva_in_piece(gva: GuestVirtAddr, gpa: GuestPhysAddr, o: usize, c: usize, error: &GuestMemError) -> GuestVirtAddr {
    let within = error.gpa().as_u64().wrapping_sub(gpa.as_u64());
    let at = if within < c as u64 { o as u64 + within } else { o as u64 };
    GuestVirtAddr::new(gva.as_u64().wrapping_add(at))
}

/// Reads guest memory at a guest-virtual address.
pub fn copy_from_guest_va<M: GuestMemory + ?Sized>(
    mem: &mut M,
    paging: &GuestPaging,
    gva: GuestVirtAddr,
    buf: &mut [u8],
) -> Result<(), GuestVaError> {
    read_va_as(mem, paging, gva, buf, Access::Read, None)
}

fn read_va_as<M: GuestMemory + ?Sized>(
    mem: &mut M,
    paging: &GuestPaging,
    gva: GuestVirtAddr,
    buf: &mut [u8],
    access: Access,
    tlb: Option<&mut GuestTlb>,
) -> Result<(), GuestVaError> {
    let len = buf.len();
    for_each_piece(mem, paging, gva, len, access, tlb, |m, gpa, o, c| {
        m.read_as(gpa, &mut buf[o..o + c], access).map_err(|error| GuestVaError::Memory {
            gva: gva_in_piece(gva, gpa, o, c, &error),
            access,
            gpa: error.gpa(),
            error,
        })
    })
}

/// Writes guest memory at a guest-virtual address. Every page
/// is translated (for writing) before any byte is written.
pub fn copy_to_guest_va<M: GuestMemory + ?Sized>(
    mem: &mut M,
    paging: &GuestPaging,
    gva: GuestVirtAddr,
    buf: &[u8],
) -> Result<(), GuestVaError> {
    write_va(mem, paging, gva, buf, None)
}

fn write_va<M: GuestMemory + ?Sized>(
    mem: &mut M,
    paging: &GuestPaging,
    gva: GuestVirtAddr,
    buf: &[u8],
    tlb: Option<&mut GuestTlb>,
) -> Result<(), GuestVaError> {
    for_each_piece(mem, paging, gva, buf.len(), Access::Write, tlb, |m, gpa, o, c| {
        m.write(gpa, &buf[o..o + c]).map_err(|error| GuestVaError::Memory {
            gva: gva_in_piece(gva, gpa, o, c, &error),
            access: Access::Write,
            gpa: error.gpa(),
            error,
        })
    })
}

/// Which instruction encoding to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// RISC-V with the C extension: 16-bit parcels, 2-byte aligned.
    Riscv,
    /// x86: up to 15 bytes, any alignment.
    X86,
}

/// Instruction bytes fetched from the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Instruction {
    bytes: [u8; 15],
    len: u8,
    /// x86: why fewer than 15 bytes were fetched (the next page could not be reached); the
    /// decoder needs to know only if the instruction really extends that far.
    pub truncated_by: Option<GuestVaError>,
}

impl Instruction {
    /// The bytes fetched.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
    /// How many bytes were fetched (RISC-V: 2 or 4; x86: 1..=15).
    pub fn len(&self) -> usize {
        self.len as usize
    }
    /// Whether nothing was fetched (never true for a successful fetch).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// RISC-V: the instruction as a 32-bit value (a compressed one in the low 16 bits).
    pub fn riscv_bits(&self) -> u32 {
        let mut v = 0u32;
        for (i, b) in self.bytes().iter().take(4).enumerate() {
            v |= u32::from(*b) << (8 * i);
        }
        v
    }
}

impl fmt::Debug for Instruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Instruction({:02x?}", self.bytes())?;
        if let Some(e) = &self.truncated_by {
            write!(f, ", truncated by {e}")?;
        }
        f.write_str(")")
    }
}

/// Fetches the guest's instruction at `pc`.
///
/// RISC-V: reads the 16-bit parcel at `pc`; only when its low two bits are 0b11 (a 32-bit
/// instruction, RISC-V Unprivileged §1.5 "Base Instruction-Length Encoding") reads the second
/// parcel at `pc + 2`, translated on its own so a page-crossing instruction works (and a fault
/// on the second page names `pc + 2`). `pc` must be 2-byte aligned.
///
/// x86: reads up to 15 bytes (Intel SDM Vol. 2A 2.3.11, the maximum instruction length); a
/// fault on the first byte is an error, a fault on a following page ends the fetch early and is
/// reported in [`Instruction::truncated_by`].
///
/// Every fetch is an execute access at both stages.
pub fn fetch_guest_instruction<M: GuestMemory + ?Sized>(
    mem: &mut M,
    paging: &GuestPaging,
    pc: GuestVirtAddr,
    isa: Isa,
) -> Result<Instruction, GuestVaError> {
    let mut insn = Instruction { bytes: [0; 15], len: 0, truncated_by: None };
    match isa {
        Isa::Riscv => {
            if !pc.is_aligned(2) {
                return Err(GuestVaError::Misaligned { gva: pc });
            }
            read_va_as(mem, paging, pc, &mut insn.bytes[..2], Access::Execute, None)?;
            insn.len = 2;
            if insn.bytes[0] & 0b11 == 0b11 {
                let next = GuestVirtAddr::new(pc.as_u64().wrapping_add(2));
                read_va_as(mem, paging, next, &mut insn.bytes[2..4], Access::Execute, None)?;
                insn.len = 4;
            }
        }
        Isa::X86 => {
            let mut off = 0usize;
            while off < 15 {
                let va = GuestVirtAddr::new(pc.as_u64().wrapping_add(off as u64));
                let t = match translate_gva(mem, paging, va, Access::Execute) {
                    Ok(t) => t,
                    Err(e) if off > 0 => {
                        insn.truncated_by = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let n = (t.page_remaining.min((15 - off) as u64)) as usize;
                if let Err(error) = mem.read_as(t.gpa, &mut insn.bytes[off..off + n], Access::Execute) {
                    let e = GuestVaError::Memory { gva: va, access: Access::Execute, gpa: error.gpa(), error };
                    if off == 0 {
                        return Err(e);
                    }
                    insn.truncated_by = Some(e);
                    break;
                }
                off += n;
                insn.len = off as u8;
            }
        }
    }
    Ok(insn)
}
