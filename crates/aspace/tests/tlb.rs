//! The space's translation cache never serves a translation after the change that removed it:
//! random guest-memory copies interleaved with every kind of change (region add, remove and
//! protection, populate, fork and copy-on-write breaks, dirty-log start, harvest and stop,
//! writes through a linear region's host memory), each copy checked against a byte model of
//! guest memory kept without any cache, every error against the rights the model says.

mod common;
use common::*;
use std::collections::HashMap;
use twostage_aspace::*;
use twostage_npt::{AdMode, Ept4, FrameAllocator, HostPhysAddr, MappingFlags};

type Space = AddressSpace<Ept4, Ram>;

const PAGE: u64 = 4096;
/// Anonymous RAM: 32 pages at 1 MiB.
const ANON: u64 = 0x10_0000;
const ANON_LEN: u64 = 32 * PAGE;
/// Linear RAM: 16 pages right after it.
const LIN: u64 = ANON + ANON_LEN;
const LIN_LEN: u64 = 16 * PAGE;
/// An MMIO page right after that.
const MMIO: u64 = LIN + LIN_LEN;

/// What guest memory should hold, page by page (missing: zeros), and each region's rights.
#[derive(Clone, Default)]
struct Model {
    pages: HashMap<u64, Vec<u8>>,
    anon_writable: bool,
    anon_present: bool,
}

impl Model {
    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let a = gpa + i;
                self.pages.get(&(a & !(PAGE - 1))).map_or(0, |p| p[(a % PAGE) as usize])
            })
            .collect()
    }
    fn write(&mut self, gpa: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let a = gpa + i as u64;
            self.pages.entry(a & !(PAGE - 1)).or_insert_with(|| vec![0; PAGE as usize])[(a % PAGE) as usize] = *b;
        }
    }
    fn clear_anon(&mut self) {
        self.pages.retain(|&p, _| !(ANON..ANON + ANON_LEN).contains(&p));
    }
    fn readable(&self, gpa: u64, len: u64) -> bool {
        (gpa..gpa + len).step_by(1).all(|a| (LIN..MMIO).contains(&a) || ((ANON..LIN).contains(&a) && self.anon_present))
    }
    fn writable(&self, gpa: u64, len: u64) -> bool {
        self.readable(gpa, len) && (self.anon_writable || gpa + len <= ANON || gpa >= LIN)
    }
}

fn pick_span(rng: &mut Rng) -> (u64, usize) {
    let len = match rng.below(4) {
        0 => 8,
        1 => 1 + rng.below(64),
        2 => 1 + rng.below(PAGE),
        _ => 1 + rng.below(3 * PAGE),
    };
    // Mostly inside RAM; now and then across the MMIO page or off the end.
    let start = ANON + rng.below(ANON_LEN + LIN_LEN + PAGE / 2);
    (start, len as usize)
}

fn run(seed: u64, steps: usize) {
    let ram = ram(512);
    let mut rng = Rng(seed | 1);
    let mut s: Space = AddressSpace::new(ram.clone(), opts::<Ept4>(AdMode::Hardware)).unwrap();
    let mut anon = s.add_region("anon", range(ANON, ANON_LEN), RW, Backend::DemandZero).unwrap().0;
    let host = ram.allocate_frames((LIN_LEN / PAGE) as usize, 1).unwrap().as_u64();
    let f = s.add_region("lin", range(LIN, LIN_LEN), RW, Backend::Linear { host: HostPhysAddr::new(host) }).unwrap().1;
    s.flush_unloaded(f).unwrap();
    let f = s.add_region("mmio", range(MMIO, PAGE), RW, Backend::Mmio).unwrap().1;
    s.flush_unloaded(f).unwrap();
    let mut model = Model { anon_writable: true, anon_present: true, ..Model::default() };
    let mut logging = false;
    let mut written_since_harvest: Vec<u64> = Vec::new();
    let mut child: Option<(Space, Model)> = None;
    for step in 0..steps {
        match rng.below(20) {
            // Copies, most of the time, through `&self` and through the trait.
            0..=5 => {
                let (gpa_, len) = pick_span(&mut rng);
                let mut buf = vec![0xeeu8; len];
                let r = if rng.below(2) == 0 {
                    s.read(gpa(gpa_), &mut buf)
                } else {
                    GuestMemory::read(&mut s, gpa(gpa_), &mut buf)
                };
                if model.readable(gpa_, len as u64) {
                    r.unwrap_or_else(|e| panic!("step {step}: read {gpa_:#x}+{len}: {e}"));
                    assert!(buf == model.read(gpa_, len), "step {step}: read {gpa_:#x}+{len} differs from the model");
                } else {
                    assert!(r.is_err(), "step {step}: read {gpa_:#x}+{len} should fail");
                }
            }
            6..=11 => {
                let (gpa_, len) = pick_span(&mut rng);
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let r = s.write(gpa(gpa_), &data);
                s.flush_pending(|_| {});
                if model.writable(gpa_, len as u64) {
                    r.unwrap_or_else(|e| panic!("step {step}: write {gpa_:#x}+{len}: {e}"));
                    model.write(gpa_, &data);
                    let mut p = gpa_ & !(PAGE - 1);
                    while p < gpa_ + len as u64 {
                        written_since_harvest.push(p);
                        p += PAGE;
                    }
                } else {
                    // Every region of the span is checked before a byte moves.
                    let e = r.expect_err("a write the rights forbid");
                    assert!(e.gpa().as_u64() >= gpa_ && e.gpa().as_u64() < gpa_ + len as u64, "step {step}: {e}");
                }
            }
            // The linear region's host memory written behind the space's back (device DMA).
            12 => {
                let off = rng.below(LIN_LEN - 8);
                let v = rng.next();
                ram.write_bytes(host + off, &v.to_le_bytes());
                model.write(LIN + off, &v.to_le_bytes());
            }
            13 => {
                let flags = if model.anon_writable { MappingFlags::READ } else { RW };
                let f = s.protect_region(anon, flags).unwrap();
                s.flush(f, |_| {}).unwrap();
                model.anon_writable = !model.anon_writable;
            }
            14 => {
                // Remove and add back: the frames are freed and reused by the new region.
                let f = s.remove_region(anon).unwrap();
                s.flush(f, |_| {}).unwrap();
                let (id, f) = s.add_region("anon", range(ANON, ANON_LEN), RW, Backend::DemandZero).unwrap();
                s.flush(f, |_| {}).unwrap();
                anon = id;
                model.clear_anon();
                model.anon_writable = true;
                if rng.below(2) == 0 {
                    let f = s.populate(anon).unwrap();
                    s.flush(f, |_| {}).unwrap();
                }
            }
            15 => {
                // Fork: both sides keep their own writes from now on.
                let (mut c, f) = s.fork().unwrap();
                s.flush(f, |_| {}).unwrap();
                // In the anonymous region: the linear region is the caller's memory, shared by
                // both sides, not copied on write.
                let (gpa_, len) = (ANON + rng.below(ANON_LEN - 64), 1 + rng.below(64) as usize);
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let mut cm = model.clone();
                if cm.writable(gpa_, len as u64) {
                    c.write(gpa(gpa_), &data).unwrap();
                    c.flush_pending(|_| {});
                    cm.write(gpa_, &data);
                }
                child = Some((c, cm));
            }
            16 => {
                if let Some((c, cm)) = child.take() {
                    // The child saw none of the parent's writes since the fork, nor the parent
                    // the child's.
                    let mut buf = vec![0u8; ANON_LEN as usize];
                    if cm.anon_present {
                        c.read(gpa(ANON), &mut buf).unwrap();
                        assert!(buf == cm.read(ANON, ANON_LEN as usize), "step {step}: the child's memory changed");
                    }
                    drop(c);
                }
            }
            17 => {
                if logging {
                    let (bits, f) = s.harvest_dirty().unwrap();
                    s.flush(f, |_| {}).unwrap();
                    for p in written_since_harvest.drain(..) {
                        if (ANON..MMIO).contains(&p) {
                            assert!(bits.get(gpa(p)), "step {step}: written page {p:#x} not in the dirty log");
                        }
                    }
                } else {
                    let (_, f) = s.start_dirty_log(range(ANON, ANON_LEN + LIN_LEN)).unwrap();
                    s.flush(f, |_| {}).unwrap();
                    logging = true;
                    written_since_harvest.clear();
                }
            }
            18 => {
                if logging {
                    let f = s.stop_dirty_log().unwrap();
                    s.flush(f, |_| {}).unwrap();
                    logging = false;
                }
            }
            _ => {
                // Compare-exchange of a word (A/D updates of the guest's tables go this way).
                let a = (ANON + rng.below(ANON_LEN + LIN_LEN - 8)) & !7;
                let cur = u64::from_le_bytes(model.read(a, 8).try_into().unwrap());
                let r = s.compare_exchange_u64(gpa(a), cur, cur ^ 1);
                s.flush_pending(|_| {});
                if model.writable(a, 8) {
                    assert_eq!(r.unwrap(), Ok(cur), "step {step}: cmpxchg at {a:#x}");
                    model.write(a, &(cur ^ 1).to_le_bytes());
                    written_since_harvest.push(a & !(PAGE - 1));
                } else {
                    assert!(r.is_err(), "step {step}: cmpxchg at {a:#x} should fail");
                }
            }
        }
    }
}

#[test]
fn cached_translations_follow_every_change() {
    for seed in 1..=12 {
        run(seed * 0x9e37_79b9, 3000);
    }
}
