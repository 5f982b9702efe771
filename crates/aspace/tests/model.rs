//! Property tests against the spec model: a simulated CPU with a TLB model walks the real
//! tables; fault resolution, fork isolation, dirty tracking and frame accounting are checked.

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use twostage_aspace::*;
use twostage_npt::testing::HostRam;
use twostage_npt::{
    Access, AdMode, Ept4, EptInvalidation, FrameAllocator, GvmaInvalidation, HostPhysAddr, InvalidationOf,
    MappingFlags, NestedPageFaultInfo, Sv39x4,
};
use twostage_spec_model as model;

/// A CPU with a TLB model for format `F`.
trait TlbCpu: ModelCpu {
    type Tlb: Default;
    fn tlb_access(
        tlb: &mut Self::Tlb,
        ram: &HostRam,
        root: u64,
        hw_ad: bool,
        gpa: u64,
        access: Access,
    ) -> Result<u64, String>;
    fn invalidate(tlb: &mut Self::Tlb, root: u64, hw_ad: bool, inv: &InvalidationOf<'_, Self>);
}

fn macc(a: Access) -> model::Access {
    match a {
        Access::Read => model::Access::Read,
        Access::Write => model::Access::Write,
        Access::Execute => model::Access::Fetch,
    }
}

const VMID: u16 = 1;

impl TlbCpu for Sv39x4 {
    type Tlb = model::tlb::GstageTlb;
    fn tlb_access(
        tlb: &mut Self::Tlb,
        ram: &HostRam,
        root: u64,
        hw_ad: bool,
        gpa: u64,
        access: Access,
    ) -> Result<u64, String> {
        let hgatp = model::gstage::Hgatp { mode: model::gstage::HgatpMode::Sv39x4, vmid: VMID, root: model::Hpa(root) }
            .encode();
        let cfg = model::gstage::GstageConfig { hw_ad_update: hw_ad, ..Default::default() };
        tlb.translate(&mut ModelMem(ram), hgatp, &cfg, model::Gpa(gpa), macc(access))
            .map(|w| w.hpa.0)
            .map_err(|e| format!("{e:?}"))
    }
    fn invalidate(tlb: &mut Self::Tlb, _root: u64, _hw_ad: bool, inv: &GvmaInvalidation<'_>) {
        match inv {
            GvmaInvalidation::None => {}
            // One modelled hart: a local invalidation is carried out on it like the others.
            GvmaInvalidation::Addresses { addrs, .. } | GvmaInvalidation::Local { addrs: Some(addrs), .. } => {
                for a in addrs.iter() {
                    tlb.hfence_gvma(Some(model::Gpa(a.as_u64())), Some(VMID));
                }
            }
            GvmaInvalidation::All { .. } | GvmaInvalidation::Local { addrs: None, .. } => {
                tlb.hfence_gvma(None, Some(VMID))
            }
        }
    }
}

fn eptp(root: u64, hw_ad: bool) -> u64 {
    root | 6 | 3 << 3 | (hw_ad as u64) << 6
}

impl TlbCpu for Ept4 {
    type Tlb = model::tlb::EptTlb;
    fn tlb_access(
        tlb: &mut Self::Tlb,
        ram: &HostRam,
        root: u64,
        hw_ad: bool,
        gpa: u64,
        access: Access,
    ) -> Result<u64, String> {
        let caps = model::ept::EptCaps::from_msr(EPT_CAPS, 48);
        tlb.translate(
            &mut ModelMem(ram),
            eptp(root, hw_ad),
            &caps,
            model::Gpa(gpa),
            macc(access).into(),
            model::ept::GuestLinear::NONE,
        )
        .map(|w| w.hpa.0)
        .map_err(|e| format!("{e:?}"))
    }
    fn invalidate(tlb: &mut Self::Tlb, root: u64, hw_ad: bool, inv: &EptInvalidation) {
        match inv {
            EptInvalidation::None => {}
            EptInvalidation::SingleContext { .. } => tlb.invept_single_context(eptp(root, hw_ad)),
        }
    }
}

/// One guest: a space, its CPU's TLB, and what its memory should hold.
struct Guest<F: TlbCpu> {
    s: AddressSpace<F, Ram>,
    tlb: F::Tlb,
    shadow: BTreeMap<u64, u64>,
}

impl<F: TlbCpu> Guest<F> {
    fn new(s: AddressSpace<F, Ram>) -> Self {
        Self { s, tlb: F::Tlb::default(), shadow: BTreeMap::new() }
    }

    fn hw_ad(&self) -> bool {
        self.s.options().ad == AdMode::Hardware
    }

    fn flush(&mut self, f: SpaceFlush<F>) {
        let (root, hw_ad) = (self.s.root().as_u64(), self.hw_ad());
        let tlb = &mut self.tlb;
        self.s.flush(f, |inv| F::invalidate(tlb, root, hw_ad, inv)).unwrap();
    }

    /// A guest access through the TLB model; faults go to `handle_fault`. Returns the outcome
    /// that stopped it (None when the access completed) and the value read.
    fn access(&mut self, ram: &HostRam, gpa: u64, access: Access, val: u64) -> (Option<FaultOutcome<F>>, u64) {
        let (root, hw_ad) = (self.s.root().as_u64(), self.hw_ad());
        for attempt in 0..6 {
            match F::tlb_access(&mut self.tlb, ram, root, hw_ad, gpa, access) {
                Ok(hpa) => {
                    if access == Access::Write {
                        ram.write_u64(hpa, val);
                        self.shadow.insert(gpa, val);
                        return (None, val);
                    }
                    return (None, ram.read_u64(hpa));
                }
                Err(e) => {
                    assert!(attempt < 4, "{access} at {gpa:#x} still faults after resolution: {e}");
                    match self.s.handle_fault(NestedPageFaultInfo::new(gpa_of(gpa), access)) {
                        FaultOutcome::Resolved { flush } => self.flush(flush),
                        other => return (Some(other), 0),
                    }
                }
            }
        }
        unreachable!()
    }

    /// Every leaf maps memory the space owns or was given (the isolation invariant).
    fn check_isolation(&self) {
        for r in self.s.regions() {
            self.s.table().for_each_leaf(r.range().start, r.range().len(), |leaf| match r.backend() {
                Backend::Linear { host } => assert_eq!(leaf.hpa, host + (leaf.gpa - r.range().start)),
                Backend::Mmio => panic!("MMIO region has a leaf at {:?}", leaf.gpa),
                _ => assert!(
                    self.s.frame_refs().count(leaf.hpa) >= 1,
                    "leaf at {:?} maps a frame nobody holds",
                    leaf.gpa
                ),
            });
        }
    }
}

fn gpa_of(a: u64) -> twostage_npt::GuestPhysAddr {
    gpa(a)
}

const RAM: u64 = 0x8000_0000;
const ROM: u64 = 0x9000_0000;
const PASS: u64 = 0xa000_0000;
const UART: u64 = 0x1000_0000;
const HOLE: u64 = 0x2000_0000;

fn setup<F: TlbCpu>(ram: &Ram, ad: AdMode, host: HostPhysAddr) -> (Guest<F>, RegionId) {
    let mut s = AddressSpace::<F, Ram>::new(ram.clone(), opts::<F>(ad)).unwrap();
    let (id, f) = s.add_region("ram", range(RAM, 64 * 4096), MappingFlags::RWX, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let (_, f) = s.add_region("rom", range(ROM, 8 * 4096), MappingFlags::RX, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let (_, f) = s.add_region("pass", range(PASS, 4 << 20), MappingFlags::RW, Backend::Linear { host }).unwrap();
    s.flush_unloaded(f).unwrap();
    let (_, f) = s.add_region("uart", range(UART, 4096), MappingFlags::RW, Backend::Mmio).unwrap();
    s.flush_unloaded(f).unwrap();
    (Guest::new(s), id)
}

#[derive(Clone, Debug)]
enum Op {
    Access { area: u8, page: u16, off: u16, access: u8, val: u64 },
    Protect { rights: u8 },
    Remove,
    Populate,
    HypWrite { page: u16, val: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..5, 0u16..12, 0u16..512, 0u8..3, any::<u64>()).prop_map(|(area, page, off, access, val)| Op::Access { area, page, off, access, val }),
        1 => (0u8..4).prop_map(|rights| Op::Protect { rights }),
        1 => Just(Op::Remove),
        1 => Just(Op::Populate),
        2 => (0u16..64, any::<u64>()).prop_map(|(page, val)| Op::HypWrite { page, val }),
    ]
}

fn run_faults<F: TlbCpu>(ad: AdMode, ops: Vec<Op>) {
    let ram = ram(4096);
    let host = ram.allocate_frames(1024, 512).unwrap();
    let (mut g, mut ram_id) = setup::<F>(&ram, ad, host);
    let mut ram_rights = MappingFlags::RWX;
    let mut ram_present = true;
    for op in ops {
        match op {
            Op::Access { area, page, off, access, val } => {
                let access = [Access::Read, Access::Write, Access::Execute][access as usize];
                let (base, pages, rights) = match area {
                    0 => (RAM, 64, if ram_present { Some(ram_rights) } else { None }),
                    1 => (ROM, 8, Some(MappingFlags::RX)),
                    2 => (PASS, 1024, Some(MappingFlags::RW)),
                    3 => (UART, 1, Some(MappingFlags::RW)),
                    _ => (HOLE, 1, None),
                };
                let at = base + u64::from(page) * 67 % pages * 4096 + u64::from(off) * 8;
                let (out, got) = g.access(&ram, at, access, val);
                match (area, rights, out) {
                    (3, _, Some(FaultOutcome::Mmio { gpa: a, access: acc, .. })) => {
                        assert_eq!((a, acc), (gpa(at), access))
                    }
                    (_, None, Some(FaultOutcome::Unmapped { .. })) => {}
                    (_, Some(r), Some(FaultOutcome::Violation { rights, .. })) => {
                        assert!(!r.allows(access), "violation for an allowed {access}");
                        assert_eq!(rights, r.rights());
                    }
                    (a, Some(r), None) if a != 3 => {
                        assert!(r.allows(access), "{access} at {at:#x} went through rights {r:?}");
                        if access != Access::Write && a != 2 {
                            assert_eq!(got, g.shadow.get(&at).copied().unwrap_or(0), "read at {at:#x}");
                        }
                    }
                    (a, r, out) => panic!("area {a} rights {r:?} {access} at {at:#x}: {out:?}"),
                }
            }
            Op::Protect { rights } => {
                if ram_present {
                    let r =
                        [MappingFlags::READ, MappingFlags::RW, MappingFlags::RX, MappingFlags::RWX][rights as usize];
                    let f = g.s.protect_region(ram_id, r).unwrap();
                    g.flush(f);
                    ram_rights = r;
                }
            }
            Op::Remove => {
                if ram_present {
                    let f = g.s.remove_region(ram_id).unwrap();
                    g.flush(f);
                    g.shadow.retain(|&a, _| !(RAM..RAM + 64 * 4096).contains(&a));
                    ram_present = false;
                } else {
                    let (id, f) =
                        g.s.add_region("ram", range(RAM, 64 * 4096), ram_rights, Backend::DemandZero).unwrap();
                    g.flush(f);
                    ram_id = id;
                    ram_present = true;
                }
            }
            Op::Populate => {
                if ram_present {
                    let f = g.s.populate(ram_id).unwrap();
                    g.flush(f);
                }
            }
            Op::HypWrite { page, val } => {
                let at = RAM + u64::from(page) * 4096 + 8;
                match g.s.write(gpa(at), &val.to_le_bytes()) {
                    Ok(()) => {
                        g.flush(SpaceFlush::none()); // The write's flush is pending in the space.
                        g.shadow.insert(at, val);
                    }
                    Err(e) => {
                        assert!(!ram_present || !ram_rights.contains(MappingFlags::WRITE), "{:?}", e);
                        g.flush(SpaceFlush::none()); // The failed write's flush is pending in the space.
                    }
                }
            }
        }
        g.check_isolation();
    }
    // Every value the guest wrote to anonymous memory is still there, seen by the hypervisor.
    for (&a, &v) in &g.shadow {
        let mut b = [0u8; 8];
        g.s.read(gpa(a), &mut b).or_else(|_| g.s.read_as(gpa(a), &mut b, Access::Execute)).unwrap();
        assert_eq!(u64::from_le_bytes(b), v, "value at {a:#x}");
    }
    drop(g);
    // SAFETY: the linear region's host frames came from allocate_frames above and are no longer mapped.
    unsafe { ram.deallocate_frames(host, 1024) };
    assert_eq!(ram.frames_in_use(), 0, "frames leaked");
}

fn ad_mode() -> impl Strategy<Value = AdMode> {
    prop_oneof![Just(AdMode::Hardware), Just(AdMode::Software), Just(AdMode::Preset)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn faults_resolve_per_model_sv39x4(ad in ad_mode(), ops in prop::collection::vec(op(), 1..60)) {
        run_faults::<Sv39x4>(ad, ops);
    }

    #[test]
    fn faults_resolve_per_model_ept4(ad in ad_mode(), ops in prop::collection::vec(op(), 1..60)) {
        run_faults::<Ept4>(ad, ops);
    }
}

#[derive(Clone, Debug)]
enum ForkOp {
    Write { child: bool, page: u8, val: u64 },
    Read { child: bool, page: u8 },
    HypWrite { child: bool, page: u8, val: u64 },
    Fork,
    DropParent,
}

fn fork_op() -> impl Strategy<Value = ForkOp> {
    prop_oneof![
        6 => (any::<bool>(), 0u8..24, any::<u64>()).prop_map(|(child, page, val)| ForkOp::Write { child, page, val }),
        4 => (any::<bool>(), 0u8..24).prop_map(|(child, page)| ForkOp::Read { child, page }),
        2 => (any::<bool>(), 0u8..24, any::<u64>()).prop_map(|(child, page, val)| ForkOp::HypWrite { child, page, val }),
        1 => Just(ForkOp::Fork),
        1 => Just(ForkOp::DropParent),
    ]
}

fn page_addr(page: u8) -> u64 {
    // Pages 0..16 in "ram", 16..24 in "pass" (linear: shared by both sides, not copied).
    if page < 16 {
        RAM + u64::from(page) * 4096 + 16
    } else {
        PASS + u64::from(page - 16) * 4096 + 16
    }
}

fn run_fork<F: TlbCpu>(ad: AdMode, pre: Vec<(u8, u64)>, ops: Vec<ForkOp>) {
    let ram = ram(4096);
    let host = ram.allocate_frames(1024, 512).unwrap();
    let (mut parent, _) = setup::<F>(&ram, ad, host);
    for (page, val) in pre {
        parent.access(&ram, page_addr(page % 16), Access::Write, val);
    }
    let fork = |p: &mut Guest<F>| {
        let (c, f) = p.s.fork().unwrap();
        p.flush(f);
        let mut c = Guest::new(c);
        c.shadow = p.shadow.clone();
        c
    };
    let mut child = fork(&mut parent);
    let mut parent = Some(parent);
    for op in ops {
        // Linear memory is shared by both sides: mirror its writes into both shadows.
        let mirror = |page: u8, val: u64, p: &mut Option<Guest<F>>, c: &mut Guest<F>| {
            if page >= 16 {
                if let Some(p) = p {
                    p.shadow.insert(page_addr(page), val);
                }
                c.shadow.insert(page_addr(page), val);
            }
        };
        match op {
            ForkOp::Write { child: on_child, page, val } => {
                let g = match (on_child, parent.as_mut()) {
                    (false, Some(p)) => p,
                    _ => &mut child,
                };
                assert!(g.access(&ram, page_addr(page), Access::Write, val).0.is_none());
                mirror(page, val, &mut parent, &mut child);
            }
            ForkOp::Read { child: on_child, page } => {
                let g = match (on_child, parent.as_mut()) {
                    (false, Some(p)) => p,
                    _ => &mut child,
                };
                let (out, got) = g.access(&ram, page_addr(page), Access::Read, 0);
                assert!(out.is_none());
                assert_eq!(
                    got,
                    g.shadow.get(&page_addr(page)).copied().unwrap_or(0),
                    "read page {page} on child={on_child}"
                );
            }
            ForkOp::HypWrite { child: on_child, page, val } => {
                let g = match (on_child, parent.as_mut()) {
                    (false, Some(p)) => p,
                    _ => &mut child,
                };
                g.s.write(gpa(page_addr(page)), &val.to_le_bytes()).unwrap();
                g.flush(SpaceFlush::none()); // The write's flush is pending in the space.
                g.shadow.insert(page_addr(page), val);
                mirror(page, val, &mut parent, &mut child);
            }
            ForkOp::Fork => {
                // The child forks a grandchild; the old parent goes away.
                let grandchild = fork(&mut child);
                parent = Some(std::mem::replace(&mut child, grandchild));
            }
            ForkOp::DropParent => parent = None,
        }
        child.check_isolation();
        if let Some(p) = &parent {
            p.check_isolation();
        }
    }
    for g in parent.iter().chain(std::iter::once(&child)) {
        for (&a, &v) in &g.shadow {
            let mut b = [0u8; 8];
            g.s.read(gpa(a), &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), v, "value at {a:#x}");
        }
    }
    drop(parent);
    drop(child);
    // SAFETY: the linear region's host frames came from allocate_frames above and are no longer mapped.
    unsafe { ram.deallocate_frames(host, 1024) };
    assert_eq!(ram.frames_in_use(), 0, "frames leaked");
}

#[derive(Clone, Debug)]
enum DirtyOp {
    Write { page: u8, val: u64 },
    Read { page: u8 },
    HypWrite { page: u8 },
    Harvest,
}

fn dirty_op() -> impl Strategy<Value = DirtyOp> {
    prop_oneof![
        6 => (0u8..24, any::<u64>()).prop_map(|(page, val)| DirtyOp::Write { page, val }),
        3 => (0u8..24).prop_map(|page| DirtyOp::Read { page }),
        2 => (0u8..16).prop_map(|page| DirtyOp::HypWrite { page }),
        2 => Just(DirtyOp::Harvest),
    ]
}

fn run_dirty<F: TlbCpu>(ad: AdMode, pre: Vec<u8>, ops: Vec<DirtyOp>) {
    let ram = ram(4096);
    let host = ram.allocate_frames(1024, 512).unwrap();
    let (mut g, _) = setup::<F>(&ram, ad, host);
    for page in pre {
        g.access(&ram, page_addr(page % 24), Access::Write, 1);
    }
    // Log all of "ram" and the first 2 MiB page of "pass" (split, or write-protected whole).
    let (_, f) = g.s.start_dirty_log(range(RAM, 64 * 4096)).unwrap();
    g.flush(f);
    g.s.stop_dirty_log().map(|f| g.flush(f)).unwrap();
    let (_, f) = g.s.start_dirty_log(range(PASS, 2 << 20)).unwrap();
    g.flush(f);
    let f = g.s.stop_dirty_log().unwrap();
    g.flush(f);
    // One log at a time: log "ram" and "pass" together through one range is impossible (they
    // are far apart), so log the "ram" region and check "pass" pages never appear.
    let (mode, f) = g.s.start_dirty_log(range(RAM, 64 * 4096)).unwrap();
    assert_eq!(mode, g.s.dirty_mode());
    g.flush(f);
    let mut expect = BTreeSet::new();
    for op in ops {
        match op {
            DirtyOp::Write { page, val } => {
                assert!(g.access(&ram, page_addr(page), Access::Write, val).0.is_none());
                if page < 16 {
                    expect.insert(page_addr(page) & !0xfff);
                }
            }
            DirtyOp::Read { page } => {
                assert!(g.access(&ram, page_addr(page), Access::Read, 0).0.is_none());
            }
            DirtyOp::HypWrite { page } => {
                g.s.write(gpa(page_addr(page)), &[0xee; 8]).unwrap();
                g.flush(SpaceFlush::none()); // The write's flush is pending in the space.
                g.shadow.insert(page_addr(page), u64::from_le_bytes([0xee; 8]));
                expect.insert(page_addr(page) & !0xfff);
            }
            DirtyOp::Harvest => {
                let (bits, f) = g.s.harvest_dirty().unwrap();
                g.flush(f);
                let got: BTreeSet<u64> = bits.iter().map(|a| a.as_u64()).collect();
                assert_eq!(got, expect, "harvest in {mode:?}");
                expect.clear();
            }
        }
        g.check_isolation();
    }
    let (bits, f) = g.s.harvest_dirty().unwrap();
    g.flush(f);
    assert_eq!(bits.iter().map(|a| a.as_u64()).collect::<BTreeSet<_>>(), expect);
    let f = g.s.stop_dirty_log().unwrap();
    g.flush(f);
    drop(g);
    // SAFETY: the linear region's host frames came from allocate_frames above and are no longer mapped.
    unsafe { ram.deallocate_frames(host, 1024) };
    assert_eq!(ram.frames_in_use(), 0, "frames leaked");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn fork_sides_never_see_each_others_writes_sv39x4(
        ad in ad_mode(), pre in prop::collection::vec((0u8..16, any::<u64>()), 0..12), ops in prop::collection::vec(fork_op(), 1..50)
    ) {
        run_fork::<Sv39x4>(ad, pre, ops);
    }

    #[test]
    fn fork_sides_never_see_each_others_writes_ept4(
        ad in ad_mode(), pre in prop::collection::vec((0u8..16, any::<u64>()), 0..12), ops in prop::collection::vec(fork_op(), 1..50)
    ) {
        run_fork::<Ept4>(ad, pre, ops);
    }

    #[test]
    fn harvest_reports_exactly_the_pages_written_sv39x4(
        ad in ad_mode(), pre in prop::collection::vec(0u8..24, 0..12), ops in prop::collection::vec(dirty_op(), 1..50)
    ) {
        run_dirty::<Sv39x4>(ad, pre, ops);
    }

    #[test]
    fn harvest_reports_exactly_the_pages_written_ept4(
        ad in ad_mode(), pre in prop::collection::vec(0u8..24, 0..12), ops in prop::collection::vec(dirty_op(), 1..50)
    ) {
        run_dirty::<Ept4>(ad, pre, ops);
    }
}
