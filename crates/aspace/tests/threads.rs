//! Several vCPUs at once on a `SharedAddressSpace`: guest accesses with faults, hypervisor
//! copies, forks and dirty harvests race; nothing may be lost, torn or leaked.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use twostage_aspace::*;
use twostage_npt::{Access, AdMode, MappingFlags, NestedPageFaultInfo, Sv39x4};

const BASE: u64 = 0x8000_0000;
const PAGES: u64 = 48;
type Shared = SharedAddressSpace<Sv39x4, Ram>;

/// A guest access as a vCPU makes it: the walk and the access happen with the read lock held
/// (standing in for "no flush is in progress": a real flush shoots the translation down first).
/// A fault is resolved under the write lock, and the vCPU resumes at once: the access is
/// retried before the lock is released (a real vCPU re-executes the instruction right after
/// the resume, long before a queued fork could write-protect the page again; with a fair lock
/// and a thread that forks without pause, retrying only after taking the lock again would let
/// a fork in between every time).
fn vcpu_access(sh: &Shared, ram: &Ram, at: u64, access: Access, val: u64) -> u64 {
    let walk = |s: &AddressSpace<Sv39x4, Ram>| {
        let hpa = Sv39x4::model_walk(ram, s.root().as_u64(), true, gpa(at), access).ok()?;
        Some(if access == Access::Write {
            ram.write_u64(hpa, val);
            val
        } else {
            ram.read_u64(hpa)
        })
    };
    if let Some(v) = sh.with(walk) {
        return v;
    }
    for _ in 0..4 {
        let done = sh.with_mut(|s| match s.handle_fault(NestedPageFaultInfo::new(gpa(at), access)) {
            // The model walks the table itself (no TLB): the change is visible before the flush.
            FaultOutcome::Resolved { flush } => (walk(s), flush),
            other => panic!("{access} at {at:#x}: {other:?}"),
        });
        if let Some(v) = done {
            return v;
        }
    }
    panic!("{access} at {at:#x} kept faulting");
}

fn uniform(page: &[u8]) -> bool {
    page.chunks(8).all(|w| w == &page[..8])
}

#[test]
fn vcpus_copies_forks_and_harvests_race_safely() {
    let ram = ram(8192);
    let mut s = AddressSpace::<Sv39x4, Ram>::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (_, f) = s.add_region("ram", range(BASE, PAGES * 4096), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let (_, f) = s.start_dirty_log(range(BASE, PAGES * 4096)).unwrap();
    s.flush_unloaded(f).unwrap();
    let sh = Arc::new(SharedAddressSpace::new(s, Box::new(|_| {}), cpu_index).relax_with(std::thread::yield_now));
    let stop = Arc::new(AtomicBool::new(false));
    let harvested = Arc::new(Mutex::new(BTreeSet::new()));
    let written = Arc::new(Mutex::new(BTreeSet::new()));
    let mut handles = Vec::new();
    // Two vCPUs, each owning 16 pages, write then read back a counter in each.
    for cpu in 0..2u64 {
        let (sh, ram, written) = (sh.clone(), ram.clone(), written.clone());
        handles.push(std::thread::spawn(move || {
            let mut last = [0u64; 16];
            for i in 0..6000u64 {
                let p = (i * 7 + cpu) % 16;
                let at = BASE + (cpu * 16 + p) * 4096 + (i % 512) * 8 / 64 * 64;
                let v = (cpu << 48) | (i + 1);
                vcpu_access(&sh, &ram, BASE + (cpu * 16 + p) * 4096, Access::Write, v);
                written.lock().unwrap().insert(BASE + (cpu * 16 + p) * 4096);
                last[p as usize] = v;
                let got = vcpu_access(&sh, &ram, BASE + (cpu * 16 + p) * 4096, Access::Read, 0);
                assert_eq!(got, v, "vCPU {cpu} lost its write to page {p} ({at:#x})");
            }
            last
        }));
    }
    // A hypervisor thread writes whole pages 32..48 with a uniform pattern; another reads them.
    {
        let (sh, stop, written) = (sh.clone(), stop.clone(), written.clone());
        handles.push(std::thread::spawn(move || {
            let mut m = &*sh;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let page = 32 + i % 16;
                let buf: Vec<u8> = std::iter::repeat_n(i.to_le_bytes(), 512).flatten().collect();
                m.write(gpa(BASE + page * 4096), &buf).unwrap();
                written.lock().unwrap().insert(BASE + page * 4096);
            }
            [0; 16]
        }));
    }
    {
        let (sh, stop) = (sh.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut m = &*sh;
            let mut buf = vec![0u8; 16 * 4096];
            while !stop.load(Ordering::Relaxed) {
                m.read(gpa(BASE + 32 * 4096), &mut buf).unwrap();
                for page in buf.chunks(4096) {
                    assert!(uniform(page), "torn page read");
                }
            }
            [0; 16]
        }));
    }
    // Forks: every child sees untorn pages, and its own writes stay its own.
    {
        let (sh, stop, ram) = (sh.clone(), stop.clone(), ram.clone());
        handles.push(std::thread::spawn(move || {
            let mut forks = 0;
            while !stop.load(Ordering::Relaxed) || forks < 3 {
                let mut child = sh.fork().unwrap();
                forks += 1;
                let mut buf = vec![0u8; 16 * 4096];
                child.read(gpa(BASE + 32 * 4096), &mut buf).unwrap();
                for page in buf.chunks(4096) {
                    assert!(uniform(page), "torn page in a fork");
                }
                child.write(gpa(BASE + 40 * 4096), &[0xab; 4096]).unwrap();
                child.flush_pending(|_| {});
                let mut one = [0u8; 8];
                child.read(gpa(BASE + 40 * 4096), &mut one).unwrap();
                assert_eq!(one, [0xab; 8]);
                let _ = &ram;
                drop(child);
                std::thread::yield_now();
            }
            [0; 16]
        }));
    }
    // Dirty harvests.
    {
        let (sh, stop, harvested) = (sh.clone(), stop.clone(), harvested.clone());
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let bits = sh.harvest_dirty().unwrap();
                harvested.lock().unwrap().extend(bits.iter().map(|g| g.as_u64()));
                std::thread::yield_now();
            }
            [0; 16]
        }));
    }
    let mut lasts = Vec::new();
    for h in handles.drain(..2) {
        lasts.push(h.join().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    // Final harvest: every page written was reported at some harvest.
    let bits = sh.harvest_dirty().unwrap();
    harvested.lock().unwrap().extend(bits.iter().map(|g| g.as_u64()));
    let harvested = harvested.lock().unwrap().clone();
    let written = written.lock().unwrap().clone();
    assert!(
        written.is_subset(&harvested),
        "dirty pages lost: {:?}",
        written.difference(&harvested).collect::<Vec<_>>()
    );
    // The vCPUs' last values are all there.
    let sh = Arc::try_unwrap(sh).ok().expect("all threads joined");
    let s = sh.into_inner();
    for (cpu, last) in lasts.iter().enumerate() {
        for (p, &v) in last.iter().enumerate() {
            let mut b = [0u8; 8];
            s.read(gpa(BASE + (cpu as u64 * 16 + p as u64) * 4096), &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), v);
        }
    }
    drop(s);
    assert_eq!(ram.frames_in_use(), 0, "frames leaked");
}

#[test]
#[should_panic(expected = "SharedAddressSpace re-entered on CPU")]
fn re_entering_the_lock_from_inside_with_panics_instead_of_hanging() {
    let ram = ram(64);
    let mut s = AddressSpace::<Sv39x4, Ram>::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let (_, f) = s.add_region("ram", range(BASE, 4096), MappingFlags::RW, Backend::DemandZero).unwrap();
    s.flush_unloaded(f).unwrap();
    let sh: Shared = SharedAddressSpace::new(s, Box::new(|_| {}), cpu_index).relax_with(std::thread::yield_now);
    // A fault resolved while this CPU still reads inside `with`: the write lock would wait for
    // this CPU's own read lock forever.
    let _ = sh.with(|_| sh.handle_fault(NestedPageFaultInfo::new(gpa(BASE), Access::Write)));
}

#[test]
fn the_lock_is_free_again_after_a_detected_re_entrance() {
    let ram = ram(64);
    let s = AddressSpace::<Sv39x4, Ram>::new(ram.clone(), opts::<Sv39x4>(AdMode::Hardware)).unwrap();
    let sh: Shared = SharedAddressSpace::new(s, Box::new(|_| {}), cpu_index).relax_with(std::thread::yield_now);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sh.with(|_| sh.with(|_| ()))));
    assert!(r.is_err());
    // Reads and writes on other threads and this one go on.
    sh.with(|s| assert_eq!(s.regions().count(), 0));
    std::thread::scope(|t| {
        t.spawn(|| sh.with_mut(|_| ((), SpaceFlush::none())));
    });
}
