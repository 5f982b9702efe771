//! Guest x86-64 paging (Intel SDM Vol. 3A 4.5-4.8), alone and over EPT (Intel SDM Vol. 3C 29.3).

mod common;

use common::*;
use twostage_spec_model::ept::{qual, EptCaps, EptExit, ACCESSED, DIRTY};
use twostage_spec_model::stage1::x86::{self, error_code as ec, X86Error, X86Regs};
use twostage_spec_model::stage1::{EptStage2, EptTlbStage2, NoStage2, Privilege};
use twostage_spec_model::tlb::EptTlb;
use twostage_spec_model::{Access, Gpa, Gva, Hpa, PageSize};

// x86 paging-entry bits (Intel SDM Vol. 3A 4.5).
const XP: u64 = 1;
const XRW: u64 = 1 << 1;
const XUS: u64 = 1 << 2;
const XA: u64 = 1 << 5;
const XD: u64 = 1 << 6;
const XPS: u64 = 1 << 7;
const XNX: u64 = 1 << 63;

const GVA: u64 = 0x7fff_1234_5000;
const DATA: u64 = 0x0080_0000; // guest-physical (and, with identity stage 2, host-physical)

fn regs(cr3: u64) -> X86Regs {
    X86Regs {
        cr3,
        cr0_wp: true,
        cr4_smep: false,
        cr4_smap: false,
        rflags_ac: false,
        efer_nxe: true,
        maxphyaddr: 46,
        page_1g: true,
    }
}

/// Installs a guest x86 leaf; non-leaf entries are P|RW|US. Returns the leaf entry's address.
fn x86_map(t: &mut Tables, cr3: u64, gva: u64, leaf_level: u8, leaf: u64) -> u64 {
    let mut table = cr3;
    for level in (leaf_level + 1..4).rev() {
        let pa = table + ((gva >> (12 + 9 * level)) & 511) * 8;
        let mut e = t.mem.peek(Hpa(pa)).unwrap();
        if e & XP == 0 {
            e = t.frame(4096) | XP | XRW | XUS;
            t.mem.poke(Hpa(pa), e);
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    let pa = table + ((gva >> (12 + 9 * leaf_level)) & 511) * 8;
    t.mem.poke(Hpa(pa), leaf);
    pa
}

fn x86_entry(t: &Tables, cr3: u64, gva: u64, level: u8) -> u64 {
    let mut table = cr3;
    for l in (level + 1..4).rev() {
        table = t.mem.peek(Hpa(table + ((gva >> (12 + 9 * l)) & 511) * 8)).unwrap() & 0x000f_ffff_ffff_f000;
    }
    table + ((gva >> (12 + 9 * level)) & 511) * 8
}

fn pf_code<F: core::fmt::Debug>(r: Result<x86::X86Walk, X86Error<F>>) -> u32 {
    match r {
        Err(X86Error::PageFault(p)) => p.error_code,
        other => panic!("expected #PF, got {other:?}"),
    }
}

#[test]
fn x86_walk_sets_guest_accessed_and_dirty() {
    let mut t = Tables::new();
    let cr3 = t.frame(4096);
    let leaf = x86_map(&mut t, cr3, GVA, 0, DATA | XP | XRW | XUS);
    let r = regs(cr3);
    let w = x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(GVA | 0xabc), Access::Read, Privilege::User).unwrap();
    assert_eq!((w.gpa, w.hpa, w.page_size), (Gpa(DATA | 0xabc), Hpa(DATA | 0xabc), PageSize::Size4K));
    assert!(w.writable && w.user && w.executable);
    for level in 0..4 {
        assert_ne!(t.mem.peek(Hpa(x86_entry(&t, cr3, GVA, level))).unwrap() & XA, 0, "4.8: A at level {level}");
    }
    assert_eq!(t.mem.peek(Hpa(leaf)).unwrap() & XD, 0);
    x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(GVA), Access::Write, Privilege::User).unwrap();
    assert_ne!(t.mem.peek(Hpa(leaf)).unwrap() & XD, 0, "4.8: D on the leaf for a write");
}

#[test]
fn x86_large_pages_and_reserved_bits() {
    let mut t = Tables::new();
    let cr3 = t.frame(4096);
    x86_map(&mut t, cr3, 0x4000_0000, 2, 0x8000_0000 | XP | XRW | XPS);
    x86_map(&mut t, cr3, 0x20_0000, 1, 0x60_0000 | XP | XRW | XPS);
    let mut r = regs(cr3);
    let sup = Privilege::Supervisor;
    let w = x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x4123_4567), Access::Read, sup).unwrap();
    assert_eq!((w.gpa, w.page_size), (Gpa(0x8123_4567), PageSize::Size1G));
    let w = x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x2f_fff8), Access::Read, sup).unwrap();
    assert_eq!((w.gpa, w.page_size), (Gpa(0x6f_fff8), PageSize::Size2M));
    // 4.5: PS in a PDPTE is reserved without 1-GByte page support.
    r.page_1g = false;
    assert_eq!(
        pf_code(x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x4000_0000), Access::Read, sup)),
        ec::P | ec::RSVD
    );
    r.page_1g = true;
    // 2-MByte PDE bits 20:13 reserved.
    x86_map(&mut t, cr3, 0x20_0000, 1, 0x60_0000 | 1 << 13 | XP | XRW | XPS);
    assert_eq!(
        pf_code(x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x20_0000), Access::Write, sup)),
        ec::P | ec::W | ec::RSVD
    );
    // Bits 51:MAXPHYADDR; XD without EFER.NXE; PS in a PML4E.
    x86_map(&mut t, cr3, 0x1000, 0, 1 << 47 | XP);
    assert_eq!(pf_code(x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x1000), Access::Read, sup)), ec::P | ec::RSVD);
    x86_map(&mut t, cr3, 0x1000, 0, XNX | 0x5000 | XP);
    assert!(x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x1000), Access::Read, sup).is_ok());
    r.efer_nxe = false;
    assert_eq!(pf_code(x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x1000), Access::Read, sup)), ec::P | ec::RSVD);
    r.efer_nxe = true;
    let pml4e = Hpa(cr3);
    t.mem.poke(pml4e, t.mem.peek(pml4e).unwrap() | XPS);
    assert_eq!(pf_code(x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x1000), Access::Read, sup)), ec::P | ec::RSVD);
}

#[test]
fn x86_not_present_and_non_canonical() {
    let mut t = Tables::new();
    let cr3 = t.frame(4096);
    let r = regs(cr3);
    // 4.7: P = 0 for a not-present page; W/R, U/S, I/D describe the access.
    assert_eq!(
        pf_code(x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x1000), Access::Write, Privilege::User)),
        ec::W | ec::U
    );
    assert_eq!(
        pf_code(x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x1000), Access::Fetch, Privilege::Supervisor)),
        ec::ID
    );
    let r_nonx = X86Regs { efer_nxe: false, ..r };
    assert_eq!(
        pf_code(x86::walk(&mut t.mem, &mut NoStage2, &r_nonx, Gva(0x1000), Access::Fetch, Privilege::Supervisor)),
        0
    );
    // 3.3.7.1: bits 63:47 must be equal.
    let e = x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0x0000_8000_0000_0000), Access::Read, Privilege::User);
    assert_eq!(e, Err(X86Error::NonCanonical { gva: Gva(0x0000_8000_0000_0000) }));
    assert!(matches!(
        x86::walk(&mut t.mem, &mut NoStage2, &r, Gva(0xffff_8000_0000_0000), Access::Read, Privilege::User),
        Err(X86Error::PageFault(_))
    ));
}

#[test]
fn x86_access_rights() {
    // 4.6: U/S, R/W with CR0.WP, XD with EFER.NXE, SMEP, SMAP with RFLAGS.AC.
    let mut t = Tables::new();
    let cr3 = t.frame(4096);
    x86_map(&mut t, cr3, 0x1000, 0, 0x5000 | XP); // supervisor, read-only
    x86_map(&mut t, cr3, 0x2000, 0, 0x5000 | XP | XUS); // user, read-only
    x86_map(&mut t, cr3, 0x3000, 0, 0x5000 | XP | XRW | XUS | XNX); // user, RW, NX
    let r = regs(cr3);
    let (u, s) = (Privilege::User, Privilege::Supervisor);
    let code = |t: &mut Tables, r: &X86Regs, va: u64, a: Access, p: Privilege| match x86::walk(
        &mut t.mem,
        &mut NoStage2,
        r,
        Gva(va),
        a,
        p,
    ) {
        Ok(_) => None,
        Err(X86Error::PageFault(f)) => Some(f.error_code),
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(code(&mut t, &r, 0x1000, Access::Read, u), Some(ec::P | ec::U));
    assert_eq!(code(&mut t, &r, 0x2000, Access::Write, u), Some(ec::P | ec::W | ec::U));
    assert_eq!(code(&mut t, &r, 0x1000, Access::Write, s), Some(ec::P | ec::W));
    let nowp = X86Regs { cr0_wp: false, ..r };
    assert_eq!(code(&mut t, &nowp, 0x1000, Access::Write, s), None, "WP = 0: supervisor writes ignore R/W");
    assert_eq!(code(&mut t, &r, 0x3000, Access::Fetch, u), Some(ec::P | ec::U | ec::ID));
    assert_eq!(code(&mut t, &r, 0x2000, Access::Fetch, s), None);
    let smep = X86Regs { cr4_smep: true, ..r };
    assert_eq!(code(&mut t, &smep, 0x2000, Access::Fetch, s), Some(ec::P | ec::ID));
    let smap = X86Regs { cr4_smap: true, ..r };
    assert_eq!(code(&mut t, &smap, 0x2000, Access::Read, s), Some(ec::P));
    assert_eq!(code(&mut t, &smap, 0x1000, Access::Read, s), None, "SMAP only guards user pages");
    let smap_ac = X86Regs { rflags_ac: true, ..smap };
    assert_eq!(code(&mut t, &smap_ac, 0x3000, Access::Write, s), None);
}

/// Guest x86 tables at GVA -> DATA, plus EPT identity mappings for every guest frame and DATA.
fn x86_over_ept() -> (Tables, u64, u64) {
    let mut t = Tables::new();
    let cr3 = t.frame(4096);
    x86_map(&mut t, cr3, GVA, 0, DATA | XP | XRW | XUS);
    let guest_end = t.next_free();
    let ept_root = t.frame(4096);
    let mut page = 0x10_0000;
    while page < guest_end {
        t.ept_map(ept_root, 4, page, 0, page | EPT_WB | EPT_RWX);
        page += 4096;
    }
    t.ept_map(ept_root, 4, DATA, 0, DATA | EPT_WB | EPT_RWX);
    (t, cr3, ept_root)
}

fn ept_violation(r: Result<x86::X86Walk, X86Error<EptExit>>) -> (Gpa, u64, bool) {
    match r {
        Err(X86Error::Stage2 { fault: EptExit::Violation { gpa, qualification }, during_walk }) => {
            (gpa, qualification, during_walk)
        }
        other => panic!("expected an EPT violation, got {other:?}"),
    }
}

#[test]
fn x86_over_ept_faults_during_the_walk_and_on_the_final_access() {
    let (mut t, cr3, ept_root) = x86_over_ept();
    let caps = EptCaps::all(46);
    let eptp = ept_root | 3 << 3 | 6;
    let mut s2 = EptStage2 { eptp, caps };
    let r = regs(cr3);
    let w = x86::walk(&mut t.mem, &mut s2, &r, Gva(GVA | 8), Access::Read, Privilege::User).unwrap();
    assert_eq!((w.gpa, w.hpa), (Gpa(DATA | 8), Hpa(DATA | 8)));

    // The guest PDPT page is not present in EPT: a violation on a paging-structure read.
    let pdpte_gpa = x86_entry(&t, cr3, GVA, 2);
    let ept_pte = t.ept_entry(ept_root, 4, pdpte_gpa, 0);
    let saved = t.mem.peek(ept_pte).unwrap();
    t.mem.poke(ept_pte, 0);
    let (gpa, q, walk) = ept_violation(x86::walk(&mut t.mem, &mut s2, &r, Gva(GVA), Access::Read, Privilege::User));
    assert_eq!((gpa, q, walk), (Gpa(pdpte_gpa), qual::READ | qual::GLA_VALID, true));
    // With EPT A/D enabled, guest paging-structure accesses are writes: bits 0 and 1 (29.3.5).
    let mut s2ad = EptStage2 { eptp: eptp | 1 << 6, caps };
    let (_, q, _) = ept_violation(x86::walk(&mut t.mem, &mut s2ad, &r, Gva(GVA), Access::Read, Privilege::User));
    assert_eq!(q, qual::READ | qual::WRITE | qual::GLA_VALID);
    t.mem.poke(ept_pte, saved);

    // The guest PT page is read-only in EPT and the guest leaf needs its dirty flag: the A/D
    // update is a locked read-modify-write of a paging structure (29.3.3.2; Vol. 3A 9.1.2.1),
    // reported with bits 0 and 1 even with EPT A/D off (Table 28-7; kvm-unit-tests).
    let pte_gpa = x86_entry(&t, cr3, GVA, 0);
    let ept_pte = t.ept_entry(ept_root, 4, pte_gpa, 0);
    t.mem.poke(ept_pte, t.mem.peek(ept_pte).unwrap() & !0b110);
    let (gpa, q, walk) = ept_violation(x86::walk(&mut t.mem, &mut s2, &r, Gva(GVA), Access::Write, Privilege::User));
    assert_eq!((gpa, q, walk), (Gpa(pte_gpa), qual::READ | qual::WRITE | qual::READABLE | qual::GLA_VALID, true));

    // The data page is not present in EPT: a violation on the translated access (bit 8 set).
    t.mem.poke(t.ept_entry(ept_root, 4, DATA, 0), 0);
    let (gpa, q, walk) =
        ept_violation(x86::walk(&mut t.mem, &mut s2, &r, Gva(GVA | 0x10), Access::Read, Privilege::User));
    assert_eq!((gpa, q, walk), (Gpa(DATA | 0x10), qual::READ | qual::GLA_VALID | qual::GLA_TRANSLATION, false));
}

#[test]
fn x86_over_ept_with_accessed_dirty_marks_guest_tables_dirty() {
    // 29.3.5: with EPT A/D, guest paging-structure accesses are writes and set the EPT dirty flag.
    let (mut t, cr3, ept_root) = x86_over_ept();
    let mut s2 = EptStage2 { eptp: ept_root | 3 << 3 | 1 << 6 | 6, caps: EptCaps::all(46) };
    x86::walk(&mut t.mem, &mut s2, &regs(cr3), Gva(GVA), Access::Read, Privilege::User).unwrap();
    let pt_ept = t.mem.peek(t.ept_entry(ept_root, 4, x86_entry(&t, cr3, GVA, 0), 0)).unwrap();
    assert_eq!(pt_ept & (ACCESSED | DIRTY), ACCESSED | DIRTY);
    let data_ept = t.mem.peek(t.ept_entry(ept_root, 4, DATA, 0)).unwrap();
    assert_eq!(data_ept & (ACCESSED | DIRTY), ACCESSED, "the data page was only read");
}

#[test]
fn x86_over_ept_through_the_tlb_model() {
    let (mut t, cr3, ept_root) = x86_over_ept();
    let mut tlb = EptTlb::new();
    let eptp = ept_root | 3 << 3 | 6;
    let r = regs(cr3);
    for _ in 0..2 {
        let mut s2 = EptTlbStage2 { tlb: &mut tlb, eptp, caps: EptCaps::all(46) };
        x86::walk(&mut t.mem, &mut s2, &r, Gva(GVA), Access::Read, Privilege::User).unwrap();
    }
    // 4 guest table reads + the final access per walk; the second walk sets no A flags, so
    // every stage-2 lookup of the second walk hits.
    let s = tlb.stats();
    assert_eq!(s.lookups, 4 + 4 + 1 + 4 + 1, "first walk: 4 reads, 4 A/D updates, final; second: 4 reads, final");
    assert_eq!(s.leaf_hits, s.lookups - 5, "only the 5 distinct guest-physical pages missed");
}
