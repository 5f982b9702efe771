//! Huge-page backing held against the spec model: guest accesses go through the spec model's
//! walk of the real table; layouts, fault counts, fork isolation, dirty-log exactness and frame
//! accounting (every allocation freed whole, with the count it was allocated with) are checked.

mod common;
use common::checked::{access, mem, Checked, Mem};
use common::{gpa, range, ModelCpu};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use twostage_aspace::*;
use twostage_npt::{Access, AdMode, Ept4, Format, FrameAllocator, MappingFlags, PageSize, Sv39x4, TableOptions};

type Space<F> = AddressSpace<F, Mem>;

fn space<F: Format>(m: &Mem, ad: AdMode) -> Space<F> {
    AddressSpace::new(m.clone(), TableOptions { ad, ..TableOptions::for_format::<F>() }).unwrap()
}

fn write<F: ModelCpu>(s: &mut Space<F>, m: &Checked, at: u64, v: u64) {
    access(s, m, at, Access::Write, v).expect("out of memory");
}

fn read<F: ModelCpu>(s: &mut Space<F>, m: &Checked, at: u64) -> u64 {
    access(s, m, at, Access::Read, 0).expect("out of memory")
}

fn leaves<F: Format>(s: &Space<F>) -> Vec<twostage_npt::Leaf> {
    let mut v = Vec::new();
    s.table().for_each_leaf(gpa(0), 1 << 39, |l| v.push(*l));
    v
}

fn count_sizes<F: Format>(s: &Space<F>) -> (usize, usize) {
    let l = leaves(s);
    (l.iter().filter(|l| l.size == PageSize::Size4K).count(), l.iter().filter(|l| l.size == PageSize::Size2M).count())
}

const RAM: u64 = 0x8000_0000;
const MIB: u64 = 1 << 20;

fn touch_all<F: ModelCpu>(policy: HugePages) -> (u64, (usize, usize)) {
    let m = mem(4096);
    let mut s = space::<F>(&m, AdMode::Hardware);
    s.set_huge_pages(policy);
    let (_, f) = s.add_region("ram", range(RAM, 4 * MIB), MappingFlags::RWX, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    for p in (0..4 * MIB).step_by(4096) {
        write(&mut s, &m, RAM + p, p);
    }
    for p in (0..4 * MIB).step_by(4096) {
        assert_eq!(read(&mut s, &m, RAM + p), p);
    }
    let out = (s.stats().faults_resolved, count_sizes(&s));
    drop(s);
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked");
    out
}

#[test]
fn faults_per_mib_drop_512_fold_on_aligned_ram() {
    let (small, sizes) = touch_all::<Sv39x4>(HugePages::Never);
    assert_eq!((small, sizes), (1024, (1024, 0)), "4 KiB backing: one fault per page");
    for (faults, sizes) in [touch_all::<Sv39x4>(HugePages::Always), touch_all::<Ept4>(HugePages::Size2M)] {
        assert_eq!(faults, 2, "one fault per 2 MiB");
        assert_eq!(sizes, (0, 2));
    }
}

#[test]
fn no_aligned_run_falls_back_to_4k() {
    let m = mem(1000);
    // One frame at the only 2 MiB-aligned place a run of 512 could start.
    let pin = m.allocate_frame().unwrap();
    let mut s = space::<Sv39x4>(&m, AdMode::Hardware);
    let (_, f) = s.add_region("ram", range(RAM, 2 * MIB), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    write(&mut s, &m, RAM + 0x5000, 7);
    assert_eq!(s.stats().huge_fallbacks, 1);
    assert_eq!(count_sizes(&s), (1, 0));
    // Once a 4 KiB page is in the block, no huge page is tried there again.
    write(&mut s, &m, RAM + 0x9000, 8);
    assert_eq!((s.stats().huge_fallbacks, s.stats().huge_2m_mapped), (1, 0));
    assert_eq!(read(&mut s, &m, RAM + 0x5000), 7);
    drop(s);
    // SAFETY: allocated above, never mapped.
    unsafe { m.deallocate_frames(pin, 1) };
    assert!(m.live.lock().unwrap().is_empty());
}

/// Fills the first `huge` 2 MiB of `RAM` with huge pages and writes a pattern.
fn huge_backed<F: ModelCpu>(m: &Mem, ad: AdMode, len: u64) -> Space<F> {
    let mut s = space::<F>(m, ad);
    let (id, f) = s.add_region("ram", range(RAM, len), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let f = s.populate(id).unwrap();
    s.flush_unloaded(f).unwrap();
    assert_eq!(count_sizes(&s), (0, (len / (2 * MIB)) as usize));
    for p in (0..len).step_by(0x8000) {
        write(&mut s, m, RAM + p, p | 1);
    }
    s
}

fn check_fork<F: ModelCpu>(ad: AdMode, writes: &[(bool, u16)]) {
    let m = mem(4096);
    let mut parent = huge_backed::<F>(&m, ad, 4 * MIB);
    let (mut child, f) = parent.fork().unwrap();
    parent.flush(f, |_| {}).unwrap();
    let mut want = [BTreeMap::new(), BTreeMap::new()];
    for (i, &(in_child, page)) in writes.iter().enumerate() {
        let at = RAM + u64::from(page % 1024) * 4096 + 8;
        let v = 0xc000 + i as u64;
        let side = if in_child { &mut child } else { &mut parent };
        write(side, &m, at, v);
        want[in_child as usize].insert(at, v);
    }
    for (side, w) in [(&mut parent, &want[0]), (&mut child, &want[1])] {
        for p in (0..4 * MIB).step_by(0x8000) {
            assert_eq!(read(side, &m, RAM + p), p | 1, "pattern at {p:#x}");
        }
        for p in (0..4 * MIB).step_by(4096) {
            let at = RAM + p + 8;
            assert_eq!(read(side, &m, at), w.get(&at).copied().unwrap_or(0), "at {at:#x}");
        }
    }
    // One copy per page written at most (a whole 2 MiB page, or 4 KiB after a split).
    let written: BTreeSet<u64> = writes.iter().map(|&(c, p)| u64::from(c) << 32 | u64::from(p % 1024)).collect();
    let copies = parent.stats().cow_copies + child.stats().cow_copies;
    assert!(copies <= written.len() as u64, "{copies} copies for {} pages written", written.len());
    drop(parent);
    // The child alone holds the runs now: its huge pages become writable in place.
    write(&mut child, &m, RAM + 0x1f_f000, 5);
    drop(child);
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked");
}

#[test]
fn fork_of_huge_backed_memory_isolates_both_sides() {
    let writes = [(true, 0), (false, 0), (true, 513), (false, 700), (false, 3), (true, 1023)];
    check_fork::<Sv39x4>(AdMode::Hardware, &writes);
    check_fork::<Ept4>(AdMode::Preset, &writes);
}

fn check_dirty<F: ModelCpu>(ad: AdMode, rounds: &[Vec<u16>]) {
    let m = mem(4096);
    let mut s = huge_backed::<F>(&m, ad, 4 * MIB);
    let (_, f) = s.start_dirty_log(range(RAM, 4 * MIB)).unwrap();
    s.flush(f, |_| {}).unwrap();
    for round in rounds {
        let mut want = BTreeSet::new();
        for &p in round {
            let at = RAM + u64::from(p % 1024) * 4096;
            write(&mut s, &m, at + 16, u64::from(p));
            want.insert(at);
        }
        let (bits, f) = s.harvest_dirty().unwrap();
        s.flush(f, |_| {}).unwrap();
        let got: BTreeSet<u64> = bits.iter().map(|g| g.as_u64()).collect();
        assert_eq!(got, want, "harvest must name exactly the pages written");
    }
    let f = s.stop_dirty_log().unwrap();
    s.flush(f, |_| {}).unwrap();
    assert_eq!(count_sizes(&s), (0, 2), "stopping the log restores the huge pages");
    assert_eq!(s.stats().huge_collapses, 2);
    for p in (0..4 * MIB).step_by(0x8000) {
        assert_eq!(read(&mut s, &m, RAM + p), p | 1);
    }
    drop(s);
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked");
}

#[test]
fn dirty_harvest_is_exact_on_huge_backed_memory() {
    let rounds = vec![vec![0, 1, 1000, 513], vec![], vec![7, 7, 600]];
    check_dirty::<Sv39x4>(AdMode::Hardware, &rounds); // D bits (huge pages split at start)
    check_dirty::<Sv39x4>(AdMode::Software, &rounds);
    check_dirty::<Ept4>(AdMode::Preset, &rounds); // write protection (split on first write)
}

#[test]
fn collapse_huge_needs_one_private_run_with_uniform_rights() {
    let m = mem(4096);
    let mut s = huge_backed::<Sv39x4>(&m, AdMode::Hardware, 2 * MIB);
    let (child, f) = s.fork().unwrap();
    s.flush(f, |_| {}).unwrap();
    // 4 KiB copy-on-write (a policy of 2 MiB would copy the whole page): split, copy one page.
    let id = s.regions().next().unwrap().id();
    s.set_region_huge_pages(id, HugePages::Never);
    write(&mut s, &m, RAM + 0x3000, 9);
    s.set_region_huge_pages(id, HugePages::Size2M);
    let (n, f) = s.collapse_huge(range(RAM, 2 * MIB));
    s.flush(f, |_| {}).unwrap();
    assert_eq!(n, 0, "one page is a copy: not contiguous");
    assert_eq!(count_sizes(&s), (512, 0));
    drop(child);
    drop(s);
    assert!(m.live.lock().unwrap().is_empty());
}

/// A region layout: (start page, pages, MMIO?) from the generator, laid out without overlap.
fn layout() -> impl Strategy<Value = Vec<(u16, u16, bool)>> {
    prop::collection::vec((0u16..1536, 1u16..1536, prop::bool::weighted(0.2)), 1..6)
}

fn run_layout(regions: Vec<(u16, u16, bool)>, pre: Vec<u16>, touches: Vec<u16>) {
    let m = mem(8192);
    let mut s = space::<Sv39x4>(&m, AdMode::Hardware);
    let mut added = Vec::new();
    for (start, pages, mmio) in regions {
        let r = range(RAM + u64::from(start) * 4096, u64::from(pages) * 4096);
        let backend = if mmio { Backend::Mmio } else { Backend::DemandZero };
        if let Ok((id, f)) = s.add_region("r", r, MappingFlags::RW, backend) {
            s.flush_unloaded(f).unwrap();
            added.push((id, r, mmio));
        }
    }
    let in_ram = |s: &Space<Sv39x4>, at: u64| s.region_at(gpa(at)).is_some_and(|r| r.backend() != Backend::Mmio);
    // Some pages touched with 4 KiB backing first: their 2 MiB blocks must stay 4 KiB.
    let mut small_blocks = BTreeSet::new();
    for &(id, _, _) in &added {
        s.set_region_huge_pages(id, HugePages::Never).unwrap();
    }
    let mut shadow = BTreeMap::new();
    for p in pre {
        let at = RAM + u64::from(p) * 4096;
        if in_ram(&s, at) {
            write(&mut s, &m, at, at);
            shadow.insert(at, at);
            small_blocks.insert(at & !(2 * MIB - 1));
        }
    }
    for &(id, _, _) in &added {
        s.set_region_huge_pages(id, HugePages::Always).unwrap();
    }
    for p in touches {
        let at = RAM + u64::from(p) * 4096 + 8;
        if in_ram(&s, at) {
            write(&mut s, &m, at, at);
            shadow.insert(at, at);
        }
    }
    for l in leaves(&s) {
        let r = s.region_at(l.gpa).expect("a leaf outside every region");
        assert!(r.range().contains(l.range().end - 4096) && r.backend() == Backend::DemandZero, "{l:?} in {r:?}");
        if l.size != PageSize::Size4K {
            assert!(!small_blocks.contains(&l.gpa.as_u64()), "huge page over 4 KiB pages at {:?}", l.gpa);
        }
    }
    for (&at, &v) in &shadow {
        assert_eq!(read(&mut s, &m, at), v);
    }
    for (id, r, mmio) in added {
        if !mmio {
            assert!(s.region(id).unwrap().range() == r);
        }
    }
    drop(s);
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random region layouts (RAM, MMIO holes, gaps) and touches: no huge page crosses a
    /// region's edge, lies over MMIO or a hole, or covers pages already mapped at 4 KiB; every
    /// value written reads back through the model's walk.
    #[test]
    fn huge_pages_respect_region_edges_and_holes(
        regions in layout(),
        pre in prop::collection::vec(0u16..3072, 0..8),
        touches in prop::collection::vec(0u16..3072, 1..40),
    ) {
        run_layout(regions, pre, touches);
    }
}

/// Huge backing, fork, copy-on-write, dirty logging and collapse with allocation number
/// `fail_at` (and every later one) failing: no frame leaks, every allocation comes back whole
/// (the `Checked` allocator), nothing written is lost. Returns whether the failure was hit.
fn failing_scenario<F: ModelCpu>(ad: AdMode, fail_at: u64) -> bool {
    let m = mem(3072);
    m.ram.fail_after(fail_at);
    let Ok(mut s) = AddressSpace::<F, Mem>::new(m.clone(), TableOptions { ad, ..TableOptions::for_format::<F>() })
    else {
        return true;
    };
    let mut hit = false;
    let (id, f) = s.add_region("ram", range(RAM, 4 * MIB), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let mut shadow = BTreeMap::new();
    let put = |s: &mut Space<F>, at: u64, v: u64, shadow: &mut BTreeMap<u64, u64>| match access(
        s,
        &m,
        at,
        Access::Write,
        v,
    ) {
        Some(_) => {
            shadow.insert(at, v);
            false
        }
        None => true,
    };
    for p in [0u64, 0x20_0000, 0x20_1000, 0x3f_f000] {
        hit |= put(&mut s, RAM + p, p + 1, &mut shadow);
    }
    let mut child = match s.fork() {
        Ok((c, f)) => {
            s.flush(f, |_| {}).unwrap();
            Some((c, shadow.clone()))
        }
        Err(_) => {
            s.flush_pending(|_| {});
            hit = true;
            None
        }
    };
    for p in [0x1000u64, 0x20_0000, 0x3f_f000] {
        hit |= put(&mut s, RAM + p + 8, p + 2, &mut shadow);
        if let Some((c, cs)) = &mut child {
            hit |= put(c, RAM + p + 16, p + 3, cs);
        }
    }
    match s.start_dirty_log(range(RAM, 4 * MIB)) {
        Ok((_, f)) => s.flush(f, |_| {}).unwrap(),
        Err(_) => {
            s.flush_pending(|_| {});
            hit = true;
        }
    }
    if s.dirty_log_range().is_some() {
        hit |= put(&mut s, RAM + 0x30_0000, 4, &mut shadow);
        match s.harvest_dirty() {
            Ok((_, f)) => s.flush(f, |_| {}).unwrap(),
            Err(_) => {
                s.flush_pending(|_| {});
                hit = true;
            }
        }
        match s.stop_dirty_log() {
            Ok(f) => s.flush(f, |_| {}).unwrap(),
            Err(_) => {
                s.flush_pending(|_| {});
                hit = true;
            }
        }
    }
    let (_, f) = s.collapse_huge(range(RAM, 4 * MIB));
    s.flush(f, |_| {}).unwrap();
    m.ram.heal();
    for (&at, &v) in &shadow {
        assert_eq!(read(&mut s, &m, at), v, "value at {at:#x} lost (allocation {fail_at} failing)");
    }
    if let Some((mut c, cs)) = child {
        for (&at, &v) in &cs {
            assert_eq!(read(&mut c, &m, at), v, "child's value at {at:#x} lost");
        }
    }
    let f = s.remove_region(id).unwrap();
    s.flush(f, |_| {}).unwrap();
    drop(s);
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked with allocation {fail_at} failing");
    hit
}

#[test]
fn every_allocation_failure_leaks_nothing_with_huge_backing() {
    for ad in [AdMode::Hardware, AdMode::Preset] {
        let mut n = 0;
        while failing_scenario::<Sv39x4>(ad, n) {
            n += 1;
            assert!(n < 400, "the scenario never completes without a failure");
        }
        assert!(n > 10, "too few allocations to be a meaningful test: {n}");
        n = 0;
        while failing_scenario::<Ept4>(ad, n) {
            n += 1;
            assert!(n < 400);
        }
    }
}
