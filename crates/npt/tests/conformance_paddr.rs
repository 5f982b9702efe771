//! kvm-unit-tests x86/vmx_tests.c "paddr" cases through engine-built tables: a guest's own x86-64
//! page tables live in guest memory that twostage-npt maps; the hypervisor write-protects or
//! unmaps the guest's page-table page with the engine; the spec model's guest walk (through the
//! engine's EPT) then exits as kvm-unit-tests expects hardware to. See docs/conformance.md.

mod common;

use common::Ram;
use twostage_npt::testing::HostRam;
use twostage_npt::*;
use twostage_npt::{EptCapabilities, EptPointer};
use twostage_spec_model::ept::{qual, EptCaps, EptExit};
use twostage_spec_model::stage1::x86::{self, X86Error, X86Regs};
use twostage_spec_model::stage1::{EptStage2, Privilege};
use twostage_spec_model::{Access, Gpa, Gva};

const SKYLAKE_X: u64 = 0xf0106334141;
const MAXPHY: u8 = 46;
/// The guest linear address: first of a 1 GiB-aligned region (its PTE is entry 0 of its page).
const GVA: u64 = 0x0000_1000_0000_0000;
/// Guest-physical layout: PML4, PDPT, PD, PT pages, then the data page at 1 << 39.
const PML4: u64 = 0x10_0000;
const PT: u64 = 0x10_3000;
const DATA: u64 = 1 << 39;
const PT_P: u64 = 1;
const PT_RW: u64 = 2;
const PT_US: u64 = 4;
const PT_A: u64 = 1 << 5;
const PT_D: u64 = 1 << 6;

struct Guest<'r> {
    ram: &'r HostRam,
    table: PageTable<Ept4, &'r HostRam>,
    eptp: u64,
    /// Host frame behind the guest PT page.
    pt_frame: u64,
}

impl<'r> Guest<'r> {
    /// Guest tables for GVA -> DATA with the guest PTE's A/D bits `pte_ad`; every guest page is a
    /// HostRam frame mapped RWX by the engine (4 KiB); `ad` asks for hardware EPT A/D.
    fn new(ram: &'r HostRam, ad: bool, pte_ad: u64) -> Self {
        let caps = EptCapabilities::new(SKYLAKE_X, MAXPHY);
        let mut table = PageTable::<Ept4, _>::new(ram, caps.table_options(ad)).unwrap();
        let eptp = EptPointer::for_table(&table, &caps).unwrap().bits();
        let mut frames = [0u64; 5];
        let gpas = [PML4, PML4 + 0x1000, PML4 + 0x2000, PT, DATA];
        for (f, g) in frames.iter_mut().zip(gpas) {
            let h = ram.allocate_frame().unwrap();
            ram.write_bytes(h.as_u64(), &[0; 4096]);
            table.map(GuestPhysAddr::new(g), h, 4096, MappingFlags::RWX, MapSize::Largest).unwrap().ignore();
            *f = h.as_u64();
        }
        for level in (1..4).rev() {
            let idx = (GVA >> (12 + 9 * level)) & 511;
            let next = gpas[4 - level as usize];
            ram.write_u64(frames[3 - level as usize] + idx * 8, next | PT_P | PT_RW | PT_US | PT_A);
        }
        assert_eq!((GVA >> 12) & 511, 0);
        ram.write_u64(frames[3], DATA | PT_P | PT_RW | PT_US | pte_ad);
        Self { ram, table, eptp, pt_frame: frames[3] }
    }

    fn run(&mut self, access: Access, privilege: Privilege) -> Result<x86::X86Walk, X86Error<EptExit>> {
        let regs = X86Regs {
            cr3: PML4,
            cr0_wp: true,
            cr4_smep: false,
            cr4_smap: false,
            rflags_ac: false,
            efer_nxe: true,
            maxphyaddr: MAXPHY,
            page_1g: true,
        };
        let mut s2 = EptStage2 { eptp: self.eptp, caps: EptCaps::from_msr(SKYLAKE_X, MAXPHY) };
        let va = if access == Access::Fetch { GVA + 8 } else { GVA };
        x86::walk(&mut Ram(self.ram), &mut s2, &regs, Gva(va), access, privilege)
    }
}

const OPS: [(Access, Privilege); 4] = [
    (Access::Read, Privilege::Supervisor),
    (Access::Write, Privilege::Supervisor),
    (Access::Fetch, Privilege::Supervisor),
    (Access::Fetch, Privilege::User),
];

#[track_caller]
fn violation(r: Result<x86::X86Walk, X86Error<EptExit>>) -> u64 {
    match r {
        Err(X86Error::Stage2 { fault: EptExit::Violation { gpa, qualification }, during_walk: true }) => {
            assert_eq!(gpa, Gpa(PT), "the exit names the guest PTE");
            qualification
        }
        other => panic!("expected a violation on the guest PTE, got {other:?}"),
    }
}

/// paddr_read_only_ad_disabled / _ad_enabled and paddr_read_execute_*: the engine maps the guest's
/// page-table page read-only (or read-execute); the guest's A/D update of its PTE exits with
/// RD | WR | PERM_RD (| PERM_EX); with EPT A/D on even the PTE read does.
#[test]
fn paddr_read_only_and_read_execute_through_engine_tables() {
    for (flags, perms) in [(MappingFlags::READ, qual::READABLE), (MappingFlags::RX, qual::READABLE | qual::EXECUTABLE)]
    {
        let q = qual::READ | qual::WRITE | perms | qual::GLA_VALID;
        for ad in [false, true] {
            for pte_ad in [0, PT_A, PT_A | PT_D] {
                for (access, privilege) in OPS {
                    let ram = HostRam::new(64);
                    let mut g = Guest::new(&ram, ad, pte_ad);
                    let f = g.table.protect(GuestPhysAddr::new(PT), 4096, flags).unwrap();
                    g.table.flush(f, |_| {}).unwrap();
                    let needs_update = pte_ad & PT_A == 0 || (access == Access::Write && pte_ad & PT_D == 0);
                    let r = g.run(access, privilege);
                    let what = format!("{flags:?} A/D {ad} pte_ad {pte_ad:#x} {access:?} {privilege:?}");
                    if ad || needs_update {
                        assert_eq!(violation(r), q, "{what}");
                    } else {
                        assert!(r.is_ok(), "{what}: {r:?}");
                    }
                }
            }
        }
    }
}

/// paddr_not_present_ad_disabled / _ad_enabled: the engine unmaps the guest's page-table page.
#[test]
fn paddr_not_present_through_engine_tables() {
    for ad in [false, true] {
        for (access, privilege) in OPS {
            let ram = HostRam::new(64);
            let mut g = Guest::new(&ram, ad, PT_A | PT_D);
            let f = g.table.unmap(GuestPhysAddr::new(PT), 4096).unwrap();
            g.table.flush(f, |_| {}).unwrap();
            let want = qual::READ | if ad { qual::WRITE } else { 0 } | qual::GLA_VALID;
            assert_eq!(violation(g.run(access, privilege)), want, "A/D {ad} {access:?}");
        }
    }
}

/// paddr_read_write / _read_write_execute: allowed; the guest's PTE gets A (and D for a write).
/// With EPT A/D on, the guest's page-table page comes back from the engine's harvest as
/// accessed and dirty even though the guest only read through it: its walks are writes.
#[test]
fn paddr_read_write_through_engine_tables_and_what_a_dirty_log_sees() {
    for flags in [MappingFlags::RW, MappingFlags::RWX] {
        for ad in [false, true] {
            for (access, privilege) in OPS {
                let ram = HostRam::new(64);
                let mut g = Guest::new(&ram, ad, 0);
                let f = g.table.protect(GuestPhysAddr::new(PT), 4096, flags).unwrap();
                g.table.flush(f, |_| {}).unwrap();
                let f = g.table.take_accessed_dirty(GuestPhysAddr::new(0), 1 << 40, AdClear::Both, |_| {});
                g.table.flush(f, |_| {}).unwrap();
                assert!(g.run(access, privilege).is_ok(), "{flags:?} A/D {ad} {access:?}");
                let pte = g.ram.read_u64(g.pt_frame);
                assert_ne!(pte & PT_A, 0);
                assert_eq!(pte & PT_D != 0, access == Access::Write);
                let mut pt_seen = None;
                let f = g.table.take_accessed_dirty(GuestPhysAddr::new(PT), 4096, AdClear::None, |l| {
                    pt_seen = Some((l.accessed, l.dirty));
                });
                g.table.flush(f, |_| {}).unwrap();
                assert_eq!(pt_seen, ad.then_some((true, true)), "{flags:?} A/D {ad} {access:?}");
            }
        }
    }
}
