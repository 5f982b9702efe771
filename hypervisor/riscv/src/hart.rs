//! Boot-time setup: the frame allocator over the RAM the device tree reports, and what the hart
//! offers (the H extension, hgatp modes and VMIDLEN, G-stage A/D updating), probed once.

use crate::vm::Table;
use alloc::boxed::Box;
use core::sync::atomic::{AtomicPtr, Ordering};
use twostage_baremetal::frames::Frames;
use twostage_npt::{
    AdMode, FrameAllocator, GStageFormat, GuestPhysAddr, GuestVirtAddr, Hgatp, HgatpCapabilities, HostPhysAddr,
    MapSize, MappingFlags, PageSize, Sv39x4, TableOptions,
};
use twostage_rvh::hw;
use twostage_rvh::probe::GStageAd;

static FRAMES: Frames = Frames::empty();

/// The frame allocator over the RAM the device tree reported (given its range in `start`).
pub fn frames() -> &'static Frames {
    &FRAMES
}

/// What the hart offers, probed at boot.
#[derive(Clone, Copy, Debug)]
pub struct HartInfo {
    /// hstatus could be read (the H extension is present).
    pub h_csrs: bool,
    /// The device tree's ISA string lists 'h'.
    pub isa_h: bool,
    /// hgatp modes and VMIDLEN.
    pub caps: HgatpCapabilities,
    /// Timebase frequency from the device tree.
    pub timebase: u32,
    /// Whether the hart sets G-stage A/D bits itself (probed at boot).
    pub ad: GStageAd,
    /// The totalsize of the device tree the firmware handed the hypervisor (what a bare kernel
    /// would get): the guest's tree is padded to it ([`crate::boot::TreeSpec::room`]).
    pub dtb_len: u64,
}

/// Table options for a G-stage table of format `F` on this hart: A/D bits kept by the hart where
/// it updates them ([`AdMode::Hardware`]); otherwise by software ([`AdMode::Software`]) when
/// `ad_faults_resolved` (the guest's faults go to an address space's fault handler, which sets
/// A/D on the fault), else preset ([`AdMode::Preset`]) so that no access faults on them.
pub fn g_stage_options<F: GStageFormat>(ad_faults_resolved: bool) -> TableOptions {
    let ad = match (hart().ad, ad_faults_resolved) {
        (GStageAd::Hardware, _) => AdMode::Hardware,
        (GStageAd::Faults, true) => AdMode::Software,
        (GStageAd::Faults, false) => AdMode::Preset,
    };
    TableOptions { ad, ..TableOptions::for_format::<F>() }
}

static HART: AtomicPtr<HartInfo> = AtomicPtr::new(core::ptr::null_mut());
static BOOT_HART: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// The hart OpenSBI booted the hypervisor on (vCPU 0's, in an SMP VM).
pub fn boot_hart() -> usize {
    BOOT_HART.load(Ordering::Relaxed)
}

/// The probed hart information.
pub fn hart() -> HartInfo {
    let p = HART.load(Ordering::Acquire);
    assert!(!p.is_null(), "hart probed at boot");
    // SAFETY: set once in `start` from a leaked Box, never freed or written again.
    unsafe { *p }
}

/// Whether the hart sets G-stage A/D bits: an HLV.D through a one-leaf Sv39x4 table whose leaf
/// allows the read but has A = 0 (vsatp Bare, so the GVA is the GPA) either sets A or takes a
/// load guest-page fault ([`twostage_rvh::probe::classify_ad_probe`]). Leaves hgatp Bare.
fn probe_gstage_ad(caps: &HgatpCapabilities) -> Result<GStageAd, twostage_rvh::probe::AdProbeError> {
    use twostage_rvh::access::GuestMemOps;
    let probe = GuestPhysAddr::new(0x8000_0000);
    let opts = TableOptions { ad: AdMode::Hardware, ..TableOptions::for_format::<Sv39x4>() };
    let mut table = Table::new(frames(), opts).expect("frames for the probe table");
    let frame = frames().allocate_frame().expect("a frame for the probe page");
    // SAFETY: a fresh frame, identity-mapped in HS-mode.
    unsafe { core::ptr::write_bytes(frames().phys_to_virt(frame).as_ptr(), 0, 4096) };
    table.map(probe, frame, 4096, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)).expect("probe map").ignore();
    let hgatp = Hgatp::for_table(&table, 0, caps).expect("Sv39x4 is offered");
    // SAFETY: no guest runs; the probe table maps one zeroed frame; hgatp is restored to Bare
    // and fenced below; vsatp Bare makes the HLV's GVA its GPA.
    unsafe {
        hw::hgatp::write(hgatp.bits());
        hw::vsatp::write(0);
    }
    hw::hfence_gvma_all();
    hw::hfence_vvma_all();
    // SAFETY: hgatp and vsatp are set just above; the trap handler applies the exception table.
    let load = unsafe { hw::Hlv::new() }.load_u64(GuestVirtAddr::new(probe.as_u64())).map(|_| ());
    // SAFETY: leaves no table loaded.
    unsafe { hw::hgatp::write(0) };
    hw::hfence_gvma_all();
    let accessed = table.query(probe).is_some_and(|l| l.accessed);
    drop(table);
    // SAFETY: the table that mapped it is gone and fenced.
    unsafe { frames().deallocate_frames(frame, 1) };
    twostage_rvh::probe::classify_ad_probe(load, accessed)
}

/// Host RAM description after boot.
fn parse_dtb(dtb: usize) -> (u64, u64, &'static [u8]) {
    // SAFETY: OpenSBI passes a device tree in RAM; the header says how long it is.
    let head = unsafe { core::slice::from_raw_parts(dtb as *const u8, 40) };
    let len = twostage_baremetal::fdt::Fdt::total_size(head).expect("a device tree from OpenSBI");
    // SAFETY: as above, `len` bytes long, reserved from the frame allocator below.
    let blob = unsafe { core::slice::from_raw_parts(dtb as *const u8, len) };
    let fdt = twostage_baremetal::fdt::Fdt::new(blob).expect("a valid device tree");
    let mut mem = [(0, 0); 4];
    let n = fdt.memory(&mut mem).expect("memory nodes");
    assert!(n > 0, "no memory in the device tree");
    (mem[0].0, mem[0].1, blob)
}

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// What boot found: how the image goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// The hart cannot run a guest: end the run with this status.
    Stop(i32),
    /// A guest file was staged at (base, length): run it ([`crate::loader::run_staged`]).
    Staged(u64, u64),
    /// Nothing was staged: run the scenario suite.
    Suite,
}

/// Boot after the trap vector: frames, probes; says whether a staged guest or the suite runs.
pub fn start(hartid: usize, dtb: usize) -> Boot {
    BOOT_HART.store(hartid, Ordering::Relaxed);
    // SAFETY: the hypervisor's own FS field (§3.1.6.6), so compiler-emitted FP code cannot trap.
    unsafe { hw::sstatus::set(twostage_rvh::csr::sstatus::FS_INITIAL) };
    let (ram, ram_len, blob) = parse_dtb(dtb);
    let image_end = &raw const __image_end as u64;
    let image_start = &raw const __image_start as u64;
    let staged = crate::loader::staged();
    // SAFETY: RAM from the device tree, identity-mapped; the image, the device tree and the
    // staged guest are reserved below before any allocation.
    unsafe {
        FRAMES.init(HostPhysAddr::new(image_end), image_end as usize, ((ram + ram_len - image_end) / 4096) as usize)
    }
    .expect("RAM fits the bitmap");
    let fr = &FRAMES;
    fr.reserve(HostPhysAddr::new(dtb as u64), HostPhysAddr::new(dtb as u64 + blob.len() as u64));
    if let Some((base, len)) = staged {
        fr.reserve(HostPhysAddr::new(base - 4096), HostPhysAddr::new(base + len));
    }
    if let Some((base, len)) = crate::loader::staged_initrd() {
        fr.reserve(HostPhysAddr::new(base), HostPhysAddr::new(base + len));
    }
    let fdt = twostage_baremetal::fdt::Fdt::new(blob).expect("checked above");
    let isa = fdt
        .find("cpu@", 2, "riscv,isa")
        .ok()
        .flatten()
        .and_then(|v| core::str::from_utf8(v.strip_suffix(&[0]).unwrap_or(v)).ok());
    let timebase = fdt
        .find("cpus", 1, "timebase-frequency")
        .ok()
        .flatten()
        .and_then(|v| v.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(10_000_000);
    let h_csrs = hw::probe_hstatus().is_ok();
    let caps = if h_csrs {
        hw::probe()
    } else {
        HgatpCapabilities { sv39x4: false, sv48x4: false, sv57x4: false, vmid_bits: 0 }
    };
    let ad = if caps.sv39x4 { probe_gstage_ad(&caps) } else { Ok(GStageAd::Faults) };
    let info = HartInfo {
        h_csrs,
        isa_h: isa.is_some_and(twostage_rvh::probe::isa_has_h),
        caps,
        timebase,
        ad: *ad.as_ref().unwrap_or(&GStageAd::Faults),
        dtb_len: blob.len() as u64,
    };
    HART.store(Box::leak(Box::new(info)), Ordering::Release);
    let dt_svadu = ["riscv,isa", "riscv,isa-extensions"]
        .iter()
        .any(|p| fdt.find("cpu@", 2, p).ok().flatten().is_some_and(|v| twostage_rvh::probe::isa_lists(v, "svadu")));
    println!(
        "twostage riscv-hv: hart {hartid}, RAM {:#x}+{:#x}, image {:#x}..{:#x}, dtb {:#x}, {} free frames",
        ram,
        ram_len,
        image_start,
        image_end,
        dtb,
        fr.free()
    );
    println!("isa {}", isa.unwrap_or("?"));
    let dt = if dt_svadu { "lists" } else { "does not list" };
    match ad {
        Ok(GStageAd::Hardware) => {
            println!("G-stage A/D: hardware (the probe load set A; the device tree {dt} svadu): tables start with A=D=0")
        }
        Ok(GStageAd::Faults) => println!(
            "G-stage A/D: software (the probe load faulted on A=0; the device tree {dt} svadu): A/D set on fault, preset where nothing handles faults"
        ),
        Err(e) => println!("G-stage A/D: probe failed ({e}); assuming the hart faults: software A/D"),
    }
    if !h_csrs {
        println!("no H extension: hstatus is not readable");
        return Boot::Stop(3);
    }
    match staged {
        Some((base, len)) => Boot::Staged(base, len),
        None => Boot::Suite,
    }
}
