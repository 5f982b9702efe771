//! The suite, third part: exits that must be reported, not fatal — an EPT misconfiguration, failed
//! VM entries, and a guest triple fault.

use crate::ensure;
use crate::guest::{self, Op};
use crate::hv::{Hv, RunError};
use crate::println;
use crate::scenarios::{ctx, Ctx, Outcome, Res};
use core::sync::atomic::{AtomicU64, Ordering};
use twostage_npt::{FrameAllocator, GuestPhysAddr, HostPhysAddr, MapSize, MappingFlags, PageSize};
use twostage_vmx::exit::EntryFailure;
use twostage_vmx::{EntryError, VmExit, VmcsField};

/// A page whose EPT entry is made write-only behind the engine's back.
const MISCONFIG: u64 = 0x0800_0000;

/// The EPT leaf entry for `gpa` (a 4 KiB page), found by walking the table in memory
/// (Intel SDM Vol. 3C 29.3.2: bits 51:12 of each non-leaf entry address the next table).
fn leaf_entry(hv: &Hv, gpa: u64) -> Option<&'static AtomicU64> {
    let mut table = hv.ept.root().as_u64();
    for level in (0..4u32).rev() {
        let idx = (gpa >> (12 + 9 * level)) & 0x1ff;
        let p = hv.frames.phys_to_virt(HostPhysAddr::new(table + idx * 8)).as_ptr().cast::<AtomicU64>();
        // SAFETY: `table` is a frame of this EPT (its root or one linked from it) reached
        // through the identity map; entries are 8-byte aligned and only touched atomically.
        let e = unsafe { &*p };
        if level == 0 {
            return Some(e);
        }
        let v = e.load(Ordering::SeqCst);
        if v & 7 == 0 || v & (1 << 7) != 0 {
            return None;
        }
        table = v & 0x000f_ffff_ffff_f000;
    }
    None
}

pub(crate) fn s_misconfig(hv: &mut Hv, _c: &Ctx) -> Res {
    let f = hv.zeroed_frame().ok_or("frames")?;
    hv.host_write(f + 0x18, &0x600Du64.to_le_bytes());
    ctx(hv.map(MISCONFIG, f, 0x1000, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)), "map")?;
    let e = leaf_entry(hv, MISCONFIG).ok_or("no 4K leaf")?;
    let good = e.load(Ordering::SeqCst);
    // Write without read is a misconfiguration (Intel SDM Vol. 3C 29.3.3.1).
    e.store((good & !0b111) | 0b010, Ordering::SeqCst);
    crate::hv::invept(&mut hv.vcpu, &twostage_npt::EptInvalidation::SingleContext { root: hv.ept.root() });
    let r = hv.op_plain(Op::Read(MISCONFIG + 0x18));
    e.store(good, Ordering::SeqCst);
    crate::hv::invept(&mut hv.vcpu, &twostage_npt::EptInvalidation::SingleContext { root: hv.ept.root() });
    let Err(RunError::Unhandled(VmExit::EptMisconfig { gpa })) = r else {
        return Err(alloc::format!("expected an EPT misconfiguration exit, got {r:?}"));
    };
    println!("   exit 49 at {gpa:?} (entry {:#x} made write-only, then restored)", good);
    ensure!(gpa == GuestPhysAddr::new(MISCONFIG + 0x18), "reported GPA {gpa:?}");
    // The read did not complete; after the repair the guest retries it.
    let v = ctx(hv.finish(), "read after repair")?;
    ensure!(v == 0x600D, "read {v:#x} after repair");
    Ok(Outcome::Pass)
}

pub(crate) fn s_entry_failures(hv: &mut Hv, _c: &Ctx) -> Res {
    // An invalid control field: more CR3-target values than IA32_VMX_MISC allows (at most 4 on
    // Bochs) fails the VM entry itself with VM-instruction error 7 (Intel SDM Vol. 3C 27.2.1.1).
    ctx(hv.vcpu.vmwrite(VmcsField::CR3_TARGET_COUNT, 200), "vmwrite")?;
    let r = hv.op_plain(Op::Read(guest::CODE));
    ctx(hv.vcpu.vmwrite(VmcsField::CR3_TARGET_COUNT, 0), "vmwrite")?;
    let Err(RunError::Entry(EntryError::Instruction(f))) = r else {
        return Err(alloc::format!("expected VMfailValid, got {r:?}"));
    };
    println!("   {f}");
    ensure!(f.error.map(|e| e.0) == Some(7), "error {:?}", f.error);
    // Invalid guest state: RFLAGS bit 1 is reserved as 1 (27.3.1.4); the entry fails after the
    // control checks, as an exit with reason 33 and bit 31 set.
    let rflags = ctx(hv.vcpu.vmread(VmcsField::GUEST_RFLAGS), "vmread")?;
    ctx(hv.vcpu.vmwrite(VmcsField::GUEST_RFLAGS, rflags & !2), "vmwrite")?;
    let r = hv.op_plain(Op::Read(guest::CODE));
    ctx(hv.vcpu.vmwrite(VmcsField::GUEST_RFLAGS, rflags), "vmwrite")?;
    let Err(RunError::Unhandled(VmExit::EntryFailed(EntryFailure::InvalidGuestState { qualification }))) = r else {
        return Err(alloc::format!("expected an invalid-guest-state entry failure, got {r:?}"));
    };
    println!("   invalid guest state (exit reason 33, qualification {qualification}); repaired and resumed");
    ctx(hv.op_plain(Op::Read(guest::CODE)), "guest runs after repair")?;
    Ok(Outcome::Pass)
}

pub(crate) fn s_triple_fault(hv: &mut Hv, _c: &Ctx) -> Res {
    // A call to a non-canonical address raises #GP; the guest has no IDT, so #GP becomes #DF and
    // then a triple fault, which exits with reason 2 (Intel SDM Vol. 3C 26.2).
    let r = hv.op_plain(Op::Exec(0x0000_8000_0000_0000));
    let Err(RunError::Unhandled(VmExit::TripleFault)) = r else {
        return Err(alloc::format!("expected a triple fault, got {r:?}"));
    };
    // The hypervisor survives; the guest is started again from its entry point.
    ctx(hv.vcpu.setup(&hv.ept, guest::entry()), "setup again")?;
    let v = ctx(hv.op_plain(Op::Read(guest::CODE)), "guest after restart")?;
    ensure!(v != 0, "guest code reads {v:#x}");
    println!("   triple fault reported as exit 2; guest restarted on the same VMCS (VMRESUME)");
    Ok(Outcome::Pass)
}
