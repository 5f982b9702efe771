//! SBI calls from a VS-mode guest: decoding (a0-a7) and serving them over a small backend trait.
//!
//! Extension and function IDs are from the RISC-V SBI specification v2.0, cited by chapter
//! title: "Base Extension", "Legacy Extensions", "Timer Extension", "IPI Extension", "RFENCE
//! Extension", "Hart State Management Extension", "System Reset Extension", "Debug Console
//! Extension"; the calling convention, hart masks and error codes are in "Binary Encoding".
//! The multi-hart calls (HSM, IPI, RFENCE, legacy 0x03-0x07) reach the hypervisor through
//! [`SbiBackend`] methods whose defaults say "not supported" (a one-vCPU VM); their shared
//! state machines are [`crate::smp`].

use core::fmt;
use twostage_npt::GuestPhysAddr;

pub use crate::smp::{hsm_state, suspend, HartMask, RemoteFence};

/// SBI error codes (SBI v2.0 §3, Table 1).
pub mod error {
    /// Completed successfully.
    pub const SUCCESS: i64 = 0;
    /// Failed.
    pub const FAILED: i64 = -1;
    /// Not supported.
    pub const NOT_SUPPORTED: i64 = -2;
    /// Invalid parameter.
    pub const INVALID_PARAM: i64 = -3;
    /// Denied.
    pub const DENIED: i64 = -4;
    /// Invalid address.
    pub const INVALID_ADDRESS: i64 = -5;
    /// Already available (HSM hart_start of a started hart).
    pub const ALREADY_AVAILABLE: i64 = -6;
    /// Already started.
    pub const ALREADY_STARTED: i64 = -7;
    /// Already stopped.
    pub const ALREADY_STOPPED: i64 = -8;
}

/// Extension IDs.
pub mod eid {
    /// Legacy set_timer (§5.1).
    pub const LEGACY_SET_TIMER: u64 = 0x00;
    /// Legacy console_putchar (§5.2).
    pub const LEGACY_PUTCHAR: u64 = 0x01;
    /// Legacy console_getchar (§5.3).
    pub const LEGACY_GETCHAR: u64 = 0x02;
    /// Legacy clear_ipi (§5.4).
    pub const LEGACY_CLEAR_IPI: u64 = 0x03;
    /// Legacy send_ipi (§5.5).
    pub const LEGACY_SEND_IPI: u64 = 0x04;
    /// Legacy remote_fence_i (§5.6).
    pub const LEGACY_REMOTE_FENCE_I: u64 = 0x05;
    /// Legacy remote_sfence_vma.
    pub const LEGACY_REMOTE_SFENCE_VMA: u64 = 0x06;
    /// Legacy remote_sfence_vma_asid.
    pub const LEGACY_REMOTE_SFENCE_VMA_ASID: u64 = 0x07;
    /// Legacy shutdown (§5.7).
    pub const LEGACY_SHUTDOWN: u64 = 0x08;
    /// IPI extension "sPI".
    pub const IPI: u64 = 0x0073_5049;
    /// RFENCE extension "RFNC".
    pub const RFENCE: u64 = 0x5246_4E43;
    /// Hart state management extension "HSM".
    pub const HSM: u64 = 0x0048_534D;
    /// Base extension (§4).
    pub const BASE: u64 = 0x10;
    /// Timer extension "TIME" (§6).
    pub const TIME: u64 = 0x5449_4D45;
    /// System reset extension "SRST" (§10).
    pub const SRST: u64 = 0x5352_5354;
    /// Debug console extension "DBCN" (§12).
    pub const DBCN: u64 = 0x4442_434E;
    /// twostage's test hypercalls, in the experimental range 0x08000000-0x08FFFFFF (§3).
    pub const TWOSTAGE_TEST: u64 = 0x0800_7473;
}

/// The spec version this server implements: 2.0 (major in bits 30:24, §4.1).
pub const SPEC_VERSION: i64 = 2 << 24;
/// The most bytes one DBCN console_write call writes.
pub const DBCN_MAX_WRITE: u64 = 4096;
/// The implementation ID reported by `sbi_get_impl_id` (not a registered ID; §4.9 lists them).
pub const IMPL_ID: i64 = 0x7473;

/// A decoded SBI call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SbiCall {
    /// Legacy or TIME set_timer(stime_value).
    SetTimer {
        /// Absolute time value.
        deadline: u64,
        /// Called through the legacy EID 0 (returns in a0 only).
        legacy: bool,
    },
    /// Legacy console_putchar.
    LegacyPutchar(u8),
    /// Legacy console_getchar.
    LegacyGetchar,
    /// Legacy shutdown.
    LegacyShutdown,
    /// Base: get spec version (fid 0).
    GetSpecVersion,
    /// Base: get implementation ID (fid 1).
    GetImplId,
    /// Base: get implementation version (fid 2).
    GetImplVersion,
    /// Base: probe extension (fid 3).
    ProbeExtension(u64),
    /// Base: mvendorid, marchid, mimpid (fids 4-6): reported as 0.
    GetMachineId,
    /// DBCN console_write(num_bytes, base_addr_lo, base_addr_hi) (§12.1).
    DbcnWrite {
        /// Bytes to write.
        len: u64,
        /// Guest-physical address of the bytes (base_addr_lo).
        gpa: u64,
        /// base_addr_hi: the address bits above XLEN, which must be 0 on RV64.
        hi: u64,
    },
    /// DBCN console_write_byte (§12.3).
    DbcnWriteByte(u8),
    /// SRST system_reset(reset_type, reset_reason) (§10.1).
    SystemReset {
        /// 0 shutdown, 1 cold reboot, 2 warm reboot.
        reset_type: u32,
        /// 0 no reason, 1 system failure, 0xF0000000+ vendor.
        reason: u32,
    },
    /// HSM hart_start(hartid, start_addr, opaque).
    HartStart {
        /// The vCPU to start.
        hart: u64,
        /// Where it starts (guest-physical, VS-mode, vsatp Bare).
        addr: u64,
        /// Its a1 at the start.
        opaque: u64,
    },
    /// HSM hart_stop().
    HartStop,
    /// HSM hart_get_status(hartid).
    HartStatus(u64),
    /// HSM hart_suspend(suspend_type, resume_addr, opaque).
    HartSuspend {
        /// 0 (retentive), 0x80000000 (non-retentive), platform types above.
        ty: u32,
        /// Where a non-retentive suspend resumes.
        addr: u64,
        /// a1 at that resume.
        opaque: u64,
    },
    /// IPI send_ipi, or legacy send_ipi (`legacy`: the mask is a pointer, see [`HartMask`]).
    SendIpi(HartMask),
    /// Legacy clear_ipi.
    ClearIpi,
    /// An RFENCE call (or its legacy form) to the harts of a mask.
    Fence(HartMask, RemoteFence),
    /// A twostage test hypercall: function and arguments a0-a2.
    Test {
        /// Function ID (a6).
        fid: u64,
        /// Arguments a0, a1, a2.
        args: [u64; 3],
    },
    /// Anything else.
    Unknown {
        /// a7.
        eid: u64,
        /// a6.
        fid: u64,
    },
}

impl SbiCall {
    /// Decodes a call from the guest's a0..a7 (`regs[0]` = a0).
    pub fn decode(regs: [u64; 8]) -> Self {
        let (eid, fid) = (regs[7], regs[6]);
        match (eid, fid) {
            (eid::LEGACY_SET_TIMER, _) => Self::SetTimer { deadline: regs[0], legacy: true },
            (eid::TIME, 0) => Self::SetTimer { deadline: regs[0], legacy: false },
            (eid::LEGACY_PUTCHAR, _) => Self::LegacyPutchar(regs[0] as u8),
            (eid::LEGACY_GETCHAR, _) => Self::LegacyGetchar,
            (eid::LEGACY_SHUTDOWN, _) => Self::LegacyShutdown,
            (eid::LEGACY_CLEAR_IPI, _) => Self::ClearIpi,
            (eid::LEGACY_SEND_IPI, _) => Self::SendIpi(HartMask::Legacy(regs[0])),
            (eid::LEGACY_REMOTE_FENCE_I, _) => Self::Fence(HartMask::Legacy(regs[0]), RemoteFence::FenceI),
            (eid::LEGACY_REMOTE_SFENCE_VMA, _) => {
                Self::Fence(HartMask::Legacy(regs[0]), RemoteFence::Vma { start: regs[1], size: regs[2], asid: None })
            }
            (eid::LEGACY_REMOTE_SFENCE_VMA_ASID, _) => Self::Fence(
                HartMask::Legacy(regs[0]),
                RemoteFence::Vma { start: regs[1], size: regs[2], asid: Some(regs[3] as u16) },
            ),
            (eid::IPI, 0) => Self::SendIpi(HartMask::new(regs[0], regs[1])),
            (eid::RFENCE, 0..=6) => {
                let mask = HartMask::new(regs[0], regs[1]);
                let (start, size) = (regs[2], regs[3]);
                Self::Fence(
                    mask,
                    match fid {
                        0 => RemoteFence::FenceI,
                        1 => RemoteFence::Vma { start, size, asid: None },
                        2 => RemoteFence::Vma { start, size, asid: Some(regs[4] as u16) },
                        _ => RemoteFence::Hypervisor,
                    },
                )
            }
            (eid::HSM, 0) => Self::HartStart { hart: regs[0], addr: regs[1], opaque: regs[2] },
            (eid::HSM, 1) => Self::HartStop,
            (eid::HSM, 2) => Self::HartStatus(regs[0]),
            (eid::HSM, 3) => Self::HartSuspend { ty: regs[0] as u32, addr: regs[1], opaque: regs[2] },
            (eid::BASE, 0) => Self::GetSpecVersion,
            (eid::BASE, 1) => Self::GetImplId,
            (eid::BASE, 2) => Self::GetImplVersion,
            (eid::BASE, 3) => Self::ProbeExtension(regs[0]),
            (eid::BASE, 4..=6) => Self::GetMachineId,
            (eid::DBCN, 0) => Self::DbcnWrite { len: regs[0], gpa: regs[1], hi: regs[2] },
            (eid::DBCN, 2) => Self::DbcnWriteByte(regs[0] as u8),
            (eid::SRST, 0) => Self::SystemReset { reset_type: regs[0] as u32, reason: regs[1] as u32 },
            (eid::TWOSTAGE_TEST, fid) => Self::Test { fid, args: [regs[0], regs[1], regs[2]] },
            (eid, fid) => Self::Unknown { eid, fid },
        }
    }
}

/// How the guest wants the system to end (SRST or legacy shutdown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetRequest {
    /// The reset type (0 shutdown, 1 cold reboot, 2 warm reboot).
    pub reset_type: u32,
    /// The reason.
    pub reason: u32,
}

impl ResetRequest {
    /// The exit status the hypervisor reports: 0 for a shutdown with no reason, 1 for a system
    /// failure, the low byte of a vendor reason (0xF0000000 | status; 1 if that byte is 0) for
    /// twostage's convention of passing an exit status.
    pub fn exit_status(&self) -> u8 {
        match self.reason {
            0 => 0,
            1 => 1,
            r if r >= 0xF000_0000 => match r as u8 {
                0 => 1,
                s => s,
            },
            _ => 1,
        }
    }
}

/// What the hypervisor's run loop does after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SbiOutcome {
    /// Write (error, value) to a0/a1, advance sepc by 4, resume.
    Return {
        /// a0.
        error: i64,
        /// a1.
        value: i64,
    },
    /// A legacy call's result (SBI v2.0 §5): write a0 only, every other register is preserved;
    /// advance sepc by 4, resume.
    LegacyReturn {
        /// a0.
        value: i64,
    },
    /// Stop the guest.
    Reset(ResetRequest),
    /// HSM hart_stop succeeded: the vCPU waits, outside the guest, until a hart_start; nothing is
    /// written to its registers.
    Stopped,
    /// HSM hart_suspend: the vCPU waits until an interrupt is pending for it, then resumes after
    /// the ecall with a0 = 0 (`resume` None, retentive), or at `resume`'s address with a0 =
    /// its hartid, a1 = the opaque, vsatp Bare and vsstatus.SIE clear (non-retentive).
    Suspend {
        /// (resume_addr, opaque) of a non-retentive suspend.
        resume: Option<(u64, u64)>,
    },
    /// A test hypercall: the run loop's caller handles it.
    Test {
        /// Function ID.
        fid: u64,
        /// Arguments.
        args: [u64; 3],
    },
}

/// A guest-physical read failed (DBCN write from memory the guest does not own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadGuestBuffer {
    /// Where.
    pub gpa: GuestPhysAddr,
}

impl fmt::Display for BadGuestBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest buffer at {} is not readable", self.gpa)
    }
}

impl core::error::Error for BadGuestBuffer {}

/// What an SBI server needs from the hypervisor.
pub trait SbiBackend {
    /// Writes a console byte.
    fn putchar(&mut self, c: u8);
    /// Reads a console byte, if one is waiting.
    fn getchar(&mut self) -> Option<u8>;
    /// Reads guest-physical memory (for DBCN console_write).
    fn read_guest(&mut self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), BadGuestBuffer>;
    /// Arms the guest's virtual timer at `deadline` (in `time` units) and clears a pending one.
    fn set_timer(&mut self, deadline: u64);
    /// The VM's vCPUs, for the multi-hart calls (HSM, IPI, RFENCE); 0 (the default) leaves them
    /// unsupported.
    fn vcpus(&self) -> usize {
        0
    }
    /// The calling vCPU's hart id.
    fn hartid(&self) -> usize {
        0
    }
    /// HSM hart_start of vCPU `hart` (below [`SbiBackend::vcpus`]): an SBI error code.
    fn hart_start(&mut self, _hart: usize, _addr: u64, _opaque: u64) -> i64 {
        error::NOT_SUPPORTED
    }
    /// HSM hart_stop of the calling vCPU: `Ok` when it stopped (the run loop parks it).
    fn hart_stop(&mut self) -> Result<(), i64> {
        Err(error::NOT_SUPPORTED)
    }
    /// HSM state of vCPU `hart` ([`hsm_state`]).
    fn hart_status(&self, _hart: usize) -> i64 {
        error::NOT_SUPPORTED
    }
    /// Raises a VS software interrupt on every vCPU of the bit set `harts`.
    fn send_ipi(&mut self, _harts: u64) {}
    /// Clears the calling vCPU's pending VS software interrupt (legacy clear_ipi).
    fn clear_ipi(&mut self) {}
    /// Carries `fence` out on every vCPU of `harts` and returns once all have.
    fn remote_fence(&mut self, _harts: u64, _fence: RemoteFence) {}
    /// Reads the u64 a legacy hart mask points to (a guest-virtual address).
    fn read_legacy_mask(&mut self, _va: u64) -> Option<u64> {
        None
    }
}

/// Whether `e` is one of the multi-hart extensions (offered when the backend has vCPUs).
fn smp_extension(e: u64) -> bool {
    matches!(
        e,
        eid::HSM
            | eid::IPI
            | eid::RFENCE
            | eid::LEGACY_CLEAR_IPI
            | eid::LEGACY_SEND_IPI
            | eid::LEGACY_REMOTE_FENCE_I
            | eid::LEGACY_REMOTE_SFENCE_VMA
            | eid::LEGACY_REMOTE_SFENCE_VMA_ASID
    )
}

/// Serves one call. Unknown calls get SBI_ERR_NOT_SUPPORTED.
pub fn handle(call: SbiCall, b: &mut impl SbiBackend) -> SbiOutcome {
    let ok = |value: i64| SbiOutcome::Return { error: error::SUCCESS, value };
    let err = |error: i64| SbiOutcome::Return { error, value: 0 };
    match call {
        SbiCall::SetTimer { deadline, legacy } => {
            b.set_timer(deadline);
            if legacy {
                SbiOutcome::LegacyReturn { value: 0 }
            } else {
                ok(0)
            }
        }
        SbiCall::LegacyPutchar(c) => {
            b.putchar(c);
            // Legacy calls return their value in a0 (§5): 0 for success.
            SbiOutcome::LegacyReturn { value: 0 }
        }
        SbiCall::LegacyGetchar => SbiOutcome::LegacyReturn { value: b.getchar().map_or(-1, i64::from) },
        SbiCall::LegacyShutdown => SbiOutcome::Reset(ResetRequest { reset_type: 0, reason: 0 }),
        SbiCall::GetSpecVersion => ok(SPEC_VERSION),
        SbiCall::GetImplId => ok(IMPL_ID),
        SbiCall::GetImplVersion => ok(1),
        SbiCall::ProbeExtension(e) if b.vcpus() > 0 && smp_extension(e) => ok(1),
        SbiCall::ProbeExtension(e) => ok(matches!(
            e,
            eid::LEGACY_SET_TIMER
                | eid::LEGACY_PUTCHAR
                | eid::LEGACY_GETCHAR
                | eid::LEGACY_SHUTDOWN
                | eid::BASE
                | eid::TIME
                | eid::SRST
                | eid::DBCN
        ) as i64),
        SbiCall::GetMachineId => ok(0),
        SbiCall::DbcnWrite { len, gpa, hi } => {
            let Ok(mut at) = GuestPhysAddr::try_new(gpa) else { return err(error::INVALID_PARAM) };
            if hi != 0 {
                return err(error::INVALID_PARAM);
            }
            // A write may be partial (§12.1 returns the bytes written): at most one page per call,
            // so a guest cannot hold the hypervisor in a single call for long.
            let total = len.min(DBCN_MAX_WRITE);
            let mut done = 0;
            let mut chunk = [0u8; 64];
            while done < total {
                let n = (total - done).min(chunk.len() as u64) as usize;
                if b.read_guest(at, &mut chunk[..n]).is_err() {
                    return if done == 0 { err(error::INVALID_PARAM) } else { ok(done as i64) };
                }
                chunk[..n].iter().for_each(|&c| b.putchar(c));
                done += n as u64;
                let Some(next) = at.checked_add(n as u64) else { break };
                at = next;
            }
            ok(done as i64)
        }
        SbiCall::DbcnWriteByte(c) => {
            b.putchar(c);
            ok(0)
        }
        SbiCall::SystemReset { reset_type, reason } => {
            if reset_type > 2 {
                return err(error::INVALID_PARAM);
            }
            SbiOutcome::Reset(ResetRequest { reset_type, reason })
        }
        SbiCall::Test { fid, args } => SbiOutcome::Test { fid, args },
        SbiCall::Unknown { .. } => err(error::NOT_SUPPORTED),
        _ if b.vcpus() == 0 => err(error::NOT_SUPPORTED),
        SbiCall::HartStart { hart, addr, opaque } => match usize::try_from(hart) {
            Ok(h) if h < b.vcpus() => err(b.hart_start(h, addr, opaque)),
            _ => err(error::INVALID_PARAM),
        },
        SbiCall::HartStop => match b.hart_stop() {
            Ok(()) => SbiOutcome::Stopped,
            Err(e) => err(e),
        },
        SbiCall::HartStatus(hart) => match usize::try_from(hart) {
            Ok(h) if h < b.vcpus() => match b.hart_status(h) {
                s if s >= 0 => ok(s),
                e => err(e),
            },
            _ => err(error::INVALID_PARAM),
        },
        SbiCall::HartSuspend { ty, addr, opaque } => match ty {
            suspend::RETENTIVE => SbiOutcome::Suspend { resume: None },
            suspend::NON_RETENTIVE => SbiOutcome::Suspend { resume: Some((addr, opaque)) },
            // Reserved types, and platform-specific ones this platform has none of.
            0x0000_0001..=0x0FFF_FFFF | 0x8000_0001..=0x8FFF_FFFF => err(error::INVALID_PARAM),
            _ => err(error::NOT_SUPPORTED),
        },
        SbiCall::ClearIpi => {
            b.clear_ipi();
            SbiOutcome::LegacyReturn { value: 0 }
        }
        SbiCall::SendIpi(mask) | SbiCall::Fence(mask, _) => {
            let legacy = matches!(mask, HartMask::Legacy(_));
            let n = b.vcpus();
            let harts = match mask.resolve(n, |va| b.read_legacy_mask(va)) {
                Ok(h) => h,
                Err(e) if legacy => return SbiOutcome::LegacyReturn { value: e },
                Err(e) => return err(e),
            };
            match call {
                SbiCall::Fence(_, RemoteFence::Hypervisor) => return err(error::NOT_SUPPORTED),
                SbiCall::Fence(_, fence) => b.remote_fence(harts, fence),
                _ => b.send_ipi(harts),
            }
            if legacy {
                SbiOutcome::LegacyReturn { value: 0 }
            } else {
                ok(0)
            }
        }
    }
}
