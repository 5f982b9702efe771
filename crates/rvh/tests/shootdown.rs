//! Remote shootdown against the spec model: several modelled harts, each with its own G-stage
//! TLB that only its own HFENCE.GVMA clears, hold translations (valid leaves, non-leaf entries
//! and invalid entries: the model caches V = 0 entries, as the Privileged spec permits) while
//! random changes are made to a `PageTable<Sv39x4>`; every change's flush goes through
//! `Shootdown`, each hart servicing its mailbox by fencing its own model TLB.
//!
//! Changes that only widen the table (a fill, a new table, A/D bits set) are fenced on the
//! changing hart alone (`GvmaInvalidation::Local`); another hart may keep a stale invalid or
//! narrower entry, and all it may do with it is fault. So after every flush each hart accesses
//! every page as the hypervisor's guest would: a translation it answers must be the tables'
//! (never a stale one, at any time); a fault on an entry the tables allow is a stale fault,
//! which the hypervisor resolves with `stale_fault_flush` carried out from that hart, after
//! which the retry must agree with the tables. No hart may still reach a frame the change
//! released, and no frame may have been freed before the last hart fenced. Shown to be caught:
//! a shootdown that skips a hart, a hart that acknowledges without fencing, a classification
//! that treats every change as local (skipping the remote fences a narrowing change needs), and
//! a stale fault resolved without its fence. Threads then play the harts to exercise the
//! atomics.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use twostage_npt::testing::HostRam;
use twostage_npt::{
    Access, AdMode, GuestPhysAddr, GvmaInvalidation, Hgatp, HgatpCapabilities, HostPhysAddr, MapSize, MappingFlags,
    PageSize, PageTable, Sv39x4, TableOptions,
};
use twostage_rvh::fence::GvmaFence;
use twostage_rvh::shootdown::{HartOps, LocalFence, Shootdown};
use twostage_spec_model as model;
use twostage_spec_model::gstage::{GWalk, GstageFault};
use twostage_spec_model::tlb::harts::{same_answer, GstageHarts};
use twostage_spec_model::{Gpa, Hpa};

const VMID: u16 = 3;
const BASE: u64 = 0x8000_0000;
/// The guest-physical window the changes and the checks cover: two 2 MiB superpages.
const PAGES: u64 = 1024;
/// Host frames of guest data (outside the fake RAM: the model never reads them).
const DATA: u64 = 0x10_0000_0000;
const FLAGS: [MappingFlags; 4] = [MappingFlags::READ, MappingFlags::RW, MappingFlags::RX, MappingFlags::RWX];

/// The fake RAM as the model reads it (atomically: hart threads walk while the engine writes).
struct Mem<'a>(&'a HostRam);

impl model::PhysMem for Mem<'_> {
    fn read_u64(&mut self, pa: Hpa) -> Option<u64> {
        self.0.contains(pa.0, 8).then(|| self.0.atomic_u64(pa.0).load(Ordering::Acquire))
    }
    fn write_u64(&mut self, pa: Hpa, v: u64) -> Option<()> {
        self.0.contains(pa.0, 8).then(|| self.0.atomic_u64(pa.0).store(v, Ordering::Release))
    }
}

fn gpa(page: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(BASE + page * 4096)
}

fn new_table(ram: &HostRam, ad: AdMode) -> (PageTable<Sv39x4, &HostRam>, u64) {
    let t = PageTable::<Sv39x4, _>::new(ram, TableOptions { ad, ..TableOptions::for_format::<Sv39x4>() }).unwrap();
    let caps = HgatpCapabilities { sv39x4: true, sv48x4: false, sv57x4: false, vmid_bits: 7 };
    let hgatp = Hgatp::for_table(&t, VMID, &caps).unwrap().bits();
    (t, hgatp)
}

fn apply(tlbs: &mut GstageHarts, hart: usize, f: LocalFence) {
    match f {
        LocalFence::Gvma(GvmaFence::Address { gpa, vmid }) => {
            tlbs.hfence_gvma(hart, Some(Gpa(gpa.as_u64())), Some(vmid))
        }
        LocalFence::Gvma(GvmaFence::Vmid { vmid }) => tlbs.hfence_gvma(hart, None, Some(vmid)),
        LocalFence::AllVmids => tlbs.hfence_gvma(hart, None, None),
    }
}

/// How the modelled machine is broken, to show the checker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broken {
    No,
    /// This hart runs the guest without `enter`: the mask says it holds nothing, so every
    /// shootdown skips it.
    Unmarked(usize),
    /// This hart acknowledges without executing its fences (a request dropped on arrival).
    Deaf(usize),
    /// Every flush is treated as widening only: no remote fence is ever asked for.
    AllLocal,
    /// A stale fault is resolved without its local fence (the hart just retries).
    StaleNoFence,
}

/// `inv` as a fence on the carrying hart only (what `Broken::AllLocal` turns every flush into).
fn as_local<'a>(inv: &GvmaInvalidation<'a>) -> GvmaInvalidation<'a> {
    match *inv {
        GvmaInvalidation::Addresses { root, addrs } => GvmaInvalidation::Local { root, addrs: Some(addrs) },
        GvmaInvalidation::All { root } => GvmaInvalidation::Local { root, addrs: None },
        other => other,
    }
}

/// Modelled harts in one thread: IPIs are queued and delivered whenever a requester waits.
struct Machine<'r> {
    sd: Shootdown,
    tlbs: RefCell<GstageHarts>,
    ipis: RefCell<VecDeque<usize>>,
    ram: &'r HostRam,
    broken: Broken,
    /// Frees counted by the fake RAM at every fence of the flush under way.
    frees_at_fences: RefCell<Vec<u64>>,
    fences: Cell<u64>,
    /// Stale faults resolved by [`guest_access`].
    stale: Cell<u64>,
    /// The table's hgatp and the harts' configuration.
    hgatp: u64,
    cfg: model::gstage::GstageConfig,
}

impl HartOps for Machine<'_> {
    fn send_ipi(&self, hart: usize) {
        self.ipis.borrow_mut().push_back(hart);
    }
    fn fence_local(&self, hart: usize, f: LocalFence) {
        self.frees_at_fences.borrow_mut().push(self.ram.frees());
        self.fences.set(self.fences.get() + 1);
        if self.broken == Broken::Deaf(hart) {
            return;
        }
        apply(&mut self.tlbs.borrow_mut(), hart, f);
    }
    fn relax(&self) {
        // The IPIs arrive: each target takes the interrupt and services its mailbox.
        let pending: Vec<usize> = self.ipis.borrow_mut().drain(..).collect();
        for h in pending {
            self.sd.service(h, self);
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// `n` 4 KiB pages, or (huge) the whole superpage around `page`.
    Map {
        page: u64,
        n: u64,
        flags: usize,
        huge: bool,
    },
    Unmap {
        page: u64,
        n: u64,
    },
    Protect {
        page: u64,
        n: u64,
        flags: usize,
    },
    Remap {
        page: u64,
        flags: usize,
    },
    Split {
        page: u64,
    },
    Collapse {
        page: u64,
    },
    /// The hypervisor sets A (and D for a write) on the leaf at `page`, as after a fault on a
    /// clear bit.
    SetAd {
        page: u64,
        write: bool,
    },
    /// `hart` runs the guest, which accesses `page` (caching what its walk saw).
    Touch {
        hart: usize,
        page: u64,
        access: u8,
    },
    /// `hart` stops running the VM (and fences it whole) / starts again.
    Leave {
        hart: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let page = 0..PAGES;
    prop_oneof![
        3 => (page.clone(), 1..24u64, 0..4usize, prop::bool::weighted(0.25))
            .prop_map(|(page, n, flags, huge)| Op::Map { page, n, flags, huge }),
        2 => (page.clone(), 1..64u64).prop_map(|(page, n)| Op::Unmap { page, n }),
        2 => (page.clone(), 1..64u64, 0..4usize).prop_map(|(page, n, flags)| Op::Protect { page, n, flags }),
        1 => (page.clone(), 0..4usize).prop_map(|(page, flags)| Op::Remap { page, flags }),
        1 => page.clone().prop_map(|page| Op::Split { page }),
        1 => page.clone().prop_map(|page| Op::Collapse { page }),
        1 => (page.clone(), prop::bool::ANY).prop_map(|(page, write)| Op::SetAd { page, write }),
        6 => (0..4usize, page.clone(), 0..3u8).prop_map(|(hart, page, access)| Op::Touch { hart, page, access }),
        1 => (0..4usize).prop_map(|hart| Op::Leave { hart }),
    ]
}

/// Every 4 KiB host page the table maps in the window.
fn mapped_pages(t: &PageTable<Sv39x4, &HostRam>) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    t.for_each_leaf(gpa(0), PAGES * 4096, |l| {
        for off in (0..l.size.bytes()).step_by(4096) {
            out.insert(l.hpa.as_u64() + off);
        }
    });
    out
}

/// Whether a translation the hart's TLB served is one the tables allow: the same frame and
/// memory type, and no right the tables lack. A cached entry with fewer rights than the tables
/// (one a local-only change widened) is not stale: it serves this access rightly, and one it does
/// not allow faults and is resolved as stale.
fn served_rightly(cached: &Result<GWalk, GstageFault>, fresh: &Result<GWalk, GstageFault>) -> bool {
    match (cached, fresh) {
        (Ok(c), Ok(f)) => {
            c.hpa == f.hpa && c.pbmt == f.pbmt && c.u == f.u && (!c.r || f.r) && (!c.w || f.w) && (!c.x || f.x)
        }
        _ => false,
    }
}

/// An access to `g` by the guest on `hart`, with its faults handled as the RISC-V hypervisor does:
/// an answer from the hart's TLB must be the tables' own; a fault where the tables allow the
/// read is a stale fault, resolved with the engine's `stale_fault_flush` carried out through the
/// shootdown from `hart` (a fence on `hart` alone), and the retry must then agree with the
/// tables. Counts a stale fault in `m.stale`.
fn guest_access(
    m: &Machine<'_>,
    t: &mut PageTable<Sv39x4, &HostRam>,
    hart: usize,
    g: Gpa,
    read: model::Access,
    broken: Broken,
) -> Result<(), String> {
    let (hgatp, cfg) = (m.hgatp, &m.cfg);
    let fresh = model::gstage::walk(&mut Mem(m.ram), hgatp, cfg, g, read);
    let cached = m.tlbs.borrow_mut().translate(hart, &mut Mem(m.ram), hgatp, cfg, g, read);
    match (&cached, &fresh) {
        (Ok(_), _) if !served_rightly(&cached, &fresh) => {
            Err(format!("stale translation on hart {hart} at {:#x}: TLB {cached:?}, tables {fresh:?}", g.0))
        }
        (Ok(_), _) | (Err(_), Err(_)) => Ok(()),
        (Err(_), Ok(_)) => {
            // A stale fault: the hypervisor finds the entry valid and fences this hart.
            m.stale.set(m.stale.get() + 1);
            let token = t.stale_fault_flush(GuestPhysAddr::new(g.0));
            if broken == Broken::StaleNoFence {
                token.ignore();
            } else {
                t.flush(token, m.sd.invalidate_from(hart, VMID, m)).unwrap();
            }
            let retry = m.tlbs.borrow_mut().translate(hart, &mut Mem(m.ram), hgatp, cfg, g, read);
            if served_rightly(&retry, &fresh) {
                Ok(())
            } else {
                Err(format!(
                    "hart {hart} at {:#x} faults again after its stale fault was resolved: {retry:?}, tables {fresh:?}",
                    g.0
                ))
            }
        }
    }
}

/// Runs `ops` on a machine of `harts` harts, `from` hart `requesters[i % len]` for change i.
/// Returns the first violation found.
fn run(ops: &[Op], harts: usize, broken: Broken) -> Result<Outcome, String> {
    run_with(ops, harts, broken, AdMode::Hardware)
}

/// What a run that found no violation did.
#[derive(Debug, Default)]
struct Outcome {
    /// Stale faults resolved with a local fence.
    stale: u64,
    /// Changes fenced on the changing hart only.
    local: u64,
    /// Changes fenced on every hart.
    remote: u64,
}

/// [`run`] with the table's A/D mode: `AdMode::Software` is a hart without hardware A/D
/// updating (Svade), whose faults on clear A/D bits the hypervisor resolves by setting them.
fn run_with(ops: &[Op], harts: usize, broken: Broken, ad: AdMode) -> Result<Outcome, String> {
    let ram = HostRam::new(256);
    let (mut t, hgatp) = new_table(&ram, ad);
    let cfg = model::gstage::GstageConfig { hw_ad_update: ad == AdMode::Hardware, ..Default::default() };
    let m = Machine {
        sd: Shootdown::new(harts),
        tlbs: RefCell::new(GstageHarts::new(harts)),
        ipis: RefCell::new(VecDeque::new()),
        ram: &ram,
        broken,
        frees_at_fences: RefCell::new(Vec::new()),
        fences: Cell::new(0),
        stale: Cell::new(0),
        hgatp,
        cfg,
    };
    // Whether each hart runs the guest now.
    let mut running = vec![false; harts];
    let mut remaps = 0u64;
    for (i, op) in ops.iter().enumerate() {
        let from = i % harts;
        let before = mapped_pages(&t);
        let token = match *op {
            Op::Touch { hart, page, access } => {
                let hart = hart % harts;
                if !running[hart] {
                    if broken != Broken::Unmarked(hart) {
                        m.sd.enter(hart, VMID, &m);
                    }
                    running[hart] = true;
                }
                let access = [model::Access::Read, model::Access::Write, model::Access::Fetch][access as usize];
                let g = Gpa(gpa(page).as_u64() + 8);
                let _ = m.tlbs.borrow_mut().translate(hart, &mut Mem(&ram), hgatp, &cfg, g, access);
                continue;
            }
            Op::Leave { hart } => {
                let hart = hart % harts;
                if running[hart] && broken != Broken::Unmarked(hart) {
                    m.sd.leave(hart, VMID, &m);
                    running[hart] = false;
                    let tlbs = m.tlbs.borrow();
                    let h = tlbs.hart(hart);
                    if broken == Broken::No && h.cached_leaves() + h.cached_invalid() + h.cached_partials() != 0 {
                        return Err(format!("hart {hart} left but still caches"));
                    }
                }
                continue;
            }
            Op::Map { page, n, flags, huge } => {
                let (page, n, size) = if huge {
                    (page & !511, 512, PageSize::Size2M)
                } else {
                    (page, n.min(PAGES - page), PageSize::Size4K)
                };
                let hpa = HostPhysAddr::new(DATA + (remaps * PAGES + page) * 4096);
                remaps += 1;
                t.map(gpa(page), hpa, n * 4096, FLAGS[flags], MapSize::Exactly(size)).ok()
            }
            Op::Unmap { page, n } => t.unmap(gpa(page), n.min(PAGES - page) * 4096).ok(),
            Op::Protect { page, n, flags } => t.protect(gpa(page), n.min(PAGES - page) * 4096, FLAGS[flags]).ok(),
            Op::Remap { page, flags } => match t.query(gpa(page)) {
                Some(leaf) => {
                    let size = leaf.size.bytes();
                    let hpa = HostPhysAddr::new((DATA + (remaps * PAGES + page) * 4096 + size) & !(size - 1));
                    remaps += 1;
                    t.remap(leaf.gpa, hpa, FLAGS[flags]).ok()
                }
                None => None,
            },
            Op::Split { page } => t.split(gpa(page)).ok(),
            Op::SetAd { page, write } => {
                t.set_accessed_dirty(gpa(page), if write { Access::Write } else { Access::Read }).ok()
            }
            Op::Collapse { page } => t.collapse(gpa(page), PageSize::Size2M).ok(),
        };
        let Some(token) = token else { continue };
        let after = mapped_pages(&t);
        let released: BTreeSet<u64> = before.difference(&after).copied().collect();

        // The flush, through the shootdown, from hart `from`.
        let frees_before = ram.frees();
        m.frees_at_fences.borrow_mut().clear();
        if broken == Broken::AllLocal {
            t.flush(token, |inv| {
                m.sd.request(from, &as_local(inv), VMID, &m);
            })
            .unwrap();
        } else {
            t.flush(token, m.sd.invalidate_from(from, VMID, &m)).unwrap();
        }
        if let Some(f) = m.frees_at_fences.borrow().iter().find(|&&f| f != frees_before) {
            return Err(format!("op {i} {op:?}: a frame was freed before a hart fenced ({f} != {frees_before})"));
        }
        // IPIs still queued now are delivered only when some later request waits: a requester
        // that returned before its targets acknowledged is seen by the check below.

        // No stale translation anywhere, no released frame reachable.
        for hart in (0..harts).filter(|&h| running[h]) {
            for page in 0..PAGES {
                let g = Gpa(gpa(page).as_u64());
                if let Some(model::tlb::CachedG::Leaf(w)) = m.tlbs.borrow().hart(hart).cached(VMID, g) {
                    if released.contains(&(w.hpa.0 & !0xfff)) {
                        return Err(format!(
                            "op {i} {op:?}: hart {hart} still reaches released frame {:#x} at {:#x}",
                            w.hpa.0, g.0
                        ));
                    }
                }
                // Reads and fetches (neither sets a bit the tables lack once A is set): a right
                // added locally (read-only to executable) is met by a fetch.
                for access in [model::Access::Read, model::Access::Fetch] {
                    guest_access(&m, &mut t, hart, g, access, broken).map_err(|e| format!("op {i} {op:?}: {e}"))?;
                }
            }
        }
    }
    // Accounting: every request that reached a hart was acknowledged by it.
    let s = m.sd.total();
    if s.targeted != s.acknowledged {
        return Err(format!("{s:?}: targeted != acknowledged"));
    }
    if s.fences != m.fences.get() {
        return Err(format!("{s:?}: {} fences executed", m.fences.get()));
    }
    Ok(Outcome { stale: m.stale.get(), local: s.local, remote: s.requested })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_hart_agrees_with_the_tables_after_every_shootdown(
        harts in 2..=4usize,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        if let Err(e) = run(&ops, harts, Broken::No) {
            prop_assert!(false, "{}", e);
        }
    }

    #[test]
    fn every_hart_agrees_with_the_tables_without_hardware_ad_updating(
        harts in 2..=4usize,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        if let Err(e) = run_with(&ops, harts, Broken::No, AdMode::Software) {
            prop_assert!(false, "{}", e);
        }
    }
}

#[test]
fn random_runs_fence_fills_locally_and_other_harts_recover_from_stale_faults() {
    // The property above is not vacuous: its runs take both paths, and harts do meet stale
    // invalid entries left by local-only fills (and resolve them).
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = prop::collection::vec(op(), 40..80);
    let mut total = Outcome::default();
    for k in 0..16 {
        let ops = strategy.new_tree(&mut runner).unwrap().current();
        let ad = if k % 2 == 0 { AdMode::Hardware } else { AdMode::Software };
        let o = run_with(&ops, 3, Broken::No, ad).unwrap();
        total.stale += o.stale;
        total.local += o.local;
        total.remote += o.remote;
    }
    assert!(total.stale > 0 && total.local > 0 && total.remote > 0, "{total:?}");
}

/// Hart 2 caches the invalid entry of page 5; hart 1 then maps the page (a fill: fenced on hart
/// 1 only). Hart 2's next access meets its stale entry.
fn fill_scenario() -> Vec<Op> {
    vec![Op::Touch { hart: 2, page: 5, access: 0 }, Op::Map { page: 5, n: 1, flags: 1, huge: false }]
}

#[test]
fn a_fill_is_fenced_locally_and_the_other_hart_recovers_with_one_stale_fault() {
    let o = run(&fill_scenario(), 3, Broken::No).unwrap();
    assert_eq!((o.stale, o.local, o.remote), (1, 2, 0), "{o:?}");
}

#[test]
fn a_right_added_is_fenced_locally_and_a_hart_that_cached_the_narrower_leaf_recovers() {
    // Harts 1 and 2 cache page 5 read-only; hart 0 makes it executable (only widens: local).
    let ops = [
        Op::Map { page: 5, n: 1, flags: 0, huge: false },
        Op::Touch { hart: 2, page: 5, access: 0 },
        Op::Touch { hart: 1, page: 5, access: 0 },
        Op::Protect { page: 5, n: 1, flags: 2 },
    ];
    let o = run(&ops, 3, Broken::No).unwrap();
    assert_eq!((o.stale, o.remote), (2, 0), "{o:?}");
    let e = run(&ops, 3, Broken::StaleNoFence).expect_err("the fetch must fault again");
    assert!(e.contains("faults again"), "{e}");
}

#[test]
fn a_stale_fault_resolved_without_its_fence_is_caught() {
    let e = run(&fill_scenario(), 3, Broken::StaleNoFence).expect_err("the retry must fault again");
    assert!(e.contains("hart 2") && e.contains("faults again"), "{e}");
}

#[test]
fn treating_a_narrowing_change_as_local_is_caught() {
    // Write-protect and unmap fenced on the changing hart alone: the others keep their
    // translations.
    let e = run(&scenario(), 3, Broken::AllLocal).expect_err("the checker must see the missing remote fences");
    assert!(e.contains("stale translation") || e.contains("released frame"), "{e}");
}

/// A scenario in which a hart that misses a shootdown must be seen: every hart caches a
/// writable page, then the page is write-protected, unmapped, and mapped elsewhere.
fn scenario() -> Vec<Op> {
    let mut ops = vec![Op::Map { page: 5, n: 1, flags: 1, huge: false }];
    ops.extend((0..3).map(|hart| Op::Touch { hart, page: 5, access: 1 }));
    ops.push(Op::Protect { page: 5, n: 1, flags: 0 });
    ops.push(Op::Unmap { page: 5, n: 1 });
    ops.push(Op::Map { page: 5, n: 1, flags: 1, huge: false });
    ops
}

#[test]
fn the_scenario_passes_on_a_sound_machine() {
    run(&scenario(), 3, Broken::No).unwrap();
}

#[test]
fn a_shootdown_that_skips_a_hart_is_caught() {
    // Hart 2 runs the guest but was never marked: every shootdown skips it.
    let e = run(&scenario(), 3, Broken::Unmarked(2)).expect_err("the checker must see the skipped hart");
    assert!(e.contains("stale translation on hart 2"), "{e}");
}

#[test]
fn a_hart_that_acknowledges_without_fencing_is_caught() {
    let e = run(&scenario(), 3, Broken::Deaf(1)).expect_err("the checker must see the deaf hart");
    assert!(e.contains("hart 1"), "{e}");
}

#[test]
fn a_skipped_hart_is_caught_on_random_runs_too() {
    // The same random operations as the property, with hart 1 unmarked: every run in which
    // hart 1 cached something that a later change invalidated must fail; at least one must.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = prop::collection::vec(op(), 20..60);
    let mut caught = 0;
    for _ in 0..20 {
        let ops = strategy.new_tree(&mut runner).unwrap().current();
        if let Err(e) = run(&ops, 3, Broken::Unmarked(1)) {
            assert!(e.contains("hart 1"), "{e}");
            caught += 1;
        }
    }
    assert!(caught > 0, "the checker never saw the skipped hart");
}

// ---------------------------------------------------------------------------------------------
// Threads as harts.

/// Harts as threads: an IPI sets a flag the target's loop watches; each hart's TLB is behind a
/// mutex that its own thread takes to translate and to fence.
struct Threads {
    tlbs: Vec<Mutex<model::tlb::GstageTlb>>,
    irq: Vec<AtomicBool>,
}

impl HartOps for Threads {
    fn send_ipi(&self, hart: usize) {
        self.irq[hart].store(true, Ordering::Release);
    }
    fn fence_local(&self, hart: usize, f: LocalFence) {
        let mut t = self.tlbs[hart].lock().unwrap();
        match f {
            LocalFence::Gvma(GvmaFence::Address { gpa, vmid }) => t.hfence_gvma(Some(Gpa(gpa.as_u64())), Some(vmid)),
            LocalFence::Gvma(GvmaFence::Vmid { vmid }) => t.hfence_gvma(None, Some(vmid)),
            LocalFence::AllVmids => t.hfence_gvma(None, None),
        }
    }
    fn relax(&self) {
        std::thread::yield_now();
    }
}

fn threads(harts: usize) -> Arc<Threads> {
    Arc::new(Threads {
        tlbs: (0..harts).map(|_| Mutex::new(model::tlb::GstageTlb::new())).collect(),
        irq: (0..harts).map(|_| AtomicBool::new(false)).collect(),
    })
}

/// A tiny deterministic generator (the threads need no shrinking).
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn threads_servicing_their_mailboxes_never_keep_a_stale_translation() {
    const HARTS: usize = 3;
    const WINDOW: u64 = 64;
    let ram = Arc::new(HostRam::new(64));
    let ops = threads(HARTS);
    let sd = Arc::new(Shootdown::new(HARTS));
    let stop = Arc::new(AtomicBool::new(false));
    // Preset A/D and reads only: the harts' walks never write the tables.
    let (mut t, hgatp) = new_table(&ram, AdMode::Preset);
    let cfg = model::gstage::GstageConfig::default();
    let read = model::Access::Read;

    // The checker below translates on every hart's TLB, as that hart: only once every hart has
    // entered (a hart translating before `enter` is outside the mask, and the checker rightly
    // catches the first change that skips it).
    let entered = Arc::new(std::sync::Barrier::new(HARTS));
    let mut joins = Vec::new();
    for hart in 1..HARTS {
        let (ram, ops, sd, stop, entered) = (ram.clone(), ops.clone(), sd.clone(), stop.clone(), entered.clone());
        joins.push(std::thread::spawn(move || {
            sd.enter(hart, VMID, &*ops);
            entered.wait();
            let mut x = 0x9e37_79b9_7f4a_7c15 ^ hart as u64;
            while !stop.load(Ordering::Acquire) {
                // The IPI handler, or the loop: both service.
                if ops.irq[hart].swap(false, Ordering::AcqRel) || next(&mut x) & 3 == 0 {
                    sd.service(hart, &*ops);
                }
                let g = Gpa(gpa(next(&mut x) % WINDOW).as_u64());
                let _ = ops.tlbs[hart].lock().unwrap().translate(&mut Mem(&ram), hgatp, &cfg, g, read);
                std::thread::yield_now();
            }
            sd.service(hart, &*ops);
        }));
    }

    sd.enter(0, VMID, &*ops);
    entered.wait();
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut stale = 0u64;
    for i in 0..300u64 {
        let page = next(&mut x) % WINDOW;
        let n = 1 + next(&mut x) % 8;
        let n = n.min(WINDOW - page);
        let flags = FLAGS[(next(&mut x) % 4) as usize];
        let token = match next(&mut x) % 3 {
            0 => t.map(
                gpa(page),
                HostPhysAddr::new(DATA + (i * WINDOW + page) * 4096),
                n * 4096,
                flags,
                MapSize::Largest,
            ),
            1 => t.unmap(gpa(page), n * 4096).map_err(|_| unreachable!()),
            _ => t.protect(gpa(page), n * 4096, flags).map_err(|_| unreachable!()),
        };
        let Ok(token) = token else { continue };
        t.flush(token, sd.invalidate_from(0, VMID, &*ops)).unwrap();
        // The change is done: no hart may answer from before it. A fault where the tables allow
        // the read is a stale invalid entry (fills are fenced on hart 0 only): the hart's own
        // stale-fault handler fences its TLB (the whole VMID, as `stale_fault_flush` asks),
        // and the retry must agree.
        for hart in 0..HARTS {
            let mut tlb = ops.tlbs[hart].lock().unwrap();
            for p in 0..WINDOW {
                let g = Gpa(gpa(p).as_u64());
                let mut cached = tlb.translate(&mut Mem(&ram), hgatp, &cfg, g, read);
                let fresh = model::gstage::walk(&mut Mem(&ram), hgatp, &cfg, g, read);
                if cached.is_err() && fresh.is_ok() {
                    stale += 1;
                    tlb.hfence_gvma(None, Some(VMID));
                    cached = tlb.translate(&mut Mem(&ram), hgatp, &cfg, g, read);
                }
                let ok = served_rightly(&cached, &fresh) || (cached.is_err() && same_answer(&cached, &fresh));
                assert!(ok, "change {i}: hart {hart} at {:#x}: {cached:?} vs {fresh:?}", g.0);
            }
        }
    }
    stop.store(true, Ordering::Release);
    joins.into_iter().for_each(|j| j.join().unwrap());
    let s = sd.total();
    assert_eq!(s.targeted, s.acknowledged, "{s:?}");
    assert!(s.targeted > 0 && s.fences > 0 && s.local > 0, "{s:?}");
    std::println!("stale faults resolved: {stale}");
}

#[test]
fn two_harts_requesting_at_once_both_finish() {
    // Harts 0 and 1 both request, each the other's target, each busy in its own request (no
    // IPI handler runs while a hart requests): they progress only because a waiter services
    // its own mailbox. Hart 2 services from its loop.
    const HARTS: usize = 3;
    const ROUNDS: usize = 400;
    let ops = threads(HARTS);
    let sd = Arc::new(Shootdown::new(HARTS));
    let stop = Arc::new(AtomicBool::new(false));
    for h in 0..HARTS {
        sd.enter(h, VMID, &*ops);
    }
    let idle = {
        let (ops, sd, stop) = (ops.clone(), sd.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                sd.service(2, &*ops);
                std::thread::yield_now();
            }
        })
    };
    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let requesters: Vec<_> = (0..2)
        .map(|h| {
            let (ops, sd, finished) = (ops.clone(), sd.clone(), finished.clone());
            std::thread::spawn(move || {
                let root = HostPhysAddr::new(0x4000_0000);
                let addrs = [GuestPhysAddr::new(BASE + h as u64 * 4096)];
                for i in 0..ROUNDS {
                    let inv = if i % 5 == 0 {
                        GvmaInvalidation::All { root }
                    } else {
                        GvmaInvalidation::Addresses { root, addrs: &addrs }
                    };
                    assert_eq!(sd.request(h, &inv, VMID, &*ops), HARTS - 1);
                }
                // A hart keeps servicing after its own work (its IPI handler stays installed):
                // the other requester may still be waiting for it.
                finished.fetch_add(1, Ordering::AcqRel);
                while finished.load(Ordering::Acquire) < 2 {
                    sd.service(h, &*ops);
                    std::thread::yield_now();
                }
            })
        })
        .collect();
    requesters.into_iter().for_each(|j| j.join().unwrap());
    stop.store(true, Ordering::Release);
    idle.join().unwrap();
    for h in 0..HARTS {
        sd.service(h, &*ops);
    }
    let s = sd.total();
    assert_eq!(s.requested, 2 * ROUNDS as u64);
    assert_eq!(s.targeted, 2 * ROUNDS as u64 * (HARTS as u64 - 1));
    assert_eq!(s.acknowledged, s.targeted, "{s:?}");
    assert_eq!(sd.stats(0).requested, ROUNDS as u64);
}
