//! Linux KVM's RISC-V G-stage behaviours (arch/riscv/kvm: gstage.c, vmid.c, mmu.c) held against
//! twostage-npt's public API and the spec model: hgatp mode and VMIDLEN detection, preset or
//! managed A/D bits, HFENCE.GVMA on map and unmap, write-protect dirty logging, huge-page split.
//! See docs/conformance.md (second section).

mod common;

use common::Ram;
use twostage_npt::testing::HostRam;
use twostage_npt::*;
use twostage_npt::{Hgatp, HgatpCapabilities, HgatpMode};
use twostage_spec_model as model;
use twostage_spec_model::gstage::{cause, GstageConfig, GstageFault, RvFaultKind};
use twostage_spec_model::hgatp_csr::{BareFields, HgatpCsr, UnsupportedMode};
use twostage_spec_model::tlb::GstageTlb;
use twostage_spec_model::{Gpa, Hpa};

const VMID: u16 = 5;
const G: u64 = 0x8000_0000;
const TARGET: u64 = 0x2_0000_0000;
const M2: u64 = 2 << 20;

fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(a)
}
fn hpa(a: u64) -> HostPhysAddr {
    HostPhysAddr::new(a)
}

/// What the probe learns on `csr`: MODE by writing each mode and reading it back (after a write
/// of 0, as twostage-rvh's probe does; KVM goes from Sv57x4 down), VMIDLEN by writing ones to
/// VMID together with `vmid_mode` and counting the ones that stay.
fn probe(csr: &mut HgatpCsr, vmid_mode: u64) -> HgatpCapabilities {
    csr.write(vmid_mode << 60 | 0x3fff << 44);
    let vmid = (csr.read() >> 44) & 0x3fff;
    HgatpCapabilities::from_probe(
        |m| {
            csr.write(0);
            csr.write((m as u64) << 60);
            csr.read() >> 60
        },
        vmid,
    )
}

/// kvm_riscv_gstage_mode_detect and kvm_riscv_gstage_vmid_detect: on harts that implement any
/// set of modes and any VMIDLEN, and that answer an unsupported MODE write with any legal value
/// (the WARL freedom the Privileged spec gives hgatp), the probe finds exactly the modes and
/// VMIDLEN, and every hgatp twostage then makes reads back unchanged (nothing WARL-adjusted).
/// VMIDLEN probed with MODE = Bare (what twostage-rvh and KVM do) is exact only on a hart that
/// keeps VMID under Bare: the spec says the other fields "must be set to zeros" with Bare, so a
/// hart may drop them, and the probe then finds 0 (never more than the truth).
#[test]
fn hgatp_mode_and_vmidlen_detection() {
    let subsets = [[true, false, false], [true, true, false], [true, true, true], [false, false, true]];
    let policies = [UnsupportedMode::KeepOld, UnsupportedMode::Bare, UnsupportedMode::Widest];
    for modes in subsets {
        for unsupported in policies {
            for bare in [BareFields::Kept, BareFields::Zeroed] {
                for vmidlen in [0u8, 1, 7, 14] {
                    let hart = HgatpCsr::new(modes, vmidlen, unsupported, bare);
                    let what = format!("{modes:?} {unsupported:?} {bare:?} VMIDLEN {vmidlen}");
                    let paged = [8u64, 9, 10][modes.iter().position(|&m| m).unwrap()];
                    let exact = probe(&mut { hart }, paged);
                    assert_eq!([exact.sv39x4, exact.sv48x4, exact.sv57x4], modes, "{what}");
                    assert_eq!(exact.vmid_bits, vmidlen, "{what}: VMIDLEN probed with a paged mode");
                    let bare_probe = probe(&mut { hart }, 0);
                    let want = if bare == BareFields::Kept { vmidlen } else { 0 };
                    assert_eq!(bare_probe.vmid_bits, want, "{what}: VMIDLEN probed with Bare");
                    for mode in [HgatpMode::Sv39x4, HgatpMode::Sv48x4, HgatpMode::Sv57x4] {
                        let vmid = ((1u32 << vmidlen) - 1) as u16;
                        match Hgatp::new(mode, vmid, hpa(0x8040_4000), &exact) {
                            Ok(h) => {
                                let mut csr = hart;
                                csr.write(h.bits());
                                assert_eq!(csr.read(), h.bits(), "{what}: {h:?} survives the write");
                            }
                            Err(e) => assert!(!exact.offers(mode), "{what}: {e:?}"),
                        }
                        if exact.offers(mode) && vmidlen < 14 {
                            assert!(Hgatp::new(mode, vmid + 1, hpa(0x8040_4000), &exact).is_err());
                        }
                    }
                }
            }
        }
    }
}

/// An Sv39x4 table with `ad`, its hgatp, and the model configuration that matches it.
fn sv39(ram: &HostRam, ad: AdMode) -> (PageTable<Sv39x4, &HostRam>, u64, GstageConfig) {
    let caps = HgatpCapabilities { sv39x4: true, sv48x4: true, sv57x4: false, vmid_bits: 7 };
    let opts = TableOptions { ad, ..TableOptions::for_format::<Sv39x4>() };
    let t = PageTable::new(ram, opts).unwrap();
    let h = Hgatp::for_table(&t, VMID, &caps).unwrap().bits();
    (t, h, GstageConfig { hw_ad_update: ad == AdMode::Hardware, ..Default::default() })
}

fn fence(tlb: &mut GstageTlb, inv: &GvmaInvalidation<'_>) {
    match inv {
        GvmaInvalidation::None => {}
        GvmaInvalidation::Addresses { addrs, .. } | GvmaInvalidation::Local { addrs: Some(addrs), .. } => {
            addrs.iter().for_each(|a| tlb.hfence_gvma(Some(Gpa(a.as_u64())), Some(VMID)))
        }
        GvmaInvalidation::All { .. } | GvmaInvalidation::Local { addrs: None, .. } => tlb.hfence_gvma(None, Some(VMID)),
    }
}

const ACCESSES: [model::Access; 3] = [model::Access::Read, model::Access::Write, model::Access::Fetch];

fn allows(f: MappingFlags, a: model::Access) -> bool {
    match a {
        model::Access::Read => f.contains(MappingFlags::READ),
        model::Access::Write => f.contains(MappingFlags::WRITE),
        model::Access::Fetch => f.contains(MappingFlags::EXECUTE),
    }
}

/// kvm_riscv_gstage_map_page "always set 'A' and 'D' PTE bits at time of creating G-stage
/// mapping" so that harts without hardware A/D updating (Svade) never fault on them: twostage's
/// Preset mode does the same (D only where writable: a store to a non-writable page faults on
/// its permission first). Every page size, every right, no A/D fault.
#[test]
fn preset_accessed_dirty_never_fault_without_hardware_updating() {
    let rights = [MappingFlags::READ, MappingFlags::RW, MappingFlags::RX, MappingFlags::RWX, MappingFlags::EXECUTE];
    for size in [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G] {
        for flags in rights {
            let ram = HostRam::new(32);
            let (mut t, hgatp, cfg) = sv39(&ram, AdMode::Preset);
            assert!(!cfg.hw_ad_update);
            t.map(gpa(G), hpa(TARGET), size.bytes(), flags, MapSize::Exactly(size)).unwrap().ignore();
            for a in ACCESSES {
                let r = model::gstage::walk(&mut Ram(&ram), hgatp, &cfg, Gpa(G + 0x18), a);
                match r {
                    Ok(w) => assert!(allows(flags, a) && w.hpa == Hpa(TARGET + 0x18)),
                    Err(GstageFault::GuestPage(f)) => {
                        assert!(!allows(flags, a), "{size:?} {flags:?} {a:?}: {f:?}");
                        assert_eq!((f.reason, f.cause), (RvFaultKind::Permission, cause::guest_page_fault(a)));
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
        }
    }
}

/// The managed alternative on Svade harts: leaves start with A and D clear, the first access
/// faults (load/store guest-page fault, the GPA in htval), the hypervisor sets the bits with
/// `set_accessed_dirty` and fences the address it names; and on Svadu harts (hardware updating)
/// the walk sets them and the engine's harvest reports them.
#[test]
fn managed_accessed_dirty_software_and_hardware() {
    let ram = HostRam::new(32);
    let (mut t, hgatp, cfg) = sv39(&ram, AdMode::Software);
    t.map(gpa(G), hpa(TARGET), 4096, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
    let mut tlb = GstageTlb::new();
    for (access, reason, bits) in [
        (model::Access::Read, RvFaultKind::AccessedClear, (true, false)),
        (model::Access::Write, RvFaultKind::DirtyClear, (true, true)),
    ] {
        match tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(G + 8), access) {
            Err(GstageFault::GuestPage(f)) => {
                assert_eq!((f.reason, f.cause, f.htval), (reason, cause::guest_page_fault(access), (G + 8) >> 2));
            }
            other => panic!("{access:?}: {other:?}"),
        }
        let a = if access == model::Access::Write { Access::Write } else { Access::Read };
        let f = t.set_accessed_dirty(gpa(G + 8), a).unwrap();
        // Setting A/D only widens the leaf: the faulting hart fences, no other must.
        assert_eq!(f.invalidation(), GvmaInvalidation::Local { root: t.root(), addrs: Some(&[gpa(G)]) });
        t.flush(f, |inv| fence(&mut tlb, inv)).unwrap();
        assert!(tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(G + 8), access).is_ok());
        let l = t.query(gpa(G)).unwrap();
        assert_eq!((l.accessed, l.dirty), bits);
    }
    let (mut t, hgatp, cfg) = sv39(&ram, AdMode::Hardware);
    t.map(gpa(G), hpa(TARGET), M2, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
    model::gstage::walk(&mut Ram(&ram), hgatp, &cfg, Gpa(G + 0x1234), model::Access::Write).unwrap();
    let mut seen = Vec::new();
    let f = t.take_accessed_dirty(gpa(G), M2, AdClear::Dirty, |l| seen.push((l.gpa, l.accessed, l.dirty)));
    assert_eq!(seen, vec![(gpa(G), true, true)]);
    assert_eq!(f.invalidation(), GvmaInvalidation::Addresses { root: t.root(), addrs: &[gpa(G)] });
    t.flush(f, |_| {}).unwrap();
}

/// kvm_riscv_gstage_set_pte fences a new leaf unless it replaced an invalid entry on a hart with
/// Svvptc; kvm_riscv_gstage_unmap_range fences what it cleared. twostage assumes no Svvptc and
/// goes further than KVM where a table is linked: a map that creates an intermediate table changes
/// a non-leaf entry, and the Privileged spec ("Supervisor Memory-Management Fence Instruction":
/// after modifying a non-leaf PTE, fence with rs1 = x0) asks for the whole VMID there, where KVM
/// fences only the leaf's range. A leaf-only change is fenced by its address; tables freed widen
/// the fence to the whole VMID.
#[test]
fn hfence_on_map_and_unmap() {
    let ram = HostRam::new(32);
    let (mut t, hgatp, cfg) = sv39(&ram, AdMode::Preset);
    let mut tlb = GstageTlb::new();
    let r = model::Access::Read;
    let go = |tlb: &mut GstageTlb, at: u64| tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(at), r);
    assert!(go(&mut tlb, G + 0x1f_f000).is_err(), "the guest touches the region before it is mapped");
    let f = t.map(gpa(G), hpa(TARGET), M2, MappingFlags::RWX, MapSize::Largest).unwrap();
    // A table was linked into an empty entry: the whole VMID, on the hart that made the change
    // (another hart that cached the invalid entry faults, and its stale fault fences it).
    assert_eq!(f.invalidation(), GvmaInvalidation::Local { root: t.root(), addrs: None }, "a table was linked");
    assert!(go(&mut tlb, G + 0x1f_f000).is_err(), "stale invalid entry until the fence");
    t.flush(f, |inv| fence(&mut tlb, inv)).unwrap();
    assert_eq!(go(&mut tlb, G + 0x1f_f000).unwrap().hpa, Hpa(TARGET + 0x1f_f000));
    let f = t.unmap(gpa(G), M2).unwrap();
    assert!(go(&mut tlb, G + 0x10_0000).is_ok(), "stale translation until the fence");
    t.flush(f, |inv| fence(&mut tlb, inv)).unwrap();
    assert!(go(&mut tlb, G + 0x10_0000).is_err());
    // 4 KiB pages in a table of their own: unmapping all of them frees the table.
    t.map(gpa(G), hpa(TARGET), 3 * 4096, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
    let f = t.unmap(gpa(G), M2).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::All { root: t.root() });
    t.flush(f, |_| {}).unwrap();
}

/// kvm_riscv_gstage_wp_range clears W in the leaves of a logged range, huge ones included, and
/// the write fault that follows splits a huge page to 4 KiB and gives write back to one page
/// (kvm_riscv_gstage_map_page with dirty logging). The same with the engine: protect, fault
/// (store guest-page fault), split, protect one 4 KiB page RW; only that page became writable.
#[test]
fn write_protect_dirty_logging_and_split_on_the_write_fault() {
    let ram = HostRam::new(32);
    let (mut t, hgatp, cfg) = sv39(&ram, AdMode::Preset);
    let mut tlb = GstageTlb::new();
    t.map(gpa(G), hpa(TARGET), M2, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
    let w = model::Access::Write;
    let go = |tlb: &mut GstageTlb, at: u64| tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(at), w);
    assert!(go(&mut tlb, G + 0x3008).is_ok());
    let f = t.protect(gpa(G), M2, MappingFlags::READ).unwrap();
    t.flush(f, |inv| fence(&mut tlb, inv)).unwrap();
    match go(&mut tlb, G + 0x3008) {
        Err(GstageFault::GuestPage(f)) => {
            assert_eq!((f.cause, f.gpa), (cause::STORE_GUEST_PAGE_FAULT, Gpa(G + 0x3008)))
        }
        other => panic!("{other:?}"),
    }
    let f = t.split(gpa(G + 0x3008)).unwrap();
    // The entry that was the 2 MiB leaf now points at a table: a non-leaf change, so the whole
    // VMID is fenced (KVM fences the huge page's range after kvm_riscv_gstage_split_huge).
    assert_eq!(f.invalidation(), GvmaInvalidation::All { root: t.root() });
    t.flush(f, |inv| fence(&mut tlb, inv)).unwrap();
    let f = t.protect(gpa(G + 0x3000), 4096, MappingFlags::RW).unwrap();
    t.flush(f, |inv| fence(&mut tlb, inv)).unwrap();
    assert!(go(&mut tlb, G + 0x3008).is_ok());
    for other in [G, G + 0x2000, G + 0x4000, G + M2 - 4096] {
        assert!(go(&mut tlb, other).is_err(), "{other:#x} is still write-protected");
    }
}

/// kvm_riscv_gstage_split_huge: children inherit the huge PTE with their offset; the parent is
/// relinked and the huge page's range fenced. twostage's split: every 4 KiB / 2 MiB child
/// translates as the huge page did and keeps its rights and A/D bits; the fence names the huge
/// page's address, which drops its cached translation whatever address it was cached for.
#[test]
fn huge_page_split_keeps_translations() {
    let ram = HostRam::new(32);
    let (mut t, hgatp, cfg) = sv39(&ram, AdMode::Hardware);
    let g1 = PageSize::Size1G;
    t.map(gpa(1 << 30), hpa(TARGET), g1.bytes(), MappingFlags::RX, MapSize::Exactly(g1)).unwrap().ignore();
    model::gstage::walk(&mut Ram(&ram), hgatp, &cfg, Gpa((1 << 30) + 0x100), model::Access::Read).unwrap();
    let mut tlb = GstageTlb::new();
    let offsets = [0u64, 0x1008, M2 - 8, M2, 0x1234_5678, (1 << 30) - 8];
    for off in offsets {
        tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa((1 << 30) + off), model::Access::Read).unwrap();
    }
    let f = t.split(gpa(1 << 30)).unwrap();
    assert_eq!(f.invalidation(), GvmaInvalidation::All { root: t.root() }, "a table replaced the leaf");
    t.flush(f, |inv| fence(&mut tlb, inv)).unwrap();
    assert!(tlb.cached(VMID, Gpa((1 << 30) + 0x1234_5678)).is_none(), "the gigapage is forgotten");
    let f = t.split(gpa((1 << 30) + M2)).unwrap();
    t.flush(f, |inv| fence(&mut tlb, inv)).unwrap();
    for off in offsets {
        let at = (1 << 30) + off;
        let l = t.query(gpa(at)).unwrap();
        let want = if (M2..2 * M2).contains(&off) { PageSize::Size4K } else { PageSize::Size2M };
        assert_eq!((l.size, l.flags, l.accessed, l.dirty), (want, MappingFlags::RX, true, false), "+{off:#x}");
        let w = tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(at), model::Access::Fetch).unwrap();
        assert_eq!(w.hpa, Hpa(TARGET + off));
        assert!(tlb.translate(&mut Ram(&ram), hgatp, &cfg, Gpa(at), model::Access::Write).is_err());
    }
}
