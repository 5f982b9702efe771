//! The software guest walkers against the spec model's stage-1 walks, over random (often
//! hostile) guest page tables: same translation or same kind of fault, same A/D updates.

mod common;
use common::*;
use proptest::prelude::*;
use twostage_aspace::guest::{PageFaultKind, RiscvPaging, X86Paging};
use twostage_aspace::*;
use twostage_npt::{Access, AdMode, GuestVirtAddr, MappingFlags, Sv39x4};
use twostage_spec_model as model;
use twostage_spec_model::stage1::{self, NoStage2, Privilege};

type Space = AddressSpace<Sv39x4, Ram>;
const TABLE_PAGES: u64 = 16;
const DATA_PAGES: u64 = 48;

/// The model reads guest memory through the address space (guest-physical = "host" for it).
struct GuestPhys<'a>(&'a mut Space);

impl model::PhysMem for GuestPhys<'_> {
    fn read_u64(&mut self, pa: model::Hpa) -> Option<u64> {
        let mut b = [0u8; 8];
        self.0.read(gpa(pa.0), &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn write_u64(&mut self, pa: model::Hpa, value: u64) -> Option<()> {
        self.0.write(gpa(pa.0), &value.to_le_bytes()).ok()?;
        self.0.flush_pending(|_| {});
        Some(())
    }
}

/// Guest memory: pages 0..16 hold tables (entries 0..4 of each random), 16..64 data; an MMIO
/// page at 64.
fn build(ram: &Ram, entries: &[u64]) -> Space {
    let mut s: Space = AddressSpace::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (_, f) = s
        .add_region("ram", range(0, (TABLE_PAGES + DATA_PAGES) * 4096), MappingFlags::RWX, Backend::DemandZero)
        .unwrap();
    s.flush_unloaded(f).unwrap();
    let (_, f) =
        s.add_region("mmio", range((TABLE_PAGES + DATA_PAGES) * 4096, 4096), MappingFlags::RW, Backend::Mmio).unwrap();
    s.flush_unloaded(f).unwrap();
    for (i, e) in entries.iter().enumerate() {
        let (page, idx) = (i as u64 / 4, i as u64 % 4);
        s.write(gpa(page * 4096 + idx * 8), &e.to_le_bytes()).unwrap();
        s.flush_pending(|_| {});
    }
    s
}

fn tables_of(s: &Space) -> Vec<u8> {
    let mut v = vec![0u8; (TABLE_PAGES * 4096) as usize];
    s.read(gpa(0), &mut v).unwrap();
    v
}

fn target_page() -> impl Strategy<Value = u64> {
    prop_oneof![7 => 0u64..TABLE_PAGES, 3 => 0u64..TABLE_PAGES + DATA_PAGES + 2]
}

/// An x86 entry: mostly a present pointer into the tables (or a page) with plausible flags,
/// sometimes hostile: huge-page bits, XD, high reserved bits, zero, or anything.
fn x86_entry() -> impl Strategy<Value = u64> {
    let flags = (
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.15),
        0u64..4,
        prop::bool::weighted(0.1),
    );
    prop_oneof![
        8 => (target_page(), flags, prop::bool::weighted(0.03)).prop_map(|(page, (rw, us, ps, ad, xd), high)| {
            let addr = if ps { 0 } else { page << 12 };
            addr | 1 | (rw as u64) << 1 | (us as u64) << 2 | ad << 5 | (ps as u64) << 7 | (xd as u64) << 63 | (high as u64) << 50
        }),
        1 => Just(0u64),
        1 => any::<u64>(),
    ]
}

/// A RISC-V PTE: mostly a pointer (R=W=X=0) or a leaf with plausible bits, sometimes hostile.
fn rv_entry() -> impl Strategy<Value = u64> {
    let leaf = (prop::bool::weighted(0.4), 0u64..8, prop::bool::weighted(0.7), 0u64..4, prop::bool::weighted(0.7));
    prop_oneof![
        8 => (target_page(), leaf, prop::bool::weighted(0.03)).prop_map(|(page, (is_leaf, rwx, u, ad, aligned), high)| {
            let bits = if is_leaf { (rwx.max(1) << 1) | (u as u64) << 4 | ad << 6 } else { 0 };
            let ppn = if is_leaf && aligned { 0 } else { page };
            ppn << 10 | bits | 1 | (high as u64) << 61
        }),
        1 => Just(0u64),
        1 => any::<u64>(),
    ]
}

/// Addresses whose indices hit the random entries (0..4 at each level), for 4 or 3 levels.
fn gva_strategy(levels: u32) -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (prop::array::uniform4(0u64..4), 0u64..4096).prop_map(move |(ix, off)| {
            let top = if levels == 4 { ix[0] << 39 } else { 0 };
            top | ix[1] << 30 | ix[2] << 21 | ix[3] << 12 | off
        }),
        1 => any::<u64>(),
    ]
}

fn acc(a: u8) -> (Access, model::Access) {
    match a {
        0 => (Access::Read, model::Access::Read),
        1 => (Access::Write, model::Access::Write),
        _ => (Access::Execute, model::Access::Fetch),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn x86_walk_matches_the_model(
        entries in prop::collection::vec(x86_entry(), (TABLE_PAGES * 4) as usize),
        cr3_page in 0u64..4, wp: bool, nxe: bool, smep: bool, smap: bool, user: bool, page_1g: bool,
        maxphy in 36u8..53, gvas in prop::collection::vec((gva_strategy(4), 0u8..3), 1..8),
    ) {
        let ram = ram(1024);
        let mut mine = build(&ram, &entries);
        let (mut theirs, f) = mine.fork().unwrap();
        mine.flush_unloaded(f).unwrap();
        let p = X86Paging { pml4: gpa(cr3_page << 12), wp, nxe, smep, smap, user, maxphyaddr: maxphy, page_1g };
        let regs = stage1::x86::X86Regs {
            cr3: cr3_page << 12, cr0_wp: wp, cr4_smep: smep, cr4_smap: smap, rflags_ac: false,
            efer_nxe: nxe, maxphyaddr: maxphy, page_1g,
        };
        for (gva, a) in gvas {
            let (access, maccess) = acc(a);
            let got = translate_gva(&mut mine, &GuestPaging::X86_64(p), GuestVirtAddr::new(gva), access);
            let priv_ = if user { Privilege::User } else { Privilege::Supervisor };
            let want = stage1::x86::walk(&mut GuestPhys(&mut theirs), &mut NoStage2, &regs, model::Gva(gva), maccess, priv_);
            use stage1::x86::{error_code as ec, X86Error};
            match (&got, &want) {
                (Ok(t), Ok(w)) => prop_assert_eq!(t.gpa.as_u64(), w.gpa.0),
                (Err(GuestVaError::NonCanonical { .. }), Err(X86Error::NonCanonical { .. })) => {}
                (Err(GuestVaError::PageFault { kind, .. }), Err(X86Error::PageFault(pf))) => {
                    let c = pf.error_code;
                    let model_kind = if c & ec::RSVD != 0 { PageFaultKind::Reserved }
                        else if c & ec::P != 0 { PageFaultKind::Protection } else { PageFaultKind::NotPresent };
                    prop_assert_eq!(*kind, model_kind, "gva {:#x} code {:#x}", gva, c);
                }
                (Err(GuestVaError::TableAccess { .. }), Err(X86Error::NoMemory { .. })) => {}
                _ => prop_assert!(false, "gva {:#x} {:?}: mine {:?} model {:?}", gva, access, got, want),
            }
            prop_assert!(tables_of(&mine) == tables_of(&theirs), "A/D updates differ after {:#x}", gva);
        }
        drop((mine, theirs));
        prop_assert_eq!(ram.frames_in_use(), 0);
    }

    #[test]
    fn riscv_walk_matches_the_model(
        entries in prop::collection::vec(rv_entry(), (TABLE_PAGES * 4) as usize),
        root_page in 0u64..4, sv48: bool, sum: bool, mxr: bool, user: bool, update_ad: bool, svpbmt: bool,
        gvas in prop::collection::vec((gva_strategy(3), gva_strategy(4), 0u8..3), 1..8),
    ) {
        let ram = ram(1024);
        let mut mine = build(&ram, &entries);
        let (mut theirs, f) = mine.fork().unwrap();
        mine.flush_unloaded(f).unwrap();
        let levels = if sv48 { 4 } else { 3 };
        let p = RiscvPaging { root: gpa(root_page << 12), levels, sum, mxr, user, update_ad, svpbmt };
        let vsatp = (if sv48 { 9u64 } else { 8 }) << 60 | root_page;
        let regs = stage1::riscv::VsRegs { vsatp, sum, mxr, hs_mxr: false, hw_ad_update: update_ad, svpbmt };
        for (gva39, gva48, a) in gvas {
            let gva = if sv48 { gva48 } else { gva39 };
            let (access, maccess) = acc(a);
            let got = translate_gva(&mut mine, &GuestPaging::Riscv(p), GuestVirtAddr::new(gva), access);
            let priv_ = if user { Privilege::User } else { Privilege::Supervisor };
            let want = stage1::riscv::walk(&mut GuestPhys(&mut theirs), &mut NoStage2, &regs, model::Gva(gva), maccess, priv_);
            use stage1::riscv::RvError;
            use model::gstage::RvFaultKind as K;
            match (&got, &want) {
                (Ok(t), Ok(w)) => prop_assert_eq!(t.gpa.as_u64(), w.gpa.0),
                (Err(GuestVaError::NonCanonical { .. }), Err(RvError::PageFault(pf))) => prop_assert_eq!(pf.reason, K::AddressTooWide),
                (Err(GuestVaError::PageFault { kind, .. }), Err(RvError::PageFault(pf))) => {
                    let ok = matches!((kind, pf.reason),
                        (PageFaultKind::NotPresent, K::NotValid)
                        | (PageFaultKind::Reserved, K::WriteWithoutRead | K::Reserved(_) | K::NonLeafReserved(_))
                        | (PageFaultKind::NoLeaf, K::NoLeaf)
                        | (PageFaultKind::MisalignedSuperpage, K::MisalignedSuperpage)
                        | (PageFaultKind::Protection, K::UserBit | K::Permission)
                        | (PageFaultKind::AccessedDirty, K::AccessedClear | K::DirtyClear)
                        // The spec orders the permission and superpage-alignment checks
                        // differently across versions; either fault is a page fault.
                        | (PageFaultKind::Protection, K::MisalignedSuperpage)
                        | (PageFaultKind::MisalignedSuperpage, K::UserBit | K::Permission));
                    prop_assert!(ok, "gva {:#x}: mine {:?} model {:?}", gva, kind, pf.reason);
                }
                (Err(GuestVaError::TableAccess { .. }), Err(RvError::AccessFault { .. })) => {}
                _ => prop_assert!(false, "gva {:#x} {:?}: mine {:?} model {:?}", gva, access, got, want),
            }
            prop_assert!(tables_of(&mine) == tables_of(&theirs), "A/D updates differ after {:#x}", gva);
        }
        drop((mine, theirs));
        prop_assert_eq!(ram.frames_in_use(), 0);
    }
}
