//! Accessed and dirty tracking: EPT A/D bits set by the CPU, read and cleared; dirty logs by D
//! bits and by write protection; the dirty log of a `twostage-aspace` address space, in the mode
//! it chooses from the CPU.

use crate::guest::{GuestOps, Op, Unassigned};
use crate::space::{guest_space, load_eptp, op_on, Space};
use crate::{ctx, gpa, Caps, Machine, Need};
use alloc::vec;
use alloc::vec::Vec;
use twostage_aspace::DirtyMode;
use twostage_harness::{ensure, Pass, Scenario, Verdict};
use twostage_hv_x86::hv::{invept, FaultAction, Hv};
use twostage_hv_x86::println;
use twostage_npt::{AdClear, GpaRange, GuestPhysAddr, MapSize, MappingFlags, PageSize};
use twostage_vmx::exit::EptViolation;

/// The dirty-tracking scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::needing("EPT accessed/dirty bits read and cleared", &[Need::EptAccessedDirty], s_ept_ad),
    Scenario::new("dirty tracking (EPT dirty bits, or write protection without them)", s_dirty_log),
    Scenario::new("dirty tracking by write protection", s_dirty_wp),
    Scenario::new("dirty log through twostage-aspace (mode chosen from the CPU)", s_dirty_aspace),
];

fn ad_leaves(hv: &mut Hv, base: u64, clear: AdClear) -> Vec<(u64, bool, bool)> {
    let mut v = Vec::new();
    let f = hv.ept.take_accessed_dirty(GuestPhysAddr::new(base), 0x4000, clear, |l| {
        v.push(((l.gpa.as_u64() - base) / 0x1000, l.accessed, l.dirty))
    });
    hv.flush(f);
    v
}

fn map4(hv: &mut Hv, base: u64) -> Result<(), alloc::string::String> {
    for i in 0..4 {
        let f = hv.zeroed_frame().ok_or("frames")?;
        ctx(hv.map(base + i * 0x1000, f, 0x1000, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)), "map")?;
    }
    Ok(())
}

fn s_ept_ad(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    map4(hv, gpa::AD)?;
    let fresh = ad_leaves(hv, gpa::AD, AdClear::Both);
    ctx(hv.op_plain(Op::Read(gpa::AD)), "read")?;
    ctx(hv.op_plain(Op::Write(gpa::AD + 0x2000, 1)), "write")?;
    let seen = ad_leaves(hv, gpa::AD, AdClear::Both);
    println!("   after mapping: {fresh:?}; after read p0, write p2 (page, A, D): {seen:?}");
    ensure!(fresh.is_empty(), "fresh leaves have A/D set: {fresh:?}");
    ensure!(seen == vec![(0, true, false), (2, true, true)], "hardware set {seen:?}");
    ctx(hv.op_plain(Op::Read(gpa::AD + 0x2000)), "read")?;
    let again = ad_leaves(hv, gpa::AD, AdClear::None);
    println!("   after clearing + INVEPT, read p2: {again:?}");
    ensure!(again == vec![(2, true, false)], "after clear: {again:?}");
    Ok(Pass::Plain)
}

fn s_dirty_log(m: &mut Machine) -> Verdict {
    let (hv, c) = (&mut m.hv, &m.caps);
    if !hv.vcpu.ept_ad_enabled() {
        println!("   no EPT A/D: dirty log by write protection");
        return dirty_by_write_protection(hv, c, gpa::DIRTY);
    }
    map4(hv, gpa::DIRTY)?;
    let _ = ad_leaves(hv, gpa::DIRTY, AdClear::Dirty);
    for p in [1u64, 3] {
        ctx(hv.op_plain(Op::Write(gpa::DIRTY + p * 0x1000 + 8, p)), "write")?;
    }
    ctx(hv.op_plain(Op::Read(gpa::DIRTY)), "read")?;
    let dirty: Vec<u64> = ad_leaves(hv, gpa::DIRTY, AdClear::Dirty).into_iter().filter(|l| l.2).map(|l| l.0).collect();
    let again: Vec<u64> = ad_leaves(hv, gpa::DIRTY, AdClear::Dirty).into_iter().filter(|l| l.2).map(|l| l.0).collect();
    println!("   dirty log by EPT D bits: pages {dirty:?}, then {again:?} after re-arming");
    ensure!(dirty == vec![1, 3] && again.is_empty(), "dirty {dirty:?}, again {again:?}");
    Ok(Pass::Plain)
}

fn s_dirty_wp(m: &mut Machine) -> Verdict {
    let (hv, c) = (&mut m.hv, &m.caps);
    dirty_by_write_protection(hv, c, gpa::DIRTY_WP)
}

fn dirty_by_write_protection(hv: &mut Hv, _c: &Caps, base: u64) -> Verdict {
    map4(hv, base)?;
    ctx(hv.protect(base, 0x4000, MappingFlags::READ), "write-protect")?;
    let mut log: Vec<u64> = Vec::new();
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        let page = v.gpa.align_down(0x1000u64).as_u64();
        if !v.qualification.write() || !(base..base + 0x4000).contains(&page) {
            return FaultAction::Fail("not a dirty-log fault");
        }
        log.push((page - base) / 0x1000);
        match hv.protect(page, 0x1000, MappingFlags::RW) {
            Ok(()) => FaultAction::Retry,
            Err(_) => FaultAction::Fail("protect failed"),
        }
    };
    for p in [3u64, 1, 3] {
        ctx(hv.op(Op::Write(base + p * 0x1000, p), &mut handler, &mut Unassigned), "write")?;
    }
    ctx(hv.op(Op::Read(base), &mut handler, &mut Unassigned), "read")?;
    println!("   dirty log by write protection: pages {log:?} (a second write to page 3 did not fault)");
    ensure!(log == vec![3, 1], "log {log:?}");
    Ok(Pass::Plain)
}

/// Runs `f` against a fresh guest address space, then puts the bundled guest back on its own
/// EPT and checks that dropping the space returned every frame.
fn with_space_accounting(hv: &mut Hv, f: impl FnOnce(&mut Hv) -> Result<(), alloc::string::String>) -> Verdict {
    let before = hv.frames.stats().in_use;
    let r = f(hv);
    load_eptp(&mut hv.vcpu, &hv.ept)?;
    let after = hv.frames.stats().in_use;
    r?;
    ensure!(after == before, "frames in use {before} before, {after} after the space was dropped");
    Ok(Pass::Plain)
}

fn s_dirty_aspace(m: &mut Machine) -> Verdict {
    let (hv, c) = (&mut m.hv, &m.caps);
    with_space_accounting(hv, |hv| {
        let base = gpa::DIRTY_AS;
        let (mut space, data) = guest_space(hv, c, base, 16 * 0x1000)?;
        let f = space.populate(data).map_err(|e| alloc::format!("populate: {e:?}"))?;
        space.flush_unloaded(f).expect("its own token");
        load_eptp(&mut hv.vcpu, space.table())?;
        let range = GpaRange::from_start_len(GuestPhysAddr::new(base), 16 * 0x1000).ok_or("range")?;
        let (mode, f) = space.start_dirty_log(range).map_err(|e| alloc::format!("start_dirty_log: {e:?}"))?;
        space
            .flush(f, |inv| {
                invept(&mut hv.vcpu, inv);
            })
            .expect("its own token");
        for p in [2u64, 5, 5] {
            op_on(hv, &mut space, Op::Write(base + p * 0x1000 + 16, p))?;
        }
        op_on(hv, &mut space, Op::Read(base + 7 * 0x1000))?;
        let harvest = |hv: &mut Hv, space: &mut Space| -> Result<Vec<u64>, alloc::string::String> {
            let (bits, f) = space.harvest_dirty().map_err(|e| alloc::format!("harvest: {e:?}"))?;
            space
                .flush(f, |inv| {
                    invept(&mut hv.vcpu, inv);
                })
                .expect("its own token");
            Ok(bits.iter().map(|g| (g.as_u64() - base) / 0x1000).collect())
        };
        let first = harvest(hv, &mut space)?;
        op_on(hv, &mut space, Op::Write(base + 9 * 0x1000, 9))?;
        op_on(hv, &mut space, Op::Write(base + 5 * 0x1000, 9))?;
        let second = harvest(hv, &mut space)?;
        println!("   twostage-aspace chose {mode:?}; dirty pages {first:?}, after re-arming {second:?}");
        let want = if hv.vcpu.ept_ad_enabled() { DirtyMode::DirtyBits } else { DirtyMode::WriteProtect };
        ensure!(mode == want, "mode {mode:?} but the EPTP has A/D {}", hv.vcpu.ept_ad_enabled());
        ensure!(first == vec![2, 5] && second == vec![5, 9], "dirty {first:?} then {second:?}");
        Ok(())
    })
}
