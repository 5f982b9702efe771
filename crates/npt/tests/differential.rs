//! Differential tests: random sequences of map, unmap, protect, remap, split, collapse and A/D
//! harvests on every format. After each step the engine's tables are walked by the independent
//! spec model (twostage-spec-model), both fresh and through its TLB model after carrying out the
//! flush the engine asked for; both must agree with a plain interval map of what should be
//! mapped, and with the engine's own query. Allocation failures are injected along the way.

use std::collections::BTreeMap;
use twostage_npt::testing::HostRam;
use twostage_npt::*;
use twostage_npt::{EptCapabilities, EptPointer};
use twostage_npt::{GStageFormat, Hgatp, HgatpCapabilities};
use twostage_spec_model as model;
use twostage_spec_model::Gpa;

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const TARGET: u64 = 0x100_0000_0000;
/// skylake_x's IA32_VMX_EPT_VPID_CAP (read on Bochs 2.7; README, platform notes) plus the 5-level walk bit (7).
const EPT_CAP: u64 = 0xf0106334141 | 1 << 7;
const MAXPHYADDR: u8 = 46;

mod common;
use common::Ram;

/// What should be mapped: disjoint intervals start -> (end, hpa of start, rights).
#[derive(Default, Clone, PartialEq, Debug)]
struct Shadow(BTreeMap<u64, (u64, u64, MappingFlags)>);

impl Shadow {
    fn lookup(&self, a: u64) -> Option<(u64, MappingFlags)> {
        let (&s, &(e, h, f)) = self.0.range(..=a).next_back()?;
        (a < e).then(|| (h + (a - s), f))
    }
    fn first_mapped(&self, start: u64, end: u64) -> Option<u64> {
        if self.lookup(start).is_some() {
            return Some(start);
        }
        self.0.range(start..end).next().map(|(&s, _)| s)
    }
    /// Cuts intervals so that `a` is a boundary.
    fn cut(&mut self, a: u64) {
        if let Some((&s, &(e, h, f))) = self.0.range(..a).next_back() {
            if a < e {
                self.0.insert(s, (a, h, f));
                self.0.insert(a, (e, h + (a - s), f));
            }
        }
    }
    fn remove(&mut self, start: u64, end: u64) {
        self.cut(start);
        self.cut(end);
        let keys: Vec<u64> = self.0.range(start..end).map(|(&k, _)| k).collect();
        for k in keys {
            self.0.remove(&k);
        }
    }
    fn protect(&mut self, start: u64, end: u64, flags: MappingFlags) {
        self.cut(start);
        self.cut(end);
        for (_, v) in self.0.range_mut(start..end) {
            v.2 = flags;
        }
    }
    fn insert(&mut self, start: u64, end: u64, hpa: u64, flags: MappingFlags) {
        self.0.insert(start, (end, hpa, flags));
    }
}

/// The hardware as the model sees it: a fresh walk, and a TLB that needs the engine's flushes.
trait Hw {
    type F: Format;
    fn new(ram: &HostRam, table: &PageTable<Self::F, &HostRam>) -> Self;
    /// A fresh walk: Ok(hpa) if `access` is allowed; Err(rights seen) for a legitimate fault.
    fn walk(&mut self, ram: &HostRam, gpa: u64, access: Access) -> Result<u64, Option<u8>>;
    /// The same through the TLB model.
    fn tlb(&mut self, ram: &HostRam, gpa: u64, access: Access) -> Result<u64, Option<u8>>;
    fn invalidate(&mut self, inv: &InvalidationOf<'_, Self::F>);
}

fn model_access(a: Access) -> model::Access {
    match a {
        Access::Read => model::Access::Read,
        Access::Write => model::Access::Write,
        Access::Execute => model::Access::Fetch,
    }
}

struct EptHw {
    eptp: u64,
    caps: model::ept::EptCaps,
    tlb: model::tlb::EptTlb,
}

fn ept_result(r: Result<model::ept::EptWalk, model::ept::EptExit>) -> Result<u64, Option<u8>> {
    match r {
        Ok(w) => Ok(w.hpa.0),
        // Bits 5:3 of the qualification: the AND of the rights along the walk.
        Err(model::ept::EptExit::Violation { qualification, .. }) => Err(Some(((qualification >> 3) & 7) as u8)),
        Err(e) => panic!("the engine built a table the hardware rejects: {e:?}"),
    }
}

macro_rules! ept_hw {
    ($name:ident, $fmt:ty, $levels:expr) => {
        struct $name(EptHw);
        impl Hw for $name {
            type F = $fmt;
            fn new(_ram: &HostRam, table: &PageTable<$fmt, &HostRam>) -> Self {
                let caps = EptCapabilities::new(EPT_CAP, MAXPHYADDR);
                let eptp = EptPointer::new(table.root(), $levels, true, &caps).unwrap().bits();
                $name(EptHw {
                    eptp,
                    caps: model::ept::EptCaps::from_msr(EPT_CAP, MAXPHYADDR),
                    tlb: model::tlb::EptTlb::new(),
                })
            }
            fn walk(&mut self, ram: &HostRam, gpa: u64, a: Access) -> Result<u64, Option<u8>> {
                let acc = model::ept::EptAccess::from(model_access(a));
                ept_result(model::ept::walk(
                    &mut Ram(ram),
                    self.0.eptp,
                    &self.0.caps,
                    Gpa(gpa),
                    acc,
                    model::ept::GuestLinear::NONE,
                ))
            }
            fn tlb(&mut self, ram: &HostRam, gpa: u64, a: Access) -> Result<u64, Option<u8>> {
                let acc = model::ept::EptAccess::from(model_access(a));
                let h = &mut self.0;
                ept_result(h.tlb.translate(
                    &mut Ram(ram),
                    h.eptp,
                    &h.caps,
                    Gpa(gpa),
                    acc,
                    model::ept::GuestLinear::NONE,
                ))
            }
            fn invalidate(&mut self, inv: &EptInvalidation) {
                match inv {
                    EptInvalidation::None => {}
                    EptInvalidation::SingleContext { .. } => self.0.tlb.invept_single_context(self.0.eptp),
                }
            }
        }
    };
}
ept_hw!(Ept4Hw, Ept4, 4);
ept_hw!(Ept5Hw, Ept5, 5);

const VMID: u16 = 5;

struct GHw<F> {
    hgatp: u64,
    cfg: model::gstage::GstageConfig,
    tlb: model::tlb::GstageTlb,
    _f: std::marker::PhantomData<F>,
}

fn g_result(r: Result<model::gstage::GWalk, model::gstage::GstageFault>) -> Result<u64, Option<u8>> {
    use model::gstage::{GstageFault, RvFaultKind};
    match r {
        Ok(w) => Ok(w.hpa.0),
        Err(GstageFault::GuestPage(f)) if matches!(f.reason, RvFaultKind::NotValid | RvFaultKind::Permission) => {
            Err(None)
        }
        Err(e) => panic!("the engine built a table the hardware rejects: {e:?}"),
    }
}

impl<F: GStageFormat> Hw for GHw<F> {
    type F = F;
    fn new(_ram: &HostRam, table: &PageTable<F, &HostRam>) -> Self {
        let caps = HgatpCapabilities { sv39x4: true, sv48x4: true, sv57x4: true, vmid_bits: 14 };
        let hgatp = Hgatp::for_table(table, VMID, &caps).unwrap().bits();
        let cfg = model::gstage::GstageConfig { hw_ad_update: true, ..Default::default() };
        GHw { hgatp, cfg, tlb: model::tlb::GstageTlb::new(), _f: std::marker::PhantomData }
    }
    fn walk(&mut self, ram: &HostRam, gpa: u64, a: Access) -> Result<u64, Option<u8>> {
        g_result(model::gstage::walk(&mut Ram(ram), self.hgatp, &self.cfg, Gpa(gpa), model_access(a)))
    }
    fn tlb(&mut self, ram: &HostRam, gpa: u64, a: Access) -> Result<u64, Option<u8>> {
        g_result(self.tlb.translate(&mut Ram(ram), self.hgatp, &self.cfg, Gpa(gpa), model_access(a)))
    }
    fn invalidate(&mut self, inv: &GvmaInvalidation<'_>) {
        match inv {
            GvmaInvalidation::None => {}
            // One modelled hart: a local invalidation is carried out on it like the others.
            GvmaInvalidation::Addresses { addrs, .. } | GvmaInvalidation::Local { addrs: Some(addrs), .. } => {
                for a in *addrs {
                    self.tlb.hfence_gvma(Some(Gpa(a.as_u64())), Some(VMID));
                }
            }
            GvmaInvalidation::All { .. } | GvmaInvalidation::Local { addrs: None, .. } => {
                self.tlb.hfence_gvma(None, Some(VMID))
            }
        }
    }
}

/// xorshift64*: deterministic, so a failure names its seed and step.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const RIGHTS: [MappingFlags; 5] =
    [MappingFlags::READ, MappingFlags::RW, MappingFlags::RX, MappingFlags::RWX, MappingFlags::EXECUTE];

/// A random range, mostly in a hot window around 1 GiB so that operations collide, split and
/// collapse each other's pages.
fn random_range(rng: &mut Rng) -> (u64, u64) {
    let unit = match rng.below(100) {
        0..=59 => K4,
        60..=94 => M2,
        _ => G1,
    };
    let (lo, span) = if unit == G1 { (0, 4 * G1) } else { (G1 - 8 * M2, 16 * M2) };
    let mut start = lo + rng.below(span / unit) * unit;
    let mut len = unit * (1 + rng.below(3));
    if unit > K4 && rng.chance(25) {
        start += K4 * rng.below(4);
    }
    if unit > K4 && rng.chance(25) {
        len += K4 * (1 + rng.below(3));
    }
    (start, len)
}

fn check<H: Hw>(t: &PageTable<H::F, &HostRam>, hw: &mut H, ram: &HostRam, shadow: &Shadow, probes: &[u64], ctx: &str) {
    for &p in probes {
        let want = shadow.lookup(p);
        let got = t.translate(GuestPhysAddr::new(p));
        assert_eq!(got.map(|(h, f)| (h.as_u64(), f)), want, "{ctx}: engine query of {p:#x}");
        for a in [Access::Read, Access::Write, Access::Execute] {
            let expect = match want {
                Some((h, f)) if f.allows(a) => Ok(h),
                _ => Err(()),
            };
            let fresh = hw.walk(ram, p, a);
            assert_eq!(fresh.map_err(|_| ()), expect, "{ctx}: model walk of {p:#x} for {a}");
            if let (Err(Some(rights)), Some((_, f))) = (fresh, want) {
                // The violation reports the rights the tables give (EPT exit qualification 5:3).
                assert_eq!(u32::from(rights), f.rights().bits(), "{ctx}: qualification rights at {p:#x}");
            }
            let cached = hw.tlb(ram, p, a);
            assert_eq!(
                cached.map_err(|_| ()),
                expect,
                "{ctx}: stale TLB translation of {p:#x} for {a} after the flush"
            );
        }
    }
}

fn run<H: Hw>(seed: u64, steps: usize) {
    let ram = HostRam::new(4096);
    let opts = TableOptions::for_format::<H::F>();
    let mut t = PageTable::<H::F, &HostRam>::new(&ram, opts).unwrap();
    let mut hw = H::new(&ram, &t);
    let mut shadow = Shadow::default();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut probes: Vec<u64> = Vec::new();
    for step in 0..steps {
        let (start, len) = random_range(&mut rng);
        let end = start + len;
        let flags = RIGHTS[rng.below(RIGHTS.len() as u64) as usize];
        let inject = rng.chance(10);
        if inject {
            ram.fail_after(rng.below(3));
        }
        let frames_before = ram.frames_in_use();
        let g = GuestPhysAddr::new(start);
        let op = rng.below(100);
        let ctx =
            format!("{} seed {seed} step {step} op {op} [{start:#x}, {end:#x}) {flags:?}", <H::F as Format>::NAME);
        let flush: Option<Flush<H::F>> = match op {
            0..=34 => {
                let hpa = TARGET + (start % (4 * G1)) + if rng.chance(20) { K4 } else { 0 };
                let size = if rng.chance(15) { MapSize::Exactly(PageSize::Size4K) } else { MapSize::Largest };
                match t.map(g, HostPhysAddr::new(hpa), len, flags, size) {
                    Ok(f) => {
                        assert_eq!(shadow.first_mapped(start, end), None, "{ctx}: mapped over a mapping");
                        if <<H::F as Format>::Family as Family>::KIND == FamilyKind::Ept {
                            assert!(f.is_empty(), "{ctx}: EPT asked for INVEPT after only adding mappings");
                        }
                        shadow.insert(start, end, hpa, flags);
                        Some(f)
                    }
                    Err(MapError::AlreadyMapped { gpa }) => {
                        assert_eq!(Some(gpa.as_u64()), shadow.first_mapped(start, end), "{ctx}: conflict address");
                        None
                    }
                    Err(MapError::OutOfFrames(_)) if inject => None,
                    Err(e) => panic!("{ctx}: {e:?}"),
                }
            }
            35..=54 => match t.unmap(g, len) {
                Ok(f) => {
                    shadow.remove(start, end);
                    Some(f)
                }
                Err(RangeError::OutOfFrames(_)) if inject => None,
                Err(e) => panic!("{ctx}: {e:?}"),
            },
            55..=69 => match t.protect(g, len, flags) {
                Ok(f) => {
                    shadow.protect(start, end, flags);
                    Some(f)
                }
                Err(RangeError::OutOfFrames(_)) if inject => None,
                Err(e) => panic!("{ctx}: {e:?}"),
            },
            70..=79 => match t.split(g) {
                Ok(f) => Some(f),
                Err(SplitError::NotMapped(_) | SplitError::AlreadySmallest(_)) => None,
                Err(SplitError::OutOfFrames(_)) if inject => None,
                Err(e) => panic!("{ctx}: {e:?}"),
            },
            80..=89 => {
                let size = if rng.chance(80) { PageSize::Size2M } else { PageSize::Size1G };
                t.collapse(g, size).ok()
            }
            90..=94 => match t.query(g) {
                // Swap the frame under a leaf (copy-on-write breaking).
                Some(leaf) => {
                    let new = leaf.hpa.as_u64() + leaf.size.bytes() * (1 + rng.below(4));
                    let f = t.remap(leaf.gpa, HostPhysAddr::new(new), flags).unwrap();
                    shadow.remove(leaf.gpa.as_u64(), leaf.gpa.as_u64() + leaf.size.bytes());
                    shadow.insert(leaf.gpa.as_u64(), leaf.gpa.as_u64() + leaf.size.bytes(), new, flags);
                    Some(f)
                }
                None => None,
            },
            _ => {
                let clear = [AdClear::Accessed, AdClear::Dirty, AdClear::Both][rng.below(3) as usize];
                Some(t.take_accessed_dirty(g, len, clear, |_| {}))
            }
        };
        ram.heal();
        match flush {
            Some(f) => t.flush(f, |inv| hw.invalidate(inv)).unwrap(),
            None => assert_eq!(ram.frames_in_use(), frames_before, "{ctx}: a refused change kept frames"),
        }
        // Probe the edges of this range, a few random addresses, and recent probes (which the
        // TLB model has cached).
        probes.retain(|_| rng.chance(70));
        probes.truncate(8);
        for a in [start.saturating_sub(K4), start, end - K4, end, start + rng.below(len / K4) * K4] {
            probes.push(a + rng.below(K4 / 8) * 8);
        }
        for _ in 0..3 {
            let (s, l) = random_range(&mut rng);
            probes.push(s + rng.below(l));
        }
        check(&t, &mut hw, &ram, &shadow, &probes, &ctx);
    }
    drop(t);
    assert_eq!(ram.frames_in_use(), 0, "seed {seed}: every table frame is freed on drop");
}

/// 10,000 operations per format: five seeds of 2,000 steps.
const SEEDS: u64 = 5;
const STEPS: usize = 2000;

#[test]
fn ept4_agrees_with_the_model() {
    (1..=SEEDS).for_each(|s| run::<Ept4Hw>(s, STEPS));
}
#[test]
fn ept5_agrees_with_the_model() {
    (1..=SEEDS).for_each(|s| run::<Ept5Hw>(s, STEPS));
}
#[test]
fn sv39x4_agrees_with_the_model() {
    (1..=SEEDS).for_each(|s| run::<GHw<Sv39x4>>(s, STEPS));
}
#[test]
fn sv48x4_agrees_with_the_model() {
    (1..=SEEDS).for_each(|s| run::<GHw<Sv48x4>>(s, STEPS));
}
#[test]
fn sv57x4_agrees_with_the_model() {
    (1..=SEEDS).for_each(|s| run::<GHw<Sv57x4>>(s, STEPS));
}
