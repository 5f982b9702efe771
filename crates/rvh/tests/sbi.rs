//! SBI dispatch: decoding and serving the calls over a fake backend (the single-hart calls,
//! then HSM, IPI and RFENCE with their masks; the shared state machines in `sbi_smp.rs`).

use twostage_npt::GuestPhysAddr;
use twostage_rvh::sbi::*;

#[derive(Default)]
struct Fake {
    out: Vec<u8>,
    timer: Option<u64>,
    mem: Vec<u8>,
}
impl SbiBackend for Fake {
    fn putchar(&mut self, c: u8) {
        self.out.push(c)
    }
    fn getchar(&mut self) -> Option<u8> {
        None
    }
    fn read_guest(&mut self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), BadGuestBuffer> {
        let start = (gpa.as_u64() as usize).checked_sub(0x8000_0000).ok_or(BadGuestBuffer { gpa })?;
        let src = self.mem.get(start..start + buf.len()).ok_or(BadGuestBuffer { gpa })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn set_timer(&mut self, d: u64) {
        self.timer = Some(d)
    }
}

fn call(regs: [u64; 8], f: &mut Fake) -> SbiOutcome {
    handle(SbiCall::decode(regs), f)
}

#[test]
fn base_and_probe() {
    let mut f = Fake::default();
    assert_eq!(call([0, 0, 0, 0, 0, 0, 0, eid::BASE], &mut f), SbiOutcome::Return { error: 0, value: 2 << 24 });
    assert_eq!(call([eid::DBCN, 0, 0, 0, 0, 0, 3, eid::BASE], &mut f), SbiOutcome::Return { error: 0, value: 1 });
    assert_eq!(call([0x1234_5678, 0, 0, 0, 0, 0, 3, eid::BASE], &mut f), SbiOutcome::Return { error: 0, value: 0 });
    assert_eq!(call([0; 8].map(|_| 0x99), &mut f), SbiOutcome::Return { error: error::NOT_SUPPORTED, value: 0 });
}

#[test]
fn consoles_timer_and_reset() {
    let mut f = Fake { mem: b"hello, world".to_vec(), ..Default::default() };
    assert_eq!(
        call([b'A' as u64, 0, 0, 0, 0, 0, 0, eid::LEGACY_PUTCHAR], &mut f),
        SbiOutcome::LegacyReturn { value: 0 }
    );
    assert_eq!(
        call([5, 0, 0, 0, 0, 0, 0, eid::LEGACY_SET_TIMER], &mut f),
        SbiOutcome::LegacyReturn { value: 0 },
        "legacy set_timer"
    );
    assert_eq!(f.timer, Some(5));
    assert_eq!(call([0, 0, 0, 0, 0, 0, 0, eid::LEGACY_GETCHAR], &mut f), SbiOutcome::LegacyReturn { value: -1 });
    assert_eq!(call([5, 0x8000_0007, 0, 0, 0, 0, 0, eid::DBCN], &mut f), SbiOutcome::Return { error: 0, value: 5 });
    call([b'!' as u64, 0, 0, 0, 0, 0, 2, eid::DBCN], &mut f);
    assert_eq!(f.out, b"Aworld!");
    // A long write is partial: one page, and the count says so.
    f.mem = vec![b'z'; 3 * 4096];
    assert_eq!(
        call([u64::MAX, 0x8000_0000, 0, 0, 0, 0, 0, eid::DBCN], &mut f),
        SbiOutcome::Return { error: 0, value: 4096 }
    );
    // A buffer the guest does not own is refused, not read.
    assert_eq!(
        call([5, 0x1000, 0, 0, 0, 0, 0, eid::DBCN], &mut f),
        SbiOutcome::Return { error: error::INVALID_PARAM, value: 0 }
    );
    call([1234, 0, 0, 0, 0, 0, 0, eid::TIME], &mut f);
    assert_eq!(f.timer, Some(1234));
    let r = call([0, 0, 0, 0, 0, 0, 0, eid::SRST], &mut f);
    assert_eq!(r, SbiOutcome::Reset(ResetRequest { reset_type: 0, reason: 0 }));
    let SbiOutcome::Reset(fail) = call([0, 1, 0, 0, 0, 0, 0, eid::SRST], &mut f) else { panic!() };
    assert_eq!(fail.exit_status(), 1);
    assert_eq!(ResetRequest { reset_type: 0, reason: 0xF000_0007 }.exit_status(), 7);
    assert_eq!(
        call([9, 0, 0, 0, 0, 0, 0, eid::SRST], &mut f),
        SbiOutcome::Return { error: error::INVALID_PARAM, value: 0 }
    );
}

/// A backend with `n` vCPUs over the crate's HSM table and mailboxes, calling as `me`.
struct Multi {
    me: usize,
    hsm: twostage_rvh::smp::Hsm,
    mail: twostage_rvh::smp::Mailbox,
    fences: Vec<(u64, RemoteFence)>,
    legacy_mask: Option<u64>,
}

impl Multi {
    fn new(n: usize) -> Self {
        Self {
            me: 0,
            hsm: twostage_rvh::smp::Hsm::new(n),
            mail: twostage_rvh::smp::Mailbox::new(n),
            fences: Vec::new(),
            legacy_mask: None,
        }
    }
}

impl SbiBackend for Multi {
    fn putchar(&mut self, _: u8) {}
    fn getchar(&mut self) -> Option<u8> {
        None
    }
    fn read_guest(&mut self, gpa: GuestPhysAddr, _: &mut [u8]) -> Result<(), BadGuestBuffer> {
        Err(BadGuestBuffer { gpa })
    }
    fn set_timer(&mut self, _: u64) {}
    fn vcpus(&self) -> usize {
        self.hsm.len()
    }
    fn hartid(&self) -> usize {
        self.me
    }
    fn hart_start(&mut self, hart: usize, addr: u64, opaque: u64) -> i64 {
        self.hsm.start(hart, addr, opaque).map_or_else(|e| e, |()| 0)
    }
    fn hart_stop(&mut self) -> Result<(), i64> {
        self.hsm.stop(self.me)
    }
    fn hart_status(&self, hart: usize) -> i64 {
        self.hsm.status(hart)
    }
    fn send_ipi(&mut self, harts: u64) {
        (0..self.vcpus()).filter(|h| harts & (1 << h) != 0).for_each(|h| self.mail.post_ipi(h));
    }
    fn clear_ipi(&mut self) {
        self.mail.take_ipi(self.me);
    }
    fn remote_fence(&mut self, harts: u64, fence: RemoteFence) {
        self.fences.push((harts, fence));
    }
    fn read_legacy_mask(&mut self, va: u64) -> Option<u64> {
        (va == 0x1000).then_some(self.legacy_mask?)
    }
}

fn r(error: i64, value: i64) -> SbiOutcome {
    SbiOutcome::Return { error, value }
}

#[test]
fn smp_extensions_only_with_vcpus() {
    // A one-vCPU VM's backend (vcpus 0): HSM, IPI and RFENCE are absent, as before.
    let mut f = Fake::default();
    assert_eq!(call([eid::HSM, 0, 0, 0, 0, 0, 3, eid::BASE], &mut f), r(0, 0));
    assert_eq!(call([1, 0, 0, 0, 0, 0, 0, eid::HSM], &mut f), r(error::NOT_SUPPORTED, 0));
    assert_eq!(call([1, 0, 0, 0, 0, 0, 0, eid::IPI], &mut f), r(error::NOT_SUPPORTED, 0));
    let mut m = Multi::new(4);
    for e in [eid::HSM, eid::IPI, eid::RFENCE, eid::LEGACY_SEND_IPI, eid::LEGACY_REMOTE_SFENCE_VMA_ASID] {
        assert_eq!(handle(SbiCall::decode([e, 0, 0, 0, 0, 0, 3, eid::BASE]), &mut m), r(0, 1), "probe {e:#x}");
    }
}

#[test]
fn hsm_start_stop_status() {
    let mut m = Multi::new(4);
    let st = |m: &mut Multi, h: u64| handle(SbiCall::decode([h, 0, 0, 0, 0, 0, 2, eid::HSM]), m);
    assert_eq!(st(&mut m, 0), r(0, hsm_state::STARTED));
    assert_eq!(st(&mut m, 3), r(0, hsm_state::STOPPED));
    assert_eq!(st(&mut m, 4), r(error::INVALID_PARAM, 0), "no hart 4");
    assert_eq!(handle(SbiCall::decode([2, 0x8020_0000, 77, 0, 0, 0, 0, eid::HSM]), &mut m), r(0, 0));
    assert_eq!(st(&mut m, 2), r(0, hsm_state::START_PENDING));
    // A second start of the same hart is refused, and so is a start of the caller.
    assert_eq!(handle(SbiCall::decode([2, 0, 0, 0, 0, 0, 0, eid::HSM]), &mut m), r(error::ALREADY_AVAILABLE, 0));
    assert_eq!(handle(SbiCall::decode([0, 0, 0, 0, 0, 0, 0, eid::HSM]), &mut m), r(error::ALREADY_AVAILABLE, 0));
    assert_eq!(handle(SbiCall::decode([9, 0, 0, 0, 0, 0, 0, eid::HSM]), &mut m), r(error::INVALID_PARAM, 0));
    // The started hart picks up its entry once.
    assert_eq!(m.hsm.take_start(2), Some((0x8020_0000, 77)));
    assert_eq!(m.hsm.take_start(2), None);
    assert_eq!(st(&mut m, 2), r(0, hsm_state::STARTED));
    // hart_stop on hart 2: the run loop parks it; a second stop fails.
    m.me = 2;
    assert_eq!(handle(SbiCall::HartStop, &mut m), SbiOutcome::Stopped);
    assert_eq!(handle(SbiCall::HartStop, &mut m), r(error::FAILED, 0));
    assert_eq!(st(&mut m, 2), r(0, hsm_state::STOPPED));
    // Suspend types: retentive, non-retentive, reserved, platform.
    let susp = |m: &mut Multi, ty: u64| handle(SbiCall::decode([ty, 0x8040_0000, 5, 0, 0, 0, 3, eid::HSM]), m);
    assert_eq!(susp(&mut m, 0), SbiOutcome::Suspend { resume: None });
    assert_eq!(susp(&mut m, 0x8000_0000), SbiOutcome::Suspend { resume: Some((0x8040_0000, 5)) });
    assert_eq!(susp(&mut m, 1), r(error::INVALID_PARAM, 0));
    assert_eq!(susp(&mut m, 0x9000_0000), r(error::NOT_SUPPORTED, 0));
}

#[test]
fn ipi_masks() {
    let mut m = Multi::new(4);
    let ipi = |m: &mut Multi, mask: u64, base: u64| handle(SbiCall::decode([mask, base, 0, 0, 0, 0, 0, eid::IPI]), m);
    assert_eq!(ipi(&mut m, 0b101, 1), r(0, 0));
    assert!(!m.mail.take_ipi(0) && m.mail.take_ipi(1) && !m.mail.take_ipi(2) && m.mail.take_ipi(3));
    assert!(!m.mail.take_ipi(1), "taken once");
    // Base -1: every hart, mask ignored; a mask reaching past the last hart is refused.
    assert_eq!(ipi(&mut m, 0, u64::MAX), r(0, 0));
    assert!((0..4).all(|h| m.mail.take_ipi(h)));
    assert_eq!(ipi(&mut m, 0b11, 3), r(error::INVALID_PARAM, 0));
    assert_eq!(ipi(&mut m, 1, u64::MAX - 1), r(error::INVALID_PARAM, 0), "base + bit overflows");
    assert_eq!(ipi(&mut m, 1 << 63, 0), r(error::INVALID_PARAM, 0));
    assert!((0..4).all(|h| !m.mail.take_ipi(h)), "a refused call posts nothing");
    assert_eq!(ipi(&mut m, 0, 2), r(0, 0), "an empty mask is fine");
    // Legacy: the mask is read from guest memory; 0 names every hart; errors are in a0.
    m.legacy_mask = Some(0b10);
    let legacy = |m: &mut Multi, va: u64| handle(SbiCall::decode([va, 0, 0, 0, 0, 0, 0, eid::LEGACY_SEND_IPI]), m);
    assert_eq!(legacy(&mut m, 0x1000), SbiOutcome::LegacyReturn { value: 0 });
    assert!(m.mail.take_ipi(1) && !m.mail.take_ipi(0));
    assert_eq!(legacy(&mut m, 0x2000), SbiOutcome::LegacyReturn { value: error::INVALID_ADDRESS });
    assert_eq!(legacy(&mut m, 0), SbiOutcome::LegacyReturn { value: 0 });
    assert!((0..4).all(|h| m.mail.take_ipi(h)));
    m.mail.post_ipi(0);
    assert_eq!(
        handle(SbiCall::decode([0, 0, 0, 0, 0, 0, 0, eid::LEGACY_CLEAR_IPI]), &mut m),
        SbiOutcome::LegacyReturn { value: 0 }
    );
    assert!(!m.mail.take_ipi(0));
}

#[test]
fn rfence_calls() {
    let mut m = Multi::new(3);
    let rf = |m: &mut Multi, fid: u64, regs: [u64; 5]| {
        handle(SbiCall::decode([regs[0], regs[1], regs[2], regs[3], regs[4], 0, fid, eid::RFENCE]), m)
    };
    assert_eq!(rf(&mut m, 0, [0b11, 0, 0, 0, 0]), r(0, 0));
    assert_eq!(rf(&mut m, 1, [1, 2, 0x1000, 0x2000, 0]), r(0, 0));
    assert_eq!(rf(&mut m, 2, [0, u64::MAX, 0, 0, 9]), r(0, 0));
    assert_eq!(rf(&mut m, 3, [1, 0, 0, 0, 0]), r(error::NOT_SUPPORTED, 0), "HFENCE calls: no nested H");
    assert_eq!(rf(&mut m, 1, [1, 3, 0, 0, 0]), r(error::INVALID_PARAM, 0));
    assert_eq!(
        m.fences,
        [
            (0b011, RemoteFence::FenceI),
            (0b100, RemoteFence::Vma { start: 0x1000, size: 0x2000, asid: None }),
            (0b111, RemoteFence::Vma { start: 0, size: 0, asid: Some(9) }),
        ]
    );
    m.legacy_mask = Some(0b1);
    let legacy = SbiCall::decode([0x1000, 0x5000, 0x1000, 4, 0, 0, 0, eid::LEGACY_REMOTE_SFENCE_VMA_ASID]);
    assert_eq!(handle(legacy, &mut m), SbiOutcome::LegacyReturn { value: 0 });
    assert_eq!(m.fences[3], (0b1, RemoteFence::Vma { start: 0x5000, size: 0x1000, asid: Some(4) }));
}
