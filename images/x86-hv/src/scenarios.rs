//! The scenario suite: each scenario makes the guest touch memory and checks what the hardware
//! and twostage did, printing `ok N - name` (or `# SKIP reason` when the CPU lacks the feature)
//! or `not ok N - name`, then `N passed, M failed`.

use crate::guest::{self, Op, Unassigned};
use crate::hv::{FaultAction, Hv, Stats};
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use twostage_baremetal::frames::Frames;
use twostage_npt::EptCapabilities;
use twostage_npt::{
    Ept4, FrameAllocator, GuestPhysAddr, HostPhysAddr, MapSize, MappingFlags, PageSize, PageTable, FRAME_SIZE,
};
use twostage_vmx::exit::EptViolation;
use twostage_vmx::hw::RealCpu;
use twostage_vmx::{EptCapsSummary, VcpuConfig, VmxVcpu};

/// What one scenario concluded.
pub enum Outcome {
    /// It ran and every check held.
    Pass,
    /// It ran, every check held, and it has a one-line summary for the `ok` line.
    PassWith(String),
    /// The CPU lacks what it needs (the reason says what).
    Skip(String),
}

/// A scenario's result: `Err` carries the failed check.
pub type Res = Result<Outcome, String>;

/// One scenario: its name and its body.
type Scenario = (&'static str, fn(&mut Hv, &Ctx) -> Res);

/// Fails the scenario with a message unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(alloc::format!($($arg)*));
        }
    };
}

/// Converts any debuggable error into a scenario failure with context.
pub fn ctx<T, E: core::fmt::Debug>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e:?}"))
}

/// GPAs of the scenario regions (each in its own 2 MiB of guest-physical space; the guest's page
/// tables identity-map the first 4 GiB).
pub mod gpa {
    /// Demand-zero region (64 KiB).
    pub const DEMAND: u64 = 0x0100_0000;
    /// One 2 MiB page.
    pub const HUGE: u64 = 0x0200_0000;
    /// Read-only page.
    pub const RO: u64 = 0x0300_0000;
    /// No-execute page with code.
    pub const NX: u64 = 0x0301_0000;
    /// Execute-only page with code.
    pub const XO: u64 = 0x0302_0000;
    /// Two pages sharing one frame, copy-on-write.
    pub const COW: u64 = 0x0400_0000;
    /// A page remapped while the guest runs.
    pub const REMAP: u64 = 0x0500_0000;
    /// Four pages for EPT A/D.
    pub const AD: u64 = 0x0600_0000;
    /// Four pages for dirty tracking.
    pub const DIRTY: u64 = 0x0700_0000;
    /// A second four pages for dirty tracking by write protection.
    pub const DIRTY_WP: u64 = 0x0710_0000;
    /// Nothing is mapped or emulated here.
    pub const UNASSIGNED: u64 = 0x0900_0000;
    /// The address-space (fork) scenario's demand-zero data region.
    pub const FORK_DATA: u64 = 0x0a00_0000;
    /// The address-space dirty-log scenario's data region (16 pages).
    pub const DIRTY_AS: u64 = 0x0b00_0000;
    /// The emulated UART's registers.
    pub const MMIO: u64 = 0xfeb0_0000;
}

/// `mov eax, 0x1234; ret`.
pub const CODE_1234: [u8; 6] = [0xb8, 0x34, 0x12, 0x00, 0x00, 0xc3];

/// What the scenarios share.
pub struct Ctx {
    /// EPT and VPID capabilities.
    pub ept: EptCapabilities,
}

/// Runs the suite; returns the exit status (0 when every scenario passed).
pub fn run(frames: &'static Frames) -> u32 {
    // SAFETY: ring 0, interrupts off, and this is the only RealCpu the image creates.
    let cpu = unsafe { RealCpu::new() };
    let vcpu = match VmxVcpu::new(cpu, frames, VcpuConfig::default()) {
        Ok(v) => v,
        Err(e) => {
            println!("VMXON failed: {e:?}");
            println!("not ok 1 - capabilities");
            println!("0 passed, 1 failed");
            return 1;
        }
    };
    let ept_caps = *vcpu.ept_capabilities();
    let ept = match PageTable::<Ept4, _>::new(frames, ept_caps.table_options(true)) {
        Ok(t) => t,
        Err(e) => {
            println!("EPT root: {e:?}");
            return 1;
        }
    };
    let mut hv = Hv { vcpu, ept, frames, stats: Stats::default() };
    let setup =
        guest::build(&mut hv).map_err(String::from).and_then(|entry| ctx(hv.vcpu.setup(&hv.ept, entry), "VMCS setup"));
    if let Err(e) = setup {
        println!("guest setup failed: {e}");
        println!("not ok 1 - capabilities");
        println!("0 passed, 1 failed");
        return 1;
    }
    let c = Ctx { ept: ept_caps };
    let list: [Scenario; 23] = [
        ("capabilities", s_capabilities),
        ("long-mode guest with its own page tables: hypercalls and forwarded COM1", s_guest_runs),
        ("demand-zero paging", s_demand_zero),
        ("huge pages: 2 MiB EPT leaf, split, protect inside, collapse", s_huge_pages),
        ("permission fault: write to read-only", s_write_ro),
        ("permission fault: execute on no-execute", s_exec_nx),
        ("permission fault: execute-only page", s_exec_only),
        ("copy-on-write (engine level)", s_cow_engine),
        ("copy-on-write and fork (twostage-aspace)", crate::scenarios2::s_fork),
        ("MMIO exits decoded: emulated UART", crate::scenarios2::s_mmio),
        ("guest memory by GPA across a page boundary", crate::scenarios2::s_gpa_copy),
        ("guest memory by GVA across a page boundary (software walk through EPT)", crate::scenarios2::s_gva_copy),
        ("instruction fetch across a page", crate::scenarios2::s_fetch_across),
        ("remap while the guest runs", crate::scenarios2::s_remap),
        ("EPT accessed/dirty bits read and cleared", crate::scenarios2::s_ept_ad),
        ("dirty tracking (EPT dirty bits, or write protection without them)", crate::scenarios2::s_dirty_log),
        ("dirty tracking by write protection", crate::scenarios2::s_dirty_wp),
        ("dirty log through twostage-aspace (mode chosen from the CPU)", crate::scenarios2::s_dirty_aspace),
        ("recovered faults: unassigned GPA, bad GPA/GVA copies give typed errors", crate::scenarios2::s_recovered),
        ("EPT misconfiguration exit decoded with its GPA", crate::scenarios3::s_misconfig),
        ("failed VM entries named: VM-instruction error, invalid guest state", crate::scenarios3::s_entry_failures),
        ("guest triple fault reported, guest restarted", crate::scenarios3::s_triple_fault),
        ("hostile guest", crate::hostile::s_hostile),
    ];
    println!(
        "# twostage x86 suite on this CPU: EPT A/D {}, execute-only {}, 2M pages {}, 1G pages {}",
        c.ept.accessed_dirty(),
        c.ept.execute_only(),
        c.ept.pages_2m(),
        c.ept.pages_1g()
    );
    println!("# depends: 4 needs 2 MiB EPT pages; 7 needs execute-only EPT; 15 needs EPT A/D (SKIP without);");
    println!(
        "#          16 uses EPT dirty bits where offered, write protection otherwise; 17 always write protection;"
    );
    println!("#          9 and 18 run on twostage-aspace (fork, copy-on-write; dirty log: D bits or write protection); 10, 12, 13 walk the guest's own tables through the EPT");
    println!("#          23 uses the VMX-preemption timer as watchdog where offered (pin-based allowed-1 bit 6)");
    let (mut passed, mut failed) = (0, 0);
    for (i, (name, f)) in list.iter().enumerate() {
        let n = i + 1;
        match f(&mut hv, &c) {
            Ok(Outcome::Pass) => {
                passed += 1;
                println!("ok {n} - {name}");
            }
            Ok(Outcome::PassWith(summary)) => {
                passed += 1;
                println!("ok {n} - {name}: {summary}");
            }
            Ok(Outcome::Skip(why)) => {
                passed += 1;
                println!("ok {n} - {name} # SKIP {why}");
            }
            Err(why) => {
                failed += 1;
                println!("not ok {n} - {name}: {why}");
            }
        }
    }
    hv.report("what the memory subsystem did");
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        0
    } else {
        1
    }
}

fn s_capabilities(hv: &mut Hv, c: &Ctx) -> Res {
    let vc = hv.vcpu.capabilities();
    println!(
        "   VMX: revision {:#x}, TRUE controls {}, unrestricted guest {}, VPID {} (in use: {:?})",
        vc.basic.revision,
        vc.basic.true_controls,
        vc.has_unrestricted_guest(),
        vc.has_vpid(),
        hv.vcpu.vpid()
    );
    println!("   EPT/VPID: {}", EptCapsSummary(&c.ept));
    println!("   EPTP: {:?}", hv.vcpu.ept_pointer());
    let o = hv.ept.options();
    println!(
        "   table options: 2M pages {}, 1G pages {}, A/D {:?}, execute-only {}",
        o.leaf_sizes.contains(PageSize::Size2M),
        o.leaf_sizes.contains(PageSize::Size1G),
        o.ad,
        o.execute_only
    );
    ensure!(c.ept.walk_length_4() && c.ept.memtype_wb(), "EPT lacks a 4-level write-back walk");
    let eptp = hv.vcpu.ept_pointer().ok_or("no EPTP")?;
    ensure!(
        eptp.accessed_dirty() == c.ept.accessed_dirty(),
        "EPTP A/D bit {} but CPU A/D {}",
        eptp.accessed_dirty(),
        c.ept.accessed_dirty()
    );
    Ok(Outcome::Pass)
}

fn s_guest_runs(hv: &mut Hv, _c: &Ctx) -> Res {
    let first = ctx(hv.op_plain(Op::Read(guest::CODE)), "guest read of its own code")?;
    let mut want = [0u8; 8];
    ctx(hv.copy_from_guest(GuestPhysAddr::new(guest::CODE), &mut want), "hypervisor read")?;
    ensure!(first == u64::from_le_bytes(want), "guest read {first:#x}, memory holds {:#x}", u64::from_le_bytes(want));
    ensure!(hv.stats.io >= 60, "only {} I/O exits for the greeting", hv.stats.io);
    ensure!(hv.stats.vmcalls >= 2, "only {} VMCALLs", hv.stats.vmcalls);
    // An OUT the hypervisor asks for by hypercall is forwarded too (a newline on the console).
    let io = hv.stats.io;
    ctx(hv.op_plain(Op::Out(crate::serial::COM1, b'\n')), "guest OUT")?;
    ensure!(hv.stats.io == io + 1, "the guest's OUT did not exit");
    println!("   {} I/O exits forwarded to COM1, {} VMCALLs", hv.stats.io, hv.stats.vmcalls);
    Ok(Outcome::Pass)
}

fn s_demand_zero(hv: &mut Hv, _c: &Ctx) -> Res {
    let mut faults: Vec<EptViolation> = Vec::new();
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        let page = v.gpa.align_down(FRAME_SIZE as u64).as_u64();
        if !(gpa::DEMAND..gpa::DEMAND + 0x10000).contains(&page) || hv.ept.query(v.gpa).is_some() {
            return FaultAction::Fail("fault outside the demand-zero region");
        }
        faults.push(*v);
        let Some(frame) = hv.zeroed_frame() else { return FaultAction::Fail("out of frames") };
        match hv.map(page, frame, FRAME_SIZE as u64, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)) {
            Ok(()) => FaultAction::Retry,
            Err(_) => FaultAction::Fail("map failed"),
        }
    };
    let v = 0x1122_3344_5566_7788;
    ctx(hv.op(Op::Write(gpa::DEMAND + 0x10, v), &mut handler, &mut Unassigned), "guest write")?;
    let back = ctx(hv.op(Op::Read(gpa::DEMAND + 0x10), &mut handler, &mut Unassigned), "guest read")?;
    let zero = ctx(hv.op(Op::Read(gpa::DEMAND + 0x3008), &mut handler, &mut Unassigned), "guest read of a new page")?;
    for f in &faults {
        println!("   EPT violation at {:?}: qualification {:?}", f.gpa, f.qualification);
    }
    ensure!(back == v, "read back {back:#x}, wrote {v:#x}");
    ensure!(zero == 0, "fresh page reads {zero:#x}");
    ensure!(faults.len() == 2, "{} faults, expected 2", faults.len());
    let (w, r) = (faults[0], faults[1]);
    ensure!(w.qualification.write() && w.qualification.entry_rights().is_empty(), "first fault {:?}", w.qualification);
    ensure!(
        w.nested_page_fault_info().access_flags == MappingFlags::WRITE,
        "fault info {:?}",
        w.nested_page_fault_info()
    );
    ensure!(r.qualification.read() && !r.qualification.write(), "second fault {:?}", r.qualification);
    ensure!(w.gpa == GuestPhysAddr::new(gpa::DEMAND + 0x10), "fault GPA {:?}", w.gpa);
    ensure!(
        w.qualification.linear_address_valid() && w.qualification.linear_translation(),
        "no linear address in {:?}",
        w.qualification
    );
    Ok(Outcome::Pass)
}

fn s_huge_pages(hv: &mut Hv, c: &Ctx) -> Res {
    if !c.ept.pages_2m() {
        return Ok(Outcome::Skip("no 2 MiB EPT pages on this CPU".into()));
    }
    let hpa = hv.frames.allocate_frames(512, 512).ok_or("no 2 MiB of contiguous host memory")?;
    let (a, b) = (0x1_0008u64, 0x1f_fff0u64);
    hv.host_write(hpa + a, &0xAAAA_0001u64.to_le_bytes());
    hv.host_write(hpa + b, &0xBBBB_0002u64.to_le_bytes());
    ctx(hv.map(gpa::HUGE, hpa, 2 << 20, MappingFlags::RW, MapSize::Exactly(PageSize::Size2M)), "map 2M")?;
    let leaf = hv.ept.query(GuestPhysAddr::new(gpa::HUGE + a)).ok_or("no leaf")?;
    ensure!(leaf.size == PageSize::Size2M, "leaf is {:?}", leaf.size);
    let violations = hv.stats.ept_violations;
    ensure!(ctx(hv.op_plain(Op::Read(gpa::HUGE + a)), "read")? == 0xAAAA_0001, "wrong data at +{a:#x}");
    ensure!(ctx(hv.op_plain(Op::Read(gpa::HUGE + b)), "read")? == 0xBBBB_0002, "wrong data at +{b:#x}");
    let f = ctx(hv.ept.split(GuestPhysAddr::new(gpa::HUGE)), "split")?;
    hv.flush(f);
    let leaf = hv.ept.query(GuestPhysAddr::new(gpa::HUGE + a)).ok_or("no leaf after split")?;
    ensure!(leaf.size == PageSize::Size4K && leaf.hpa == hpa + 0x1_0000, "after split: {leaf:?}");
    ensure!(ctx(hv.op_plain(Op::Read(gpa::HUGE + b)), "read")? == 0xBBBB_0002, "wrong data after split");
    ensure!(hv.stats.ept_violations == violations, "EPT violations on a mapped huge page");
    // Protect one 4 KiB piece: only it faults.
    ctx(hv.protect(gpa::HUGE + 0x1_0000, 0x1000, MappingFlags::READ), "protect")?;
    let mut seen = 0;
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        seen += 1;
        if v.qualification.write()
            && v.qualification.entry_rights() == MappingFlags::READ
            && hv.protect(gpa::HUGE + 0x1_0000, 0x1000, MappingFlags::RW).is_ok()
        {
            FaultAction::Retry
        } else {
            FaultAction::Fail("unexpected fault in the split page")
        }
    };
    ctx(hv.op(Op::Write(gpa::HUGE + 0x2_0000, 5), &mut handler, &mut Unassigned), "write to an untouched piece")?;
    ctx(hv.op(Op::Write(gpa::HUGE + a, 6), &mut handler, &mut Unassigned), "write to the protected piece")?;
    ensure!(seen == 1, "{seen} faults, expected exactly 1 (the protected 4K piece)");
    let f = ctx(hv.ept.collapse(GuestPhysAddr::new(gpa::HUGE), PageSize::Size2M), "collapse")?;
    hv.flush(f);
    let leaf = hv.ept.query(GuestPhysAddr::new(gpa::HUGE + b)).ok_or("no leaf after collapse")?;
    ensure!(leaf.size == PageSize::Size2M, "after collapse: {:?}", leaf.size);
    ensure!(ctx(hv.op_plain(Op::Read(gpa::HUGE + a)), "read")? == 6, "collapsed page lost the write");
    println!(
        "   2M leaf at {:?} -> {:?}: read, split into 4K, one piece protected (1 fault), collapsed back",
        GuestPhysAddr::new(gpa::HUGE),
        hpa
    );
    Ok(Outcome::Pass)
}

fn map_frame_with(hv: &mut Hv, gpa: u64, bytes: &[u8], flags: MappingFlags) -> Result<HostPhysAddr, String> {
    let f = hv.zeroed_frame().ok_or("out of frames")?;
    hv.host_write(f, bytes);
    ctx(hv.map(gpa, f, FRAME_SIZE as u64, flags, MapSize::Exactly(PageSize::Size4K)), "map")?;
    Ok(f)
}

fn s_write_ro(hv: &mut Hv, _c: &Ctx) -> Res {
    map_frame_with(hv, gpa::RO, &0x5151u64.to_le_bytes(), MappingFlags::READ)?;
    ensure!(ctx(hv.op_plain(Op::Read(gpa::RO)), "read")? == 0x5151, "read-only page reads wrong");
    let mut q = None;
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        q = Some(v.qualification);
        match hv.protect(gpa::RO, 0x1000, MappingFlags::RW) {
            Ok(()) => FaultAction::Retry,
            Err(_) => FaultAction::Fail("protect failed"),
        }
    };
    ctx(hv.op(Op::Write(gpa::RO, 0x7777), &mut handler, &mut Unassigned), "write")?;
    let q = q.ok_or("the write to a read-only page did not fault")?;
    println!("   qualification {q:?}");
    ensure!(q.write() && !q.fetch() && q.entry_rights() == MappingFlags::READ, "qualification {q:?}");
    ensure!(ctx(hv.op_plain(Op::Read(gpa::RO)), "read")? == 0x7777, "write after upgrade lost");
    Ok(Outcome::Pass)
}

fn s_exec_nx(hv: &mut Hv, _c: &Ctx) -> Res {
    map_frame_with(hv, gpa::NX, &CODE_1234, MappingFlags::RW)?;
    let mut q = None;
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        q = Some(v.qualification);
        match hv.protect(gpa::NX, 0x1000, MappingFlags::RX) {
            Ok(()) => FaultAction::Retry,
            Err(_) => FaultAction::Fail("protect failed"),
        }
    };
    let r = ctx(hv.op(Op::Exec(gpa::NX), &mut handler, &mut Unassigned), "call")?;
    let q = q.ok_or("executing a no-execute page did not fault")?;
    println!("   qualification {q:?}");
    ensure!(q.fetch() && !q.write() && q.entry_rights() == MappingFlags::RW, "qualification {q:?}");
    ensure!(r == 0x1234, "code returned {r:#x}");
    Ok(Outcome::Pass)
}

fn s_exec_only(hv: &mut Hv, c: &Ctx) -> Res {
    if !c.ept.execute_only() {
        return Ok(Outcome::Skip("no execute-only EPT translations on this CPU (EPT_VPID_CAP bit 0)".into()));
    }
    map_frame_with(hv, gpa::XO, &CODE_1234, MappingFlags::EXECUTE)?;
    let r = ctx(hv.op_plain(Op::Exec(gpa::XO)), "call of execute-only code")?;
    ensure!(r == 0x1234, "code returned {r:#x}");
    let mut q = None;
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        q = Some(v.qualification);
        match hv.protect(gpa::XO, 0x1000, MappingFlags::RX) {
            Ok(()) => FaultAction::Retry,
            Err(_) => FaultAction::Fail("protect failed"),
        }
    };
    let bytes = ctx(hv.op(Op::Read(gpa::XO), &mut handler, &mut Unassigned), "read")?;
    let q = q.ok_or("reading an execute-only page did not fault")?;
    println!("   read of execute-only page: qualification {q:?}");
    ensure!(q.read() && q.entry_rights() == MappingFlags::EXECUTE, "qualification {q:?}");
    ensure!(bytes.to_le_bytes()[..6] == CODE_1234, "read {bytes:#x}");
    Ok(Outcome::Pass)
}

fn s_cow_engine(hv: &mut Hv, _c: &Ctx) -> Res {
    let shared = map_frame_with(hv, gpa::COW, &0xC0C0u64.to_le_bytes(), MappingFlags::READ)?;
    ctx(
        hv.map(gpa::COW + 0x1000, shared, 0x1000, MappingFlags::READ, MapSize::Exactly(PageSize::Size4K)),
        "map alias",
    )?;
    ensure!(ctx(hv.op_plain(Op::Read(gpa::COW + 0x1000)), "read")? == 0xC0C0, "alias reads wrong");
    let mut copies = 0;
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        let page = v.gpa.align_down(0x1000u64);
        let Some(leaf) = hv.ept.query(page) else { return FaultAction::Fail("no leaf") };
        if !v.qualification.write() || leaf.hpa != shared {
            return FaultAction::Fail("not a copy-on-write fault");
        }
        let Some(copy) = hv.frames.allocate_frame() else { return FaultAction::Fail("out of frames") };
        let mut buf = [0u8; FRAME_SIZE];
        hv.host_read(shared, &mut buf);
        hv.host_write(copy, &buf);
        if hv.unmap(page.as_u64(), 0x1000).is_err()
            || hv.map(page.as_u64(), copy, 0x1000, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)).is_err()
        {
            return FaultAction::Fail("remap failed");
        }
        copies += 1;
        FaultAction::Retry
    };
    ctx(hv.op(Op::Write(gpa::COW + 0x1000, 0xD1D1), &mut handler, &mut Unassigned), "write")?;
    let a = ctx(hv.op_plain(Op::Read(gpa::COW)), "read original")?;
    let b = ctx(hv.op_plain(Op::Read(gpa::COW + 0x1000)), "read copy")?;
    let mut orig = [0u8; 8];
    hv.host_read(shared, &mut orig);
    ensure!(copies == 1, "{copies} copies");
    ensure!(a == 0xC0C0 && b == 0xD1D1 && u64::from_le_bytes(orig) == 0xC0C0, "original {a:#x}, copy {b:#x}");
    println!("   shared frame {shared:?} stayed 0xc0c0; the writer got its own copy");
    Ok(Outcome::Pass)
}
