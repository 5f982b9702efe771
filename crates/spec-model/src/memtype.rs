//! The memory type of an access through EPT: the leaf's EPT memory type and ignore-PAT bit
//! combined with the guest's PAT type.
//!
//! Sources: Intel SDM Vol. 3C 29.3.7.2 "Memory Type Used for Translated Guest-Physical
//! Addresses" (with CR0.CD = 0 and IPAT = 0, the effective type combines the EPT memory type and
//! the PAT type as in Table 11-7, with the EPT type in place of the MTRR type; with IPAT = 1 the
//! PAT type is ignored; with CR0.CD = 1 it is UC; the MTRRs play no part); Vol. 3A 11.5.2.2
//! "Selecting Memory Types for Pentium III and More Recent Processor Families", Table 11-7;
//! 11.12.3 and Table 11-10 (PAT encodings).

use crate::ept::EptMemType;

/// A PAT entry's memory type (Vol. 3A Table 11-10). UC- exists only here: it yields to WC from
/// the other side of the combination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PatType {
    /// 00H: uncacheable.
    Uc,
    /// 01H: write-combining.
    Wc,
    /// 04H: write-through.
    Wt,
    /// 05H: write-protected.
    Wp,
    /// 06H: write-back.
    Wb,
    /// 07H: uncached (UC-).
    UcMinus,
}

impl PatType {
    /// Every PAT type.
    pub const ALL: [Self; 6] = [Self::Uc, Self::Wc, Self::Wt, Self::Wp, Self::Wb, Self::UcMinus];

    /// Decodes a PAT field (02H, 03H and 08H-FFH are reserved: `None`).
    pub const fn from_bits(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Uc),
            1 => Some(Self::Wc),
            4 => Some(Self::Wt),
            5 => Some(Self::Wp),
            6 => Some(Self::Wb),
            7 => Some(Self::UcMinus),
            _ => None,
        }
    }
}

/// An effective memory type: what the access uses. Table 11-7 never yields UC-.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryType {
    /// Uncacheable.
    Uc,
    /// Write-combining (not cached; writes may be combined and reads speculated).
    Wc,
    /// Write-through.
    Wt,
    /// Write-protected.
    Wp,
    /// Write-back.
    Wb,
}

impl From<EptMemType> for MemoryType {
    fn from(t: EptMemType) -> Self {
        match t {
            EptMemType::Uc => Self::Uc,
            EptMemType::Wc => Self::Wc,
            EptMemType::Wt => Self::Wt,
            EptMemType::Wp => Self::Wp,
            EptMemType::Wb => Self::Wb,
        }
    }
}

/// Table 11-7: the effective type for a range of memory type `range` (the MTRR's column; under
/// EPT, the EPT memory type) and a PAT type `pat`.
pub const fn combine(range: EptMemType, pat: PatType) -> MemoryType {
    use MemoryType as M;
    match (range, pat) {
        // A UC page-level type wins everywhere; a WC one everywhere too, UC range included.
        (_, PatType::Uc) => M::Uc,
        (_, PatType::Wc) => M::Wc,
        // UC- gives WC over a WC or WP range, UC over the others.
        (EptMemType::Wc | EptMemType::Wp, PatType::UcMinus) => M::Wc,
        (_, PatType::UcMinus) => M::Uc,
        // A UC range: UC for WT, WB and WP pages.
        (EptMemType::Uc, _) => M::Uc,
        // A WC range: WC for a WB page, UC for WT and WP pages.
        (EptMemType::Wc, PatType::Wb) => M::Wc,
        (EptMemType::Wc, _) => M::Uc,
        // WT range: WT for WT and WB pages, WP for a WP page.
        (EptMemType::Wt, PatType::Wp) => M::Wp,
        (EptMemType::Wt, _) => M::Wt,
        // WP range: WT for a WT page, WP for WB and WP pages.
        (EptMemType::Wp, PatType::Wt) => M::Wt,
        (EptMemType::Wp, _) => M::Wp,
        // WB range: the page-level type.
        (EptMemType::Wb, PatType::Wt) => M::Wt,
        (EptMemType::Wb, PatType::Wp) => M::Wp,
        (EptMemType::Wb, PatType::Wb) => M::Wb,
    }
}

/// 29.3.7.2: the effective memory type of an access through an EPT leaf with memory type `ept`
/// and ignore-PAT bit `ipat`, when the guest's PAT selects `pat` and its CR0.CD is `cr0_cd`.
pub const fn effective(cr0_cd: bool, ept: EptMemType, ipat: bool, pat: PatType) -> MemoryType {
    if cr0_cd {
        MemoryType::Uc
    } else if ipat {
        match ept {
            EptMemType::Uc => MemoryType::Uc,
            EptMemType::Wc => MemoryType::Wc,
            EptMemType::Wt => MemoryType::Wt,
            EptMemType::Wp => MemoryType::Wp,
            EptMemType::Wb => MemoryType::Wb,
        }
    } else {
        combine(ept, pat)
    }
}
