//! SBI calls from a VS-mode guest: decoding (a0-a7) and serving them over a small backend trait.
//!
//! Extension and function IDs are from the RISC-V SBI specification v2.0: base (§4), legacy
//! (§5), TIME (§6), SRST (§10), DBCN (§12); the calling convention and error codes are §3.

use core::fmt;
use twostage_npt::GuestPhysAddr;

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
    /// Invalid address.
    pub const INVALID_ADDRESS: i64 = -5;
}

/// Extension IDs.
pub mod eid {
    /// Legacy set_timer (§5.1).
    pub const LEGACY_SET_TIMER: u64 = 0x00;
    /// Legacy console_putchar (§5.2).
    pub const LEGACY_PUTCHAR: u64 = 0x01;
    /// Legacy console_getchar (§5.3).
    pub const LEGACY_GETCHAR: u64 = 0x02;
    /// Legacy shutdown (§5.7).
    pub const LEGACY_SHUTDOWN: u64 = 0x08;
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

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
        f.mem = alloc::vec![b'z'; 3 * 4096];
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
}
