//! Address-space operations against a simple model: regions (overlap refused), faults, GPA
//! copies, fork, dirty logging, with allocation failures injected. Checks outcomes, bytes and
//! frame accounting.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use twostage_aspace::*;
use twostage_npt::testing::HostRam;
use twostage_npt::{
    Access, AdMode, FrameAllocator, GpaRange, GuestPhysAddr, HostPhysAddr, MappingFlags, NestedPageFaultInfo, Sv39x4,
    TableOptions,
};

const PAGES: u64 = 48;
const P: u64 = 4096;
type Space = AddressSpace<Sv39x4, Arc<HostRam>>;

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Kind {
    Linear,
    Anon,
    Mmio,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Add { kind: Kind, start: u8, len: u8, rights: u8 },
    Remove { idx: u8 },
    Protect { idx: u8, rights: u8 },
    Populate { idx: u8 },
    Fault { page: u8, off: u16, access: u8 },
    Write { page: u8, off: u16, len: u16, byte: u8 },
    Read { page: u8, off: u16, len: u16 },
    Fork,
    Share { idx: u8, dst: u8 },
    Switch,
    DirtyStart { page: u8, len: u8 },
    Harvest,
    DirtyStop,
    FailAfter { n: u8 },
    Heal,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ad: u8,
    ops: Vec<Op>,
}

#[derive(Clone)]
struct MRegion {
    id: RegionId,
    start: u64,
    end: u64,
    kind: Kind,
    rights: MappingFlags,
}

struct Side {
    s: Space,
    regions: Vec<MRegion>,
    /// Bytes written into anonymous memory.
    anon: BTreeMap<u64, u8>,
    /// Pages written since the last harvest, and whether that set is exact.
    dirty: BTreeSet<u64>,
    dirty_exact: bool,
}

const RIGHTS: [MappingFlags; 4] = [MappingFlags::READ, MappingFlags::RW, MappingFlags::RX, MappingFlags::RWX];

fn range(start: u64, len: u64) -> GpaRange {
    GpaRange::from_start_len(GuestPhysAddr::new(start), len).unwrap()
}

impl Side {
    fn region(&self, a: u64) -> Option<&MRegion> {
        self.regions.iter().find(|r| r.start <= a && a < r.end)
    }
    /// What an access of `len` bytes at `a` should fail with (first failing byte), if anything.
    fn expect_err(&self, a: u64, len: u64, access: Access) -> Option<GuestMemError> {
        let mut cur = a;
        while cur < a + len {
            let gpa = GuestPhysAddr::new(cur);
            let Some(r) = self.region(cur) else { return Some(GuestMemError::Unmapped { gpa, access }) };
            if r.kind == Kind::Mmio {
                return Some(GuestMemError::Mmio { gpa, access });
            }
            if !r.rights.allows(access) {
                return Some(GuestMemError::Forbidden { gpa, access, rights: r.rights });
            }
            cur = r.end.min(a + len);
        }
        None
    }
    fn byte(&self, a: u64, linear: &BTreeMap<u64, u8>) -> u8 {
        match self.region(a).map(|r| r.kind) {
            Some(Kind::Linear) => linear.get(&a).copied().unwrap_or(0),
            _ => self.anon.get(&a).copied().unwrap_or(0),
        }
    }
}

fuzz_target!(|input: Input| {
    let ram = Arc::new(HostRam::new(1024));
    let host = ram.allocate_frames(PAGES as usize, 1).unwrap();
    ram.write_bytes(host.as_u64(), &vec![0u8; (PAGES * P) as usize]);
    let ad = [AdMode::Hardware, AdMode::Software, AdMode::Preset][usize::from(input.ad % 3)];
    let opts = TableOptions { ad, ..TableOptions::for_format::<Sv39x4>() };
    {
        let mut linear: BTreeMap<u64, u8> = BTreeMap::new();
        let Ok(s) = Space::new(ram.clone(), opts) else { return };
        let mut sides =
            vec![Side { s, regions: Vec::new(), anon: BTreeMap::new(), dirty: BTreeSet::new(), dirty_exact: true }];
        let mut cur = 0usize;
        let mut failing = false;
        for op in input.ops.iter().take(64) {
            let g = &mut sides[cur];
            match *op {
                Op::Add { kind, start, len, rights } => {
                    let start = u64::from(start) % PAGES * P;
                    // A linear region must lie in the host buffer given for it (the caller's promise).
                    let len = ((u64::from(len) % 8 + 1) * P).min(PAGES * P - start);
                    let rights = RIGHTS[usize::from(rights % 4)];
                    let backend = match kind {
                        Kind::Linear => Backend::Linear { host: HostPhysAddr::new(host.as_u64() + start) },
                        Kind::Anon => Backend::DemandZero,
                        Kind::Mmio => Backend::Mmio,
                    };
                    let overlap = g.regions.iter().any(|r| r.start < start + len && start < r.end);
                    match g.s.add_region("r", range(start, len), rights, backend) {
                        Ok((id, f)) => {
                            assert!(!overlap, "overlapping region accepted");
                            g.s.flush_unloaded(f).unwrap();
                            if kind == Kind::Anon {
                                g.anon.retain(|&a, _| !(start..start + len).contains(&a));
                            }
                            g.regions.push(MRegion { id, start, end: start + len, kind, rights });
                        }
                        Err(AddRegionError::Overlap { existing, .. }) => {
                            assert!(overlap);
                            assert!(g.regions.iter().any(|r| r.id == existing.id));
                        }
                        Err(AddRegionError::Map(_)) => assert!(failing),
                        Err(e) => panic!("{e}"),
                    }
                }
                Op::Remove { idx } => {
                    if g.regions.is_empty() {
                        continue;
                    }
                    let r = g.regions.remove(usize::from(idx) % g.regions.len());
                    let f = g.s.remove_region(r.id).unwrap();
                    g.s.flush_unloaded(f).unwrap();
                    g.anon.retain(|&a, _| !(r.start..r.end).contains(&a));
                }
                Op::Protect { idx, rights } => {
                    if g.regions.is_empty() {
                        continue;
                    }
                    let i = usize::from(idx) % g.regions.len();
                    let rights = RIGHTS[usize::from(rights % 4)];
                    match g.s.protect_region(g.regions[i].id, rights) {
                        Ok(f) => {
                            g.s.flush_unloaded(f).unwrap();
                            g.regions[i].rights = rights;
                        }
                        Err(e) => {
                            assert!(failing, "{:?}", e);
                            g.s.flush_pending(|_| {});
                        }
                    }
                }
                Op::Populate { idx } => {
                    if g.regions.is_empty() {
                        continue;
                    }
                    let r = &g.regions[usize::from(idx) % g.regions.len()];
                    match g.s.populate(r.id) {
                        Ok(f) => {
                            assert_eq!(r.kind, Kind::Anon);
                            g.s.flush_unloaded(f).unwrap();
                        }
                        Err(e) => {
                            assert!(r.kind != Kind::Anon || failing, "{:?}", e);
                            g.s.flush_pending(|_| {});
                        }
                    }
                }
                Op::Fault { page, off, access } => {
                    let a = u64::from(page) % PAGES * P + u64::from(off) % P;
                    let access = [Access::Read, Access::Write, Access::Execute][usize::from(access % 3)];
                    let out = g.s.handle_fault(NestedPageFaultInfo::new(GuestPhysAddr::new(a), access));
                    match (g.region(a).cloned(), out) {
                        (None, FaultOutcome::Unmapped { .. }) => {}
                        (Some(r), FaultOutcome::Mmio { .. }) if r.kind == Kind::Mmio => {}
                        (Some(r), FaultOutcome::Violation { rights, .. }) => {
                            assert!(!r.rights.allows(access));
                            assert_eq!(rights, r.rights);
                        }
                        (Some(r), FaultOutcome::Resolved { flush }) => {
                            assert!(r.kind != Kind::Mmio && r.rights.allows(access));
                            g.s.flush_unloaded(flush).unwrap();
                            let leaf = g.s.table().query(GuestPhysAddr::new(a)).expect("resolved but unmapped");
                            assert!(leaf.flags.allows(access), "resolved {access} but leaf has {:?}", leaf.flags);
                            if access == Access::Write {
                                g.dirty.insert(a & !(P - 1));
                            }
                        }
                        (Some(_), FaultOutcome::OutOfMemory { .. }) => assert!(failing),
                        (r, out) => panic!("fault {access} at {a:#x} in {:?}: {out:?}", r.map(|r| r.kind)),
                    }
                }
                Op::Write { page, off, len, byte } => {
                    let a = u64::from(page) % PAGES * P + u64::from(off) % P;
                    let len = u64::from(len) % (3 * P) + 1;
                    let expect = g.expect_err(a, len, Access::Write);
                    match g.s.write(GuestPhysAddr::new(a), &vec![byte; len as usize]) {
                        Ok(()) => {
                            assert_eq!(expect, None);
                            g.s.flush_pending(|_| {});
                            for x in a..a + len {
                                match g.region(x).map(|r| r.kind) {
                                    Some(Kind::Linear) => {
                                        linear.insert(x, byte);
                                    }
                                    _ => {
                                        g.anon.insert(x, byte);
                                    }
                                }
                            }
                            let mut p = a & !(P - 1);
                            while p < a + len {
                                g.dirty.insert(p);
                                p += P;
                            }
                        }
                        Err(e) => {
                            g.s.flush_pending(|_| {});
                            if let GuestMemError::OutOfMemory { .. } = e {
                                assert!(failing && expect.is_none());
                                // A prefix may have been written: learn what is there now.
                                for x in a..a + len {
                                    let mut b = [0u8];
                                    g.s.read(GuestPhysAddr::new(x), &mut b).unwrap();
                                    match g.region(x).map(|r| r.kind) {
                                        Some(Kind::Linear) => linear.insert(x, b[0]),
                                        _ => g.anon.insert(x, b[0]),
                                    };
                                }
                                g.dirty_exact = false;
                            } else {
                                assert_eq!(Some(e), expect, "write at {a:#x}+{len:#x}");
                            }
                        }
                    }
                }
                Op::Read { page, off, len } => {
                    let a = u64::from(page) % PAGES * P + u64::from(off) % P;
                    let len = u64::from(len) % (3 * P) + 1;
                    let mut buf = vec![0u8; len as usize];
                    match g.s.read(GuestPhysAddr::new(a), &mut buf) {
                        Ok(()) => {
                            assert_eq!(g.expect_err(a, len, Access::Read), None);
                            for (i, b) in buf.iter().enumerate() {
                                let want = g.byte(a + i as u64, &linear);
                                assert_eq!(*b, want, "byte at {:#x}", a + i as u64);
                            }
                        }
                        Err(e) => assert_eq!(Some(e), g.expect_err(a, len, Access::Read)),
                    }
                }
                Op::Fork => match g.s.fork() {
                    Ok((c, f)) => {
                        g.s.flush_unloaded(f).unwrap();
                        let child = Side {
                            s: c,
                            regions: g.regions.clone(),
                            anon: g.anon.clone(),
                            dirty: BTreeSet::new(),
                            dirty_exact: true,
                        };
                        sides.truncate(1);
                        sides.push(child);
                    }
                    Err(e) => {
                        assert!(failing, "{:?}", e);
                        g.s.flush_pending(|_| {});
                    }
                },
                Op::Share { idx, dst } => {
                    // The other side (same FrameRefs after a fork) takes a copy-on-write share of
                    // one of this side's regions.
                    if sides.len() < 2 || sides[cur].regions.is_empty() {
                        continue;
                    }
                    let (a, b) = sides.split_at_mut(1);
                    let (src, dstside) = if cur == 0 { (&mut a[0], &mut b[0]) } else { (&mut b[0], &mut a[0]) };
                    let r = src.regions[usize::from(idx) % src.regions.len()].clone();
                    let at = u64::from(dst) % PAGES * P;
                    let len = r.end - r.start;
                    let overlap = dstside.regions.iter().any(|x| x.start < at + len && at < x.end);
                    match dstside.s.share_from("shared", GuestPhysAddr::new(at), &mut src.s, r.id) {
                        Ok((id, f, g)) => {
                            assert!(r.kind == Kind::Anon && !overlap);
                            dstside.s.flush_unloaded(f).unwrap();
                            src.s.flush_unloaded(g).unwrap();
                            dstside.anon.retain(|&x, _| !(at..at + len).contains(&x));
                            for (&x, &v) in src.anon.range(r.start..r.end) {
                                dstside.anon.insert(at + (x - r.start), v);
                            }
                            dstside.regions.push(MRegion {
                                id,
                                start: at,
                                end: at + len,
                                kind: Kind::Anon,
                                rights: r.rights,
                            });
                        }
                        Err(e) => {
                            dstside.s.flush_pending(|_| {});
                            match e {
                                ShareError::NotAnonymous(_) => assert!(r.kind != Kind::Anon),
                                ShareError::Add(AddRegionError::Overlap { .. }) => assert!(overlap),
                                ShareError::Add(AddRegionError::OutOfRange { .. }) => {}
                                ShareError::Map(_) => assert!(failing),
                                other => panic!("share: {other:?}"),
                            }
                        }
                    }
                }
                Op::Switch => cur = (cur + 1) % sides.len(),
                Op::DirtyStart { page, len } => {
                    let start = u64::from(page) % PAGES * P;
                    let len = (u64::from(len) % 16 + 1) * P;
                    match g.s.start_dirty_log(range(start, len)) {
                        Ok((_, f)) => {
                            g.s.flush_unloaded(f).unwrap();
                            g.dirty.clear();
                            g.dirty_exact = true;
                        }
                        Err(e) => {
                            g.s.flush_pending(|_| {});
                            if let DirtyLogError::AlreadyLogging { .. } = e {
                            } else {
                                assert!(failing, "{:?}", e);
                                g.dirty_exact = false;
                            }
                        }
                    }
                }
                Op::Harvest => match g.s.harvest_dirty() {
                    Ok((bits, f)) => {
                        g.s.flush_unloaded(f).unwrap();
                        let log = bits.range();
                        let want: BTreeSet<u64> =
                            g.dirty.iter().copied().filter(|&p| log.contains(GuestPhysAddr::new(p))).collect();
                        let got: BTreeSet<u64> = bits.iter().map(|p| p.as_u64()).collect();
                        if g.dirty_exact {
                            assert_eq!(got, want, "harvest");
                        } else {
                            assert!(want.is_subset(&got));
                        }
                        g.dirty.clear();
                        g.dirty_exact = true;
                    }
                    Err(e) => {
                        g.s.flush_pending(|_| {});
                        assert!(matches!(e, DirtyLogError::NotLogging) || failing, "{:?}", e);
                        g.dirty_exact = false;
                    }
                },
                Op::DirtyStop => match g.s.stop_dirty_log() {
                    Ok(f) => g.s.flush_unloaded(f).unwrap(),
                    Err(_) => g.s.flush_pending(|_| {}),
                },
                Op::FailAfter { n } => {
                    ram.fail_after(u64::from(n % 16));
                    failing = true;
                }
                Op::Heal => {
                    ram.heal();
                    failing = false;
                }
            }
            let _ = format!("{}", sides[cur].s);
        }
        ram.heal();
        // Whatever happened, every byte the model knows is there.
        for g in &sides {
            for (&a, &b) in &g.anon {
                if g.region(a).is_some_and(|r| r.kind == Kind::Anon && r.rights.allows(Access::Read)) {
                    let mut x = [0u8];
                    g.s.read(GuestPhysAddr::new(a), &mut x).unwrap();
                    assert_eq!(x[0], b, "byte at {a:#x} lost");
                }
            }
        }
    }
    // SAFETY: allocated above for the linear regions, which are all gone with their spaces.
    unsafe { ram.deallocate_frames(host, PAGES as usize) };
    assert_eq!(ram.frames_in_use(), 0, "frames leaked");
});
