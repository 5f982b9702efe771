//! Copy-on-write: at the engine level (two guest pages share a frame until one is written), and
//! a `twostage-aspace` fork in which neither side sees the other's writes.

use crate::faults::map_frame_with;
use crate::guest::{GuestOps, Op, Unassigned};
use crate::space::{guest_space, load_eptp, op_on};
use crate::{ctx, gpa, Caps, Machine};
use twostage_harness::{ensure, Pass, Scenario, Verdict};
use twostage_hv_x86::hv::{invept, FaultAction, Hv};
use twostage_hv_x86::println;
use twostage_npt::{FrameAllocator, MapSize, MappingFlags, PageSize, FRAME_SIZE};
use twostage_vmx::exit::EptViolation;

/// The copy-on-write scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("copy-on-write (engine level)", s_cow_engine),
    Scenario::new("copy-on-write and fork (twostage-aspace)", s_fork),
];

fn s_cow_engine(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
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
    Ok(Pass::Plain)
}

fn s_fork(m: &mut Machine) -> Verdict {
    let (hv, c) = (&mut m.hv, &m.caps);
    let before = hv.frames.stats().in_use;
    let r = fork_inner(hv, c);
    // Whatever happened, the bundled guest goes back to its own EPT.
    load_eptp(&mut hv.vcpu, &hv.ept)?;
    let after = hv.frames.stats().in_use;
    r?;
    ensure!(after == before, "frames in use {before} before, {after} after both spaces were dropped");
    println!("   both spaces dropped: host frames back to {after}");
    Ok(Pass::Plain)
}

fn fork_inner(hv: &mut Hv, c: &Caps) -> Result<(), alloc::string::String> {
    let (mut space, _) = guest_space(hv, c, gpa::FORK_DATA, 0x10000)?;
    load_eptp(&mut hv.vcpu, space.table())?;
    op_on(hv, &mut space, Op::Write(gpa::FORK_DATA + 8, 0xFA7E))?;
    let (mut child, f) = space.fork().map_err(|e| alloc::format!("fork: {e:?}"))?;
    space
        .flush(f, |inv| {
            invept(&mut hv.vcpu, inv);
        })
        .expect("its own token");
    load_eptp(&mut hv.vcpu, child.table())?;
    let seen = op_on(hv, &mut child, Op::Read(gpa::FORK_DATA + 8))?;
    ensure!(seen == 0xFA7E, "child reads {seen:#x} before writing");
    op_on(hv, &mut child, Op::Write(gpa::FORK_DATA + 8, 0xC41D))?;
    let child_sees = op_on(hv, &mut child, Op::Read(gpa::FORK_DATA + 8))?;
    load_eptp(&mut hv.vcpu, space.table())?;
    let parent_sees = op_on(hv, &mut space, Op::Read(gpa::FORK_DATA + 8))?;
    let (ps, cs) = (space.stats(), child.stats());
    println!("   parent: {ps:?}");
    println!("   child:  {cs:?}");
    ensure!(child_sees == 0xC41D && parent_sees == 0xFA7E, "child sees {child_sees:#x}, parent {parent_sees:#x}");
    ensure!(cs.cow_copies + ps.cow_copies + cs.cow_reuses + ps.cow_reuses >= 1, "no copy-on-write happened");
    load_eptp(&mut hv.vcpu, &hv.ept)?;
    drop(child);
    drop(space);
    Ok(())
}
