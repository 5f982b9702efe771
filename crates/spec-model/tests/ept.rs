//! The EPT walk against Intel SDM Vol. 3C 29.3 (and 25.6.11, Table 28-7, Vol. 3D A.10).

mod common;

use common::*;
use twostage_spec_model::ept::{
    self, qual, EptAccess, EptCaps, EptExit, EptMemType, Eptp, EptpError, GuestLinear, MisconfigReason, ACCESSED, DIRTY,
};
use twostage_spec_model::{Gpa, Hpa, PageSize};

const MAXPHY: u8 = 46;

fn caps() -> EptCaps {
    EptCaps::all(MAXPHY)
}

/// EPTP: WB (6), 4-level (bits 5:3 = 3), A/D per `ad`.
fn eptp4(root: u64, ad: bool) -> u64 {
    root | 3 << 3 | (ad as u64) << 6 | 6
}

fn setup() -> (Tables, u64) {
    let mut t = Tables::new();
    let root = t.frame(4096);
    (t, root)
}

fn violation(r: Result<ept::EptWalk, EptExit>) -> u64 {
    match r {
        Err(EptExit::Violation { qualification, .. }) => qualification,
        other => panic!("expected a violation, got {other:?}"),
    }
}

fn misconfig(r: Result<ept::EptWalk, EptExit>) -> MisconfigReason {
    match r {
        Err(EptExit::Misconfig { reason, .. }) => reason,
        other => panic!("expected a misconfiguration, got {other:?}"),
    }
}

#[test]
fn caps_decode_per_appendix_a10() {
    // The IA32_VMX_EPT_VPID_CAP value Bochs reports for corei7_skylake_x (read on Bochs 2.7; README, platform notes).
    let c = EptCaps::from_msr(0xf0106334141, 39);
    assert!(c.execute_only, "bit 0");
    assert!(c.walk_4, "bit 6");
    assert!(!c.walk_5, "bit 7");
    assert!(c.uc, "bit 8");
    assert!(c.wb, "bit 14");
    assert!(c.page_2m, "bit 16");
    assert!(c.page_1g, "bit 17 is set in this value");
    assert!(c.invept && c.accessed_dirty, "bits 20, 21");
    assert!(c.invept_single_context && c.invept_all_context, "bits 25, 26");
    assert_eq!(c.maxphyaddr, 39);
    let none = EptCaps::from_msr(0, 60);
    assert!(!none.execute_only && !none.page_2m && !none.accessed_dirty);
    assert_eq!(none.maxphyaddr, 52, "clamped");
}

#[test]
fn eptp_decode_checks_vm_entry_rules() {
    // 25.6.11 Table 25-9; 27.2.1.1.
    let c = caps();
    let e = Eptp::decode(0x1234_5000 | 6 | 3 << 3 | 1 << 6, &c).unwrap();
    assert_eq!(e.memory_type, EptMemType::Wb);
    assert_eq!((e.levels, e.accessed_dirty, e.root), (4, true, Hpa(0x1234_5000)));
    assert_eq!(e.encode(), 0x1234_5000 | 6 | 3 << 3 | 1 << 6);
    assert_eq!(e.gpa_bits(), 48);
    assert_eq!(Eptp::decode(0x1000 | 4 << 3, &c).unwrap().gpa_bits(), 57);
    assert_eq!(Eptp::decode(0x1000 | 1 | 3 << 3, &c), Err(EptpError::MemoryType(1)));
    assert_eq!(Eptp::decode(0x1000 | 6 | 2 << 3, &c), Err(EptpError::WalkLength(2)));
    assert_eq!(Eptp::decode(0x1000 | 6 | 3 << 3 | 1 << 8, &c), Err(EptpError::ReservedBits(1 << 8)));
    assert_eq!(Eptp::decode(0x1000 | 6 | 3 << 3 | 1 << 7, &c), Err(EptpError::ReservedBits(1 << 7)));
    assert_eq!(Eptp::decode(1 << 46 | 6 | 3 << 3, &c), Err(EptpError::ReservedBits(1 << 46)));
    let sandy = EptCaps::from_msr(1 << 6 | 1 << 14, MAXPHY); // 4-level + WB only
    assert_eq!(Eptp::decode(0x1000 | 6 | 3 << 3 | 1 << 6, &sandy), Err(EptpError::AccessedDirtyUnsupported));
    assert_eq!(Eptp::decode(0x1000 | 6 | 4 << 3, &sandy), Err(EptpError::WalkLength(4)));
    assert_eq!(Eptp::decode(0x1000 | 3 << 3, &sandy), Err(EptpError::MemoryType(0)));
    assert_eq!(
        ept::walk(&mut Tables::new().mem, 0x1000 | 3 << 3, &sandy, Gpa(0), EptAccess::READ, GuestLinear::NONE),
        Err(EptExit::InvalidEptp(EptpError::MemoryType(0)))
    );
}

#[test]
fn walk_4k_2m_1g() {
    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x4000_1000, 0, 0x7654_3000 | EPT_WB | 1 << 6 | 0b111);
    t.ept_map(root, 4, 0x8020_0000, 1, 0x0160_0000 | EPT_LARGE | 0b011);
    t.ept_map(root, 4, 0x1_c000_0000, 2, 0x4000_0000 | EPT_LARGE | EPT_WB | 0b101);
    let c = caps();
    let w =
        ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x4000_1abc), EptAccess::READ, GuestLinear::NONE).unwrap();
    assert_eq!((w.hpa, w.page_size), (Hpa(0x7654_3abc), PageSize::Size4K));
    assert!(w.read && w.write && w.exec && w.ipat);
    assert_eq!(w.memtype, EptMemType::Wb);
    let w =
        ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x803f_fff8), EptAccess::WRITE, GuestLinear::NONE).unwrap();
    assert_eq!((w.hpa, w.page_size, w.exec, w.memtype), (Hpa(0x017f_fff8), PageSize::Size2M, false, EptMemType::Uc));
    let w =
        ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x1_c123_4567), EptAccess::FETCH, GuestLinear::NONE).unwrap();
    assert_eq!((w.hpa, w.page_size, w.write), (Hpa(0x4123_4567), PageSize::Size1G, false));
}

#[test]
fn five_level_walk_uses_gpa_bits_56_48_and_four_level_ignores_them() {
    // 29.3.2: a 4-level walk uses only bits 47:0; a 5-level walk bits 56:0.
    let (mut t, root) = setup();
    let gpa = 0x0123_4567_8000_0000u64 & ((1 << 57) - 1);
    t.ept_map(root, 5, gpa, 0, 0x0009_9000 | EPT_WB | 0b001);
    let e5 = root | 4 << 3 | 6;
    let w = ept::walk(&mut t.mem, e5, &caps(), Gpa(gpa | 0x10), EptAccess::READ, GuestLinear::NONE).unwrap();
    assert_eq!(w.hpa, Hpa(0x0009_9010));
    // Same PML5 slot index bits above 48 differ -> a different PML5E, not present.
    assert!(matches!(
        ept::walk(&mut t.mem, e5, &caps(), Gpa(gpa ^ 1 << 50), EptAccess::READ, GuestLinear::NONE),
        Err(EptExit::Violation { .. })
    ));

    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x5000, 0, 0x0009_9000 | EPT_WB | 0b001);
    let w = ept::walk(
        &mut t.mem,
        eptp4(root, false),
        &caps(),
        Gpa(0xffff_0000_0000_5008),
        EptAccess::READ,
        GuestLinear::NONE,
    );
    assert_eq!(w.unwrap().hpa, Hpa(0x0009_9008));
}

#[test]
fn not_present_violation_qualification() {
    // 29.3.3.2 and Table 28-7. On Bochs 2.7 a guest write to an unmapped GPA gave 0x182 on Bochs.
    let (mut t, root) = setup();
    let c = caps();
    let q = violation(ept::walk(
        &mut t.mem,
        eptp4(root, false),
        &c,
        Gpa(0x1000),
        EptAccess::WRITE,
        GuestLinear::TRANSLATION,
    ));
    assert_eq!(q, 0x182);
    let q = violation(ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x1000), EptAccess::READ, GuestLinear::NONE));
    assert_eq!(q, qual::READ);
    let q = violation(ept::walk(
        &mut t.mem,
        eptp4(root, false),
        &c,
        Gpa(0x1000),
        EptAccess::FETCH,
        GuestLinear::PAGING_STRUCTURE,
    ));
    assert_eq!(q, qual::FETCH | qual::GLA_VALID, "bit 8 clear for a paging-structure access");
    // Not present at the PTE level below RWX non-leaf entries: bits 3-5 still 0 (the AND
    // includes the not-present entry).
    t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b111);
    let q = violation(ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x3000), EptAccess::READ, GuestLinear::NONE));
    assert_eq!(q, qual::READ);
}

#[test]
fn rights_are_anded_across_levels() {
    // Table 28-7 bits 3-5: logical AND of bits 0-2 of the entries used.
    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b111);
    let pml4e = t.ept_entry(root, 4, 0x2000, 3);
    t.mem.poke(pml4e, t.mem.peek(pml4e).unwrap() & !0b110 | 0b001); // PML4E read-only
    let c = caps();
    let w = ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x2000), EptAccess::READ, GuestLinear::NONE).unwrap();
    assert!(w.read && !w.write && !w.exec);
    let q = violation(ept::walk(
        &mut t.mem,
        eptp4(root, false),
        &c,
        Gpa(0x2000),
        EptAccess::WRITE,
        GuestLinear::TRANSLATION,
    ));
    assert_eq!(q, qual::WRITE | qual::READABLE | qual::GLA_VALID | qual::GLA_TRANSLATION);
    let pde = t.ept_entry(root, 4, 0x2000, 1);
    t.mem.poke(pml4e, t.mem.peek(pml4e).unwrap() | 0b111);
    t.mem.poke(pde, t.mem.peek(pde).unwrap() & !0b111 | 0b011); // PDE RW, no X
    let q = violation(ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x2000), EptAccess::FETCH, GuestLinear::NONE));
    assert_eq!(q, qual::FETCH | qual::READABLE | qual::WRITABLE);
}

#[test]
fn misconfig_write_without_read_and_execute_only() {
    // 29.3.3.1: bits 2:0 = 010b or 110b; 100b without the execute-only capability.
    let c = caps();
    for perm in [0b010, 0b110] {
        let (mut t, root) = setup();
        t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | perm);
        let r = ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x2000), EptAccess::READ, GuestLinear::NONE);
        assert_eq!(misconfig(r), MisconfigReason::WriteWithoutRead);
    }
    // Also in a non-leaf entry.
    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b111);
    let pdpte = t.ept_entry(root, 4, 0x2000, 2);
    t.mem.poke(pdpte, t.mem.peek(pdpte).unwrap() & !0b111 | 0b010);
    match ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x2000), EptAccess::READ, GuestLinear::NONE) {
        Err(EptExit::Misconfig { level: 2, reason: MisconfigReason::WriteWithoutRead, .. }) => {}
        other => panic!("{other:?}"),
    }

    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b100);
    let w = ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x2000), EptAccess::FETCH, GuestLinear::NONE).unwrap();
    assert!(w.exec && !w.read);
    let q = violation(ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x2000), EptAccess::READ, GuestLinear::NONE));
    assert_eq!(q, qual::READ | qual::EXECUTABLE);
    let no_xo = EptCaps::from_msr(c.raw & !1, MAXPHY);
    let r = ept::walk(&mut t.mem, eptp4(root, false), &no_xo, Gpa(0x2000), EptAccess::FETCH, GuestLinear::NONE);
    assert_eq!(misconfig(r), MisconfigReason::ExecuteOnlyUnsupported);
}

#[test]
fn misconfig_reserved_bits_per_entry_format() {
    // 29.3.2 entry-format tables; 29.3.3.1 "A reserved bit is set".
    let c = caps();
    let cases: [(u8, u64, u64); 5] = [
        (3, 1 << 7, 1 << 7),   // PML4E bit 7
        (3, 1 << 3, 1 << 3),   // PML4E bits 6:3
        (1, 1 << 5, 1 << 5),   // PDE (non-leaf) bits 6:3
        (2, 1 << 6, 1 << 6),   // PDPTE (non-leaf) bits 6:3
        (0, 1 << 50, 1 << 50), // PTE bits 51:MAXPHYADDR
    ];
    for (level, set, expect) in cases {
        let (mut t, root) = setup();
        t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b111);
        let pa = t.ept_entry(root, 4, 0x2000, level);
        t.mem.poke(pa, t.mem.peek(pa).unwrap() | set);
        match ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x2000), EptAccess::READ, GuestLinear::NONE) {
            Err(EptExit::Misconfig { level: l, reason: MisconfigReason::ReservedBits(b), gpa, .. }) => {
                assert_eq!((l, b, gpa), (level, expect, Gpa(0x2000)));
            }
            other => panic!("level {level}: {other:?}"),
        }
    }
    // A 2-MByte PDE with bits 20:12 set; a 1-GByte PDPTE with bits 29:12 set.
    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x20_0000, 1, 0x40_0000 | 1 << 12 | EPT_LARGE | EPT_WB | 0b111);
    t.ept_map(root, 4, 0x4000_0000, 2, 0x8000_0000 | 1 << 21 | EPT_LARGE | EPT_WB | 0b111);
    let r = ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x20_0000), EptAccess::READ, GuestLinear::NONE);
    assert_eq!(misconfig(r), MisconfigReason::ReservedBits(1 << 12));
    let r = ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x4000_0000), EptAccess::READ, GuestLinear::NONE);
    assert_eq!(misconfig(r), MisconfigReason::ReservedBits(1 << 21));
    // Bits 63:52 and 11:8 are ignored (and bit 7 in a PTE).
    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x2000, 0, 0x9000 | 0xfff0_0000_0000_0000 | 0xf00 | EPT_LARGE | EPT_WB | 0b111);
    assert!(ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x2000), EptAccess::READ, GuestLinear::NONE).is_ok());
}

#[test]
fn misconfig_large_pages_without_capability_and_bad_memory_types() {
    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x20_0000, 1, 0x40_0000 | EPT_LARGE | EPT_WB | 0b111);
    t.ept_map(root, 4, 0x4000_0000, 2, 0x8000_0000 | EPT_LARGE | EPT_WB | 0b111);
    let no_large = EptCaps::from_msr(caps().raw & !(1 << 16 | 1 << 17), MAXPHY);
    for gpa in [0x20_0000, 0x4000_0000] {
        let r = ept::walk(&mut t.mem, eptp4(root, false), &no_large, Gpa(gpa), EptAccess::READ, GuestLinear::NONE);
        assert_eq!(misconfig(r), MisconfigReason::LargePageUnsupported);
    }
    // 29.3.3.1: leaf memory type 2, 3 or 7; 29.3.7: 0, 1, 4, 5, 6 are valid.
    for mt in 0..8u64 {
        let (mut t, root) = setup();
        t.ept_map(root, 4, 0x2000, 0, 0x9000 | mt << 3 | 0b001);
        let r = ept::walk(&mut t.mem, eptp4(root, false), &caps(), Gpa(0x2000), EptAccess::READ, GuestLinear::NONE);
        match mt {
            2 | 3 | 7 => assert_eq!(misconfig(r), MisconfigReason::MemoryType(mt as u8)),
            _ => assert_eq!(r.unwrap().memtype as u64, mt),
        }
    }
}

#[test]
fn misconfig_takes_priority_over_rights_violation() {
    // 29.3.3: "An EPT violation occurs when there is no EPT misconfiguration".
    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x2000, 0, 0x9000 | 7 << 3 | 0b001);
    let r = ept::walk(&mut t.mem, eptp4(root, false), &caps(), Gpa(0x2000), EptAccess::WRITE, GuestLinear::NONE);
    assert_eq!(misconfig(r), MisconfigReason::MemoryType(7));
}

#[test]
fn accessed_and_dirty_flags_when_eptp_enables_them() {
    // 29.3.5: A in every entry used; D in the leaf for a write; only with EPTP bit 6.
    let (mut t, root) = setup();
    let leaf = t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b111);
    let entries: Vec<Hpa> = (0..4).map(|l| t.ept_entry(root, 4, 0x2000, l)).collect();
    let c = caps();

    let w = ept::walk(&mut t.mem, eptp4(root, false), &c, Gpa(0x2000), EptAccess::WRITE, GuestLinear::NONE).unwrap();
    assert!(!w.accessed && !w.dirty);
    assert_eq!(t.mem.writes, 0, "A/D disabled: no writes");

    let w = ept::walk(&mut t.mem, eptp4(root, true), &c, Gpa(0x2000), EptAccess::READ, GuestLinear::NONE).unwrap();
    assert!(w.accessed && !w.dirty);
    for e in &entries {
        assert_ne!(t.mem.peek(*e).unwrap() & ACCESSED, 0);
    }
    assert_eq!(t.mem.peek(leaf).unwrap() & DIRTY, 0);
    assert_eq!(t.mem.writes, 4);

    let w = ept::walk(&mut t.mem, eptp4(root, true), &c, Gpa(0x2000), EptAccess::WRITE, GuestLinear::NONE).unwrap();
    assert!(w.dirty);
    assert_ne!(t.mem.peek(leaf).unwrap() & DIRTY, 0);
    assert_eq!(t.mem.writes, 5, "only the leaf's dirty flag was written");
    for e in &entries[1..] {
        assert_eq!(t.mem.peek(*e).unwrap() & DIRTY, 0, "dirty only in the leaf");
    }

    ept::walk(&mut t.mem, eptp4(root, true), &c, Gpa(0x2000), EptAccess::WRITE, GuestLinear::NONE).unwrap();
    assert_eq!(t.mem.writes, 5, "flags already set: nothing written");
}

#[test]
fn no_accessed_flags_on_a_failed_walk() {
    // Model choice (documented): flags are written only for a walk that succeeds.
    let (mut t, root) = setup();
    t.ept_map(root, 4, 0x2000, 0, 0x9000 | EPT_WB | 0b001);
    let r = ept::walk(&mut t.mem, eptp4(root, true), &caps(), Gpa(0x2000), EptAccess::WRITE, GuestLinear::NONE);
    assert!(matches!(r, Err(EptExit::Violation { .. })));
    assert_eq!(t.mem.writes, 0);
}

#[test]
fn tables_outside_memory_are_a_model_error() {
    let mut t = Tables::new();
    let root = MEM; // beyond SparseMem's limit
    let r = ept::walk(&mut t.mem, eptp4(root, false), &caps(), Gpa(0), EptAccess::READ, GuestLinear::NONE);
    assert_eq!(r, Err(EptExit::NoMemory { pa: Hpa(MEM) }));
}
