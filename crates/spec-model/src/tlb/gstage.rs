//! The G-stage TLB model: translations tagged by VMID, invalidated by HFENCE.GVMA.
//!
//! RISC-V Privileged: "Virtual Address Translation Process" ("The results of implicit
//! address-translation reads in step 2 may be held in a read-only, incoherent
//! address-translation cache"; "This specification permits the caching of PTEs whose V (Valid)
//! bit is clear"; "The address-translation cache cannot be used in step 9"), SFENCE.VMA (with
//! rs1 != x0 the fence "invalidates all address-translation cache entries that contain leaf page
//! table entries corresponding to the virtual address in rs1"; non-leaf entries are only
//! invalidated with rs1 = x0), and "Hypervisor Memory-Management Fence Instructions"
//! (HFENCE.GVMA is the same for the G-stage: rs1 = GPA >> 2, rs2 = VMID).

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::gstage::{
    self, cause, GRequest, GSeen, GWalk, GstageConfig, GstageFault, GuestPageFault, Hgatp, HgatpMode, RvFaultKind,
};
use crate::{level_shift, Access, Gpa, Hpa, PhysMem};

/// Counters for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GstageTlbStats {
    /// Calls to [`GstageTlb::translate`] / [`GstageTlb::translate_with`].
    pub lookups: u64,
    /// Lookups answered (translation or fault) from a cached leaf.
    pub leaf_hits: u64,
    /// Lookups answered with a fault from a cached invalid (V = 0) PTE.
    pub negative_hits: u64,
    /// Walks that began below a cached non-leaf PTE.
    pub partial_hits: u64,
    /// Walks that began at the hgatp root.
    pub full_walks: u64,
    /// HFENCE.GVMA with rs1 = x0, rs2 = x0.
    pub hfence_all: u64,
    /// HFENCE.GVMA with rs1 = x0, rs2 = VMID.
    pub hfence_vmid: u64,
    /// HFENCE.GVMA with rs1 = GPA, rs2 = x0.
    pub hfence_gpa: u64,
    /// HFENCE.GVMA with rs1 = GPA, rs2 = VMID.
    pub hfence_gpa_vmid: u64,
}

/// What the TLB holds for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachedG {
    /// A cached leaf translation (hpa = the translation of the probed address).
    Leaf(GWalk),
    /// A cached invalid PTE at this level (lookups fault without walking).
    Invalid {
        /// The level of the V = 0 PTE.
        level: u8,
    },
}

/// A G-stage TLB for one hart.
///
/// Keys: leaves and invalid PTEs by (VMID, level, base of the region the PTE controls);
/// non-leaf PTEs by (VMID, level, GPA >> the level's shift). The tag is the VMID alone, as in
/// hardware: reusing a VMID for other tables, or changing hgatp.MODE, needs an HFENCE.GVMA
/// with rs1 = x0 ("Hypervisor Guest Address Translation and Protection"). A test that builds a
/// new table for the same VMID therefore needs a new `GstageTlb` or a fence.
#[derive(Clone, Debug, Default)]
pub struct GstageTlb {
    leaves: BTreeMap<(u16, u8, u64), GWalk>,
    invalid: BTreeSet<(u16, u8, u64)>,
    partials: BTreeMap<(u16, u8, u64), u64>,
    stats: GstageTlbStats,
}

impl GstageTlb {
    /// An empty TLB.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters.
    pub fn stats(&self) -> GstageTlbStats {
        self.stats
    }

    /// Number of cached leaf translations.
    pub fn cached_leaves(&self) -> usize {
        self.leaves.len()
    }

    /// Number of cached invalid PTEs.
    pub fn cached_invalid(&self) -> usize {
        self.invalid.len()
    }

    /// Number of cached non-leaf PTEs.
    pub fn cached_partials(&self) -> usize {
        self.partials.len()
    }

    /// What a lookup of `gpa` for `vmid` would find in the TLB, without walking or changing
    /// anything (leaves are preferred to invalid entries, smaller pages to larger).
    pub fn cached(&self, vmid: u16, gpa: Gpa) -> Option<CachedG> {
        for level in 0..=4u8 {
            let size = 1u64 << level_shift(level);
            if let Some(w) = self.leaves.get(&(vmid, level, gpa.0 & !(size - 1))) {
                let mut w = *w;
                w.hpa = Hpa(w.hpa.0 | (gpa.0 & (size - 1)));
                return Some(CachedG::Leaf(w));
            }
        }
        (0..=4u8)
            .find(|&level| self.invalid.contains(&(vmid, level, gpa.0 & !((1u64 << level_shift(level)) - 1))))
            .map(|level| CachedG::Invalid { level })
    }

    /// Translates an explicit access to `gpa` through this TLB.
    pub fn translate<M: PhysMem + ?Sized>(
        &mut self,
        mem: &mut M,
        hgatp: u64,
        cfg: &GstageConfig,
        gpa: Gpa,
        access: Access,
    ) -> Result<GWalk, GstageFault> {
        self.translate_with(mem, hgatp, cfg, gpa, GRequest::explicit(access))
    }

    /// Translates `gpa` through this TLB, checking as `req.check` and reporting as
    /// `req.report` (see [`GRequest`]).
    ///
    /// A cached leaf answers unless the access is a store and the cached D is clear (step 9
    /// must update memory directly, so the hart walks). A cached invalid PTE answers with a
    /// guest-page fault. Otherwise the walk resumes below the deepest cached non-leaf PTE and
    /// everything it saw is cached: non-leaf PTEs, a V = 0 PTE, a valid leaf with A = 1 (even
    /// when this access faults on its permissions).
    pub fn translate_with<M: PhysMem + ?Sized>(
        &mut self,
        mem: &mut M,
        hgatp: u64,
        cfg: &GstageConfig,
        gpa: Gpa,
        req: GRequest,
    ) -> Result<GWalk, GstageFault> {
        self.stats.lookups += 1;
        let h = Hgatp::decode(hgatp).map_err(GstageFault::InvalidHgatp)?;
        if h.mode == HgatpMode::Bare || gpa.0 >> h.mode.gpa_bits() != 0 {
            // No translation to cache (Bare), or an address fault that involves no PTE.
            return gstage::walk_from(mem, &h, cfg, gpa, req, None, &mut Vec::new());
        }
        let vmid = h.vmid;
        let top = h.mode.levels() - 1;
        let fault = |reason, level| {
            GstageFault::GuestPage(GuestPageFault {
                cause: cause::guest_page_fault(req.report),
                htval: gpa.0 >> 2,
                gpa,
                htinst: req.htinst,
                reason,
                level: Some(level),
            })
        };

        match self.cached(vmid, gpa) {
            Some(CachedG::Leaf(w)) => {
                self.stats.leaf_hits += 1;
                let pte_bits = (w.r as u64) << 1 | (w.w as u64) << 2 | (w.x as u64) << 3;
                let level = w.page_size.level();
                if !w.u {
                    return Err(fault(RvFaultKind::UserBit, level));
                }
                if !gstage::rwx_allows(pte_bits, req.check, cfg.mxr) {
                    return Err(fault(RvFaultKind::Permission, level));
                }
                if req.check != Access::Write || w.dirty {
                    return Ok(w);
                }
                // A store through a leaf cached with D = 0: step 9 walks to memory.
                self.stats.leaf_hits -= 1;
            }
            Some(CachedG::Invalid { level }) => {
                self.stats.negative_hits += 1;
                return Err(fault(RvFaultKind::NotValid, level));
            }
            None => {}
        }

        let mut start = None;
        for level in 1..=top {
            if let Some(&next) = self.partials.get(&(vmid, level, gpa.0 >> level_shift(level))) {
                start = Some((level - 1, next));
                break;
            }
        }
        if start.is_some() {
            self.stats.partial_hits += 1;
        } else {
            self.stats.full_walks += 1;
        }
        let mut seen = Vec::new();
        let result = gstage::walk_from(mem, &h, cfg, gpa, req, start, &mut seen);
        for s in seen {
            match s {
                GSeen::Pointer { level, prefix, next } => {
                    self.partials.insert((vmid, level, prefix), next);
                }
                GSeen::Invalid { level } => {
                    let size = 1u64 << level_shift(level);
                    self.invalid.insert((vmid, level, gpa.0 & !(size - 1)));
                }
                GSeen::Leaf { walk } => {
                    let size = walk.page_size.bytes();
                    let mut base = walk;
                    base.hpa = Hpa(walk.hpa.0 & !(size - 1));
                    self.leaves.insert((vmid, walk.page_size.level(), gpa.0 & !(size - 1)), base);
                }
            }
        }
        result
    }

    /// HFENCE.GVMA. `gpa` is the address itself (the instruction's rs1 holds it shifted right
    /// by 2); `None` stands for rs1 = x0, and `vmid: None` for rs2 = x0.
    ///
    /// With an address, only leaf entries (and cached invalid PTEs, which end a walk as a leaf
    /// would) whose region contains the address are removed, for the VMID or for all;
    /// non-leaf entries stay (SFENCE.VMA, to which HFENCE.GVMA is analogous, orders with
    /// rs1 != x0 "only reads and writes made to leaf page table entries"). Without an address,
    /// every entry of the VMID (or every entry) is removed.
    pub fn hfence_gvma(&mut self, gpa: Option<Gpa>, vmid: Option<u16>) {
        let vm_match = |v: u16| vmid.is_none_or(|x| x == v);
        match gpa {
            None => {
                if vmid.is_some() {
                    self.stats.hfence_vmid += 1;
                } else {
                    self.stats.hfence_all += 1;
                }
                self.leaves.retain(|k, _| !vm_match(k.0));
                self.invalid.retain(|k| !vm_match(k.0));
                self.partials.retain(|k, _| !vm_match(k.0));
            }
            Some(g) => {
                if vmid.is_some() {
                    self.stats.hfence_gpa_vmid += 1;
                } else {
                    self.stats.hfence_gpa += 1;
                }
                let covers = |k: &(u16, u8, u64)| {
                    let size = 1u64 << level_shift(k.1);
                    vm_match(k.0) && g.0 & !(size - 1) == k.2
                };
                self.leaves.retain(|k, _| !covers(k));
                self.invalid.retain(|k| !covers(k));
            }
        }
    }
}
