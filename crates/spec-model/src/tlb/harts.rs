//! Several harts, one G-stage TLB each, and a fence that reaches only the hart executing it.
//!
//! RISC-V Privileged, "Hypervisor Memory-Management Fence Instructions": HFENCE.GVMA is the
//! G-stage counterpart of SFENCE.VMA, which "is used to synchronize updates to in-memory
//! memory-management data structures with current execution" on the hart that executes it; its
//! commentary ("Supervisor Memory-Management Fence Instruction") adds that other harts are
//! reached by having them execute the fence themselves (after an interprocessor interrupt). The
//! model therefore keeps one [`GstageTlb`] per hart and offers no fence that spans harts: a
//! shootdown that forgets a hart leaves that hart's entries where they were.

use alloc::vec::Vec;

use super::{CachedG, GstageTlb};
use crate::gstage::{self, GWalk, GstageConfig, GstageFault, GuestPageFault};
use crate::{Access, Gpa, PhysMem};

/// One [`GstageTlb`] per hart.
#[derive(Clone, Debug, Default)]
pub struct GstageHarts {
    tlbs: Vec<GstageTlb>,
}

/// A hart whose TLB answers differently from a fresh walk of the tables in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleTranslation {
    /// The hart.
    pub hart: usize,
    /// The address.
    pub gpa: Gpa,
    /// What the hart's TLB answered.
    pub cached: Result<GWalk, GstageFault>,
    /// What a walk of the tables in memory answers.
    pub fresh: Result<GWalk, GstageFault>,
}

/// Whether two answers name the same translation: page, size and rights for a translation,
/// cause and reason for a guest-page fault. The A/D bits a walk reports are left out: a TLB
/// entry keeps the bits of the walk that filled it, which is what the architecture allows.
pub fn same_answer(a: &Result<GWalk, GstageFault>, b: &Result<GWalk, GstageFault>) -> bool {
    match (a, b) {
        (Ok(x), Ok(y)) => {
            (x.hpa, x.page_size, x.r, x.w, x.x, x.u, x.pbmt) == (y.hpa, y.page_size, y.r, y.w, y.x, y.u, y.pbmt)
        }
        (Err(GstageFault::GuestPage(x)), Err(GstageFault::GuestPage(y))) => {
            let key = |f: &GuestPageFault| (f.cause, f.gpa, f.reason);
            key(x) == key(y)
        }
        (Err(x), Err(y)) => x == y,
        _ => false,
    }
}

impl GstageHarts {
    /// `harts` harts with empty TLBs.
    pub fn new(harts: usize) -> Self {
        Self { tlbs: (0..harts).map(|_| GstageTlb::new()).collect() }
    }

    /// Number of harts.
    pub fn len(&self) -> usize {
        self.tlbs.len()
    }

    /// Whether there are no harts.
    pub fn is_empty(&self) -> bool {
        self.tlbs.is_empty()
    }

    /// The TLB of `hart`.
    pub fn hart(&self, hart: usize) -> &GstageTlb {
        &self.tlbs[hart]
    }

    /// The TLB of `hart`, to change.
    pub fn hart_mut(&mut self, hart: usize) -> &mut GstageTlb {
        &mut self.tlbs[hart]
    }

    /// An explicit access to `gpa` made by `hart` (through its TLB only).
    pub fn translate<M: PhysMem + ?Sized>(
        &mut self,
        hart: usize,
        mem: &mut M,
        hgatp: u64,
        cfg: &GstageConfig,
        gpa: Gpa,
        access: Access,
    ) -> Result<GWalk, GstageFault> {
        self.tlbs[hart].translate(mem, hgatp, cfg, gpa, access)
    }

    /// HFENCE.GVMA executed by `hart`: only its own TLB forgets (see
    /// [`GstageTlb::hfence_gvma`] for the operands).
    pub fn hfence_gvma(&mut self, hart: usize, gpa: Option<Gpa>, vmid: Option<u16>) {
        self.tlbs[hart].hfence_gvma(gpa, vmid);
    }

    /// The harts whose TLB holds something (a leaf or an invalid entry) for `gpa` and `vmid`.
    pub fn holders(&self, vmid: u16, gpa: Gpa) -> impl Iterator<Item = (usize, CachedG)> + '_ {
        self.tlbs.iter().enumerate().filter_map(move |(h, t)| t.cached(vmid, gpa).map(|c| (h, c)))
    }

    /// Translates every address of `gpas` on every hart through its TLB and through a fresh
    /// walk, and returns the first disagreement. The TLB translations fill the TLBs as any
    /// access would; `access` should be one that sets no A/D bit the tables lack (a read, with
    /// accessed bits already set or updated by hardware), so that the check changes nothing a
    /// later check depends on.
    pub fn first_stale<M: PhysMem + ?Sized>(
        &mut self,
        mem: &mut M,
        hgatp: u64,
        cfg: &GstageConfig,
        gpas: impl IntoIterator<Item = Gpa>,
        access: Access,
    ) -> Option<StaleTranslation> {
        for gpa in gpas {
            for hart in 0..self.tlbs.len() {
                let cached = self.tlbs[hart].translate(mem, hgatp, cfg, gpa, access);
                let fresh = gstage::walk(mem, hgatp, cfg, gpa, access);
                if !same_answer(&cached, &fresh) {
                    return Some(StaleTranslation { hart, gpa, cached, fresh });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gstage::{Hgatp, HgatpMode};
    use crate::{Hpa, SparseMem};

    // Sv39x4: root (16 KiB) at 0x10000 -> level-1 table 0x20000 -> level-0 table 0x21000.
    fn setup() -> (SparseMem, u64) {
        let mut mem = SparseMem::new(1 << 20);
        mem.set_entry(Hpa(0x10000), 0, 0x20000 >> 2 | 1);
        mem.set_entry(Hpa(0x20000), 0, 0x21000 >> 2 | 1);
        // V R W U A D -> frame 0x8000.
        mem.set_entry(Hpa(0x21000), 0, 0x8000 >> 2 | 0b1101_0111);
        let hgatp = Hgatp { mode: HgatpMode::Sv39x4, vmid: 7, root: Hpa(0x10000) }.encode();
        (mem, hgatp)
    }

    #[test]
    fn a_fence_reaches_only_the_hart_that_executes_it() {
        let (mut mem, hgatp) = setup();
        let cfg = GstageConfig::default();
        let mut harts = GstageHarts::new(3);
        for h in 0..3 {
            assert_eq!(harts.translate(h, &mut mem, hgatp, &cfg, Gpa(0x10), Access::Read).unwrap().hpa, Hpa(0x8010));
        }
        assert_eq!(harts.holders(7, Gpa(0)).count(), 3);
        mem.set_entry(Hpa(0x21000), 0, 0);
        assert!(harts.first_stale(&mut mem, hgatp, &cfg, [Gpa(0)], Access::Read).is_some());
        harts.hfence_gvma(0, Some(Gpa(0)), Some(7));
        harts.hfence_gvma(2, None, Some(7));
        let stale = harts.first_stale(&mut mem, hgatp, &cfg, [Gpa(0)], Access::Read).unwrap();
        assert_eq!(stale.hart, 1, "hart 1 did not fence: it still translates");
        assert_eq!(stale.cached.unwrap().hpa, Hpa(0x8000));
        assert!(stale.fresh.is_err());
        harts.hfence_gvma(1, Some(Gpa(0x123)), Some(7));
        assert_eq!(harts.first_stale(&mut mem, hgatp, &cfg, [Gpa(0)], Access::Read), None);
        // Every hart now caches the invalid entry: remapping needs the fence on each again.
        mem.set_entry(Hpa(0x21000), 0, 0x9000 >> 2 | 0b1101_0111);
        assert!(harts.first_stale(&mut mem, hgatp, &cfg, [Gpa(0)], Access::Read).is_some());
        (0..3).for_each(|h| harts.hfence_gvma(h, Some(Gpa(0)), Some(7)));
        assert_eq!(harts.first_stale(&mut mem, hgatp, &cfg, [Gpa(0)], Access::Read), None);
    }
}
