//! Frame accounting on every path: a whole scenario is run with the N-th allocation failing,
//! for every N, and must neither leak nor double-free a frame nor lose a byte already written.

mod common;
use common::*;
use std::collections::BTreeMap;
use twostage_aspace::*;
use twostage_npt::testing::HostRam;
use twostage_npt::{Access, AdMode, Ept4, Format, FrameAllocator, MappingFlags, NestedPageFaultInfo, Sv39x4};

/// A guest write that gives up on OutOfMemory (returns whether it happened).
fn try_write<F: ModelCpu>(s: &mut AddressSpace<F, Ram>, ram: &HostRam, at: u64, v: u64) -> bool {
    let hw_ad = s.options().ad == AdMode::Hardware;
    for _ in 0..6 {
        match F::model_walk(ram, s.root().as_u64(), hw_ad, gpa(at), Access::Write) {
            Ok(hpa) => {
                ram.write_u64(hpa, v);
                return true;
            }
            Err(_) => match s.handle_fault(NestedPageFaultInfo::new(gpa(at), Access::Write)) {
                FaultOutcome::Resolved { flush } => s.flush(flush, |_| {}).unwrap(),
                FaultOutcome::OutOfMemory { gpa: g } => {
                    assert_eq!(g, gpa(at));
                    return false;
                }
                other => panic!("write at {at:#x}: {other:?}"),
            },
        }
    }
    panic!("write at {at:#x} kept faulting");
}

fn check<F: Format>(s: &AddressSpace<F, Ram>, shadow: &BTreeMap<u64, u64>) {
    for (&a, &v) in shadow {
        let mut b = [0u8; 8];
        s.read(gpa(a), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), v, "value at {a:#x} lost");
    }
}

const RAM: u64 = 0x8000_0000;
const PASS: u64 = 0x4000_0000;

/// Runs the scenario; allocation number `fail_at` (and every later one until healed) fails.
fn scenario<F: ModelCpu>(ad: AdMode, fail_at: u64) -> bool {
    let ram = ram(2048);
    let host = ram.allocate_frames(512, 512).unwrap();
    ram.fail_after(fail_at);
    let mut hit = false;
    {
        let Ok(mut s) = AddressSpace::<F, Ram>::new(ram.clone(), opts::<F>(ad)) else {
            ram.heal();
            // SAFETY: frames from allocate_frames above, never mapped.
            unsafe { ram.deallocate_frames(host, 512) };
            assert_eq!(ram.frames_in_use(), 0);
            return true;
        };
        let mut shadow = BTreeMap::new();
        let id = match s.add_region("ram", range(RAM, 32 * 4096), MappingFlags::RW, Backend::DemandZero) {
            Ok((id, f)) => {
                s.flush_unloaded(f).unwrap();
                id
            }
            Err(e) => panic!("{e}"),
        };
        match s.add_region("pass", range(PASS, 2 << 20), MappingFlags::RW, Backend::Linear { host }) {
            Ok((_, f)) => s.flush_unloaded(f).unwrap(),
            Err(AddRegionError::Map(twostage_npt::MapError::OutOfFrames(_))) => hit = true,
            Err(e) => panic!("{e}"),
        }
        for i in 0..8u64 {
            if try_write(&mut s, &ram, RAM + i * 4096, i + 1) {
                shadow.insert(RAM + i * 4096, i + 1);
            } else {
                hit = true;
            }
        }
        match s.populate(id) {
            Ok(f) => s.flush_unloaded(f).unwrap(),
            Err(e) => {
                hit = true;
                assert!(matches!(e, PopulateError::OutOfMemory { .. }));
                s.flush_pending(|_| {});
            }
        }
        check(&s, &shadow);
        let mut child = match s.fork() {
            Ok((c, f)) => {
                s.flush_unloaded(f).unwrap();
                Some((c, shadow.clone()))
            }
            Err(_) => {
                hit = true;
                s.flush_pending(|_| {});
                None
            }
        };
        check(&s, &shadow);
        // Copy-on-write breaks on both sides.
        for i in 0..8u64 {
            let at = RAM + i * 4096 + 8;
            if try_write(&mut s, &ram, at, 100 + i) {
                shadow.insert(at, 100 + i);
            } else {
                hit = true;
            }
            if let Some((c, cs)) = &mut child {
                if try_write(c, &ram, at, 200 + i) {
                    cs.insert(at, 200 + i);
                } else {
                    hit = true;
                }
            }
        }
        check(&s, &shadow);
        if let Some((c, cs)) = &child {
            check(c, cs);
        }
        match s.start_dirty_log(range(PASS, 2 << 20)) {
            Ok((_, f)) => {
                s.flush_unloaded(f).unwrap();
                if s.harvest_dirty().map(|(_, f)| s.flush_unloaded(f)).is_err() {
                    hit = true;
                    s.flush_pending(|_| {});
                }
                match s.stop_dirty_log() {
                    Ok(f) => s.flush_unloaded(f).unwrap(),
                    Err(_) => {
                        hit = true;
                        s.flush_pending(|_| {});
                    }
                }
            }
            Err(_) => {
                hit = true;
                s.flush_pending(|_| {});
                if s.dirty_log_range().is_some() {
                    s.stop_dirty_log()
                        .map(|f| s.flush_unloaded(f).unwrap())
                        .unwrap_or_else(|_| s.flush_pending(|_| {}));
                }
            }
        }
        match s.write(gpa(RAM + 20 * 4096 - 4), &[7u8; 8]) {
            Ok(()) => s.flush_pending(|_| {}),
            Err(e) => {
                hit = true;
                assert!(matches!(e, GuestMemError::OutOfMemory { .. }), "{:?}", e);
                s.flush_pending(|_| {});
            }
        }
        // Heal and check nothing written was lost (parked pages included).
        ram.heal();
        check(&s, &shadow);
        if let Some((c, cs)) = &child {
            check(c, cs);
        }
        for i in 0..8u64 {
            assert!(try_write(&mut s, &ram, RAM + i * 4096 + 16, 1));
        }
        let f = s.remove_region(id).unwrap();
        s.flush_unloaded(f).unwrap();
        drop(child);
    }
    ram.heal();
    // SAFETY: the linear region's frames came from allocate_frames above and are no longer mapped.
    unsafe { ram.deallocate_frames(host, 512) };
    assert_eq!(ram.frames_in_use(), 0, "frames leaked with allocation {fail_at} failing");
    hit
}

fn every_failure_point<F: ModelCpu>(ad: AdMode) {
    let mut n = 0;
    while scenario::<F>(ad, n) {
        n += 1;
        assert!(n < 400, "the scenario never completes without a failure");
    }
    assert!(n > 20, "too few allocations to be a meaningful test: {n}");
}

#[test]
fn every_allocation_failure_is_survived_sv39x4() {
    every_failure_point::<Sv39x4>(AdMode::Hardware);
    every_failure_point::<Sv39x4>(AdMode::Preset);
}

#[test]
fn every_allocation_failure_is_survived_ept4() {
    every_failure_point::<Ept4>(AdMode::Hardware);
    every_failure_point::<Ept4>(AdMode::Preset);
}
