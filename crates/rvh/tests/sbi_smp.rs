//! The shared multi-hart state machines of `twostage_rvh::smp`: how a remote fence becomes
//! local fences, the mailboxes' acknowledge protocol with harts as threads, and HSM races.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use twostage_rvh::sbi::{hsm_state, RemoteFence};
use twostage_rvh::smp::{plan, Hsm, Mailbox, VsFence, FENCE_SLOTS};

fn planned(f: RemoteFence) -> Vec<VsFence> {
    let mut v = Vec::new();
    plan(f, |x| v.push(x));
    v
}

#[test]
fn plans() {
    assert_eq!(planned(RemoteFence::FenceI), [VsFence::FenceI]);
    assert_eq!(
        planned(RemoteFence::Vma { start: 0x1800, size: 0x1000, asid: None }),
        [VsFence::Page(0x1000), VsFence::Page(0x2000)],
        "a range straddling a page boundary fences both pages"
    );
    assert_eq!(planned(RemoteFence::Vma { start: 0x1000, size: 1, asid: Some(3) }), [VsFence::PageAsid(0x1000, 3)]);
    assert_eq!(planned(RemoteFence::Vma { start: 0, size: 0, asid: None }), [VsFence::All]);
    assert_eq!(planned(RemoteFence::Vma { start: 0x1000, size: u64::MAX, asid: Some(2) }), [VsFence::Asid(2)]);
    let big = (FENCE_SLOTS as u64 + 1) * 4096;
    assert_eq!(planned(RemoteFence::Vma { start: 0, size: big, asid: None }), [VsFence::All], "widened");
    assert_eq!(planned(RemoteFence::Vma { start: u64::MAX - 4095, size: 8192, asid: None }), [VsFence::All]);
    assert_eq!(planned(RemoteFence::Vma { start: 0x1000, size: 0, asid: None }), [], "an empty range");
    assert!(planned(RemoteFence::Hypervisor).is_empty());
}

#[test]
fn mailbox_widens_and_merges() {
    let m = Mailbox::new(2);
    let g1 = m.post_fence(1, RemoteFence::Vma { start: 0x4000, size: 0x1000, asid: Some(1) });
    let g2 = m.post_fence(1, RemoteFence::Vma { start: 0x4000, size: 0x1000, asid: None });
    let g3 = m.post_fence(1, RemoteFence::FenceI);
    assert!(g1 < g2 && g2 < g3 && !m.done(1, g1) && m.pending(1));
    let mut ran = Vec::new();
    m.service(1, |f| ran.push(f));
    assert_eq!(ran, [VsFence::FenceI, VsFence::Page(0x4000)], "one page fence for both requests");
    assert!(m.done(1, g3) && !m.pending(1));
    // More pages than slots, and two ASIDs: the whole VMID.
    for i in 0..FENCE_SLOTS as u64 + 1 {
        m.post_fence(0, RemoteFence::Vma { start: i * 0x10_000, size: 1, asid: None });
    }
    ran.clear();
    m.service(0, |f| ran.push(f));
    assert_eq!(ran, [VsFence::All]);
    m.post_fence(0, RemoteFence::Vma { start: 0, size: 0, asid: Some(1) });
    m.post_fence(0, RemoteFence::Vma { start: 0, size: 0, asid: Some(2) });
    ran.clear();
    m.service(0, |f| ran.push(f));
    assert_eq!(ran, [VsFence::All]);
    assert_eq!(m.stats(0).fence_requests, FENCE_SLOTS as u64 + 3);
}

/// Harts as threads: each requests fences of its own pages on every other hart and waits for
/// their acknowledgements, servicing its own mailbox meanwhile. When a wait ends, every target
/// has run a fence covering the requester's page (its log says so): nothing returns early,
/// and nobody deadlocks although all request at once.
#[test]
fn remote_fences_complete_before_the_call_returns() {
    const HARTS: usize = 4;
    const ROUNDS: u64 = 300;
    let m = Arc::new(Mailbox::new(HARTS));
    let logs: Arc<Vec<Mutex<Vec<VsFence>>>> = Arc::new((0..HARTS).map(|_| Mutex::new(Vec::new())).collect());
    let served = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..HARTS)
        .map(|me| {
            let (m, logs, served, finished) = (m.clone(), logs.clone(), served.clone(), finished.clone());
            std::thread::spawn(move || {
                let service = |m: &Mailbox| {
                    let n = m.service(me, |f| logs[me].lock().unwrap().push(f));
                    served.fetch_add(n, Ordering::Relaxed);
                };
                for round in 0..ROUNDS {
                    let va = ((me as u64) << 32) | (round << 12);
                    let f = RemoteFence::Vma { start: va, size: 4096, asid: None };
                    let gens: Vec<_> = (0..HARTS).filter(|&t| t != me).map(|t| (t, m.post_fence(t, f))).collect();
                    while !gens.iter().all(|&(t, g)| m.done(t, g)) {
                        service(&m);
                        std::thread::yield_now();
                    }
                    for &(t, _) in &gens {
                        let log = logs[t].lock().unwrap();
                        assert!(
                            log.iter().any(|&x| x == VsFence::Page(va) || x == VsFence::All),
                            "hart {t} acknowledged without fencing {va:#x}"
                        );
                    }
                }
                // Keep serving until everybody is done.
                finished.fetch_add(1, Ordering::AcqRel);
                while finished.load(Ordering::Acquire) < HARTS as u64 {
                    service(&m);
                    std::thread::yield_now();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(served.load(Ordering::Relaxed) >= HARTS as u64 * (HARTS as u64 - 1), "fences ran");
}

#[test]
fn hsm_racing_starts_one_wins() {
    for _ in 0..200 {
        let hsm = Arc::new(Hsm::new(2));
        let wins: Vec<_> = (0..3u64)
            .map(|i| {
                let hsm = hsm.clone();
                std::thread::spawn(move || hsm.start(1, 0x8000_0000 + i * 4096, i).is_ok())
            })
            .collect();
        let won: Vec<bool> = wins.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(won.iter().filter(|&&w| w).count(), 1);
        let (addr, opaque) = loop {
            if let Some(s) = hsm.take_start(1) {
                break s;
            }
        };
        assert!(won[opaque as usize] && addr == 0x8000_0000 + opaque * 4096, "the winner's entry, whole");
        assert_eq!(hsm.status(1), hsm_state::STARTED);
        hsm.set_suspended(1, true);
        assert_eq!(hsm.status(1), hsm_state::SUSPENDED);
        hsm.set_suspended(1, false);
        assert_eq!(hsm.status(1), hsm_state::STARTED);
    }
}
