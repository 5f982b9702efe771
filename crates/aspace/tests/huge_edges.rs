//! Huge backing never maps a page across a region's edge or over an MMIO hole, held against
//! the spec model: random layouts of RAM regions, MMIO holes and gaps are touched by a vCPU,
//! populated, forked (copy-on-write breaks copying whole 2 MiB pages) and migrated (the
//! destination rebuilding 2 MiB pages); then, in every space, the spec model's walk of the real
//! table is asked for every page: each translation's page (of the size the model's walk found)
//! lies wholly inside one RAM region, and no MMIO or hole page translates.

mod common;
use common::{gpa, ModelCpu, ModelMem, Ram, EPT_CAPS};
use proptest::prelude::*;
use twostage_aspace::migrate::Migration;
use twostage_aspace::*;
use twostage_npt::testing::HostRam;
use twostage_npt::{Access, AdMode, Ept4, MappingFlags, NestedPageFaultInfo, Sv39x4, TableOptions};
use twostage_spec_model as model;

/// The spec model's walk, reporting the size of the page it found.
trait SizedWalk: ModelCpu {
    /// `(host address, page bytes)` of a read of `gpa`, or `None` if the walk faults.
    fn walk_sized(ram: &HostRam, root: u64, hw_ad: bool, gpa: u64) -> Option<(u64, u64)>;
}

fn bytes(size: model::PageSize) -> u64 {
    match size {
        model::PageSize::Size4K => 1 << 12,
        model::PageSize::Size2M => 1 << 21,
        model::PageSize::Size1G => 1 << 30,
        _ => 1 << 39,
    }
}

impl SizedWalk for Sv39x4 {
    fn walk_sized(ram: &HostRam, root: u64, hw_ad: bool, gpa: u64) -> Option<(u64, u64)> {
        let hgatp =
            model::gstage::Hgatp { mode: model::gstage::HgatpMode::Sv39x4, vmid: 1, root: model::Hpa(root) }.encode();
        let cfg = model::gstage::GstageConfig { hw_ad_update: hw_ad, ..Default::default() };
        let w = model::gstage::walk(&mut ModelMem(ram), hgatp, &cfg, model::Gpa(gpa), model::Access::Read).ok()?;
        Some((w.hpa.0, bytes(w.page_size)))
    }
}

impl SizedWalk for Ept4 {
    fn walk_sized(ram: &HostRam, root: u64, hw_ad: bool, gpa: u64) -> Option<(u64, u64)> {
        let caps = model::ept::EptCaps::from_msr(EPT_CAPS, 48);
        // EPTP: memory type WB (6), walk length 4 (3 << 3), A/D enable (bit 6): SDM Vol. 3C 25.6.11.
        let eptp = root | 6 | 3 << 3 | (hw_ad as u64) << 6;
        let w = model::ept::walk(
            &mut ModelMem(ram),
            eptp,
            &caps,
            model::Gpa(gpa),
            model::Access::Read.into(),
            model::ept::GuestLinear::NONE,
        )
        .ok()?;
        Some((w.hpa.0, bytes(w.page_size)))
    }
}

const RAM: u64 = 0x8000_0000;
const PAGE: u64 = 4096;
/// The span the layouts use: 12 MiB.
const SPAN: u64 = 3072;

type Space<F> = AddressSpace<F, Ram>;

/// A vCPU write through the model's walk (faults resolved). `false` if out of memory.
fn store<F: ModelCpu>(s: &mut Space<F>, ram: &HostRam, at: u64, v: u64) -> bool {
    let hw = s.options().ad == AdMode::Hardware;
    for _ in 0..8 {
        match F::model_walk(ram, s.root().as_u64(), hw, gpa(at), Access::Write) {
            Ok(hpa) => {
                ram.write_u64(hpa, v);
                return true;
            }
            Err(_) => match s.handle_fault(NestedPageFaultInfo::new(gpa(at), Access::Write)) {
                FaultOutcome::Resolved { flush } => s.flush(flush, |_| {}).unwrap(),
                FaultOutcome::OutOfMemory { .. } => return false,
                other => panic!("write at {at:#x}: {other:?}"),
            },
        }
    }
    panic!("write at {at:#x} kept faulting");
}

/// Every page of the span (and one page either side) through the model's walk of `s`.
fn check_edges<F: SizedWalk>(s: &Space<F>, ram: &HostRam, what: &str) -> u64 {
    let hw = s.options().ad == AdMode::Hardware;
    let mut huge = 0;
    for p in 0..SPAN + 2 {
        let at = RAM - PAGE + p * PAGE;
        let region = s.region_at(gpa(at)).cloned();
        let ram_region = region.as_ref().filter(|r| r.backend() != Backend::Mmio);
        match F::walk_sized(ram, s.root().as_u64(), hw, at) {
            None => {}
            Some((hpa, size)) => {
                let Some(r) = ram_region else {
                    panic!("{what}: {at:#x} translates but is MMIO or a hole: {region:?}");
                };
                let base = at & !(size - 1);
                assert!(
                    r.range().contains(gpa(base)) && r.range().contains(gpa(base + size - 1)),
                    "{what}: a {size:#x}-byte page at {base:#x} crosses the edge of {r:?}"
                );
                assert_eq!(hpa % size, at % size, "{what}: a huge page's frames are aligned");
                if size > PAGE && at == base {
                    huge += 1;
                }
            }
        }
    }
    huge
}

/// A region layout: (start page, pages, MMIO?), laid out without overlap (overlaps dropped).
fn layout() -> impl Strategy<Value = Vec<(u16, u16, bool)>> {
    prop::collection::vec((0u16..SPAN as u16, 1u16..1536, prop::bool::weighted(0.25)), 1..7)
}

fn run<F: SizedWalk>(ad: AdMode, regions: &[(u16, u16, bool)], touches: &[u16], child_writes: &[u16]) -> u64 {
    let ram: Ram = std::sync::Arc::new(HostRam::new(16384));
    let mut s: Space<F> =
        AddressSpace::new(ram.clone(), TableOptions { ad, ..TableOptions::for_format::<F>() }).unwrap();
    s.set_huge_pages(HugePages::Always);
    let mut anon = Vec::new();
    for &(start, pages, mmio) in regions {
        let end = (u64::from(start) + u64::from(pages)).min(SPAN);
        let Some(r) =
            twostage_npt::GpaRange::from_start_len(gpa(RAM + u64::from(start) * PAGE), (end - u64::from(start)) * PAGE)
        else {
            continue;
        };
        if r.is_empty() {
            continue;
        }
        let backend = if mmio { Backend::Mmio } else { Backend::DemandZero };
        if let Ok((id, f)) = s.add_region("r", r, MappingFlags::RW, backend) {
            s.flush_unloaded(f).unwrap();
            if !mmio {
                anon.push(id);
            }
        }
    }
    let is_ram = |s: &Space<F>, at: u64| s.region_at(gpa(at)).is_some_and(|r| r.backend() != Backend::Mmio);
    for &t in touches {
        let at = RAM + u64::from(t) % SPAN * PAGE + 8;
        if is_ram(&s, at) {
            assert!(store(&mut s, &ram, at, at));
        }
    }
    // One region populated whole: huge pages wherever a block fits.
    if let Some(&id) = anon.first() {
        let f = s.populate(id).unwrap();
        s.flush(f, |_| {}).unwrap();
    }
    let mut huge = check_edges(&s, &ram, "touched");
    // Fork: the child's writes copy whole 2 MiB pages.
    let (mut child, f) = s.fork().unwrap();
    s.flush(f, |_| {}).unwrap();
    for &t in child_writes {
        let at = RAM + u64::from(t) % SPAN * PAGE + 16;
        if is_ram(&child, at) {
            assert!(store(&mut child, &ram, at, 1));
        }
    }
    huge += check_edges(&child, &ram, "child");
    huge += check_edges(&s, &ram, "parent");
    // Migration: the destination rebuilds 2 MiB pages.
    let (mig, mut dst, f) = Migration::start(&mut s, ram.clone()).unwrap();
    s.flush(f, |_| {}).unwrap();
    let (_, f) = mig.finish(&mut s, &mut dst).unwrap();
    s.flush(f, |_| {}).unwrap();
    huge += check_edges(&dst, &ram, "migrated");
    huge
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn no_huge_page_crosses_a_region_edge_or_covers_mmio_per_model(
        fmt in 0u8..3,
        regions in layout(),
        touches in prop::collection::vec(0u16..SPAN as u16, 0..40),
        child_writes in prop::collection::vec(0u16..SPAN as u16, 0..20),
    ) {
        match fmt {
            0 => run::<Sv39x4>(AdMode::Hardware, &regions, &touches, &child_writes),
            1 => run::<Ept4>(AdMode::Hardware, &regions, &touches, &child_writes),
            _ => run::<Ept4>(AdMode::Preset, &regions, &touches, &child_writes),
        };
    }
}

/// The check can fail: a layout whose RAM holds whole 2 MiB blocks produces huge pages that it
/// examines (so the property above is not vacuous).
#[test]
fn layouts_with_room_get_huge_pages() {
    let regions = [(0u16, 1100u16, false), (1100, 1, true), (1101, 1971, false)];
    let touches: Vec<u16> = (0..SPAN as u16).step_by(97).collect();
    let huge = run::<Sv39x4>(AdMode::Hardware, &regions, &touches, &[3, 600, 1500]);
    assert!(huge >= 8, "{huge} huge pages examined");
}
