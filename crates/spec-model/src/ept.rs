//! Intel EPT: capabilities, the EPT pointer, the guest-physical walk, violations and misconfigurations.
//!
//! Sources (2023+ edition numbering; older editions: 28.2 for 29.3, 24.6.11 for 25.6.11,
//! Table 27-7 for Table 28-7):
//! - Intel SDM Vol. 3C 29.3.2 "EPT Translation Mechanism" and its entry-format tables;
//! - 29.3.3.1 "EPT Misconfigurations", 29.3.3.2 "EPT Violations";
//! - 29.3.5 "Accessed and Dirty Flags for EPT"; 29.3.7 "EPT and Memory Typing";
//! - 25.6.11 "Extended-Page-Table Pointer (EPTP)"; 27.2.1.1 (VM-entry checks on the EPTP);
//! - Table 28-7 "Exit Qualification for EPT Violations";
//! - Vol. 3D Appendix A.10 "VPID and EPT Capabilities".

use alloc::vec::Vec;

use crate::{bits, level_shift, Gpa, Hpa, PageSize, PhysMem};

/// The EPT capabilities of a processor: IA32_VMX_EPT_VPID_CAP (MSR 48CH) plus MAXPHYADDR.
///
/// Intel SDM Vol. 3D A.10. Only the EPT half of the MSR is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptCaps {
    /// The raw MSR value this was decoded from.
    pub raw: u64,
    /// Bit 0: execute-only translations (bits 2:0 = 100b) are allowed.
    pub execute_only: bool,
    /// Bit 6: page-walk length 4.
    pub walk_4: bool,
    /// Bit 7: page-walk length 5.
    pub walk_5: bool,
    /// Bit 8: the EPT paging structures may be uncacheable (EPTP memory type 0).
    pub uc: bool,
    /// Bit 14: the EPT paging structures may be write-back (EPTP memory type 6).
    pub wb: bool,
    /// Bit 16: an EPT PDE may map a 2-MByte page.
    pub page_2m: bool,
    /// Bit 17: an EPT PDPTE may map a 1-GByte page.
    pub page_1g: bool,
    /// Bit 20: INVEPT is supported.
    pub invept: bool,
    /// Bit 21: accessed and dirty flags for EPT.
    pub accessed_dirty: bool,
    /// Bit 25: single-context INVEPT.
    pub invept_single_context: bool,
    /// Bit 26: all-context INVEPT.
    pub invept_all_context: bool,
    /// The processor's physical-address width (`CPUID.80000008H:EAX[7:0]`), 36..=52.
    /// Bits 51:MAXPHYADDR of every EPT entry and of the EPTP are reserved.
    pub maxphyaddr: u8,
}

impl EptCaps {
    /// Decodes an IA32_VMX_EPT_VPID_CAP value. `maxphyaddr` is clamped to 36..=52.
    pub const fn from_msr(raw: u64, maxphyaddr: u8) -> Self {
        let maxphyaddr = if maxphyaddr < 36 {
            36
        } else if maxphyaddr > 52 {
            52
        } else {
            maxphyaddr
        };
        Self {
            raw,
            execute_only: raw & (1 << 0) != 0,
            walk_4: raw & (1 << 6) != 0,
            walk_5: raw & (1 << 7) != 0,
            uc: raw & (1 << 8) != 0,
            wb: raw & (1 << 14) != 0,
            page_2m: raw & (1 << 16) != 0,
            page_1g: raw & (1 << 17) != 0,
            invept: raw & (1 << 20) != 0,
            accessed_dirty: raw & (1 << 21) != 0,
            invept_single_context: raw & (1 << 25) != 0,
            invept_all_context: raw & (1 << 26) != 0,
            maxphyaddr,
        }
    }

    /// Every EPT feature the model knows (execute-only, 4- and 5-level walks, UC and WB, 2 MiB
    /// and 1 GiB pages, A/D, all INVEPT types) with the given MAXPHYADDR.
    pub const fn all(maxphyaddr: u8) -> Self {
        Self::from_msr(
            1 | 1 << 6 | 1 << 7 | 1 << 8 | 1 << 14 | 1 << 16 | 1 << 17 | 1 << 20 | 1 << 21 | 1 << 25 | 1 << 26,
            maxphyaddr,
        )
    }

    /// Bits 51:MAXPHYADDR, reserved in every EPT entry (Intel SDM Vol. 3C 29.3.2, entry tables).
    const fn reserved_high(&self) -> u64 {
        if self.maxphyaddr >= 52 {
            0
        } else {
            bits(51, self.maxphyaddr as u32)
        }
    }

    /// Bits MAXPHYADDR-1:12: the physical address in an entry or in the EPTP.
    const fn addr_mask(&self) -> u64 {
        bits(self.maxphyaddr as u32 - 1, 12)
    }
}

/// An EPT memory type (Intel SDM Vol. 3C 29.3.7; values 2, 3 and 7 are reserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EptMemType {
    /// 0: uncacheable.
    Uc = 0,
    /// 1: write-combining.
    Wc = 1,
    /// 4: write-through.
    Wt = 4,
    /// 5: write-protected.
    Wp = 5,
    /// 6: write-back.
    Wb = 6,
}

impl EptMemType {
    /// Decodes a 3-bit memory type; `None` for the reserved values 2, 3 and 7.
    pub const fn from_bits(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Uc),
            1 => Some(Self::Wc),
            4 => Some(Self::Wt),
            5 => Some(Self::Wp),
            6 => Some(Self::Wb),
            _ => None,
        }
    }
}

/// Why an EPTP value would fail the VM-entry checks (Intel SDM Vol. 3C 27.2.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptpError {
    /// Bits 2:0 name a memory type the processor does not allow for the paging structures
    /// (only UC = 0 with cap bit 8 and WB = 6 with cap bit 14 are possible).
    MemoryType(u8),
    /// Bits 5:3 (page-walk length minus 1) are not 3 (with cap bit 6) or 4 (with cap bit 7).
    WalkLength(u8),
    /// Bit 6 (enable A/D) is set but cap bit 21 is clear.
    AccessedDirtyUnsupported,
    /// Reserved bits are set: 11:8, 63:MAXPHYADDR, or bit 7 (supervisor shadow-stack control,
    /// which the model does not implement and therefore refuses).
    ReservedBits(u64),
}

/// A decoded EPT pointer (Intel SDM Vol. 3C 25.6.11, Table 25-9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eptp {
    /// Bits 2:0: memory type used to access the EPT paging structures.
    pub memory_type: EptMemType,
    /// Bits 5:3 plus 1: the number of levels, 4 or 5.
    pub levels: u8,
    /// Bit 6: accessed and dirty flags are enabled.
    pub accessed_dirty: bool,
    /// Bits MAXPHYADDR-1:12: the root table (EP4TA; the PML5 table for 5-level walks).
    pub root: Hpa,
}

impl Eptp {
    /// Decodes and checks a raw EPTP against the capabilities, as VM entry would.
    pub fn decode(raw: u64, caps: &EptCaps) -> Result<Self, EptpError> {
        // Intel SDM Vol. 3C 25.6.11, Table 25-9: bit 7 is supervisor shadow-stack control,
        // bits 11:8 are reserved, bits 63:N are reserved.
        let reserved = bits(11, 7) | bits(63, caps.maxphyaddr as u32);
        if raw & reserved != 0 {
            return Err(EptpError::ReservedBits(raw & reserved));
        }
        let mt = (raw & 7) as u8;
        // Intel SDM Vol. 3C 27.2.1.1: the memory type must be one allowed by
        // IA32_VMX_EPT_VPID_CAP (bit 8 for UC, bit 14 for WB).
        let memory_type = match mt {
            0 if caps.uc => EptMemType::Uc,
            6 if caps.wb => EptMemType::Wb,
            _ => return Err(EptpError::MemoryType(mt)),
        };
        let wl = ((raw >> 3) & 7) as u8;
        let levels = match wl {
            3 if caps.walk_4 => 4,
            4 if caps.walk_5 => 5,
            _ => return Err(EptpError::WalkLength(wl)),
        };
        let accessed_dirty = raw & (1 << 6) != 0;
        if accessed_dirty && !caps.accessed_dirty {
            return Err(EptpError::AccessedDirtyUnsupported);
        }
        Ok(Self { memory_type, levels, accessed_dirty, root: Hpa(raw & caps.addr_mask()) })
    }

    /// Encodes an EPTP (no checks; pair with [`Eptp::decode`]).
    pub const fn encode(&self) -> u64 {
        self.root.0 | ((self.levels as u64 - 1) << 3) | (self.accessed_dirty as u64) << 6 | self.memory_type as u64
    }

    /// How many guest-physical address bits the walk translates: 48 for 4 levels, 57 for 5.
    ///
    /// Intel SDM Vol. 3C 29.3.2: a 4-level walk uses only bits 47:0 of the guest-physical
    /// address (5-level: 56:0). Wider guest-physical addresses cannot arise: guest paging
    /// treats bits above MAXPHYADDR as reserved (a guest #PF), so the model ignores the
    /// upper bits exactly as the walk does.
    pub const fn gpa_bits(&self) -> u32 {
        level_shift(self.levels)
    }
}

/// Which kinds of access a guest-physical access is (Table 28-7 bits 0-2). More than one may
/// be set: guest paging-structure accesses with EPT A/D enabled count as read and write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EptAccess {
    /// A data read.
    pub read: bool,
    /// A data write.
    pub write: bool,
    /// An instruction fetch.
    pub fetch: bool,
}

impl EptAccess {
    /// A data read.
    pub const READ: Self = Self { read: true, write: false, fetch: false };
    /// A data write.
    pub const WRITE: Self = Self { read: false, write: true, fetch: false };
    /// An instruction fetch.
    pub const FETCH: Self = Self { read: false, write: false, fetch: true };
    /// A read-modify-write (e.g. a guest paging-structure access with EPT A/D enabled).
    pub const READ_WRITE: Self = Self { read: true, write: true, fetch: false };

    const fn bits(self) -> u8 {
        self.read as u8 | (self.write as u8) << 1 | (self.fetch as u8) << 2
    }
}

impl From<crate::Access> for EptAccess {
    fn from(a: crate::Access) -> Self {
        match a {
            crate::Access::Read => Self::READ,
            crate::Access::Write => Self::WRITE,
            crate::Access::Fetch => Self::FETCH,
        }
    }
}

/// What the guest-linear-address bits of the exit qualification say (Table 28-7 bits 7-8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuestLinear {
    /// Bit 7: the guest linear-address field is valid (the access came from a linear address).
    pub valid: bool,
    /// Bit 8 (only when `valid`): the access was to the translation of the linear address
    /// (true) rather than to a guest paging-structure entry during the guest's walk or its
    /// A/D update (false).
    pub translated: bool,
}

impl GuestLinear {
    /// No guest linear address (e.g. a guest with paging off is still "valid"; use this for
    /// direct guest-physical probes such as the differential tests).
    pub const NONE: Self = Self { valid: false, translated: false };
    /// The final access of a linear-address translation.
    pub const TRANSLATION: Self = Self { valid: true, translated: true };
    /// An access to a guest paging-structure entry.
    pub const PAGING_STRUCTURE: Self = Self { valid: true, translated: false };
}

/// Bits of the EPT-violation exit qualification (Intel SDM Vol. 3C Table 28-7).
pub mod qual {
    /// Bit 0: the access was a data read.
    pub const READ: u64 = 1 << 0;
    /// Bit 1: the access was a data write.
    pub const WRITE: u64 = 1 << 1;
    /// Bit 2: the access was an instruction fetch.
    pub const FETCH: u64 = 1 << 2;
    /// Bit 3: logical AND of bit 0 (read) of the EPT entries used: the GPA was readable.
    pub const READABLE: u64 = 1 << 3;
    /// Bit 4: logical AND of bit 1 (write): the GPA was writable.
    pub const WRITABLE: u64 = 1 << 4;
    /// Bit 5: logical AND of bit 2 (execute): the GPA was executable (mode-based execute
    /// control off, which the model assumes).
    pub const EXECUTABLE: u64 = 1 << 5;
    /// Bit 7: the guest linear-address field is valid.
    pub const GLA_VALID: u64 = 1 << 7;
    /// Bit 8 (when bit 7 is set): the access was to the translation of a linear address, not
    /// to a guest paging-structure entry.
    pub const GLA_TRANSLATION: u64 = 1 << 8;
}

/// Builds an exit qualification from the access, the AND of the rights (bits 2:0 of the entries
/// used, 0 if one was not present) and the guest-linear information (Table 28-7).
pub const fn qualification(access: EptAccess, rights: u8, gla: GuestLinear) -> u64 {
    let mut q = access.bits() as u64 | ((rights as u64 & 7) << 3);
    if gla.valid {
        q |= qual::GLA_VALID;
        if gla.translated {
            q |= qual::GLA_TRANSLATION;
        }
    }
    q
}

/// Why an entry is an EPT misconfiguration (Intel SDM Vol. 3C 29.3.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MisconfigReason {
    /// Bits 2:0 are 010b or 110b: writable but not readable.
    WriteWithoutRead,
    /// Bits 2:0 are 100b and the processor does not support execute-only translations.
    ExecuteOnlyUnsupported,
    /// A reserved bit is set (the value holds the offending bits): 51:MAXPHYADDR anywhere;
    /// 7:3 in a PML5E or PML4E; 6:3 in a non-leaf PDPTE or PDE; 29:12 in a 1-GByte PDPTE;
    /// 20:12 in a 2-MByte PDE (entry-format tables of 29.3.2).
    ReservedBits(u64),
    /// Bit 7 is set in a PDPTE (PDE) but the processor cannot map 1-GByte (2-MByte) pages.
    /// SDM 29.3.2 says software must check the capability before setting bit 7; the model
    /// treats the bit as reserved, as it is in a PML4E.
    LargePageUnsupported,
    /// A leaf's memory type (bits 5:3) is 2, 3 or 7.
    MemoryType(u8),
}

/// Why an EPT access did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptExit {
    /// An EPT violation (exit reason 48): a not-present entry, or rights that do not allow the
    /// access. `qualification` follows Table 28-7 (bits 0-8; the rest 0).
    Violation {
        /// The guest-physical address of the access.
        gpa: Gpa,
        /// The exit qualification.
        qualification: u64,
    },
    /// An EPT misconfiguration (exit reason 49).
    Misconfig {
        /// The guest-physical address of the access.
        gpa: Gpa,
        /// Level of the offending entry (0 = PTE, 1 = PDE, 2 = PDPTE, 3 = PML4E, 4 = PML5E).
        level: u8,
        /// The offending entry's value.
        entry: u64,
        /// What is wrong with it.
        reason: MisconfigReason,
    },
    /// The EPTP itself is invalid: VM entry would have failed before any walk.
    InvalidEptp(EptpError),
    /// Model-only: a table lies where [`PhysMem`] has no memory (the hardware's behaviour is
    /// undefined; the engine must never build such a table).
    NoMemory {
        /// The entry address that could not be read or written.
        pa: Hpa,
    },
}

/// A completed EPT translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptWalk {
    /// The host-physical address of the access.
    pub hpa: Hpa,
    /// The size of the page the leaf maps.
    pub page_size: PageSize,
    /// AND of bit 0 across the entries used.
    pub read: bool,
    /// AND of bit 1 across the entries used.
    pub write: bool,
    /// AND of bit 2 across the entries used.
    pub exec: bool,
    /// The leaf's EPT memory type (bits 5:3).
    pub memtype: EptMemType,
    /// The leaf's ignore-PAT bit (bit 6).
    pub ipat: bool,
    /// The leaf's accessed flag (bit 8) after this walk; false when the EPTP does not enable A/D.
    pub accessed: bool,
    /// The leaf's dirty flag (bit 9) after this walk; false when the EPTP does not enable A/D.
    pub dirty: bool,
}

/// Accessed flag, bit 8 of every EPT entry (Intel SDM Vol. 3C 29.3.5).
pub const ACCESSED: u64 = 1 << 8;
/// Dirty flag, bit 9 of a leaf EPT entry (Intel SDM Vol. 3C 29.3.5).
pub const DIRTY: u64 = 1 << 9;
/// Bit 7: the entry maps a page (in a PDPTE or PDE).
pub const LARGE: u64 = 1 << 7;

/// Walks the EPT paging structures named by `eptp` for `gpa`, as the processor does for an
/// access of kind `access` (Intel SDM Vol. 3C 29.3.2-29.3.5).
///
/// Order of checks, per entry from the root: not present (bits 2:0 = 000b) ends the walk with
/// a violation; then the misconfiguration checks of 29.3.3.1; at the leaf, the rights (the AND
/// across all entries used) are checked against the access (29.3.3.2). A misconfiguration
/// anywhere in the walk takes priority over a rights violation ("an EPT violation occurs when
/// there is no EPT misconfiguration").
///
/// A/D (29.3.5), when EPTP bit 6 is set: the accessed flag is set in every entry used and, for
/// a write, the dirty flag in the leaf. Model choice: flags are written only when the walk
/// succeeds, and only when they were clear (so a test can count the writes).
pub fn walk<M: PhysMem + ?Sized>(
    mem: &mut M,
    eptp: u64,
    caps: &EptCaps,
    gpa: Gpa,
    access: EptAccess,
    gla: GuestLinear,
) -> Result<EptWalk, EptExit> {
    let e = Eptp::decode(eptp, caps).map_err(EptExit::InvalidEptp)?;
    walk_from(mem, &e, caps, gpa, access, gla, WalkStart::root(&e), &mut Vec::new())
}

/// Where a walk begins: at the root, or below a cached non-leaf entry (the TLB model).
#[derive(Clone, Copy, Debug)]
pub(crate) struct WalkStart {
    /// Level of the table to read next.
    pub level: u8,
    /// Host-physical address of that table.
    pub table: u64,
    /// AND of bits 2:0 of the entries above it.
    pub rights: u8,
}

impl WalkStart {
    pub(crate) fn root(e: &Eptp) -> Self {
        Self { level: e.levels - 1, table: e.root.0, rights: 0b111 }
    }
}

/// A non-leaf entry the walk used (for the TLB model's paging-structure cache).
#[derive(Clone, Copy, Debug)]
pub(crate) struct NonLeafSeen {
    pub level: u8,
    /// `gpa >> level_shift(level)`: the region this entry controls.
    pub prefix: u64,
    /// The next table's host-physical address.
    pub next: u64,
    /// AND of bits 2:0 through this entry.
    pub rights: u8,
}

/// Checks one present entry for the misconfigurations of Intel SDM Vol. 3C 29.3.3.1.
/// Returns whether the entry is a leaf.
fn check_entry(e: u64, level: u8, caps: &EptCaps) -> Result<bool, MisconfigReason> {
    let perm = e & 7;
    // 29.3.3.1: bits 2:0 = 010b (write-only) or 110b (write/execute).
    if perm & 0b011 == 0b010 {
        return Err(MisconfigReason::WriteWithoutRead);
    }
    // 29.3.3.1: bits 2:0 = 100b (execute-only) without IA32_VMX_EPT_VPID_CAP bit 0.
    if perm == 0b100 && !caps.execute_only {
        return Err(MisconfigReason::ExecuteOnlyUnsupported);
    }
    let large = e & LARGE != 0;
    let leaf = level == 0 || (large && (level == 1 || level == 2));
    let mut reserved = caps.reserved_high();
    match (level, leaf) {
        // PML5E / PML4E: bits 7:3 reserved (29.3.2, "Format of an EPT PML4 Entry").
        (3.., _) => reserved |= bits(7, 3),
        // PDPTE mapping a 1-GByte page: bits 29:12 reserved.
        (2, true) => {
            if !caps.page_1g {
                return Err(MisconfigReason::LargePageUnsupported);
            }
            reserved |= bits(29, 12);
        }
        // PDE mapping a 2-MByte page: bits 20:12 reserved.
        (1, true) => {
            if !caps.page_2m {
                return Err(MisconfigReason::LargePageUnsupported);
            }
            reserved |= bits(20, 12);
        }
        // PDPTE / PDE referencing a table: bits 6:3 reserved (bit 7 is 0 here).
        (1 | 2, false) => reserved |= bits(6, 3),
        // PTE: bit 7 ignored, nothing else reserved below bit 51.
        _ => {}
    }
    if e & reserved != 0 {
        return Err(MisconfigReason::ReservedBits(e & reserved));
    }
    if leaf {
        // 29.3.3.1: leaf memory type (bits 5:3) 2, 3 or 7.
        let mt = ((e >> 3) & 7) as u8;
        if EptMemType::from_bits(mt).is_none() {
            return Err(MisconfigReason::MemoryType(mt));
        }
    }
    Ok(leaf)
}

/// The walk proper, from `start`. Non-leaf entries used are appended to `seen`.
#[allow(
    clippy::too_many_arguments,
    reason = "internal: the public walk's inputs plus the TLB's start point and record"
)]
pub(crate) fn walk_from<M: PhysMem + ?Sized>(
    mem: &mut M,
    e: &Eptp,
    caps: &EptCaps,
    gpa: Gpa,
    access: EptAccess,
    gla: GuestLinear,
    start: WalkStart,
    seen: &mut Vec<NonLeafSeen>,
) -> Result<EptWalk, EptExit> {
    let g = gpa.0 & bits(e.gpa_bits() - 1, 0);
    let addr_mask = caps.addr_mask();
    let mut table = start.table;
    let mut rights = start.rights;
    // Entries used (address, value), for the A/D update at the end.
    let mut used: [(u64, u64); 5] = [(0, 0); 5];
    let mut n_used = 0;
    let mut level = start.level;
    loop {
        let shift = level_shift(level);
        let pa = table + ((g >> shift) & 511) * 8;
        let entry = mem.read_u64(Hpa(pa)).ok_or(EptExit::NoMemory { pa: Hpa(pa) })?;
        let perm = (entry & 7) as u8;
        if perm == 0 {
            // 29.3.3.2: a not-present entry; bits 3-5 of the qualification are the AND of
            // bits 2:0 of the entries used, which includes this all-zero one.
            return Err(EptExit::Violation { gpa, qualification: qualification(access, 0, gla) });
        }
        let leaf =
            check_entry(entry, level, caps).map_err(|reason| EptExit::Misconfig { gpa, level, entry, reason })?;
        rights &= perm;
        used[n_used] = (pa, entry);
        n_used += 1;
        if !leaf {
            let next = entry & addr_mask;
            seen.push(NonLeafSeen { level, prefix: g >> shift, next, rights });
            table = next;
            level -= 1;
            continue;
        }
        // 29.3.3.2: the access must be allowed by the AND of the rights.
        if access.bits() & !rights != 0 {
            return Err(EptExit::Violation { gpa, qualification: qualification(access, rights, gla) });
        }
        let mut leaf_entry = entry;
        if e.accessed_dirty {
            // 29.3.5: accessed on every entry used, dirty on the leaf for a write.
            for (i, &(pa, v)) in used[..n_used].iter().enumerate() {
                let mut new = v | ACCESSED;
                if i == n_used - 1 && access.write {
                    new |= DIRTY;
                }
                if new != v {
                    mem.write_u64(Hpa(pa), new).ok_or(EptExit::NoMemory { pa: Hpa(pa) })?;
                }
                leaf_entry = new;
            }
        }
        let page_size = PageSize::from_level(level).unwrap_or(PageSize::Size4K);
        let offset_mask = page_size.bytes() - 1;
        return Ok(EptWalk {
            hpa: Hpa((entry & addr_mask & !offset_mask) | (g & offset_mask)),
            page_size,
            read: rights & 1 != 0,
            write: rights & 2 != 0,
            exec: rights & 4 != 0,
            memtype: EptMemType::from_bits(((entry >> 3) & 7) as u8).unwrap_or(EptMemType::Uc),
            ipat: entry & (1 << 6) != 0,
            accessed: e.accessed_dirty && leaf_entry & ACCESSED != 0,
            dirty: e.accessed_dirty && leaf_entry & DIRTY != 0,
        });
    }
}
