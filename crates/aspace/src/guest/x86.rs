//! x86-64 4-level paging, walked in software (Intel SDM Vol. 3A 4.5, 4.6, 4.8).
#![forbid(unsafe_code)]

use super::{guest_gpa, GuestPaging, GuestVaError, PageFaultKind, PagingModeError, Translation, Walk, WalkCache};
use crate::mem::{GuestMemory, PageHint};
use twostage_npt::{Access, GuestPhysAddr, GuestVirtAddr};

/// CR0.PG, bit 31 (Intel SDM Vol. 3A 2.5).
const CR0_PG: u64 = 1 << 31;
/// CR0.WP, bit 16: supervisor writes honour read-only pages (SDM Vol. 3A 2.5, 4.6.1).
const CR0_WP: u64 = 1 << 16;
/// CR4.PAE, bit 5 (SDM Vol. 3A 2.5).
const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57, bit 12: 5-level paging (SDM Vol. 3A 2.5).
const CR4_LA57: u64 = 1 << 12;
/// CR4.SMEP, bit 20 (SDM Vol. 3A 4.6.1).
const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP, bit 21 (SDM Vol. 3A 4.6.1).
const CR4_SMAP: u64 = 1 << 21;
/// IA32_EFER.NXE, bit 11 (SDM Vol. 3A 2.2.1, Table 2-1... and 4.1.1).
const EFER_NXE: u64 = 1 << 11;
/// IA32_EFER.LMA, bit 10: IA-32e mode active.
const EFER_LMA: u64 = 1 << 10;

/// Paging-entry bits (SDM Vol. 3A 4.5, Tables 4-15 to 4-20).
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// x86-64 4-level paging as the guest's registers set it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X86Paging {
    /// Guest-physical address of the PML4 table (CR3 bits 51:12).
    pub pml4: GuestPhysAddr,
    /// CR0.WP: supervisor writes to read-only pages fault.
    pub wp: bool,
    /// IA32_EFER.NXE: bit 63 of entries is XD (else reserved).
    pub nxe: bool,
    /// CR4.SMEP: supervisor fetches from user pages fault.
    pub smep: bool,
    /// CR4.SMAP: supervisor data accesses to user pages fault (EFLAGS.AC is taken as 0).
    pub smap: bool,
    /// The access is made as user mode (CPL 3) rather than supervisor.
    pub user: bool,
    /// The processor's MAXPHYADDR (36..=52): entry bits 51:MAXPHYADDR are reserved.
    pub maxphyaddr: u8,
    /// 1 GiB pages are supported (CPUID.80000001H:EDX.Page1GB); else PS in a PDPTE is reserved.
    pub page_1g: bool,
}

/// What the processor's own paging offers, which a software walk of the guest's tables must
/// mirror: under VMX the guest's paging-structure entries are checked by the physical processor,
/// so its MAXPHYADDR decides which address bits are reserved (Intel SDM Vol. 3A 4.5.4,
/// "Linear-Address Translation with 4-Level Paging and 5-Level Paging") and its CPUID decides
/// whether a PDPTE may map 1 GiB. There is no default: a walker that guessed 52 would accept
/// entries the processor faults on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X86Cpu {
    /// MAXPHYADDR: CPUID.80000008H:EAX\[7:0\] (36 where the leaf is missing).
    pub maxphyaddr: u8,
    /// 1 GiB pages: CPUID.80000001H:EDX\[26\] (Page1GB).
    pub page_1g: bool,
}

impl X86Cpu {
    /// From the raw CPUID leaves: `max_ext` is CPUID.80000000H:EAX, `ext1_edx` is
    /// CPUID.80000001H:EDX, `ext8_eax` is CPUID.80000008H:EAX.
    pub fn from_cpuid(max_ext: u32, ext1_edx: u32, ext8_eax: u32) -> Self {
        let maxphyaddr = if max_ext >= 0x8000_0008 { (ext8_eax & 0xff) as u8 } else { 36 };
        let page_1g = max_ext >= 0x8000_0001 && ext1_edx & (1 << 26) != 0;
        Self { maxphyaddr, page_1g }
    }
}

impl X86Paging {
    /// Decodes the guest's CR0, CR3, CR4 and IA32_EFER on a processor described by `cpu`. Paging
    /// off gives [`GuestPaging::Bare`]; IA-32e 4-level paging gives [`GuestPaging::X86_64`];
    /// 32-bit, PAE and 5-level paging are refused. Accesses are supervisor-mode; see
    /// [`X86Paging::user`].
    pub fn from_regs(cr0: u64, cr3: u64, cr4: u64, efer: u64, cpu: X86Cpu) -> Result<GuestPaging, PagingModeError> {
        if cr0 & CR0_PG == 0 {
            return Ok(GuestPaging::Bare);
        }
        if efer & EFER_LMA == 0 || cr4 & CR4_PAE == 0 {
            return Err(PagingModeError::X86NotLongMode);
        }
        if cr4 & CR4_LA57 != 0 {
            return Err(PagingModeError::X86FiveLevel);
        }
        // CR3 bits 51:12 hold the PML4 address (SDM Vol. 3A 4.5.2, Table 4-12); the low bits are
        // PCID or PWT/PCD.
        let base = cr3 & 0x000f_ffff_ffff_f000;
        let pml4 = GuestPhysAddr::try_new(base).map_err(PagingModeError::RootOutOfRange)?;
        Ok(GuestPaging::X86_64(Self {
            pml4,
            wp: cr0 & CR0_WP != 0,
            nxe: efer & EFER_NXE != 0,
            smep: cr4 & CR4_SMEP != 0,
            smap: cr4 & CR4_SMAP != 0,
            user: false,
            maxphyaddr: cpu.maxphyaddr,
            page_1g: cpu.page_1g,
        }))
    }

    fn phys_mask(&self) -> u64 {
        let m = self.maxphyaddr.clamp(36, 52);
        (1u64 << m) - 1
    }
}

fn read_entry<M: GuestMemory + ?Sized>(
    mem: &mut M,
    at: GuestPhysAddr,
    gva: GuestVirtAddr,
    access: Access,
    hint: &mut PageHint,
) -> Result<u64, GuestVaError> {
    mem.read_u64_hinted(at, hint).map_err(|error| GuestVaError::TableAccess { gva, access, entry: at, error })
}

pub(super) fn translate<M: GuestMemory + ?Sized>(
    mem: &mut M,
    p: &X86Paging,
    gva: GuestVirtAddr,
    access: Access,
    cache: &mut WalkCache<'_>,
) -> Result<Walk, GuestVaError> {
    let v = gva.as_u64();
    // Canonical: bits 63:47 all equal (SDM Vol. 3A 3.3.7.1).
    let top = (v as i64) >> 47;
    if top != 0 && top != -1 {
        return Err(GuestVaError::NonCanonical { gva, access });
    }
    if let Some(w) = leaf_fast(mem, p, v, access, cache) {
        return Ok(w);
    }
    // A/D updates race with the guest's own CPUs: retry the walk if an entry changed under us.
    let mut last = None;
    for _ in 0..4 {
        match walk_once(mem, p, gva, access, cache)? {
            Walked::Done(t, level) => return Ok(Walk { t, level, settled: true }),
            Walked::Raced(t, level) => last = Some(Walk { t, level, settled: false }),
        }
    }
    // The entries kept changing; the translation itself was valid on the last walk.
    last.ok_or(GuestVaError::NonCanonical { gva, access })
}

enum Walked {
    Done(Translation, u32),
    Raced(Translation, u32),
}

/// Bits 51:MAXPHYADDR of every entry are reserved, and bit 63 without IA32_EFER.NXE (SDM Vol. 3A
/// 4.5.4, Tables 4-14..4-20).
fn common_reserved(p: &X86Paging) -> u64 {
    let mut rsvd = 0x000f_ffff_ffff_ffff & !p.phys_mask() & !0xfff;
    if !p.nxe {
        rsvd |= XD;
    }
    rsvd
}

/// Whether the rights folded over a walk (`rw`, `us`, `xd`) allow `access` (SDM Vol. 3A 4.6.1).
fn allowed(p: &X86Paging, access: Access, rw: bool, us: bool, xd: bool) -> bool {
    match access {
        Access::Read => {
            if p.user {
                us
            } else {
                !(us && p.smap)
            }
        }
        Access::Write => {
            if p.user {
                us && rw
            } else {
                !(us && p.smap) && (rw || !p.wp)
            }
        }
        Access::Execute => !xd && if p.user { us } else { !(us && p.smep) },
    }
}

/// A translation through a cached page table (level 0) whose entry for `v` needs nothing done:
/// present, no reserved bit, the access allowed, A (and D for a write) already set. Anything
/// else (a fault, an A/D update, a read error) is left to the full walk, which reports it.
#[inline]
fn leaf_fast<M: GuestMemory + ?Sized>(
    mem: &mut M,
    p: &X86Paging,
    v: u64,
    access: Access,
    cache: &WalkCache<'_>,
) -> Option<Walk> {
    let c = cache.hit(v).filter(|c| c.level == 0)?;
    let at = c.table.checked_add(((v >> 12) & 0x1ff) * 8)?;
    let mut hint = c.hint;
    let e = mem.read_u64_hinted(at, &mut hint).ok()?;
    let want = if access == Access::Write { P | A | D } else { P | A };
    if e & want != want || e & common_reserved(p) != 0 {
        return None;
    }
    let rw = c.bits & RW != 0 && e & RW != 0;
    let us = c.bits & US != 0 && e & US != 0;
    let xd = c.bits & XD != 0 || (p.nxe && e & XD != 0);
    if !allowed(p, access, rw, us, xd) {
        return None;
    }
    let gpa = GuestPhysAddr::try_new(e & p.phys_mask() & 0x000f_ffff_ffff_f000 | (v & 0xfff)).ok()?;
    Some(Walk { t: Translation { gpa, page_remaining: 0x1000 - (v & 0xfff) }, level: 0, settled: true })
}

fn walk_once<M: GuestMemory + ?Sized>(
    mem: &mut M,
    p: &X86Paging,
    gva: GuestVirtAddr,
    access: Access,
    cache: &mut WalkCache<'_>,
) -> Result<Walked, GuestVaError> {
    let v = gva.as_u64();
    let fault = |kind, level: usize| GuestVaError::PageFault { gva, access, kind, level: level as u8 };
    let phys = p.phys_mask();
    let common_rsvd = common_reserved(p);
    let mut table = p.pml4;
    let (mut rw, mut us, mut xd) = (true, true, false);
    let mut path = [(GuestPhysAddr::ZERO, 0u64); 4];
    let mut n = 0;
    let mut result = None;
    let mut top = 3usize;
    // The upper entries of the last translation of this copy, if they cover `gva` (their A
    // bits are set and their rights are folded into `bits`).
    // The host view of the page of `table` (kept with a cached table).
    let mut hint = PageHint::default();
    if let Some(c) = cache.hit(v) {
        table = c.table;
        top = c.level as usize;
        (rw, us, xd) = (c.bits & RW != 0, c.bits & US != 0, c.bits & XD != 0);
        hint = c.hint;
    }
    // (table, rights so far) at each level, to remember the walk's upper part.
    let mut above = [(GuestPhysAddr::ZERO, 0u64); 4];
    // Level 3 = PML4, 2 = PDPT, 1 = PD, 0 = PT. Four reads at most: a cycle in the guest's tables
    // cannot make the walk longer.
    for level in (0..=top).rev() {
        above[level] = (table, (if rw { RW } else { 0 }) | (if us { US } else { 0 }) | (if xd { XD } else { 0 }));
        let idx = (v >> (12 + 9 * level)) & 0x1ff;
        let at = table.checked_add(idx * 8).ok_or(fault(PageFaultKind::Reserved, level))?;
        let e = read_entry(mem, at, gva, access, &mut hint)?;
        path[n] = (at, e);
        n += 1;
        if e & P == 0 {
            return Err(fault(PageFaultKind::NotPresent, level));
        }
        let is_leaf = level == 0 || (e & PS != 0 && (level == 1 || level == 2));
        let mut rsvd = common_rsvd;
        match level {
            3 => rsvd |= PS, // PS is reserved in a PML4E (Table 4-15).
            2 if e & PS != 0 && !p.page_1g => rsvd |= PS,
            2 if e & PS != 0 => rsvd |= 0x3fff_e000, // 1 GiB page: bits 29:13 reserved (Table 4-16).
            1 if e & PS != 0 => rsvd |= 0x1f_e000,   // 2 MiB page: bits 20:13 reserved (Table 4-18).
            _ => {}
        }
        if e & rsvd != 0 {
            return Err(fault(PageFaultKind::Reserved, level));
        }
        rw &= e & RW != 0;
        us &= e & US != 0;
        xd |= p.nxe && e & XD != 0;
        if is_leaf {
            let page = 1u64 << (12 + 9 * level);
            let base = e & phys & !(page - 1) & 0x000f_ffff_ffff_f000;
            let gpa = guest_gpa(base | (v & (page - 1)), || fault(PageFaultKind::Reserved, level))?;
            result = Some((gpa, page - (v & (page - 1)), level));
            break;
        }
        let next = e & phys & 0x000f_ffff_ffff_f000;
        table = guest_gpa(next, || fault(PageFaultKind::Reserved, level))?;
        hint = PageHint::default();
    }
    let Some((gpa, page_remaining, leaf_level)) = result else {
        return Err(fault(PageFaultKind::NotPresent, 0));
    };
    // Access rights (SDM Vol. 3A 4.6.1).
    let ok = allowed(p, access, rw, us, xd);
    if !ok {
        return Err(fault(PageFaultKind::Protection, leaf_level));
    }
    // Accessed flag in every entry used, dirty flag in the leaf for a write (SDM Vol. 3A 4.8),
    // with a locked compare-exchange as the processor does.
    let mut raced = false;
    for (i, &(at, e)) in path[..n].iter().enumerate() {
        let mut want = A;
        if i == n - 1 && access == Access::Write {
            want |= D;
        }
        if e & want != want {
            match mem.compare_exchange_u64(at, e, e | want) {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => raced = true,
                Err(error) => return Err(GuestVaError::TableAccess { gva, access, entry: at, error }),
            }
        }
    }
    let t = Translation { gpa, page_remaining };
    if raced {
        return Ok(Walked::Raced(t, leaf_level as u32));
    }
    if leaf_level < 3 {
        let (table, bits) = above[leaf_level];
        cache.store(v, leaf_level as u32, table, bits, hint);
    }
    Ok(Walked::Done(t, leaf_level as u32))
}
