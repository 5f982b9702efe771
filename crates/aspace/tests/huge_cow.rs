//! Copy-on-write of huge pages held against the spec model: a write to a shared 2 MiB page
//! copies the whole page into a free aligned run when the region's policy allows 2 MiB pages
//! (one fault), else splits and copies 4 KiB; the last holder only regains the write right.
//! Forked spaces never see each other's writes (read through the model's walks), and every
//! frame comes back whole when the spaces are dropped.

mod common;
use common::checked::{mem, Checked, Mem};
use common::{gpa, range, ModelCpu};
use proptest::prelude::*;
use std::collections::BTreeMap;
use twostage_aspace::*;
use twostage_npt::{
    Access, AdMode, Ept4, Format, FrameAllocator, MappingFlags, NestedPageFaultInfo, PageSize, Sv39x4, TableOptions,
};

type Space<F> = AddressSpace<F, Mem>;

const RAM: u64 = 0x8000_0000;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const LEN: u64 = 4 * MIB;

/// A vCPU access through the spec model's walk; faults resolved and flushed.
fn access<F: ModelCpu>(s: &mut Space<F>, m: &Checked, at: u64, acc: Access, v: u64) -> u64 {
    let hw = s.options().ad == AdMode::Hardware;
    for _ in 0..8 {
        match F::model_walk(&m.ram, s.root().as_u64(), hw, gpa(at), acc) {
            Ok(hpa) if acc == Access::Write => {
                m.ram.write_u64(hpa, v);
                return v;
            }
            Ok(hpa) => return m.ram.read_u64(hpa),
            Err(_) => match s.handle_fault(NestedPageFaultInfo::new(gpa(at), acc)) {
                FaultOutcome::Resolved { flush } => s.flush(flush, |_| {}).unwrap(),
                other => panic!("{acc} at {at:#x}: {other:?}"),
            },
        }
    }
    panic!("{acc} at {at:#x} kept faulting");
}

fn sizes<F: Format>(s: &Space<F>) -> (usize, usize) {
    let mut out = (0, 0);
    s.table().for_each_leaf(gpa(0), 1 << 39, |l| match l.size {
        PageSize::Size4K => out.0 += 1,
        _ => out.1 += 1,
    });
    out
}

/// A parent whose `LEN` bytes of RAM are 2 MiB pages holding a pattern.
fn parent<F: ModelCpu>(m: &Mem, ad: AdMode) -> Space<F> {
    let mut s: Space<F> = AddressSpace::new(m.clone(), TableOptions { ad, ..TableOptions::for_format::<F>() }).unwrap();
    let (id, f) = s.add_region("ram", range(RAM, LEN), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let f = s.populate(id).unwrap();
    s.flush_unloaded(f).unwrap();
    for p in (0..LEN).step_by(PAGE as usize) {
        access(&mut s, m, RAM + p, Access::Write, p | 1);
    }
    assert_eq!(sizes(&s), (0, (LEN / (2 * MIB)) as usize));
    s
}

/// What a child's writes after a fork cost: (faults, copy-on-write copies, frames allocated,
/// leaves (4 KiB, 2 MiB)), writing every `stride`-th page, with the child's region policy.
fn child_writes<F: ModelCpu>(ad: AdMode, policy: HugePages, stride: u64) -> (u64, u64, u64, (usize, usize)) {
    let m = mem(8192);
    let mut p = parent::<F>(&m, ad);
    let (mut c, f) = p.fork().unwrap();
    p.flush(f, |_| {}).unwrap();
    let id = c.regions().next().unwrap().id();
    c.set_region_huge_pages(id, policy);
    for page in (0..LEN / PAGE).step_by(stride as usize) {
        access(&mut c, &m, RAM + page * PAGE + 8, Access::Write, 0xc0de);
    }
    // Isolation: the parent sees none of it; the child sees its writes and the pattern.
    for page in 0..LEN / PAGE {
        let at = RAM + page * PAGE;
        assert_eq!(access(&mut p, &m, at + 8, Access::Read, 0), 0);
        assert_eq!(access(&mut c, &m, at, Access::Read, 0), (page * PAGE) | 1);
        let want = if page % stride == 0 { 0xc0de } else { 0 };
        assert_eq!(access(&mut c, &m, at + 8, Access::Read, 0), want);
    }
    let st = c.stats();
    let out = (st.faults_resolved, st.cow_copies, st.frames_allocated, sizes(&c));
    drop(p);
    drop(c);
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked");
    out
}

/// The measurement: a child writing every page of 4 MiB of forked 2 MiB pages takes 2 faults
/// (was 1,024: one per 4 KiB page) and keeps 2 MiB pages; a child writing one page per 2 MiB
/// pays 512 frames per page written (was 1).
#[test]
fn huge_copy_on_write_copies_whole_pages_in_one_fault() {
    for (name, ad) in [("Sv39x4", AdMode::Hardware), ("Ept4", AdMode::Preset)] {
        let run = |policy, stride| match name {
            "Sv39x4" => child_writes::<Sv39x4>(ad, policy, stride),
            _ => child_writes::<Ept4>(ad, policy, stride),
        };
        let split_dense = run(HugePages::Never, 1);
        let whole_dense = run(HugePages::Size2M, 1);
        let split_sparse = run(HugePages::Never, 512);
        let whole_sparse = run(HugePages::Size2M, 512);
        for (what, r) in [
            ("split+4K, every page", split_dense),
            ("whole 2M, every page", whole_dense),
            ("split+4K, 1 page/2M", split_sparse),
            ("whole 2M, 1 page/2M", whole_sparse),
        ] {
            println!(
                "{name} {ad:?} child writes, {what}: faults={} cow_copies={} frames={} leaves 4K/2M={:?}",
                r.0, r.1, r.2, r.3
            );
        }
        assert_eq!((split_dense.0, split_dense.1, split_dense.2), (1024, 1024, 1024), "{split_dense:?}");
        assert_eq!(split_dense.3, (1024, 0));
        assert_eq!((whole_dense.0, whole_dense.1, whole_dense.2), (2, 2, 1024), "{whole_dense:?}");
        assert_eq!(whole_dense.3, (0, 2), "the copies stay 2 MiB pages");
        assert_eq!((split_sparse.1, split_sparse.2), (2, 2));
        assert_eq!((whole_sparse.1, whole_sparse.2), (2, 1024));
    }
}

/// No free aligned run: the break falls back to split + 4 KiB copy.
#[test]
fn no_aligned_run_falls_back_to_split_and_4k_copy() {
    let m = mem(2048);
    let mut p = parent::<Sv39x4>(&m, AdMode::Hardware);
    let (mut c, f) = p.fork().unwrap();
    p.flush(f, |_| {}).unwrap();
    // Take every aligned run of 512 frames left.
    let mut pins = Vec::new();
    while let Some(run) = m.allocate_frames(512, 512) {
        pins.push(run);
    }
    access(&mut c, &m, RAM + 0x5008, Access::Write, 3);
    let st = c.stats();
    assert_eq!((st.huge_cow_copies, st.huge_fallbacks, st.cow_copies, st.huge_splits), (0, 1, 1, 1), "{st:?}");
    assert_eq!(sizes(&c), (512, 1));
    assert_eq!(access(&mut p, &m, RAM + 0x5008, Access::Read, 0), 0);
    assert_eq!(access(&mut c, &m, RAM + 0x5008, Access::Read, 0), 3);
    drop(p);
    drop(c);
    for run in pins {
        // SAFETY: allocated above, never mapped.
        unsafe { m.deallocate_frames(run, 512) };
    }
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked");
}

/// Once one side copied a 2 MiB page, the other is its last holder: its write only restores
/// the write right on the whole huge leaf (no copy); the hypervisor's writes copy nothing either.
#[test]
fn last_holder_upgrades_in_place() {
    let m = mem(8192);
    let mut p = parent::<Ept4>(&m, AdMode::Hardware);
    let (mut c, f) = p.fork().unwrap();
    p.flush(f, |_| {}).unwrap();
    access(&mut c, &m, RAM + 8, Access::Write, 1);
    // The hypervisor writes into the second 2 MiB page of the child: copied whole as well.
    c.write_obj(gpa(RAM + 2 * MIB + 16), &7u64).unwrap();
    c.flush_pending(|_| {});
    assert_eq!(c.stats().huge_cow_copies, 2);
    let before = p.stats();
    access(&mut p, &m, RAM + 8, Access::Write, 2);
    p.write_obj(gpa(RAM + 2 * MIB + 16), &9u64).unwrap();
    p.flush_pending(|_| {});
    let st = p.stats();
    assert_eq!(st.cow_copies, before.cow_copies, "the last holder copies nothing");
    // The guest's write fault regains the write right on the huge leaf (the hypervisor's
    // write goes to the private frame directly).
    assert_eq!(st.cow_reuses, before.cow_reuses + 1, "{st:?}");
    assert_eq!(st.frames_allocated, before.frames_allocated);
    assert_eq!(sizes(&p), (0, 2));
    assert_eq!(sizes(&c), (0, 2));
    assert_eq!(c.read_obj::<u64>(gpa(RAM + 2 * MIB + 16)).unwrap(), 7);
    assert_eq!(p.read_obj::<u64>(gpa(RAM + 2 * MIB + 16)).unwrap(), 9);
    assert_eq!(access(&mut c, &m, RAM + 8, Access::Read, 0), 1);
    assert_eq!(access(&mut p, &m, RAM + 8, Access::Read, 0), 2);
    drop(p);
    drop(c);
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked");
}

#[derive(Clone, Debug)]
enum Op {
    /// Side `side` (mod the live sides) stores through the model's walk.
    Store { side: u8, page: u16, value: u64 },
    /// The hypervisor writes through `GuestMemory` on side `side`.
    Write { side: u8, page: u16, off: u16, value: u64 },
    /// Side `side` forks (up to 4 sides).
    Fork { side: u8 },
    /// Side `side`'s policy for its region.
    Policy { side: u8, huge: bool },
    /// Take (or give back) the aligned runs of 512 frames left, so breaks must fall back.
    Starve(bool),
    /// Side `side` is dropped (if more than one is left).
    Drop { side: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u8>(), 0u16..1024, any::<u64>()).prop_map(|(side, page, value)| Op::Store { side, page, value }),
        2 => (any::<u8>(), 0u16..1024, 0u16..4088, any::<u64>())
            .prop_map(|(side, page, off, value)| Op::Write { side, page, off, value }),
        2 => any::<u8>().prop_map(|side| Op::Fork { side }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(side, huge)| Op::Policy { side, huge }),
        1 => any::<bool>().prop_map(Op::Starve),
        1 => any::<u8>().prop_map(|side| Op::Drop { side }),
    ]
}

/// Random stores, hypervisor writes, forks (of forks), policy changes, starvation of aligned
/// runs and drops: every side reads exactly its own writes over the pattern, through the
/// model's walk, and every frame comes back whole.
fn run_forks<F: ModelCpu>(ad: AdMode, ops: &[Op]) {
    let m = mem(12288);
    let p = parent::<F>(&m, ad);
    let pattern: BTreeMap<u64, u64> = (0..LEN).step_by(PAGE as usize).map(|p| (RAM + p, p | 1)).collect();
    // Each side: its space and the bytes it must read (8-byte words).
    let mut sides: Vec<(Space<F>, BTreeMap<u64, u64>)> = vec![(p, pattern)];
    let mut pins = Vec::new();
    for op in ops {
        let pick = |side: u8, n: usize| usize::from(side) % n;
        match *op {
            Op::Store { side, page, value } => {
                let i = pick(side, sides.len());
                let at = RAM + u64::from(page) * PAGE + 8 * (u64::from(page) % 500);
                let (s, w) = &mut sides[i];
                access(s, &m, at, Access::Write, value);
                w.insert(at, value);
            }
            Op::Write { side, page, off, value } => {
                let i = pick(side, sides.len());
                let at = RAM + u64::from(page) * PAGE + u64::from(off & !7);
                let (s, w) = &mut sides[i];
                s.write_obj(gpa(at), &value).unwrap();
                s.flush_pending(|_| {});
                w.insert(at, value);
            }
            Op::Fork { side } => {
                if sides.len() < 4 {
                    let i = pick(side, sides.len());
                    let (s, w) = &mut sides[i];
                    let (c, f) = s.fork().unwrap();
                    s.flush(f, |_| {}).unwrap();
                    let w = w.clone();
                    sides.push((c, w));
                }
            }
            Op::Policy { side, huge } => {
                let i = pick(side, sides.len());
                let s = &mut sides[i].0;
                let id = s.regions().next().unwrap().id();
                s.set_region_huge_pages(id, if huge { HugePages::Size2M } else { HugePages::Never });
            }
            Op::Starve(true) => {
                while let Some(run) = m.allocate_frames(512, 512) {
                    pins.push(run);
                }
            }
            Op::Starve(false) => {
                for run in pins.drain(..) {
                    // SAFETY: allocated by `Starve(true)`, never mapped.
                    unsafe { m.deallocate_frames(run, 512) };
                }
            }
            Op::Drop { side } => {
                if sides.len() > 1 {
                    let i = pick(side, sides.len());
                    sides.remove(i);
                }
            }
        }
    }
    for (s, w) in &mut sides {
        for (&at, &v) in w.iter() {
            assert_eq!(access(s, &m, at, Access::Read, 0), v, "at {at:#x}");
        }
        // Every leaf stays inside the region, huge leaves aligned.
        s.table().for_each_leaf(gpa(0), 1 << 39, |l| {
            assert!(l.gpa.as_u64() >= RAM && l.gpa.as_u64() + l.size.bytes() <= RAM + LEN, "{l:?}");
            assert!(l.gpa.is_aligned(l.size.bytes()) && l.hpa.is_aligned(l.size.bytes()), "{l:?}");
        });
    }
    drop(sides);
    for run in pins {
        // SAFETY: allocated by `Starve(true)`, never mapped.
        unsafe { m.deallocate_frames(run, 512) };
    }
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn forked_huge_pages_never_leak_writes_sv39x4(
        ad in prop_oneof![Just(AdMode::Hardware), Just(AdMode::Software), Just(AdMode::Preset)],
        ops in prop::collection::vec(op(), 1..50),
    ) {
        run_forks::<Sv39x4>(ad, &ops);
    }

    #[test]
    fn forked_huge_pages_never_leak_writes_ept4(
        ad in prop_oneof![Just(AdMode::Hardware), Just(AdMode::Preset)],
        ops in prop::collection::vec(op(), 1..50),
    ) {
        run_forks::<Ept4>(ad, &ops);
    }
}
