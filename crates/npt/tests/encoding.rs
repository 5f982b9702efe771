//! Entry, EPTP and hgatp encodings checked bit by bit against the specs' tables.

use twostage_npt::*;
use twostage_npt::{EptCapabilities, EptMemoryType, EptPointer, EptPointerError};
use twostage_npt::{Hgatp, HgatpCapabilities, HgatpError, HgatpMode};
use twostage_npt::{LeafBits, Pte};

fn leaf(hpa: u64, flags: MappingFlags) -> LeafBits {
    LeafBits { hpa: HostPhysAddr::new(hpa), flags, accessed: false, dirty: false }
}

/// The value Bochs reports on corei7_skylake_x (read on Bochs 2.7; README, platform notes).
const SKYLAKE_X: u64 = 0xf0106334141;

#[test]
fn ept_leaf_bits_follow_sdm_tables_29_x() {
    // Intel SDM Vol. 3C §29.3.2, Table 29-6 (4 KiB PTE): R=0, W=1, X=2, memory type 5:3,
    // ignore-PAT 6, accessed 8, dirty 9, address 51:12.
    let raw = Ept4::encode_leaf(&leaf(0x1234_5000, MappingFlags::RWX), 0);
    assert_eq!(raw, 0x1234_5000 | 0b111 | (6 << 3));
    let raw = Ept4::encode_leaf(&LeafBits { accessed: true, dirty: true, ..leaf(0x1000, MappingFlags::READ) }, 0);
    assert_eq!(raw, 0x1000 | 1 | (6 << 3) | (1 << 8) | (1 << 9));
    // Table 29-4 (2 MiB PDE): bit 7 set; Table 29-2 (1 GiB PDPTE) likewise.
    assert_eq!(Ept4::encode_leaf(&leaf(0x20_0000, MappingFlags::RW), 1), 0x20_0000 | 0b011 | (6 << 3) | (1 << 7));
    assert_eq!(Ept4::encode_leaf(&leaf(0x4000_0000, MappingFlags::RX), 2), 0x4000_0000 | 0b101 | (6 << 3) | (1 << 7));
    // Device memory: UC (0) with ignore-PAT; uncached: UC without it (§29.3.7).
    assert_eq!(Ept4::encode_leaf(&leaf(0x1000, MappingFlags::RW | MappingFlags::DEVICE), 0), 0x1000 | 0b011 | (1 << 6));
    assert_eq!(Ept4::encode_leaf(&leaf(0x1000, MappingFlags::RW | MappingFlags::UNCACHED), 0), 0x1000 | 0b011);
    // Non-leaf entries (Tables 29-1, 29-3, 29-5): R/W/X all set, address, nothing else.
    assert_eq!(Ept4::encode_table(HostPhysAddr::new(0x7000)), 0x7007);
    // Decoding: not present when bits 2:0 are clear whatever else is set.
    assert_eq!(Ept4::decode(0xffff_f000 | (6 << 3), 0), Pte::Invalid);
    assert_eq!(Ept4::decode(0x7007, 1), Pte::Table(HostPhysAddr::new(0x7000)));
    assert!(matches!(Ept4::decode(0x20_0000 | 0x83, 1), Pte::Leaf(_)));
    // Bit 7 in a PML4E is not a large page: the engine never reads it as a leaf at level 3.
    assert_eq!(Ept4::decode(0x7087, 3), Pte::Table(HostPhysAddr::new(0x7000)));
}

#[test]
fn gstage_leaf_bits_follow_the_privileged_spec() {
    // RISC-V Privileged §4.4.1 (Sv39 PTE): V=0 R=1 W=2 X=3 U=4 G=5 A=6 D=7, PPN at 53:10.
    // G-stage leaves always carry U=1 (§9.5.1: G-stage accesses are treated as U-mode).
    let raw = Sv39x4::encode_leaf(&leaf(0x8020_0000, MappingFlags::RW), 1);
    assert_eq!(raw, (0x8020_0000 >> 12) << 10 | 0b1_0111);
    let raw = Sv48x4::encode_leaf(&LeafBits { accessed: true, dirty: true, ..leaf(0x1000, MappingFlags::EXECUTE) }, 0);
    assert_eq!(raw, 1 << 10 | 0b1101_1001);
    // A pointer to the next level: V=1, R=W=X=0, and A, D, U clear (reserved in non-leaf PTEs).
    assert_eq!(Sv57x4::encode_table(HostPhysAddr::new(0x9000)), 9 << 10 | 1);
    assert_eq!(Sv39x4::decode(0, 0), Pte::Invalid);
    assert_eq!(Sv39x4::decode(9 << 10 | 1, 2), Pte::Table(HostPhysAddr::new(0x9000)));
    // The x4 root is 2048 entries: bits 40:30 of the GPA index it for Sv39x4.
    assert_eq!(<Sv39x4 as Format>::entries(2), 2048);
    assert_eq!(<Sv39x4 as Format>::index((1 << 41) - 1, 2), 2047);
    assert_eq!(<Sv48x4 as Format>::index(1 << 49, 3), 1024);
    assert_eq!(<Sv57x4 as Format>::index(1 << 58, 4), 1024);
    assert_eq!(<Ept4 as Format>::entries(3), 512);
}

#[test]
fn ept_capabilities_decode_the_msr() {
    // Intel SDM Vol. 3D Appendix A.10.
    let caps = EptCapabilities::new(SKYLAKE_X, 39);
    assert!(caps.execute_only() && caps.walk_length_4() && !caps.walk_length_5());
    assert!(caps.memtype_uc() && caps.memtype_wb());
    // Bits 16 and 17 are both set in this value: 2 MiB and 1 GiB EPT pages.
    assert!(caps.pages_2m() && caps.pages_1g());
    assert!(caps.invept() && caps.invept_single_context() && caps.invept_all_context());
    assert!(caps.accessed_dirty());
    let opts = caps.table_options(true);
    assert!(opts.leaf_sizes.contains(PageSize::Size2M) && opts.leaf_sizes.contains(PageSize::Size1G));
    let no_1g = EptCapabilities::new(SKYLAKE_X & !(1 << 17), 39).table_options(true);
    assert!(!no_1g.leaf_sizes.contains(PageSize::Size1G));
    assert_eq!(opts.ad, AdMode::Hardware);
    // Sandy Bridge in Bochs: the same without A/D (bit 21).
    let sandy = EptCapabilities::new(SKYLAKE_X & !(1 << 21), 36);
    assert_eq!(sandy.table_options(true).ad, AdMode::Preset);
}

#[test]
fn ept_pointer_is_checked_against_the_capabilities() {
    let caps = EptCapabilities::new(SKYLAKE_X, 39);
    let root = HostPhysAddr::new(0x12_3000);
    // Intel SDM Vol. 3C §25.6.11, Table 25-9: type 2:0 (6 = WB), walk length - 1 in 5:3, A/D bit 6.
    let eptp = EptPointer::new(root, 4, true, &caps).unwrap();
    assert_eq!(eptp.bits(), 0x12_3000 | 6 | (3 << 3) | (1 << 6));
    assert_eq!(eptp.root(), root);
    assert_eq!(eptp.walk_length(), 4);
    assert_eq!(EptPointer::new(root, 4, false, &caps).unwrap().bits(), 0x12_301e);
    assert_eq!(EptPointer::new(root, 5, true, &caps), Err(EptPointerError::WalkLengthUnsupported(5)));
    let no_ad = EptCapabilities::new(SKYLAKE_X & !(1 << 21), 39);
    assert_eq!(EptPointer::new(root, 4, true, &no_ad), Err(EptPointerError::AccessedDirtyUnsupported));
    let no_wb = EptCapabilities::new(SKYLAKE_X & !(1 << 14), 39);
    assert_eq!(
        EptPointer::new(root, 4, false, &no_wb),
        Err(EptPointerError::MemoryTypeUnsupported(EptMemoryType::WriteBack))
    );
    assert!(EptPointer::with_memory_type(root, 4, false, EptMemoryType::Uncacheable, &no_wb).is_ok());
    assert_eq!(
        EptPointer::new(HostPhysAddr::new(1 << 40), 4, false, &caps),
        Err(EptPointerError::BadRoot(HostPhysAddr::new(1 << 40)))
    );
    assert_eq!(
        EptPointer::new(HostPhysAddr::new(0x1234), 4, false, &caps),
        Err(EptPointerError::BadRoot(HostPhysAddr::new(0x1234)))
    );
}

#[test]
fn hgatp_is_checked_against_the_probe() {
    // A hart with Sv39x4 and Sv48x4 but not Sv57x4 and 7 VMID bits: an unsupported mode write
    // leaves the old value (WARL), VMID bits read back as implemented.
    let caps = HgatpCapabilities::from_probe(|m| if m == HgatpMode::Sv57x4 { 0 } else { m as u64 }, 0x7f);
    assert!(caps.sv39x4 && caps.sv48x4 && !caps.sv57x4);
    assert_eq!(caps.vmid_bits, 7);
    let root = HostPhysAddr::new(0x8040_4000);
    // RISC-V Privileged §9.2.10: MODE 63:60, VMID 57:44, PPN 43:0.
    let h = Hgatp::new(HgatpMode::Sv39x4, 5, root, &caps).unwrap();
    assert_eq!(h.bits(), 8 << 60 | 5 << 44 | 0x80404);
    assert_eq!((h.vmid(), h.root()), (5, root));
    assert_eq!(Hgatp::new(HgatpMode::Sv57x4, 1, root, &caps), Err(HgatpError::ModeUnsupported(HgatpMode::Sv57x4)));
    assert_eq!(
        Hgatp::new(HgatpMode::Sv39x4, 128, root, &caps),
        Err(HgatpError::VmidTooWide { vmid: 128, vmid_bits: 7 })
    );
    // The root must be 16 KiB-aligned (the x4 root is 16 KiB).
    let r = HostPhysAddr::new(0x8040_1000);
    assert_eq!(Hgatp::new(HgatpMode::Sv39x4, 1, r, &caps), Err(HgatpError::BadRoot(r)));
}

#[test]
fn hgatp_bare_has_no_vmid_and_no_root() {
    // RISC-V Privileged spec, "Hypervisor Guest Address Translation and Protection Register
    // (hgatp)": with MODE = Bare the remaining fields must be zero.
    let caps = HgatpCapabilities { sv39x4: true, sv48x4: false, sv57x4: false, vmid_bits: 7 };
    let root = HostPhysAddr::new(0x8040_4000);
    assert_eq!(Hgatp::new(HgatpMode::Bare, 0, HostPhysAddr::ZERO, &caps).unwrap().bits(), 0);
    assert_eq!(
        Hgatp::new(HgatpMode::Bare, 3, HostPhysAddr::ZERO, &caps),
        Err(HgatpError::BareWithFields { vmid: 3, root: HostPhysAddr::ZERO })
    );
    assert_eq!(Hgatp::new(HgatpMode::Bare, 0, root, &caps), Err(HgatpError::BareWithFields { vmid: 0, root }));
}

#[test]
fn ept_pointer_for_table_refuses_options_the_cpu_lacks() {
    let ram = twostage_npt::testing::HostRam::new(16);
    let caps = EptCapabilities::new(SKYLAKE_X, 39);
    // Options taken from the same capabilities always pass.
    let t = PageTable::<Ept4, _>::new(&ram, caps.table_options(true)).unwrap();
    assert!(EptPointer::for_table(&t, &caps).unwrap().accessed_dirty());
    drop(t);
    // `for_format` allows everything the format has: 1 GiB pages, execute-only, 52-bit addresses.
    let no_1g = EptCapabilities::new(SKYLAKE_X & !(1 << 17), 52);
    let t = PageTable::<Ept4, _>::new(&ram, TableOptions::for_format::<Ept4>()).unwrap();
    assert_eq!(EptPointer::for_table(&t, &no_1g), Err(EptPointerError::PageSizeUnsupported(PageSize::Size1G)));
    let no_2m = EptCapabilities::new(SKYLAKE_X & !(1 << 16), 52);
    assert_eq!(EptPointer::for_table(&t, &no_2m), Err(EptPointerError::PageSizeUnsupported(PageSize::Size2M)));
    let no_xo = EptCapabilities::new(SKYLAKE_X & !1, 52);
    assert_eq!(EptPointer::for_table(&t, &no_xo), Err(EptPointerError::ExecuteOnlyUnsupported));
    assert_eq!(EptPointer::for_table(&t, &caps), Err(EptPointerError::MaxPhysTooWide { table: 52, cpu: 39 }));
    let no_ad = EptCapabilities::new(SKYLAKE_X & !(1 << 21), 52);
    assert_eq!(EptPointer::for_table(&t, &no_ad), Err(EptPointerError::AccessedDirtyUnsupported));
    assert!(EptPointer::for_table(&t, &EptCapabilities::new(SKYLAKE_X, 52)).is_ok());
}
