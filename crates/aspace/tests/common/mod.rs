//! Helpers shared by the integration tests: fake RAM, a simulated guest CPU.
#![allow(dead_code)]

pub mod checked;

use std::sync::Arc;
use twostage_aspace::{AddressSpace, FaultOutcome};
use twostage_npt::testing::HostRam;
use twostage_npt::{Access, AdMode, Format, GpaRange, GuestPhysAddr, MappingFlags, NestedPageFaultInfo, TableOptions};

pub type Ram = Arc<HostRam>;

pub fn ram(frames: usize) -> Ram {
    Arc::new(HostRam::new(frames))
}

pub fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(a)
}

pub fn range(start: u64, len: u64) -> GpaRange {
    GpaRange::from_start_len(gpa(start), len).unwrap()
}

pub fn opts<F: Format>(ad: AdMode) -> TableOptions {
    TableOptions { ad, ..TableOptions::for_format::<F>() }
}

/// The spec model's view of fake RAM.
pub struct ModelMem<'a>(pub &'a HostRam);

impl twostage_spec_model::PhysMem for ModelMem<'_> {
    fn read_u64(&mut self, pa: twostage_spec_model::Hpa) -> Option<u64> {
        in_ram(self.0, pa.0).then(|| self.0.read_u64(pa.0))
    }
    fn write_u64(&mut self, pa: twostage_spec_model::Hpa, value: u64) -> Option<()> {
        in_ram(self.0, pa.0).then(|| self.0.write_u64(pa.0, value))
    }
}

fn in_ram(ram: &HostRam, pa: u64) -> bool {
    let base = twostage_npt::testing::HOST_RAM_BASE;
    pa >= base && pa + 8 <= base + ram.frames() as u64 * 4096
}

/// A CPU as the spec model describes it (no TLB): walks the nested table of `F`.
pub trait ModelCpu: Format {
    /// Translates `gpa` for `access`, setting A/D bits as the hardware would when `hw_ad`.
    fn model_walk(ram: &HostRam, root: u64, hw_ad: bool, gpa: GuestPhysAddr, access: Access) -> Result<u64, String>;
}

fn model_access(a: Access) -> twostage_spec_model::Access {
    match a {
        Access::Read => twostage_spec_model::Access::Read,
        Access::Write => twostage_spec_model::Access::Write,
        Access::Execute => twostage_spec_model::Access::Fetch,
    }
}

/// IA32_VMX_EPT_VPID_CAP of Bochs' skylake_x plus 1 GiB pages (bit 17).
pub const EPT_CAPS: u64 = 0xf0106334141 | 1 << 17;

impl ModelCpu for twostage_npt::Ept4 {
    fn model_walk(ram: &HostRam, root: u64, hw_ad: bool, gpa: GuestPhysAddr, access: Access) -> Result<u64, String> {
        use twostage_spec_model::ept;
        let caps = ept::EptCaps::from_msr(EPT_CAPS, 48);
        // EPTP: memory type WB (6), walk length 4 (3 << 3), A/D enable (bit 6): SDM Vol. 3C 25.6.11.
        let eptp = root | 6 | 3 << 3 | (hw_ad as u64) << 6;
        ept::walk(
            &mut ModelMem(ram),
            eptp,
            &caps,
            twostage_spec_model::Gpa(gpa.as_u64()),
            model_access(access).into(),
            ept::GuestLinear::NONE,
        )
        .map(|w| w.hpa.0)
        .map_err(|e| format!("{e:?}"))
    }
}

impl ModelCpu for twostage_npt::Sv39x4 {
    fn model_walk(ram: &HostRam, root: u64, hw_ad: bool, gpa: GuestPhysAddr, access: Access) -> Result<u64, String> {
        use twostage_spec_model::gstage;
        let hgatp =
            gstage::Hgatp { mode: gstage::HgatpMode::Sv39x4, vmid: 1, root: twostage_spec_model::Hpa(root) }.encode();
        let cfg = gstage::GstageConfig { hw_ad_update: hw_ad, ..Default::default() };
        gstage::walk(&mut ModelMem(ram), hgatp, &cfg, twostage_spec_model::Gpa(gpa.as_u64()), model_access(access))
            .map(|w| w.hpa.0)
            .map_err(|e| format!("{e:?}"))
    }
}

/// A guest access through the spec model's walk of the real table (A/D set by "hardware"
/// under `AdMode::Hardware`); faults are resolved with `handle_fault` and flushed until the
/// access succeeds. Returns the value read (or written).
pub fn guest_access<F: ModelCpu>(
    s: &mut AddressSpace<F, Ram>,
    ram: &HostRam,
    at: GuestPhysAddr,
    access: Access,
    write_val: u64,
) -> u64 {
    let hw_ad = s.options().ad == AdMode::Hardware;
    for _ in 0..8 {
        match F::model_walk(ram, s.root().as_u64(), hw_ad, at, access) {
            Ok(hpa) if access == Access::Write => {
                ram.write_u64(hpa, write_val);
                return write_val;
            }
            Ok(hpa) => return ram.read_u64(hpa),
            Err(_) => match s.handle_fault(NestedPageFaultInfo::new(at, access)) {
                FaultOutcome::Resolved { flush } => s.flush(flush, |_| {}).unwrap(),
                other => panic!("guest {access} at {at:?}: {other:?}"),
            },
        }
    }
    panic!("guest {access} at {at:?} kept faulting");
}

pub fn guest_write<F: ModelCpu>(s: &mut AddressSpace<F, Ram>, ram: &HostRam, at: u64, v: u64) {
    guest_access(s, ram, gpa(at), Access::Write, v);
}

pub fn guest_read<F: ModelCpu>(s: &mut AddressSpace<F, Ram>, ram: &HostRam, at: u64) -> u64 {
    guest_access(s, ram, gpa(at), Access::Read, 0)
}

pub const RW: MappingFlags = MappingFlags::RW;

/// A dense per-thread index, standing in for the CPU number a hypervisor would give
/// `SharedAddressSpace::new`: live threads never share one (a thread's index is reused only
/// after it exits).
pub fn cpu_index() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    struct Slot(usize);
    impl Drop for Slot {
        fn drop(&mut self) {
            FREE.lock().unwrap().push(self.0);
        }
    }
    thread_local!(static SLOT: Slot = Slot(FREE.lock().unwrap().pop().unwrap_or_else(|| NEXT.fetch_add(1, Ordering::Relaxed))));
    SLOT.with(|s| s.0)
}

/// A small seeded generator (xorshift) for the tests' random operations.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
