//! kvm-unit-tests x86/vmx_tests.c EPT cases held against the engine: tables built by twostage-npt
//! (through its public API only) are walked by the independent spec model, and the outcomes and
//! exit qualifications are the ones kvm-unit-tests expects of hardware. See docs/conformance.md.

mod common;

use common::Ram;
use twostage_npt::testing::HostRam;
use twostage_npt::FlagsError;
use twostage_npt::*;
use twostage_npt::{EptCapabilities, EptMemoryType, EptPointer, EptPointerError};
use twostage_spec_model as model;
use twostage_spec_model::ept::{qual, EptAccess, EptCaps, EptExit, EptMemType, GuestLinear};
use twostage_spec_model::memtype::{self, MemoryType, PatType};
use twostage_spec_model::{Gpa, Hpa};

/// Bochs corei7_skylake_x and corei7_sandy_bridge_2600k (README "Platform notes").
const SKYLAKE_X: u64 = 0xf0106334141;
const SANDY_BRIDGE: u64 = 0xf0106114141;
const MAXPHY: u8 = 46;
/// kvm-unit-tests' data->gpa; the host side is 1 GiB-aligned and outside HostRam (never read).
const GPA: u64 = 1 << 39;
const TARGET: u64 = 0x80_4000_0000;
const LA: u64 = qual::GLA_VALID | qual::GLA_TRANSLATION;

fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(a)
}
fn hpa(a: u64) -> HostPhysAddr {
    HostPhysAddr::new(a)
}

/// An Ept4 table for a CPU with `cap`, hardware A/D when `ad` (and offered), and its EPTP.
fn table(ram: &HostRam, cap: u64, ad: bool) -> (PageTable<Ept4, &HostRam>, u64, EptCaps) {
    let caps = EptCapabilities::new(cap, MAXPHY);
    let t = PageTable::new(ram, caps.table_options(ad)).unwrap();
    let eptp = EptPointer::for_table(&t, &caps).unwrap().bits();
    (t, eptp, EptCaps::from_msr(cap, MAXPHY))
}

fn walk(ram: &HostRam, eptp: u64, caps: &EptCaps, at: u64, access: EptAccess) -> Result<model::ept::EptWalk, EptExit> {
    model::ept::walk(&mut Ram(ram), eptp, caps, Gpa(at), access, GuestLinear::TRANSLATION)
}

/// (op, guest-physical offset, EPT access): kvm-unit-tests reads and writes gva[0] and calls
/// gva[1], 8 bytes in (exec-user is the same as exec without mode-based execute control).
const OPS: [(&str, u64, EptAccess); 3] =
    [("read", 0, EptAccess::READ), ("write", 0, EptAccess::WRITE), ("exec", 8, EptAccess::FETCH)];

/// The ept_access_test_* permission cases at the leaf, for every page size the engine makes:
/// each mapping is an engine leaf, and the walk's verdict is kvm-unit-tests' (None: allowed).
#[test]
fn ept_access_cases_on_engine_leaves_of_every_size() {
    type Q = Option<u64>;
    let (rd, wr, fe) = (qual::READ, qual::WRITE, qual::FETCH);
    let (pr, pw, px) = (qual::READABLE, qual::WRITABLE, qual::EXECUTABLE);
    let cases: [(&str, MappingFlags, [Q; 3]); 5] = [
        ("read_only", MappingFlags::READ, [None, Some(wr | pr), Some(fe | pr)]),
        ("read_write", MappingFlags::RW, [None, None, Some(fe | pr | pw)]),
        ("execute_only", MappingFlags::EXECUTE, [Some(rd | px), Some(wr | px), None]),
        ("read_execute", MappingFlags::RX, [None, Some(wr | pr | px), None]),
        ("read_write_execute", MappingFlags::RWX, [None, None, None]),
    ];
    for (cap, ad) in [(SKYLAKE_X, false), (SKYLAKE_X, true), (SANDY_BRIDGE, false)] {
        for size in [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G] {
            let ram = HostRam::new(32);
            let (mut t, eptp, caps) = table(&ram, cap, ad);
            if !t.options().leaf_sizes.contains(size) {
                continue; // sandy_bridge: no 1 GiB EPT pages
            }
            // ept_access_test_not_present: nothing mapped.
            for ((op, off, access), want) in OPS.iter().zip([rd, wr, fe]) {
                match walk(&ram, eptp, &caps, GPA + off, *access) {
                    Err(EptExit::Violation { qualification, .. }) => assert_eq!(qualification, want | LA, "{op}"),
                    other => panic!("not present, {op}: {other:?}"),
                }
            }
            for (name, flags, wants) in cases {
                t.map(gpa(GPA), hpa(TARGET), size.bytes(), flags, MapSize::Exactly(size)).unwrap().ignore();
                for ((op, off, access), want) in OPS.iter().zip(wants) {
                    let r = walk(&ram, eptp, &caps, GPA + off, *access);
                    let what = format!("{name} {size:?} {op} cap {cap:#x} A/D {ad}");
                    match (want, r) {
                        (None, Ok(w)) => assert_eq!((w.hpa, w.page_size as u8), (Hpa(TARGET + off), size as u8)),
                        (Some(q), Err(EptExit::Violation { qualification, gpa: g })) => {
                            assert_eq!((qualification, g), (q | LA, Gpa(GPA + off)), "{what}");
                        }
                        (want, got) => panic!("{what}: expected {want:?}, got {got:?}"),
                    }
                }
                t.unmap(gpa(GPA), size.bytes()).unwrap().ignore();
            }
        }
    }
}

/// ept_access_test_write_only / _write_execute (misconfigurations in hardware) and
/// _execute_only without the capability: the engine refuses to build such entries at all.
#[test]
fn misconfiguring_rights_are_refused_by_the_engine() {
    let ram = HostRam::new(32);
    let (mut t, _, _) = table(&ram, SKYLAKE_X, false);
    let w = MappingFlags::WRITE;
    let wx = MappingFlags::WRITE | MappingFlags::EXECUTE;
    for flags in [w, wx] {
        let e = t.map(gpa(GPA), hpa(TARGET), 4096, flags, MapSize::Largest).unwrap_err();
        assert_eq!(e, MapError::BadFlags { flags, reason: FlagsError::WriteWithoutRead });
    }
    t.map(gpa(GPA), hpa(TARGET), 4096, MappingFlags::READ, MapSize::Largest).unwrap().ignore();
    assert!(matches!(t.protect(gpa(GPA), 4096, w), Err(RangeError::BadFlags { .. })));
    assert!(matches!(t.remap(gpa(GPA), hpa(TARGET), wx), Err(RemapError::BadFlags { .. })));
    let no_xo = EptCapabilities::new(SKYLAKE_X & !1, MAXPHY);
    let mut t = PageTable::<Ept4, _>::new(&ram, no_xo.table_options(false)).unwrap();
    let x = MappingFlags::EXECUTE;
    let e = t.map(gpa(GPA), hpa(TARGET), 4096, x, MapSize::Largest).unwrap_err();
    assert_eq!(e, MapError::BadFlags { flags: x, reason: FlagsError::ExecuteOnlyUnsupported });
}

/// Every entry of an engine table, as (level, raw), read the way the hardware reads them.
fn entries(ram: &HostRam, table: u64, level: usize, out: &mut Vec<(usize, u64, u64)>) {
    for i in 0..512 {
        let pa = table + i * 8;
        let e = ram.read_u64(pa);
        if e & 7 == 0 {
            continue;
        }
        out.push((level, pa, e));
        if level > 0 && !(level <= 2 && e & 1 << 7 != 0) {
            entries(ram, e & 0x000f_ffff_ffff_f000, level - 1, out);
        }
    }
}

/// ept_access_test_reserved_bits and _ignored_bits, from the engine's side: the entries it writes
/// set no reserved bit (for any MAXPHYADDR above its addresses) and none of the ignored bits
/// 10, 11, 52-63; and bits set there by someone else change nothing the engine reads back.
#[test]
fn engine_entries_keep_reserved_and_ignored_bits_clear() {
    let ram = HostRam::new(64);
    let (mut t, eptp, _) = table(&ram, SKYLAKE_X, true);
    let all = [MappingFlags::READ, MappingFlags::RW, MappingFlags::RX, MappingFlags::RWX, MappingFlags::EXECUTE];
    let mut at = GPA;
    for size in [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G] {
        for f in all.iter().flat_map(|&f| [f, f | MappingFlags::DEVICE, f | MappingFlags::UNCACHED]) {
            at = at.next_multiple_of(size.bytes());
            t.map(gpa(at), hpa(TARGET + (at - GPA)), size.bytes(), f, MapSize::Exactly(size)).unwrap().ignore();
            at += size.bytes();
        }
    }
    let mut seen = Vec::new();
    entries(&ram, t.root().as_u64(), 3, &mut seen);
    for &(level, _, e) in &seen {
        let leaf = level == 0 || (level <= 2 && e & 1 << 7 != 0);
        assert_eq!(e & 0xfff0_0000_0000_0c00, 0, "ignored bits 63:52, 11:10 in {e:#x}");
        assert_eq!(e & 0x000f_c000_0000_0000, 0, "bits 51:46 (reserved at MAXPHYADDR 46) in {e:#x}");
        if leaf {
            assert!(matches!((e >> 3) & 7, 0 | 6), "leaf memory type in {e:#x}");
        } else {
            assert_eq!(e & 0xf8, 0, "non-leaf bits 7:3 in {e:#x}");
        }
    }
    // Every mapped page walks cleanly under every MAXPHYADDR from 40 (the addresses' width) up.
    let leaves: Vec<Leaf> = {
        let mut v = Vec::new();
        t.for_each_leaf(gpa(GPA), at - GPA, |l| v.push(*l));
        v
    };
    for m in [40u8, 46, 52] {
        let caps = EptCaps::from_msr(SKYLAKE_X, m);
        for l in &leaves {
            let r = walk(&ram, eptp, &caps, l.gpa.as_u64(), EptAccess::FETCH);
            assert!(!matches!(r, Err(EptExit::Misconfig { .. })), "MAXPHYADDR {m}: {r:?}");
        }
    }
    // Someone sets the ignored bits everywhere: the engine reads the same leaves.
    for &(_, pa, e) in &seen {
        ram.write_u64(pa, e | 0xfff0_0000_0000_0c00);
    }
    for l in &leaves {
        assert_eq!(t.query(l.gpa).as_ref(), Some(l), "ignored bits changed the engine's reading");
    }
}

/// ept_access_test_force_2m_page: a 2 MiB leaf read; read-only 2 MiB leaf written (WR | PERM_RD);
/// write-only 2 MiB leaf (a misconfiguration) refused.
#[test]
fn ept_access_test_force_2m_page() {
    let ram = HostRam::new(32);
    let (mut t, eptp, caps) = table(&ram, SKYLAKE_X, false);
    let m2 = PageSize::Size2M;
    t.map(gpa(GPA), hpa(TARGET), m2.bytes(), MappingFlags::RWX, MapSize::Exactly(m2)).unwrap().ignore();
    let w = walk(&ram, eptp, &caps, GPA, EptAccess::READ).unwrap();
    assert_eq!((w.hpa, w.page_size), (Hpa(TARGET), model::PageSize::Size2M));
    let f = t.protect(gpa(GPA), m2.bytes(), MappingFlags::READ).unwrap();
    assert_eq!(f.invalidation(), EptInvalidation::SingleContext { root: t.root() });
    t.flush(f, |_| {}).unwrap();
    assert_eq!(t.query(gpa(GPA)).unwrap().size, m2, "protecting the whole page keeps it 2 MiB");
    match walk(&ram, eptp, &caps, GPA, EptAccess::WRITE) {
        Err(EptExit::Violation { qualification, .. }) => assert_eq!(qualification, qual::WRITE | qual::READABLE | LA),
        other => panic!("{other:?}"),
    }
    assert!(matches!(t.protect(gpa(GPA), m2.bytes(), MappingFlags::WRITE), Err(RangeError::BadFlags { .. })));
}

/// test_ept_eptp: every EPTP the engine makes passes the model's VM-entry checks, and it refuses
/// exactly the memory types, walk lengths, A/D flag and roots those checks would fail.
#[test]
fn ept_pointer_agrees_with_the_vm_entry_checks() {
    let caps_list = [SKYLAKE_X, SANDY_BRIDGE, SKYLAKE_X | 1 << 7, SKYLAKE_X & !(1 << 14), SKYLAKE_X & !(1 << 8)];
    for cap in caps_list {
        for m in [36u8, 39, 46, 52] {
            let ours = EptCapabilities::new(cap, m);
            let theirs = EptCaps::from_msr(cap, m);
            let mut roots = vec![0x1000u64, 0x12_3000];
            roots.extend((12..56).map(|b| 1u64 << b));
            for root in roots {
                for walk_len in 0..=8u8 {
                    for ad in [false, true] {
                        for mt in [EptMemoryType::WriteBack, EptMemoryType::Uncacheable] {
                            let r = EptPointer::with_memory_type(hpa(root), walk_len, ad, mt, &ours);
                            // The value VM entry would see for the same request.
                            let raw = root | (walk_len.wrapping_sub(1) as u64 & 7) << 3 | (ad as u64) << 6 | mt as u64;
                            let legal = (1..=8).contains(&walk_len) && model::ept::Eptp::decode(raw, &theirs).is_ok();
                            let what = format!("cap {cap:#x} M {m} root {root:#x} walk {walk_len} A/D {ad} {mt:?}");
                            match r {
                                Ok(p) => {
                                    assert!(legal, "{what}: engine made {p:?}, VM entry would fail");
                                    let d = model::ept::Eptp::decode(p.bits(), &theirs).unwrap();
                                    assert_eq!(
                                        (d.root, d.levels, d.accessed_dirty),
                                        (Hpa(root), walk_len, ad),
                                        "{what}"
                                    );
                                    assert_eq!(d.memory_type as u8, mt as u8, "{what}");
                                }
                                Err(e) => {
                                    assert!(!legal, "{what}: engine refused ({e:?}) a valid EPTP");
                                    if let EptPointerError::BadRoot(r) = e {
                                        assert_eq!(r, hpa(root));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// "EPT - unsupported INVEPT" from the other side: the INVEPT the engine's flush tokens ask for
/// (single-context on the table's own EPTP) is an operand the CPU accepts; type 0 never arises.
#[test]
fn the_engines_invept_is_a_valid_operand() {
    use model::tlb::operands::{invept, invept_type};
    for (cap, ad) in [(SKYLAKE_X, true), (SKYLAKE_X, false), (SANDY_BRIDGE, false)] {
        let ram = HostRam::new(32);
        let (mut t, eptp, caps) = table(&ram, cap, ad);
        t.map(gpa(GPA), hpa(TARGET), 4096, MappingFlags::RW, MapSize::Largest).unwrap().ignore();
        let f = t.protect(gpa(GPA), 4096, MappingFlags::READ).unwrap();
        let EptInvalidation::SingleContext { root } = f.invalidation() else { panic!("{f:?}") };
        assert_eq!(root, t.root());
        assert_eq!(eptp & 0x000f_ffff_ffff_f000, root.as_u64(), "the token names this EPTP's root");
        assert_eq!(invept(invept_type::SINGLE_CONTEXT, eptp, &caps), Ok(()));
        t.flush(f, |_| {}).unwrap();
    }
}

/// "EPT basic framework" (and its A/D-enabled twin): a remapped page is seen through a TLB only
/// after the INVEPT the engine asks for; with EPT A/D, reads set A and writes set D in the
/// engine's leaf, and harvesting them asks for an INVEPT too.
#[test]
fn ept_basic_framework_remap_and_accessed_dirty() {
    let (page1, page2) = (TARGET, TARGET + 0x1000);
    for ad in [false, true] {
        let ram = HostRam::new(32);
        let (mut t, eptp, caps) = table(&ram, SKYLAKE_X, ad);
        let mut tlb = model::tlb::EptTlb::new();
        let go = |tlb: &mut model::tlb::EptTlb, a: EptAccess| {
            tlb.translate(&mut Ram(&ram), eptp, &caps, Gpa(GPA), a, GuestLinear::TRANSLATION).map(|w| w.hpa.0)
        };
        // data_page1's GPA maps data_page2.
        t.map(gpa(GPA), hpa(page2), 4096, MappingFlags::RWX, MapSize::Largest).unwrap().ignore();
        assert_eq!(go(&mut tlb, EptAccess::READ), Ok(page2));
        let l = t.query(gpa(GPA)).unwrap();
        assert_eq!((l.accessed, l.dirty), (true, !ad), "A/D {ad}: A after a read (preset A and D without EPT A/D)");
        assert_eq!(go(&mut tlb, EptAccess::WRITE), Ok(page2));
        assert!(t.query(gpa(GPA)).unwrap().dirty);
        let f = t.remap(gpa(GPA), hpa(page1), MappingFlags::RWX).unwrap();
        assert_eq!(go(&mut tlb, EptAccess::READ), Ok(page2), "stale until the INVEPT");
        t.flush(f, |inv| match inv {
            EptInvalidation::SingleContext { root } => {
                assert_eq!(root.as_u64(), eptp & 0x000f_ffff_ffff_f000);
                tlb.invept_single_context(eptp);
            }
            other => panic!("{other:?}"),
        })
        .unwrap();
        assert_eq!(go(&mut tlb, EptAccess::READ), Ok(page1));
        if ad {
            let mut seen = 0;
            let f = t.take_accessed_dirty(gpa(GPA), 4096, AdClear::Both, |l| {
                seen += 1;
                assert!(l.accessed);
            });
            assert_eq!(seen, 1);
            assert!(!f.is_empty(), "cleared A/D must be flushed, or the CPU never sets them again");
            t.flush(f, |_| tlb.invept_all_context()).unwrap();
        }
    }
}

/// "MMIO EPT violation - read / - write": an unmapped MMIO page faults as a read; once mapped
/// read-only (no INVEPT needed: nothing was cached from a not-present entry) a write faults
/// with WR | PERM_RD; read-write after the INVEPT the protect asks for.
#[test]
fn mmio_ept_violation_read_then_write() {
    let ram = HostRam::new(32);
    let (mut t, eptp, caps) = table(&ram, SKYLAKE_X, false);
    let mut tlb = model::tlb::EptTlb::new();
    let go = |tlb: &mut model::tlb::EptTlb, a: EptAccess| {
        tlb.translate(&mut Ram(&ram), eptp, &caps, Gpa(GPA), a, GuestLinear::TRANSLATION)
    };
    let q = |r: Result<model::ept::EptWalk, EptExit>| match r {
        Err(EptExit::Violation { qualification, .. }) => qualification,
        other => panic!("{other:?}"),
    };
    assert_eq!(q(go(&mut tlb, EptAccess::READ)), qual::READ | LA);
    let f = t.map(gpa(GPA), hpa(TARGET), 4096, MappingFlags::READ | MappingFlags::DEVICE, MapSize::Largest).unwrap();
    assert_eq!(f.invalidation(), EptInvalidation::None);
    t.flush(f, |inv| assert_eq!(*inv, EptInvalidation::None, "no INVEPT for a new mapping")).unwrap();
    assert!(go(&mut tlb, EptAccess::READ).is_ok());
    assert_eq!(q(go(&mut tlb, EptAccess::WRITE)), qual::WRITE | qual::READABLE | LA);
    let f = t.protect(gpa(GPA), 4096, MappingFlags::RW | MappingFlags::DEVICE).unwrap();
    t.flush(f, |_| tlb.invept_all_context()).unwrap();
    assert!(go(&mut tlb, EptAccess::WRITE).is_ok());
}

/// "EPT - MMIO access" (device memory mapped through EPT) and the memory types the engine's
/// attributes give (Intel SDM Vol. 3C 29.3.7.2, Vol. 3A Table 11-7): DEVICE is UC with
/// ignore-PAT, UC whatever the guest's PAT; UNCACHED is UC without it, so a guest PAT of WC
/// makes it WC and every other PAT type UC; plain memory is WB, the guest's PAT deciding.
#[test]
fn memory_types_of_device_uncached_and_normal_mappings() {
    let ram = HostRam::new(32);
    let (mut t, eptp, caps) = table(&ram, SKYLAKE_X, false);
    let kinds = [MappingFlags::DEVICE, MappingFlags::UNCACHED, MappingFlags::empty()];
    for (i, k) in kinds.iter().enumerate() {
        let at = GPA + i as u64 * 4096;
        t.map(gpa(at), hpa(TARGET + at - GPA), 4096, MappingFlags::RW | *k, MapSize::Largest).unwrap().ignore();
        assert_eq!(t.query(gpa(at)).unwrap().flags, MappingFlags::RW | *k, "the attribute reads back");
    }
    let effective = |i: u64, pat: PatType| {
        let w = walk(&ram, eptp, &caps, GPA + i * 4096, EptAccess::READ).unwrap();
        memtype::effective(false, w.memtype, w.ipat, pat)
    };
    for pat in PatType::ALL {
        assert_eq!(effective(0, pat), MemoryType::Uc, "DEVICE, PAT {pat:?}");
        let want = if pat == PatType::Wc { MemoryType::Wc } else { MemoryType::Uc };
        assert_eq!(effective(1, pat), want, "UNCACHED, PAT {pat:?}");
        assert_eq!(effective(2, pat), memtype::combine(EptMemType::Wb, pat), "normal, PAT {pat:?}");
    }
    assert_eq!(effective(2, PatType::Wb), MemoryType::Wb);
}
