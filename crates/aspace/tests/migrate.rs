//! Live migration held against the spec model: the guest writes through the spec model's walk
//! of the source's real table (A/D bits set as the model's walk sets them under hardware A/D,
//! faults resolved by the space) and through `GuestMemory`, interleaved with pre-copy rounds;
//! after the final copy every guest-physical page of the destination, read through the model's
//! walk of the destination's table, holds the source's bytes, pages the source never populated
//! stay unpopulated, and dropping both spaces returns every frame whole.

mod common;
use common::checked::{access, mem, Checked, Mem};
use common::{gpa, range, ModelCpu};
use proptest::prelude::*;
use twostage_aspace::migrate::{MigrateError, Migration, Round};
use twostage_aspace::*;
use twostage_npt::testing::HostRam;
use twostage_npt::{
    Access, AdMode, Ept4, Format, FrameAllocator, HostPhysAddr, MappingFlags, NestedPageFaultInfo, PageSize, Sv39x4,
    TableOptions,
};
use twostage_spec_model as model;

type Space<F> = AddressSpace<F, Mem>;

const RAM: u64 = 0x8000_0000;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// The 4 KiB page at `page` as the model's walk of `s`'s table reads it: `None` if the page
/// is not mapped. A fault on a mapped page (A = 0 under software A/D, RISC-V Svade) is resolved
/// as a vCPU's would be; nothing is populated.
fn model_page<F: ModelCpu>(s: &mut Space<F>, m: &Checked, page: u64) -> Option<Vec<u64>> {
    s.table().query(gpa(page))?;
    let hpa = match F::model_walk(&m.ram, s.root().as_u64(), false, gpa(page), Access::Read) {
        Ok(h) => h,
        Err(_) => {
            let FaultOutcome::Resolved { flush } = s.handle_fault(NestedPageFaultInfo::new(gpa(page), Access::Read))
            else {
                panic!("a read of mapped page {page:#x} not resolved")
            };
            s.flush(flush, |_| {}).unwrap();
            F::model_walk(&m.ram, s.root().as_u64(), false, gpa(page), Access::Read).expect("resolved")
        }
    };
    Some((0..PAGE / 8).map(|i| m.ram.read_u64(hpa + 8 * i)).collect())
}

/// The test VM's layout: two RAM regions (one not 2 MiB-aligned at its end), an MMIO page and
/// a linear region between them, a hole, and a read-only RAM region.
struct Layout {
    linear_host: HostPhysAddr,
}

const LOW: (u64, u64) = (RAM, 6 * MIB);
const MMIO: (u64, u64) = (RAM + 6 * MIB, PAGE);
const LINEAR: (u64, u64) = (RAM + 6 * MIB + 4 * PAGE, 2 * PAGE);
const HIGH: (u64, u64) = (RAM + 8 * MIB, 3 * MIB + 20 * PAGE);
const ROM: (u64, u64) = (RAM + 12 * MIB, 4 * PAGE);

fn vm<F: Format>(m: &Mem, ad: AdMode) -> (Space<F>, Layout) {
    let mut s = AddressSpace::new(m.clone(), TableOptions { ad, ..TableOptions::for_format::<F>() }).unwrap();
    let linear_host = m.allocate_frames(2, 1).unwrap();
    let regions = [
        ("low", LOW, MappingFlags::RWX, Backend::DemandZero),
        ("mmio", MMIO, MappingFlags::RW, Backend::Mmio),
        ("linear", LINEAR, MappingFlags::RW, Backend::Linear { host: linear_host }),
        ("high", HIGH, MappingFlags::RW, Backend::DemandZero),
        ("rom", ROM, MappingFlags::READ, Backend::DemandZero),
    ];
    for (name, (start, len), flags, backend) in regions {
        let (_, f) = s.add_region(name, range(start, len), flags, backend).unwrap();
        s.flush_unloaded(f).unwrap();
    }
    (s, Layout { linear_host })
}

/// Every writable page the test writes to: low, linear, high.
fn page_addr(i: u16) -> u64 {
    let i = u64::from(i) % (1538 + HIGH.1 / PAGE);
    if i < 1536 {
        LOW.0 + i * PAGE
    } else if i < 1538 {
        LINEAR.0 + (i - 1536) * PAGE
    } else {
        HIGH.0 + (i - 1538) * PAGE
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// A vCPU stores `value` at word `word` of page `page` (through the model's walk).
    Store { page: u16, word: u16, value: u64 },
    /// A vCPU loads from a page (a read fault may populate it with zeros).
    Load { page: u16 },
    /// The hypervisor writes bytes through `GuestMemory` (may cross into the next page).
    Write { page: u16, off: u16, len: u16, byte: u8 },
    /// A pre-copy round.
    Round,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (any::<u16>(), 0u16..512, any::<u64>()).prop_map(|(page, word, value)| Op::Store { page, word, value }),
        1 => any::<u16>().prop_map(|page| Op::Load { page }),
        2 => (any::<u16>(), 0u16..4096, 1u16..6000, any::<u8>())
            .prop_map(|(page, off, len, byte)| Op::Write { page, off, len, byte }),
        2 => Just(Op::Round),
    ]
}

fn apply<F: ModelCpu>(s: &mut Space<F>, m: &Checked, op: &Op) {
    match *op {
        Op::Store { page, word, value } => {
            access(s, m, page_addr(page) + u64::from(word) * 8, Access::Write, value).expect("out of memory");
        }
        Op::Load { page } => {
            access(s, m, page_addr(page), Access::Read, 0).expect("out of memory");
        }
        Op::Write { page, off, len, byte } => {
            let at = page_addr(page) + u64::from(off);
            let buf = vec![byte; usize::from(len)];
            // It may run past a region's end: then nothing is written (a typed error).
            let _ = s.write(gpa(at), &buf);
            s.flush_pending(|_| {});
        }
        Op::Round => unreachable!(),
    }
}

/// Pages of the guest-physical space the check walks: every page of every region, and the
/// holes around them.
fn all_pages() -> impl Iterator<Item = u64> {
    (RAM - 4 * PAGE..ROM.0 + ROM.1 + 4 * PAGE).step_by(PAGE as usize)
}

/// Which pages the table populates (leaves, in 4 KiB pages).
fn populated<F: Format>(s: &Space<F>) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    s.table().for_each_leaf(gpa(0), 1 << 39, |l| {
        for p in (0..l.size.bytes()).step_by(PAGE as usize) {
            out.insert(l.gpa.as_u64() + p);
        }
    });
    out
}

/// The destination against the source at stop time, through the model's walks.
fn check_equal<F: ModelCpu>(src: &mut Space<F>, dst: &mut Space<F>, m: &Checked) {
    let src_pop = populated(src);
    for page in all_pages() {
        let want = model_page(src, m, page);
        let got = model_page(dst, m, page);
        let in_mmio = src.region_at(gpa(page)).is_some_and(|r| r.backend() == Backend::Mmio);
        match (&want, &got) {
            (Some(w), Some(g)) => {
                if let Some(i) = (0..w.len()).find(|&i| w[i] != g[i]) {
                    panic!("page {page:#x} differs at word {i}: source {:#x}, destination {:#x}", w[i], g[i]);
                }
            }
            (Some(w), None) => {
                // Not copied: only a page reading as zero (demand-zero in the destination).
                assert!(w.iter().all(|&x| x == 0), "page {page:#x} not copied");
                assert!(dst.region_at(gpa(page)).is_some_and(|r| r.backend() == Backend::DemandZero));
            }
            (None, Some(_)) => panic!("page {page:#x} populated in the destination only"),
            (None, None) => {}
        }
        if in_mmio {
            assert!(got.is_none(), "MMIO page {page:#x} mapped");
        }
        if got.is_some() {
            assert!(src_pop.contains(&page), "page {page:#x} populated in the destination only");
        }
    }
    let names = |s: &Space<F>| {
        s.regions().map(|r| (r.id(), r.name(), r.range(), r.flags(), r.huge_pages())).collect::<Vec<_>>()
    };
    assert_eq!(names(src), names(dst), "the destination has the source's regions");
}

/// Runs `ops` (stores, loads, hypervisor writes, rounds) on a source while migrating it; then
/// finishes and checks. `pre` writes happen before the migration starts; `fork` forks the
/// source first (its anonymous regions become copy-on-write, frames shared with the child).
/// Returns the rounds.
fn run<F: ModelCpu>(ad: AdMode, huge: bool, fork: bool, pre: &[Op], ops: &[Op]) -> Vec<Round> {
    let m = mem(8192);
    let (mut src, layout) = vm::<F>(&m, ad);
    if !huge {
        for id in src.regions().map(|r| r.id()).collect::<Vec<_>>() {
            src.set_region_huge_pages(id, HugePages::Never);
        }
    }
    for op in pre.iter().filter(|o| !matches!(o, Op::Round)) {
        apply(&mut src, &m, op);
    }
    let mut child = None;
    if fork {
        let (c, f) = src.fork().unwrap();
        src.flush(f, |_| {}).unwrap();
        child = Some(c);
    }
    let (mut mig, mut dst, f) = Migration::start(&mut src, m.clone()).unwrap();
    src.flush(f, |_| {}).unwrap();
    let want_mode = src.dirty_mode();
    assert_eq!(mig.dirty_mode(), Some(want_mode));
    let mut rounds = Vec::new();
    let mut did_round = false;
    for op in ops {
        if let Op::Round = op {
            let (r, f) = mig.round(&mut src, &mut dst).unwrap();
            src.flush(f, |_| {}).unwrap();
            rounds.push(r);
            did_round = true;
        } else {
            apply(&mut src, &m, op);
        }
    }
    let _ = did_round;
    let (last, f) = mig.finish(&mut src, &mut dst).unwrap();
    src.flush(f, |_| {}).unwrap();
    assert!(last.last && last.dirty == 0);
    rounds.push(last);
    assert_eq!(src.dirty_log_range(), None, "finish stops the source's log");
    check_equal(&mut src, &mut dst, &m);
    // The destination runs on its own: a vCPU writing everywhere in it changes nothing in
    // the source (apart from the linear region, which is the same host memory by design).
    let before: Vec<_> = all_pages().map(|p| model_page(&mut src, &m, p)).collect::<Vec<_>>();
    for p in (LOW.0..LOW.0 + LOW.1).step_by(64 * PAGE as usize) {
        access(&mut dst, &m, p + 8, Access::Write, 0xd57).unwrap();
    }
    let after: Vec<_> = all_pages().map(|p| model_page(&mut src, &m, p)).collect();
    assert!(before == after, "a write in the destination reached the source");
    drop(src);
    drop(child);
    drop(dst);
    // SAFETY: allocated by `vm`, mapped only by the dropped spaces' linear regions.
    unsafe { m.deallocate_frames(layout.linear_host, 2) };
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked: {:?}", m.live.lock().unwrap());
    rounds
}

fn modes() -> impl Strategy<Value = (u8, AdMode)> {
    prop_oneof![
        // D bits set by the model's walk (EPT A/D enabled; RISC-V Svadu).
        Just((0, AdMode::Hardware)),
        Just((1, AdMode::Hardware)),
        // D bits set by the fault handler (RISC-V Svade).
        Just((1, AdMode::Software)),
        // No D bits: write protection.
        Just((0, AdMode::Preset)),
        Just((1, AdMode::Preset)),
    ]
}

fn run_mode(fmt: u8, ad: AdMode, huge: bool, fork: bool, pre: &[Op], ops: &[Op]) -> Vec<Round> {
    match fmt {
        0 => run::<Ept4>(ad, huge, fork, pre, ops),
        _ => run::<Sv39x4>(ad, huge, fork, pre, ops),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Random guest stores, loads and hypervisor writes interleaved with rounds, in every dirty
    /// mode, with and without huge backing and a fork of the source: the destination equals
    /// the source at stop time, page by page, through the model's walks.
    #[test]
    fn migrated_space_equals_source_at_stop_time(
        (fmt, ad) in modes(),
        huge in any::<bool>(),
        fork in any::<bool>(),
        pre in prop::collection::vec(op(), 0..40),
        ops in prop::collection::vec(op(), 0..60),
    ) {
        run_mode(fmt, ad, huge, fork, &pre, &ops);
    }
}

/// Every mode on one fixed run (the property test draws modes at random).
#[test]
fn every_dirty_mode_migrates() {
    let pre: Vec<Op> = (0..40u16).map(|i| Op::Store { page: i * 61, word: i, value: u64::from(i) + 1 }).collect();
    let ops = vec![
        Op::Round,
        Op::Store { page: 5, word: 3, value: 9 },
        Op::Write { page: 1600, off: 4000, len: 200, byte: 7 },
        Op::Round,
        Op::Store { page: 1537, word: 0, value: 4 }, // the linear region
        Op::Store { page: 2000, word: 0, value: 5 },
        Op::Load { page: 2100 },
        Op::Round,
        Op::Store { page: 5, word: 4, value: 10 },
    ];
    for (fmt, ad) in
        [(0, AdMode::Hardware), (0, AdMode::Preset), (1, AdMode::Hardware), (1, AdMode::Software), (1, AdMode::Preset)]
    {
        for huge in [false, true] {
            let rounds = run_mode(fmt, ad, huge, false, &pre, &ops);
            assert_eq!(rounds.len(), 4);
            // Round 2 copies what round 1's harvest found: nothing (the guest wrote before the
            // start); its harvest finds page 5 and the two pages of the hypervisor's write.
            assert_eq!((rounds[1].pages, rounds[1].dirty), (0, 3), "{fmt} {ad:?} {huge}: {rounds:?}");
            // Round 3 copies those; its harvest finds page 2000 (not the linear page: shared,
            // not copied; not the page only read).
            assert_eq!((rounds[2].pages, rounds[2].dirty), (3, 1), "{rounds:?}");
            // The final copy: page 2000, and page 5 written again.
            assert_eq!(rounds[3].pages, 2, "{rounds:?}");
        }
    }
}

/// Huge backing survives: fully written 2 MiB blocks come out as 2 MiB pages in the
/// destination (also when the source's D-bit log split them), sparse ones as 4 KiB pages, and
/// pages never written cost no frame.
fn huge_case<F: ModelCpu>(ad: AdMode) {
    let m = mem(8192);
    let (mut src, layout) = vm::<F>(&m, ad);
    // 4 MiB written in full (2 huge pages), plus 3 pages in the third 2 MiB block.
    for p in (0..4 * MIB).step_by(PAGE as usize) {
        access(&mut src, &m, LOW.0 + p, Access::Write, p | 1).unwrap();
    }
    let mut pages = 1024;
    if ad == AdMode::Hardware {
        // A read-only touch of a fresh 2 MiB block in HIGH: a zero huge page.
        access(&mut src, &m, HIGH.0 + 0x1000, Access::Read, 0).unwrap();
    }
    let (mut mig, mut dst, f) = Migration::start(&mut src, m.clone()).unwrap();
    src.flush(f, |_| {}).unwrap();
    // Written while logging: 4 KiB pages in the source.
    for p in [0u64, 7, 300] {
        access(&mut src, &m, LOW.0 + 4 * MIB + p * PAGE, Access::Write, 5).unwrap();
        pages += 1;
    }
    let src_frames = src.stats().frames_allocated;
    let (r1, f) = mig.round(&mut src, &mut dst).unwrap();
    src.flush(f, |_| {}).unwrap();
    access(&mut src, &m, LOW.0 + 0x1000, Access::Write, 77).unwrap();
    let (r2, f) = mig.round(&mut src, &mut dst).unwrap();
    src.flush(f, |_| {}).unwrap();
    let (r3, f) = mig.finish(&mut src, &mut dst).unwrap();
    src.flush(f, |_| {}).unwrap();
    println!(
        "migration ({ad:?}, {:?}): source {src_frames} frames; round 1 {r1:?}; round 2 {r2:?}; final {r3:?}; \
         destination {} frames",
        mig_mode(&src),
        dst.stats().frames_allocated
    );
    assert_eq!(r1.huge_pages, 2, "{r1:?}");
    assert_eq!(r1.pages, pages);
    if ad == AdMode::Hardware {
        assert_eq!(r1.zero_pages, 512, "the zero huge page is not copied: {r1:?}");
    }
    // The pages written between the start and round 1 are copied again by round 2 (round 1
    // may have copied them before they were written); the page written after round 1, by the
    // final copy.
    assert_eq!(r1.dirty, 3, "{r1:?}");
    assert_eq!((r2.pages, r2.dirty, r3.pages), (3, 1, 1), "{r2:?} {r3:?}");
    assert_eq!(dst.stats().frames_allocated, pages, "a frame for every page written, none for the rest");
    let mut huge = Vec::new();
    dst.table().for_each_leaf(gpa(0), 1 << 39, |l| {
        if l.size == PageSize::Size2M {
            huge.push(l.gpa.as_u64())
        }
    });
    assert_eq!(huge, [LOW.0, LOW.0 + 2 * MIB]);
    check_equal(&mut src, &mut dst, &m);
    drop(src);
    drop(dst);
    // SAFETY: allocated by `vm`, mapped only by the dropped spaces' linear regions.
    unsafe { m.deallocate_frames(layout.linear_host, 2) };
    assert!(m.live.lock().unwrap().is_empty());
}

fn mig_mode<F: Format>(s: &Space<F>) -> DirtyMode {
    s.dirty_mode()
}

/// Huge backing survives: fully written 2 MiB blocks come out as 2 MiB pages in the
/// destination (also when the source's D-bit log split them to 4 KiB), sparse ones as 4 KiB
/// pages, and pages never written cost no frame.
#[test]
fn destination_keeps_huge_pages_and_allocates_only_what_was_written() {
    huge_case::<Sv39x4>(AdMode::Hardware); // D bits: the log split the source's huge pages
    huge_case::<Sv39x4>(AdMode::Preset); // write protection: they stay huge in the source
    huge_case::<Ept4>(AdMode::Hardware);
    huge_case::<Ept4>(AdMode::Preset);
}

/// Out of frames in the destination mid-round: the round fails with a typed error, what was
/// copied stays (and is right), nothing leaks, and retrying after memory is freed completes the
/// migration; abandoning instead stops the source's log and leaks nothing either.
#[test]
fn out_of_frames_mid_round_loses_nothing() {
    for abandon in [false, true] {
        for ad in [AdMode::Hardware, AdMode::Preset] {
            let m = mem(4096);
            let (mut src, layout) = vm::<Sv39x4>(&m, ad);
            for id in src.regions().map(|r| r.id()).collect::<Vec<_>>() {
                src.set_region_huge_pages(id, HugePages::Never);
            }
            for i in 0..300u64 {
                access(&mut src, &m, LOW.0 + i * 3 * PAGE, Access::Write, i + 1).unwrap();
            }
            let (mut mig, mut dst, f) = Migration::start(&mut src, m.clone()).unwrap();
            src.flush(f, |_| {}).unwrap();
            m.ram.fail_after(100);
            let err = mig.round(&mut src, &mut dst).unwrap_err();
            let MigrateError::OutOfFrames { copied, .. } = err else { panic!("{err}") };
            assert!(copied > 0 && copied < 300, "{copied}");
            // What was copied is right, and only that is populated.
            let linear = range(LINEAR.0, LINEAR.1);
            let dst_pop: Vec<u64> = populated(&dst).into_iter().filter(|&p| !linear.contains(gpa(p))).collect();
            assert_eq!(dst_pop.len() as u64, copied);
            for &p in &dst_pop {
                assert_eq!(model_page(&mut dst, &m, p), model_page(&mut src, &m, p));
            }
            assert_eq!(mig.rounds(), 0);
            m.ram.heal();
            access(&mut src, &m, LOW.0 + 8, Access::Write, 99).unwrap(); // the guest runs on
            if abandon {
                let f = mig.abandon(&mut src).unwrap();
                src.flush(f, |_| {}).unwrap();
                assert_eq!(src.dirty_log_range(), None);
                drop(dst);
            } else {
                let (r, f) = mig.round(&mut src, &mut dst).unwrap();
                src.flush(f, |_| {}).unwrap();
                assert_eq!(r.pages, 300 - copied, "the retry copies the rest: {r:?}");
                let (r, f) = mig.finish(&mut src, &mut dst).unwrap();
                src.flush(f, |_| {}).unwrap();
                assert_eq!(r.pages, 1, "the page written meanwhile: {r:?}");
                check_equal(&mut src, &mut dst, &m);
                drop(dst);
            }
            drop(src);
            // SAFETY: allocated by `vm`, mapped only by the dropped spaces' linear regions.
            unsafe { m.deallocate_frames(layout.linear_host, 2) };
            assert!(m.live.lock().unwrap().is_empty());
        }
    }
}

/// `finish` failing hands the migration back; finishing again completes it.
#[test]
fn failed_finish_can_be_retried() {
    let m = mem(4096);
    let (mut src, layout) = vm::<Sv39x4>(&m, AdMode::Hardware);
    let (mut mig, mut dst, f) = Migration::start(&mut src, m.clone()).unwrap();
    src.flush(f, |_| {}).unwrap();
    let (_, f) = mig.round(&mut src, &mut dst).unwrap();
    src.flush(f, |_| {}).unwrap();
    for i in 0..20u64 {
        access(&mut src, &m, HIGH.0 + i * PAGE, Access::Write, i + 1).unwrap();
    }
    m.ram.fail_after(3);
    let err = mig.finish(&mut src, &mut dst).unwrap_err();
    let MigrateError::Unfinished { cause, migration } = err else { panic!("{err}") };
    assert!(matches!(*cause, MigrateError::OutOfFrames { .. }), "{cause}");
    assert!(src.dirty_log_range().is_some(), "the source still logs");
    m.ram.heal();
    src.flush_pending(|_| {});
    let (r, f) = migration.finish(&mut src, &mut dst).unwrap();
    src.flush(f, |_| {}).unwrap();
    assert!(r.pages > 0);
    check_equal(&mut src, &mut dst, &m);
    drop(src);
    drop(dst);
    // SAFETY: allocated by `vm`, mapped only by the dropped spaces' linear regions.
    unsafe { m.deallocate_frames(layout.linear_host, 2) };
    assert!(m.live.lock().unwrap().is_empty());
}

/// Misuse gives typed errors and changes nothing.
#[test]
fn misuse_is_refused() {
    let m = mem(4096);
    let (mut src, layout) = vm::<Sv39x4>(&m, AdMode::Hardware);
    let (mut other, _) = vm::<Sv39x4>(&m, AdMode::Hardware);
    let (_, f) = other.start_dirty_log(range(LOW.0, PAGE)).unwrap();
    other.flush(f, |_| {}).unwrap();
    assert!(matches!(Migration::start(&mut other, m.clone()), Err(MigrateError::SourceLogging { .. })));
    let (mut mig, mut dst, f) = Migration::start(&mut src, m.clone()).unwrap();
    src.flush(f, |_| {}).unwrap();
    assert!(matches!(mig.round(&mut src, &mut other), Err(MigrateError::WrongSpace)));
    assert!(matches!(mig.round(&mut dst, &mut src), Err(MigrateError::WrongSpace)));
    let (id, f) = src.add_region("late", range(RAM + 64 * MIB, PAGE), MappingFlags::RW, Backend::DemandZero).unwrap();
    src.flush(f, |_| {}).unwrap();
    assert!(matches!(mig.round(&mut src, &mut dst), Err(MigrateError::SourceChanged { region }) if region == id));
    let f = src.remove_region(id).unwrap();
    src.flush(f, |_| {}).unwrap();
    let f = src.stop_dirty_log().unwrap();
    src.flush(f, |_| {}).unwrap();
    assert!(matches!(mig.round(&mut src, &mut dst), Err(MigrateError::LogLost)));
    let f = mig.abandon(&mut src).unwrap();
    src.flush(f, |_| {}).unwrap();
    drop((src, dst, other));
    // SAFETY: allocated by `vm` (twice: only the first layout's is known here, the second
    // space's host frames are freed by scanning what is left).
    unsafe { m.deallocate_frames(layout.linear_host, 2) };
    let left: Vec<(u64, usize)> = m.live.lock().unwrap().iter().map(|(&a, &n)| (a, n)).collect();
    assert_eq!(left.len(), 1, "only the second layout's linear frames: {left:?}");
    // SAFETY: the second layout's linear frames, mapped only by the dropped space.
    unsafe { m.deallocate_frames(HostPhysAddr::new(left[0].0), left[0].1) };
}

/// A vCPU with the spec model's TLB for format `F`: it keeps translations (with their D bit)
/// until the invalidations a flush asks for remove them.
trait TlbCpu: ModelCpu {
    type Tlb: Default;
    fn tlb_write(tlb: &mut Self::Tlb, ram: &HostRam, root: u64, hw_ad: bool, gpa: u64) -> Result<u64, String>;
    fn invalidate(tlb: &mut Self::Tlb, root: u64, hw_ad: bool, inv: &twostage_npt::InvalidationOf<'_, Self>);
}

const VMID: u16 = 1;

impl TlbCpu for Sv39x4 {
    type Tlb = model::tlb::GstageTlb;
    fn tlb_write(tlb: &mut Self::Tlb, ram: &HostRam, root: u64, hw_ad: bool, gpa: u64) -> Result<u64, String> {
        let hgatp = model::gstage::Hgatp { mode: model::gstage::HgatpMode::Sv39x4, vmid: VMID, root: model::Hpa(root) }
            .encode();
        let cfg = model::gstage::GstageConfig { hw_ad_update: hw_ad, ..Default::default() };
        tlb.translate(&mut common::ModelMem(ram), hgatp, &cfg, model::Gpa(gpa), model::Access::Write)
            .map(|w| w.hpa.0)
            .map_err(|e| format!("{e:?}"))
    }
    fn invalidate(tlb: &mut Self::Tlb, _root: u64, _hw_ad: bool, inv: &twostage_npt::GvmaInvalidation<'_>) {
        match inv {
            twostage_npt::GvmaInvalidation::None => {}
            twostage_npt::GvmaInvalidation::Addresses { addrs, .. } => {
                for a in addrs.iter() {
                    tlb.hfence_gvma(Some(model::Gpa(a.as_u64())), Some(VMID));
                }
            }
            twostage_npt::GvmaInvalidation::All { .. } => tlb.hfence_gvma(None, Some(VMID)),
            // One modelled hart: a fence meant for the changing hart only is its fence.
            twostage_npt::GvmaInvalidation::Local { addrs: Some(addrs), .. } => {
                for a in addrs.iter() {
                    tlb.hfence_gvma(Some(model::Gpa(a.as_u64())), Some(VMID));
                }
            }
            twostage_npt::GvmaInvalidation::Local { addrs: None, .. } => tlb.hfence_gvma(None, Some(VMID)),
        }
    }
}

fn eptp(root: u64, hw_ad: bool) -> u64 {
    // Memory type WB (6), walk length 4 (3 << 3), A/D enable (bit 6): SDM Vol. 3C 25.6.11.
    root | 6 | 3 << 3 | (hw_ad as u64) << 6
}

impl TlbCpu for Ept4 {
    type Tlb = model::tlb::EptTlb;
    fn tlb_write(tlb: &mut Self::Tlb, ram: &HostRam, root: u64, hw_ad: bool, gpa: u64) -> Result<u64, String> {
        let caps = model::ept::EptCaps::from_msr(common::EPT_CAPS, 48);
        tlb.translate(
            &mut common::ModelMem(ram),
            eptp(root, hw_ad),
            &caps,
            model::Gpa(gpa),
            model::Access::Write.into(),
            model::ept::GuestLinear::NONE,
        )
        .map(|w| w.hpa.0)
        .map_err(|e| format!("{e:?}"))
    }
    fn invalidate(tlb: &mut Self::Tlb, root: u64, hw_ad: bool, inv: &twostage_npt::EptInvalidation) {
        match inv {
            twostage_npt::EptInvalidation::None => {}
            twostage_npt::EptInvalidation::SingleContext { .. } => tlb.invept_single_context(eptp(root, hw_ad)),
        }
    }
}

/// Carries out `f` on `s`, invalidating the vCPU's TLB as asked.
fn flush_tlb<F: TlbCpu>(s: &mut Space<F>, tlb: &mut F::Tlb, f: SpaceFlush<F>) {
    let (root, hw) = (s.root().as_u64(), s.options().ad == AdMode::Hardware);
    s.flush(f, |inv| F::invalidate(tlb, root, hw, inv)).unwrap();
}

/// A store by the TLB-holding vCPU (faults resolved and flushed).
fn tlb_store<F: TlbCpu>(s: &mut Space<F>, tlb: &mut F::Tlb, m: &Checked, at: u64, v: u64) {
    let (root, hw) = (s.root().as_u64(), s.options().ad == AdMode::Hardware);
    for _ in 0..8 {
        match F::tlb_write(tlb, &m.ram, root, hw, at) {
            Ok(hpa) => return m.ram.write_u64(hpa, v),
            Err(_) => match s.handle_fault(NestedPageFaultInfo::new(gpa(at), Access::Write)) {
                FaultOutcome::Resolved { flush } => flush_tlb(s, tlb, flush),
                other => panic!("write at {at:#x}: {other:?}"),
            },
        }
    }
    panic!("write at {at:#x} kept faulting");
}

/// The vCPU keeps running while a round copies and until its flush is carried out: stores in
/// that window go through translations the vCPU cached before the harvest (D already set, or
/// the write right), leaving no trace in the log. The migration still ends equal, because the
/// pages a harvest returns are copied only after its flush.
/// Stores (page, value).
type Stores = Vec<(u16, u64)>;

fn run_stale<F: TlbCpu>(ad: AdMode, before: &[(u16, u64)], steps: &[(Stores, Stores)]) {
    let m = mem(8192);
    let (mut src, layout) = vm::<F>(&m, ad);
    let mut tlb = F::Tlb::default();
    let addr = |page: u16| page_addr(page) + 8 * (u64::from(page) % 512);
    for &(p, v) in before {
        tlb_store(&mut src, &mut tlb, &m, addr(p), v);
    }
    let (mut mig, mut dst, f) = Migration::start(&mut src, m.clone()).unwrap();
    flush_tlb(&mut src, &mut tlb, f);
    for (running, window) in steps {
        for &(p, v) in running {
            tlb_store(&mut src, &mut tlb, &m, addr(p), v);
        }
        let (_, f) = mig.round(&mut src, &mut dst).unwrap();
        // The round returned; its flush is not carried out yet: the vCPU still writes.
        for &(p, v) in window {
            let (root, hw) = (src.root().as_u64(), src.options().ad == AdMode::Hardware);
            // Only stores the cached translations serve (a fault would wait for the lock the
            // round holds, i.e. until after the flush).
            if let Ok(hpa) = F::tlb_write(&mut tlb, &m.ram, root, hw, addr(p)) {
                m.ram.write_u64(hpa, v);
            }
        }
        flush_tlb(&mut src, &mut tlb, f);
    }
    // Pause the vCPU (its TLB state no longer matters), finish.
    let (_, f) = mig.finish(&mut src, &mut dst).unwrap();
    flush_tlb(&mut src, &mut tlb, f);
    check_equal(&mut src, &mut dst, &m);
    drop(src);
    drop(dst);
    // SAFETY: allocated by `vm`, mapped only by the dropped spaces' linear regions.
    unsafe { m.deallocate_frames(layout.linear_host, 2) };
    assert!(m.live.lock().unwrap().is_empty());
}

fn stores(n: usize) -> impl Strategy<Value = Vec<(u16, u64)>> {
    // A small set of pages, so that the window's stores hit cached translations.
    prop::collection::vec((0u16..24, any::<u64>()), 0..n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn stores_through_stale_translations_during_a_round_are_not_lost(
        mode in 0u8..5,
        before in stores(12),
        steps in prop::collection::vec((stores(8), stores(8)), 1..5),
    ) {
        match mode {
            0 => run_stale::<Sv39x4>(AdMode::Hardware, &before, &steps),
            1 => run_stale::<Sv39x4>(AdMode::Software, &before, &steps),
            2 => run_stale::<Sv39x4>(AdMode::Preset, &before, &steps),
            3 => run_stale::<Ept4>(AdMode::Hardware, &before, &steps),
            _ => run_stale::<Ept4>(AdMode::Preset, &before, &steps),
        }
    }
}

/// A whole migration with allocation number `fail_at` (and every later one, until healed)
/// failing: start, rounds and finish either succeed or fail with a typed error; after healing,
/// a failed step is retried (or, for a failed start, the migration started again) and the
/// migration completes equal; nothing leaks. Returns whether the failure was hit.
fn failing_migration<F: ModelCpu>(ad: AdMode, fail_at: u64) -> bool {
    let m = mem(8192);
    let (mut src, layout) = vm::<F>(&m, ad);
    let low = src.region_at(gpa(LOW.0)).unwrap().id();
    src.set_region_huge_pages(low, HugePages::Never);
    for i in 0..40u64 {
        // 4 KiB pages in LOW (every 39th page), one 2 MiB page in HIGH.
        access(&mut src, &m, LOW.0 + i * 13 * 3 * PAGE, Access::Write, i + 1).unwrap();
    }
    for p in (0..2 * MIB).step_by(PAGE as usize) {
        access(&mut src, &m, HIGH.0 + p, Access::Write, p | 1).unwrap();
    }
    let mut hit = false;
    m.ram.fail_after(fail_at);
    let (mut mig, mut dst) = loop {
        match Migration::start(&mut src, m.clone()) {
            Ok((mig, dst, f)) => {
                src.flush(f, |_| {}).unwrap();
                break (mig, dst);
            }
            Err(e) => {
                hit = true;
                assert!(
                    matches!(e, MigrateError::NewSpace(_) | MigrateError::AddRegion(_) | MigrateError::DirtyLog(_)),
                    "{e}"
                );
                assert_eq!(src.dirty_log_range(), None, "a failed start leaves no log");
                src.flush_pending(|_| {});
                m.ram.heal();
            }
        }
    };
    let mut written = 0u64;
    for round in 0..3u64 {
        access(&mut src, &m, LOW.0 + round * 2 * MIB + 8, Access::Write, 100 + round).unwrap_or_else(|| {
            hit = true; // The source's own fault found no frame: heal, the vCPU retries.
            m.ram.heal();
            access(&mut src, &m, LOW.0 + round * 2 * MIB + 8, Access::Write, 100 + round).unwrap()
        });
        written += 1;
        loop {
            match mig.round(&mut src, &mut dst) {
                Ok((_, f)) => {
                    src.flush(f, |_| {}).unwrap();
                    break;
                }
                Err(e) => {
                    hit = true;
                    assert!(matches!(e, MigrateError::OutOfFrames { .. } | MigrateError::DirtyLog(_)), "{e}");
                    src.flush_pending(|_| {});
                    m.ram.heal();
                }
            }
        }
    }
    let _ = written;
    let mut mig = Some(mig);
    while let Some(mg) = mig.take() {
        match mg.finish(&mut src, &mut dst) {
            Ok((_, f)) => src.flush(f, |_| {}).unwrap(),
            Err(MigrateError::Unfinished { migration, .. }) => {
                hit = true;
                src.flush_pending(|_| {});
                m.ram.heal();
                mig = Some(*migration);
            }
            Err(e) => panic!("{e}"),
        }
    }
    m.ram.heal();
    check_equal(&mut src, &mut dst, &m);
    drop(src);
    drop(dst);
    // SAFETY: allocated by `vm`, mapped only by the dropped spaces' linear regions.
    unsafe { m.deallocate_frames(layout.linear_host, 2) };
    assert!(m.live.lock().unwrap().is_empty(), "frames leaked with allocation {fail_at} failing");
    hit
}

#[test]
fn every_allocation_failure_during_a_migration_is_survived() {
    for ad in [AdMode::Hardware, AdMode::Preset] {
        let mut n = 0;
        while failing_migration::<Sv39x4>(ad, n) {
            n += 1;
            assert!(n < 2000, "the migration never completes without a failure");
        }
        assert!(n > 10, "too few allocations to be a meaningful test: {n}");
        println!("{ad:?}: Sv39x4 migration survives each of its {n} allocations failing");
        n = 0;
        while failing_migration::<Ept4>(ad, n) {
            n += 1;
            assert!(n < 2000);
        }
    }
}

/// Under software A/D (RISC-V Svade) the destination's copied pages come with A and D set: the
/// guest, moved, touches its memory without one more exit per page.
#[test]
fn copied_pages_need_no_accessed_dirty_fault_after_moving() {
    for ad in [AdMode::Software, AdMode::Hardware] {
        let m = mem(8192);
        let (mut src, layout) = vm::<Sv39x4>(&m, ad);
        let low = src.region_at(gpa(LOW.0)).unwrap().id();
        src.set_region_huge_pages(low, HugePages::Never);
        let pages: Vec<u64> = (0..50).map(|i| LOW.0 + i * 7 * PAGE).collect();
        for &p in &pages {
            access(&mut src, &m, p, Access::Write, p).unwrap();
        }
        for p in (0..2 * MIB).step_by(PAGE as usize) {
            access(&mut src, &m, HIGH.0 + p, Access::Write, p | 1).unwrap(); // one 2 MiB page
        }
        let (mig, mut dst, f) = Migration::start(&mut src, m.clone()).unwrap();
        src.flush(f, |_| {}).unwrap();
        let (_, f) = mig.finish(&mut src, &mut dst).unwrap();
        src.flush(f, |_| {}).unwrap();
        let before = dst.stats().faults_resolved;
        for &p in &pages {
            assert_eq!(access(&mut dst, &m, p, Access::Read, 0), Some(p));
            access(&mut dst, &m, p + 8, Access::Write, 1).unwrap();
        }
        for p in (0..2 * MIB).step_by(64 * PAGE as usize) {
            assert_eq!(access(&mut dst, &m, HIGH.0 + p, Access::Read, 0), Some(p | 1));
            access(&mut dst, &m, HIGH.0 + p + 8, Access::Write, 1).unwrap();
        }
        assert_eq!(dst.stats().faults_resolved - before, 0, "{ad:?}: faults in the destination after moving");
        drop(src);
        drop(dst);
        // SAFETY: allocated by `vm`, mapped only by the dropped spaces' linear regions.
        unsafe { m.deallocate_frames(layout.linear_host, 2) };
        assert!(m.live.lock().unwrap().is_empty());
    }
}
