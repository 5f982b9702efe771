//! The multi-hart side of the SBI, shared by a VM's vCPUs: hart masks and remote fences as the
//! guest names them, the HSM state of every vCPU ([`Hsm`]), and the mailboxes through which one
//! vCPU raises a software interrupt on another or has it fence its VS-stage translations
//! ([`Mailbox`]). Everything here is atomics and plain values, host-tested with threads in
//! `tests/sbi_smp.rs`; the hypervisor adds the physical IPIs and the fence instructions.
//!
//! The mailbox follows the pattern of [`crate::shootdown`]: a requester posts into the
//! target's slot with read-modify-writes, raises the target's `requested` generation, sends it
//! an IPI and waits (servicing its own slot) until the target's `acked` generation reached the
//! one it raised; the target drains its slot, executes the fences, then acknowledges with a
//! Release store. An RFENCE call therefore returns only after every named hart fenced ("RFENCE
//! Extension": the remote fences are complete when the call returns).

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// The harts a multi-hart call names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HartMask {
    /// hart_mask and hart_mask_base ("Binary Encoding", "Hart List Parameter"): bit i of `mask`
    /// names hart `base + i`; a base of -1 (all ones) names every hart and `mask` is ignored.
    Bits {
        /// hart_mask.
        mask: u64,
        /// hart_mask_base.
        base: u64,
    },
    /// A legacy call's mask ("Legacy Extensions"): the guest-virtual address of a bit vector
    /// of harts, 0 for every hart.
    Legacy(u64),
}

impl HartMask {
    /// The mask of the SBI v0.2+ calls.
    pub fn new(mask: u64, base: u64) -> Self {
        Self::Bits { mask, base }
    }

    /// The named harts as a bit set over the VM's `n` vCPUs (at most 64), given how to read a
    /// legacy mask from guest-virtual memory. `INVALID_PARAM` when a named hart does not exist
    /// ("IPI Extension", "RFENCE Extension": at least one hartid is not valid),
    /// `INVALID_ADDRESS` when a legacy mask cannot be read.
    pub fn resolve(self, n: usize, read_legacy: impl FnOnce(u64) -> Option<u64>) -> Result<u64, i64> {
        let all = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        let (mask, base) = match self {
            Self::Bits { base: u64::MAX, .. } | Self::Legacy(0) => return Ok(all),
            Self::Bits { mask, base } => (mask, base),
            Self::Legacy(va) => (read_legacy(va).ok_or(crate::sbi::error::INVALID_ADDRESS)?, 0),
        };
        if mask == 0 {
            return Ok(0);
        }
        let top = 63 - u64::from(mask.leading_zeros());
        match base.checked_add(top) {
            Some(last) if last < n as u64 => Ok(mask << base),
            _ => Err(crate::sbi::error::INVALID_PARAM),
        }
    }
}

/// What an RFENCE call (or legacy remote fence) asks of the named harts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteFence {
    /// remote_fence_i: FENCE.I on each.
    FenceI,
    /// remote_sfence_vma (`asid` None) or remote_sfence_vma_asid: the guest's SFENCE.VMA over
    /// [start, start + size), carried out as HFENCE.VVMA under the VM's VMID.
    Vma {
        /// First guest-virtual address.
        start: u64,
        /// Bytes; 0 with a start of 0, or all ones, means the whole address space.
        size: u64,
        /// The ASID, for remote_sfence_vma_asid.
        asid: Option<u16>,
    },
    /// The HFENCE calls (fids 3-6): for a guest that is itself a hypervisor; not offered.
    Hypervisor,
}

impl RemoteFence {
    /// Whether a Vma fence covers the whole address space ("RFENCE Extension":
    /// start_addr and size 0, or size 2^XLEN - 1).
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Vma { start, size, .. } if (*start == 0 && *size == 0) || *size == u64::MAX)
    }
}

/// HSM hart states ("Hart State Management Extension", the table of HSM hart states).
pub mod hsm_state {
    /// Started.
    pub const STARTED: i64 = 0;
    /// Stopped.
    pub const STOPPED: i64 = 1;
    /// Start pending.
    pub const START_PENDING: i64 = 2;
    /// Stop pending.
    pub const STOP_PENDING: i64 = 3;
    /// Suspended.
    pub const SUSPENDED: i64 = 4;
}

/// The suspend types of hart_suspend.
pub mod suspend {
    /// Default retentive suspend.
    pub const RETENTIVE: u32 = 0;
    /// Default non-retentive suspend.
    pub const NON_RETENTIVE: u32 = 0x8000_0000;
}

/// A Stopped hart being started: reported as START_PENDING, start address not yet stored.
const CLAIMED: u8 = 0xff;

/// One vCPU's HSM state.
struct HsmHart {
    state: AtomicU8,
    addr: AtomicU64,
    opaque: AtomicU64,
}

/// The HSM states of a VM's vCPUs ("Hart State Management Extension"): vCPU 0 starts in
/// STARTED (the boot hart), the others in STOPPED until a hart_start names them.
pub struct Hsm {
    harts: Box<[HsmHart]>,
}

impl core::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries((0..self.harts.len()).map(|h| self.status(h))).finish()
    }
}

impl Hsm {
    /// `n` vCPUs, vCPU 0 started.
    pub fn new(n: usize) -> Self {
        let harts = (0..n)
            .map(|i| HsmHart {
                state: AtomicU8::new(if i == 0 { hsm_state::STARTED as u8 } else { hsm_state::STOPPED as u8 }),
                addr: AtomicU64::new(0),
                opaque: AtomicU64::new(0),
            })
            .collect();
        Self { harts }
    }

    /// The vCPUs.
    pub fn len(&self) -> usize {
        self.harts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.harts.is_empty()
    }

    /// hart_start: a STOPPED vCPU becomes START_PENDING with `addr` and `opaque`; its hart picks
    /// them up with [`Hsm::take_start`]. `ALREADY_AVAILABLE` for a vCPU in any other state
    /// (only one of two racing starts wins).
    pub fn start(&self, hart: usize, addr: u64, opaque: u64) -> Result<(), i64> {
        let h = &self.harts[hart];
        h.state
            .compare_exchange(hsm_state::STOPPED as u8, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| crate::sbi::error::ALREADY_AVAILABLE)?;
        h.addr.store(addr, Ordering::Relaxed);
        h.opaque.store(opaque, Ordering::Relaxed);
        h.state.store(hsm_state::START_PENDING as u8, Ordering::Release);
        Ok(())
    }

    /// On the stopped vCPU's own hart: the start address and opaque once a start is pending
    /// (the vCPU is STARTED from then on).
    pub fn take_start(&self, hart: usize) -> Option<(u64, u64)> {
        let h = &self.harts[hart];
        if h.state.load(Ordering::Acquire) != hsm_state::START_PENDING as u8 {
            return None;
        }
        let r = (h.addr.load(Ordering::Relaxed), h.opaque.load(Ordering::Relaxed));
        h.state.store(hsm_state::STARTED as u8, Ordering::Release);
        Some(r)
    }

    /// hart_stop on the calling vCPU: STARTED becomes STOPPED; `FAILED` otherwise.
    pub fn stop(&self, hart: usize) -> Result<(), i64> {
        self.harts[hart]
            .state
            .compare_exchange(hsm_state::STARTED as u8, hsm_state::STOPPED as u8, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(|_| crate::sbi::error::FAILED)
    }

    /// hart_suspend (`true`) and the wake-up from it (`false`): STARTED and SUSPENDED swap.
    pub fn set_suspended(&self, hart: usize, suspended: bool) {
        let (from, to) = if suspended {
            (hsm_state::STARTED, hsm_state::SUSPENDED)
        } else {
            (hsm_state::SUSPENDED, hsm_state::STARTED)
        };
        let _ = self.harts[hart].state.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    /// hart_get_status ([`hsm_state`]).
    pub fn status(&self, hart: usize) -> i64 {
        match self.harts[hart].state.load(Ordering::Acquire) {
            CLAIMED => hsm_state::START_PENDING,
            s => i64::from(s),
        }
    }
}

/// Page fences a mailbox holds before it widens a request to a whole ASID or the whole VMID.
pub const FENCE_SLOTS: usize = 8;

/// One fence a vCPU's hart executes on itself for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsFence {
    /// FENCE.I.
    FenceI,
    /// HFENCE.VVMA zero, zero: every VS-stage translation of the current VMID.
    All,
    /// HFENCE.VVMA zero, asid.
    Asid(u16),
    /// HFENCE.VVMA vaddr, zero: one page, every ASID.
    Page(u64),
    /// HFENCE.VVMA vaddr, asid.
    PageAsid(u64, u16),
}

/// How one vCPU carries `fence` out on itself: FENCE.I, HFENCE.VVMA per page for a range of at
/// most [`FENCE_SLOTS`] pages, for the ASID or whole otherwise ("Hypervisor Memory-Management
/// Fence Instructions": HFENCE.VVMA applies to the VMID in hgatp, as the guest's SFENCE.VMA
/// would).
pub fn plan(fence: RemoteFence, mut run: impl FnMut(VsFence)) {
    match fence {
        RemoteFence::FenceI => run(VsFence::FenceI),
        RemoteFence::Hypervisor => {}
        f @ RemoteFence::Vma { start, size, asid } => {
            let first = start & !0xfff;
            let pages = start.checked_add(size).map(|end| (end.saturating_sub(first)).div_ceil(4096));
            match pages {
                Some(p) if !f.is_full() && p <= FENCE_SLOTS as u64 => {
                    for va in (0..p).map(|i| first + i * 4096) {
                        run(asid.map_or(VsFence::Page(va), |a| VsFence::PageAsid(va, a)));
                    }
                }
                _ => run(asid.map_or(VsFence::All, VsFence::Asid)),
            }
        }
    }
}

/// One vCPU's slot.
#[derive(Default)]
struct Slot {
    ipi: AtomicBool,
    fence_i: AtomicBool,
    all: AtomicBool,
    /// 0, or the ASID + 1 to fence whole.
    asid: AtomicU64,
    /// 0, or a page address | 1 (fenced for every ASID: a superset of one ASID's).
    pages: [AtomicU64; FENCE_SLOTS],
    requested: AtomicU64,
    acked: AtomicU64,
    c_ipis: AtomicU64,
    c_fence_requests: AtomicU64,
    c_fences_served: AtomicU64,
}

/// Puts `v` in an empty slot; true when the slot holds `v` afterwards (it was empty or already
/// held it), false when another value is there.
fn claim(slot: &AtomicU64, v: u64) -> bool {
    loop {
        match slot.compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(cur) if cur == v => {
                if slot.compare_exchange(v, v, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

/// What one vCPU's mailbox counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailStats {
    /// Guest IPIs posted to it.
    pub ipis: u64,
    /// Remote fence requests posted to it.
    pub fence_requests: u64,
    /// Requests it served (drains that acknowledged a new generation).
    pub fences_served: u64,
}

/// The guest-IPI and remote-fence mailboxes of a VM's vCPUs (see the module documentation).
pub struct Mailbox {
    slots: Box<[Slot]>,
}

impl core::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mailbox").field("vcpus", &self.slots.len()).finish()
    }
}

impl Mailbox {
    /// Mailboxes for `n` vCPUs.
    pub fn new(n: usize) -> Self {
        Self { slots: (0..n).map(|_| Slot::default()).collect() }
    }

    /// Posts a VS software interrupt to `to`; the caller then interrupts `to`'s hart.
    pub fn post_ipi(&self, to: usize) {
        let s = &self.slots[to];
        s.c_ipis.fetch_add(1, Ordering::Relaxed);
        s.ipi.store(true, Ordering::Release);
    }

    /// On `me`'s hart: whether a VS software interrupt was posted since the last call.
    pub fn take_ipi(&self, me: usize) -> bool {
        let s = &self.slots[me];
        s.ipi.load(Ordering::Relaxed) && s.ipi.swap(false, Ordering::AcqRel)
    }

    /// Posts `fence` to `to`; returns the generation to wait for ([`Mailbox::done`]).
    pub fn post_fence(&self, to: usize, fence: RemoteFence) -> u64 {
        let s = &self.slots[to];
        s.c_fence_requests.fetch_add(1, Ordering::Relaxed);
        plan(fence, |f| match f {
            VsFence::FenceI => {
                s.fence_i.swap(true, Ordering::AcqRel);
            }
            VsFence::All => {
                s.all.swap(true, Ordering::AcqRel);
            }
            VsFence::Asid(a) => {
                if !claim(&s.asid, u64::from(a) + 1) {
                    s.all.swap(true, Ordering::AcqRel);
                }
            }
            VsFence::Page(va) | VsFence::PageAsid(va, _) => {
                if !s.pages.iter().any(|p| claim(p, va | 1)) {
                    s.all.swap(true, Ordering::AcqRel);
                }
            }
        });
        s.requested.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether `to` acknowledged generation `gen`.
    pub fn done(&self, to: usize, gen: u64) -> bool {
        self.slots[to].acked.load(Ordering::Acquire) >= gen
    }

    /// Whether anything waits for `me` (a fence request or an IPI).
    pub fn pending(&self, me: usize) -> bool {
        let s = &self.slots[me];
        s.ipi.load(Ordering::Relaxed) || s.requested.load(Ordering::Relaxed) != s.acked.load(Ordering::Relaxed)
    }

    /// On `me`'s hart: executes the fences posted to it (through `run`) and acknowledges them;
    /// returns how many fences ran. Guest IPIs stay for [`Mailbox::take_ipi`].
    pub fn service(&self, me: usize, mut run: impl FnMut(VsFence)) -> u64 {
        let s = &self.slots[me];
        let mut ran = 0;
        loop {
            let gen = s.requested.load(Ordering::Acquire);
            if s.acked.load(Ordering::Relaxed) >= gen {
                return ran;
            }
            let mut go = |f| {
                ran += 1;
                run(f)
            };
            if s.fence_i.swap(false, Ordering::AcqRel) {
                go(VsFence::FenceI);
            }
            let all = s.all.swap(false, Ordering::AcqRel);
            let asid = s.asid.swap(0, Ordering::AcqRel);
            let pages: [u64; FENCE_SLOTS] = core::array::from_fn(|i| s.pages[i].swap(0, Ordering::AcqRel));
            if all {
                go(VsFence::All);
            } else {
                if let Some(a) = asid.checked_sub(1) {
                    go(VsFence::Asid(a as u16));
                }
                pages.iter().filter(|&&p| p != 0).for_each(|&p| go(VsFence::Page(p & !1)));
            }
            s.c_fences_served.fetch_add(1, Ordering::Relaxed);
            s.acked.store(gen, Ordering::Release);
        }
    }

    /// What `me`'s mailbox counted.
    pub fn stats(&self, me: usize) -> MailStats {
        let s = &self.slots[me];
        MailStats {
            ipis: s.c_ipis.load(Ordering::Relaxed),
            fence_requests: s.c_fence_requests.load(Ordering::Relaxed),
            fences_served: s.c_fences_served.load(Ordering::Relaxed),
        }
    }
}
