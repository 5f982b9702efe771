//! The EPT TLB model: guest-physical mappings tagged by EP4TA, invalidated by INVEPT.
//!
//! Intel SDM Vol. 3C 29.4 "Caching Translation Information": 29.4.1 (guest-physical mappings:
//! "guest-physical translations" and "guest-physical paging-structure-cache entries", each with
//! access rights, tagged by the EP4TA = EPTP bits 51:12); 29.4.2 ("No guest-physical mappings
//! ... are created with information derived from EPT paging-structure entries that are not
//! present (bits 2:0 are all 0) or that are misconfigured"); 29.4.3.1 ("An EPT violation
//! invalidates any guest-physical mappings (associated with the current EP4TA) that would be
//! used to translate the guest-physical address that caused the EPT violation", likewise for a
//! misconfiguration; INVEPT single-context invalidates the mappings of one EP4TA, all-context
//! those of every EP4TA).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::ept::{self, qualification, EptAccess, EptCaps, EptExit, EptWalk, Eptp, GuestLinear, WalkStart};
use crate::{bits, level_shift, Gpa, Hpa, PageSize, PhysMem};

/// Counters for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EptTlbStats {
    /// Calls to [`EptTlb::translate`].
    pub lookups: u64,
    /// Lookups answered (successfully or with a violation) from a cached leaf translation.
    pub leaf_hits: u64,
    /// Walks that began below a cached non-leaf entry.
    pub partial_hits: u64,
    /// Walks that began at the EPTP root.
    pub full_walks: u64,
    /// INVEPT single-context executions.
    pub invept_single_context: u64,
    /// INVEPT all-context executions.
    pub invept_all_context: u64,
    /// Violations and misconfigurations (each invalidates the mappings for its address).
    pub exits: u64,
}

#[derive(Clone, Copy, Debug)]
struct CachedLeaf {
    /// The walk result, with `hpa` the base of the page.
    walk: EptWalk,
    rights: u8,
}

/// A TLB of guest-physical mappings for one logical processor.
///
/// Keys: leaves by (EP4TA, level, page base), non-leaf entries by (EP4TA, level, GPA >> the
/// level's shift). A cached leaf with the dirty flag clear is not used for a write when the
/// EPTP enables A/D: the processor must set the dirty flag in memory, so it walks.
#[derive(Clone, Debug, Default)]
pub struct EptTlb {
    leaves: BTreeMap<(u64, u8, u64), CachedLeaf>,
    partials: BTreeMap<(u64, u8, u64), (u64, u8)>,
    stats: EptTlbStats,
}

impl EptTlb {
    /// An empty TLB.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters.
    pub fn stats(&self) -> EptTlbStats {
        self.stats
    }

    /// Number of cached leaf translations.
    pub fn cached_leaves(&self) -> usize {
        self.leaves.len()
    }

    /// Number of cached non-leaf (paging-structure-cache) entries.
    pub fn cached_partials(&self) -> usize {
        self.partials.len()
    }

    /// The cached leaf translation that would answer a lookup of `gpa` under `eptp`, if any,
    /// without walking or changing anything.
    pub fn cached(&self, eptp: u64, gpa: Gpa) -> Option<EptWalk> {
        let ep4ta = ep4ta(eptp);
        (0..=2).find_map(|level| {
            let size = PageSize::from_level(level)?.bytes();
            let c = self.leaves.get(&(ep4ta, level, gpa.0 & !(size - 1)))?;
            let mut w = c.walk;
            w.hpa = Hpa(w.hpa.0 | (gpa.0 & (size - 1)));
            Some(w)
        })
    }

    /// Translates `gpa` as the processor would with this TLB: from a cached leaf if there is
    /// one, else by walking from the deepest cached non-leaf entry (or the root), caching what
    /// the walk used.
    pub fn translate<M: PhysMem + ?Sized>(
        &mut self,
        mem: &mut M,
        eptp: u64,
        caps: &EptCaps,
        gpa: Gpa,
        access: EptAccess,
        gla: GuestLinear,
    ) -> Result<EptWalk, EptExit> {
        self.stats.lookups += 1;
        let e = Eptp::decode(eptp, caps).map_err(EptExit::InvalidEptp)?;
        let tag = e.root.0;
        let g = gpa.0 & bits(e.gpa_bits() - 1, 0);

        for level in 0..=2u8 {
            let size = 1u64 << level_shift(level);
            let Some(c) = self.leaves.get(&(tag, level, g & !(size - 1))).copied() else {
                continue;
            };
            let want = access.read as u8 | (access.write as u8) << 1 | (access.fetch as u8) << 2;
            if want & !c.rights != 0 {
                // The cached rights do not allow the access: a violation reported from the
                // cached information, which then invalidates the mappings for this address.
                self.stats.leaf_hits += 1;
                self.stats.exits += 1;
                self.forget(tag, g);
                return Err(EptExit::Violation { gpa, qualification: qualification(access, c.rights, gla) });
            }
            if access.write && e.accessed_dirty && !c.walk.dirty {
                // 29.3.5: the dirty flag must be set in memory: walk.
                break;
            }
            self.stats.leaf_hits += 1;
            let mut w = c.walk;
            w.hpa = Hpa(w.hpa.0 | (g & (size - 1)));
            return Ok(w);
        }

        let mut start = WalkStart::root(&e);
        for level in 1..e.levels {
            if let Some(&(next, rights)) = self.partials.get(&(tag, level, g >> level_shift(level))) {
                start = WalkStart { level: level - 1, table: next, rights };
                break;
            }
        }
        if start.level == e.levels - 1 {
            self.stats.full_walks += 1;
        } else {
            self.stats.partial_hits += 1;
        }
        let mut seen = Vec::new();
        match ept::walk_from(mem, &e, caps, gpa, access, gla, start, &mut seen) {
            Ok(w) => {
                for s in seen {
                    self.partials.insert((tag, s.level, s.prefix), (s.next, s.rights));
                }
                let level = w.page_size.level();
                let size = w.page_size.bytes();
                let rights = w.read as u8 | (w.write as u8) << 1 | (w.exec as u8) << 2;
                let mut base = w;
                base.hpa = Hpa(w.hpa.0 & !(size - 1));
                self.leaves.insert((tag, level, g & !(size - 1)), CachedLeaf { walk: base, rights });
                Ok(w)
            }
            Err(exit) => {
                if matches!(exit, EptExit::Violation { .. } | EptExit::Misconfig { .. }) {
                    self.stats.exits += 1;
                    self.forget(tag, g);
                }
                Err(exit)
            }
        }
    }

    /// INVEPT type 1 (single-context): invalidates the guest-physical mappings tagged with the
    /// EP4TA in bits 51:12 of `eptp` (Intel SDM Vol. 3C 29.4.3.1; the INVEPT descriptor's EPTP).
    pub fn invept_single_context(&mut self, eptp: u64) {
        self.stats.invept_single_context += 1;
        let tag = ep4ta(eptp);
        self.leaves.retain(|k, _| k.0 != tag);
        self.partials.retain(|k, _| k.0 != tag);
    }

    /// INVEPT type 2 (all-context): invalidates the guest-physical mappings of every EP4TA.
    pub fn invept_all_context(&mut self) {
        self.stats.invept_all_context += 1;
        self.leaves.clear();
        self.partials.clear();
    }

    /// Drops every mapping that would be used to translate `g` under `tag` (29.4.3.1, on an
    /// EPT violation or misconfiguration).
    fn forget(&mut self, tag: u64, g: u64) {
        for level in 0..=2u8 {
            let size = 1u64 << level_shift(level);
            self.leaves.remove(&(tag, level, g & !(size - 1)));
        }
        for level in 1..=4u8 {
            self.partials.remove(&(tag, level, g >> level_shift(level)));
        }
    }
}

/// The EP4TA tag of an EPTP: bits 51:12.
fn ep4ta(eptp: u64) -> u64 {
    eptp & bits(51, 12)
}
