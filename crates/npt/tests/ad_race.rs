//! Split and collapse against hardware that sets accessed/dirty bits meanwhile.
//!
//! A second thread acts as the CPU: it "writes" to a guest-physical address inside the region
//! being split or collapsed, setting A and D with a locked read-modify-write on whatever leaf maps
//! the address at that moment (Intel SDM Vol. 3C §29.3.5: the processor sets EPT accessed and
//! dirty flags with locked operations; RISC-V Privileged spec, "Virtual Address Translation
//! Process": the A/D update is atomic with respect to the check of the PTE). Whatever the
//! interleaving, once the "hardware" is done and the flush has run, the leaf that maps the
//! address must say dirty: a dirty harvest must never miss a write.

use std::sync::atomic::Ordering;
use std::sync::Barrier;
use twostage_npt::testing::HostRam;
use twostage_npt::*;

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const TARGET: u64 = 0x80_0000_0000;
const ITERATIONS: u64 = 4000;

/// Host-physical address of the entry at `level` on the walk for `gpa` (the path must exist).
fn slot<F: Format>(ram: &HostRam, root: HostPhysAddr, gpa: u64, level: usize) -> u64 {
    let mut table = root.as_u64();
    for l in (level + 1..F::LEVELS).rev() {
        table = F::address(ram.read_u64(table + 8 * F::index(gpa, l) as u64)).as_u64();
    }
    table + 8 * F::index(gpa, level) as u64
}

/// The hardware writes to `gpa`, walking from the level-1 entry at `s1`: A and D are set with a
/// compare-exchange on the leaf that maps `gpa` now. Returns whether that was the 2 MiB leaf.
fn hw_write<F: Format>(ram: &HostRam, s1: u64, gpa: u64) -> bool {
    let e = ram.atomic_u64(s1);
    let mut cur = e.load(Ordering::Acquire);
    loop {
        if F::is_leaf(cur, 1) {
            match e.compare_exchange(cur, cur | F::ACCESSED | F::DIRTY, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        } else {
            let child = F::address(cur).as_u64() + 8 * F::index(gpa, 0) as u64;
            ram.atomic_u64(child).fetch_or(F::ACCESSED | F::DIRTY, Ordering::AcqRel);
            return false;
        }
    }
}

fn spin(n: u64) {
    for _ in 0..n {
        std::hint::spin_loop();
    }
}

fn rand(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// One race: a thread acting as the hardware sets A/D on a random 4 KiB page of the 2 MiB at
/// `M2` (through the level-1 entry, as a walk would find it) after a random delay, while `op`
/// changes the table; the change's flush is carried out once both are done, as the invalidation
/// completes only when no walk can still reach the old table. Returns the page written and
/// whether the write landed on the level-1 entry (a huge leaf) rather than below it.
fn race<'r, F: Format, Op: FnOnce(&mut PageTable<F, &'r HostRam>) -> Flush<F>>(
    ram: &'r HostRam,
    t: &mut PageTable<F, &'r HostRam>,
    seed: &mut u64,
    op: Op,
) -> (u64, bool) {
    let s1 = slot::<F>(ram, t.root(), M2, 1);
    let x = M2 + (rand(seed) % 512) * K4;
    let delay = rand(seed) % 4000;
    let barrier = Barrier::new(2);
    let landed = std::thread::scope(|s| {
        let hw = s.spawn(|| {
            barrier.wait();
            spin(delay);
            hw_write::<F>(ram, s1, x)
        });
        barrier.wait();
        let f = op(t);
        let landed = hw.join().unwrap();
        t.flush(f, |_| {}).unwrap();
        landed
    });
    (x, landed)
}

/// Splits a clean 2 MiB leaf while the hardware writes into it. Returns how often D landed on
/// the huge leaf during the split and was then missing from the 4 KiB page written.
fn split_race<F: Format>() -> (u64, u64) {
    let (mut on_leaf, mut lost) = (0, 0);
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..ITERATIONS {
        let ram = HostRam::new(64);
        let mut t = PageTable::<F, _>::new(&ram, TableOptions::for_format::<F>()).unwrap();
        t.map(GuestPhysAddr::new(M2), HostPhysAddr::new(TARGET), M2, MappingFlags::RW, MapSize::Largest)
            .unwrap()
            .ignore();
        let (x, landed) = race::<F, _>(&ram, &mut t, &mut seed, |t| t.split(GuestPhysAddr::new(M2)).unwrap());
        let q = t.query(GuestPhysAddr::new(x)).unwrap();
        assert_eq!(q.size, PageSize::Size4K);
        if landed {
            on_leaf += 1;
        }
        if !q.dirty {
            lost += 1;
        }
    }
    (on_leaf, lost)
}

/// Collapses 512 clean 4 KiB leaves while the hardware writes into one of them. Returns how
/// often the write went to a 4 KiB leaf, and how often the 2 MiB leaf was then clean.
fn collapse_race<F: Format>() -> (u64, u64) {
    let (mut on_child, mut lost) = (0, 0);
    let mut seed = 0x2545_f491_4f6c_dd1d;
    for _ in 0..ITERATIONS {
        let ram = HostRam::new(64);
        let mut t = PageTable::<F, _>::new(&ram, TableOptions::for_format::<F>()).unwrap();
        let size = MapSize::Exactly(PageSize::Size4K);
        t.map(GuestPhysAddr::new(M2), HostPhysAddr::new(TARGET), M2, MappingFlags::RW, size).unwrap().ignore();
        let op = |t: &mut PageTable<F, &HostRam>| t.collapse(GuestPhysAddr::new(M2), PageSize::Size2M).unwrap();
        let (x, landed) = race::<F, _>(&ram, &mut t, &mut seed, op);
        let q = t.query(GuestPhysAddr::new(x)).unwrap();
        assert_eq!(q.size, PageSize::Size2M);
        if !landed {
            on_child += 1;
        }
        if !q.dirty {
            lost += 1;
        }
    }
    (on_child, lost)
}

#[test]
fn split_keeps_dirty_bits_set_during_the_split_ept() {
    let (on_leaf, lost) = split_race::<Ept4>();
    assert_eq!(lost, 0, "EPT split: D set on the huge leaf {on_leaf} times, missing from the child {lost} times");
}

#[test]
fn split_keeps_dirty_bits_set_during_the_split_gstage() {
    let (on_leaf, lost) = split_race::<Sv39x4>();
    assert_eq!(lost, 0, "G-stage split: D set on the huge leaf {on_leaf} times, missing from the child {lost} times");
}

#[test]
fn collapse_keeps_dirty_bits_set_during_the_collapse_ept() {
    let (on_child, lost) = collapse_race::<Ept4>();
    assert_eq!(
        lost, 0,
        "EPT collapse: D set on a 4 KiB leaf {on_child} times, missing from the huge leaf {lost} times"
    );
}

#[test]
fn collapse_keeps_dirty_bits_set_during_the_collapse_gstage() {
    let (on_child, lost) = collapse_race::<Sv39x4>();
    assert_eq!(
        lost, 0,
        "G-stage collapse: D set on a 4 KiB leaf {on_child} times, missing from the huge leaf {lost} times"
    );
}
