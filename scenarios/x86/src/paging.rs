//! Paging: the CPU's capabilities, the bundled guest running on its own page tables over the
//! EPT, demand-zero pages, a 2 MiB EPT page split and collapsed, and a remap under the running
//! guest.

use crate::guest::{self, GuestOps, Op, Unassigned};
use crate::{ctx, gpa, Machine, Need};
use alloc::vec::Vec;
use twostage_harness::{ensure, Pass, Scenario, Verdict};
use twostage_hv_x86::hv::{FaultAction, Hv};
use twostage_hv_x86::{println, serial};
use twostage_npt::{FrameAllocator, GuestPhysAddr, MapSize, MappingFlags, PageSize, FRAME_SIZE};
use twostage_vmx::exit::EptViolation;
use twostage_vmx::EptCapsSummary;

/// The paging scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("capabilities", s_capabilities),
    Scenario::new("long-mode guest with its own page tables: hypercalls and forwarded COM1", s_guest_runs),
    Scenario::new("demand-zero paging", s_demand_zero),
    Scenario::needing("huge pages: 2 MiB EPT leaf, split, protect inside, collapse", &[Need::Ept2M], s_huge_pages),
    Scenario::new("remap while the guest runs", s_remap),
];

fn s_capabilities(m: &mut Machine) -> Verdict {
    let (hv, c) = (&mut m.hv, &m.caps);
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
    Ok(Pass::Plain)
}

fn s_guest_runs(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    let first = ctx(hv.op_plain(Op::Read(guest::CODE)), "guest read of its own code")?;
    let mut want = [0u8; 8];
    ctx(hv.copy_from_guest(GuestPhysAddr::new(guest::CODE), &mut want), "hypervisor read")?;
    ensure!(first == u64::from_le_bytes(want), "guest read {first:#x}, memory holds {:#x}", u64::from_le_bytes(want));
    ensure!(hv.stats.io >= 60, "only {} I/O exits for the greeting", hv.stats.io);
    ensure!(hv.stats.vmcalls >= 2, "only {} VMCALLs", hv.stats.vmcalls);
    // An OUT the hypervisor asks for by hypercall is forwarded too (a newline on the console).
    let io = hv.stats.io;
    ctx(hv.op_plain(Op::Out(serial::COM1, b'\n')), "guest OUT")?;
    ensure!(hv.stats.io == io + 1, "the guest's OUT did not exit");
    println!("   {} I/O exits forwarded to COM1, {} VMCALLs", hv.stats.io, hv.stats.vmcalls);
    Ok(Pass::Plain)
}

fn s_demand_zero(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
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
    Ok(Pass::Plain)
}

fn s_huge_pages(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
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
    Ok(Pass::Plain)
}

fn s_remap(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    let a = hv.zeroed_frame().ok_or("frames")?;
    let b = hv.zeroed_frame().ok_or("frames")?;
    hv.host_write(a, &0xAAAAu64.to_le_bytes());
    hv.host_write(b, &0xBBBBu64.to_le_bytes());
    ctx(hv.map(gpa::REMAP, a, 0x1000, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)), "map A")?;
    ensure!(ctx(hv.op_plain(Op::Read(gpa::REMAP)), "read")? == 0xAAAA, "not A");
    let invepts = hv.stats.invepts;
    ctx(hv.unmap(gpa::REMAP, 0x1000), "unmap")?;
    ctx(hv.map(gpa::REMAP, b, 0x1000, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)), "map B")?;
    ensure!(hv.stats.invepts > invepts, "the remap issued no INVEPT");
    ensure!(ctx(hv.op_plain(Op::Read(gpa::REMAP)), "read")? == 0xBBBB, "guest still sees A after remap + INVEPT");
    ctx(hv.op_plain(Op::Write(gpa::REMAP, 0xCCCC)), "write")?;
    let (mut ra, mut rb) = ([0u8; 8], [0u8; 8]);
    hv.host_read(a, &mut ra);
    hv.host_read(b, &mut rb);
    ensure!(u64::from_le_bytes(ra) == 0xAAAA && u64::from_le_bytes(rb) == 0xCCCC, "write went to the wrong frame");
    // SAFETY: A is no longer mapped (the unmap was flushed) and nothing else refers to it.
    unsafe { hv.frames.deallocate_frames(a, 1) };
    println!("   {a:?} -> {b:?} under the running guest; {} INVEPT for it", hv.stats.invepts - invepts);
    Ok(Pass::Plain)
}
