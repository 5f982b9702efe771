//! Faults: permission faults (write to read-only, execute on no-execute, execute-only), faults
//! the hypervisor recovers from, and exits that must be reported rather than fatal: an EPT
//! misconfiguration, failed VM entries, a guest triple fault.

use crate::guest::{self, GuestOps, Op, Unassigned};
use crate::{ctx, gpa, Machine, Need, CODE_1234};
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};
use twostage_aspace::guest::PageFaultKind;
use twostage_aspace::{GuestMemError, GuestVaError};
use twostage_harness::{ensure, Pass, Scenario, Verdict};
use twostage_hv_x86::hv::{invept, FaultAction, GvaError, Hv, RunError};
use twostage_hv_x86::println;
use twostage_npt::{
    Access, FrameAllocator, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, MapSize, MappingFlags, PageSize, FRAME_SIZE,
};
use twostage_vmx::exit::{EntryFailure, EptViolation};
use twostage_vmx::{EntryError, VmExit, VmcsField};

/// The fault scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[
    Scenario::new("permission fault: write to read-only", s_write_ro),
    Scenario::new("permission fault: execute on no-execute", s_exec_nx),
    Scenario::needing("permission fault: execute-only page", &[Need::EptExecuteOnly], s_exec_only),
    Scenario::new("recovered faults: unassigned GPA, bad GPA/GVA copies give typed errors", s_recovered),
    Scenario::new("EPT misconfiguration exit decoded with its GPA", s_misconfig),
    Scenario::new("failed VM entries named: VM-instruction error, invalid guest state", s_entry_failures),
    Scenario::new("guest triple fault reported, guest restarted", s_triple_fault),
];

pub(crate) fn map_frame_with(hv: &mut Hv, gpa: u64, bytes: &[u8], flags: MappingFlags) -> Result<HostPhysAddr, String> {
    let f = hv.zeroed_frame().ok_or("out of frames")?;
    hv.host_write(f, bytes);
    ctx(hv.map(gpa, f, FRAME_SIZE as u64, flags, MapSize::Exactly(PageSize::Size4K)), "map")?;
    Ok(f)
}

fn s_write_ro(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    map_frame_with(hv, gpa::RO, &0x5151u64.to_le_bytes(), MappingFlags::READ)?;
    ensure!(ctx(hv.op_plain(Op::Read(gpa::RO)), "read")? == 0x5151, "read-only page reads wrong");
    let mut q = None;
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        q = Some(v.qualification);
        match hv.protect(gpa::RO, 0x1000, MappingFlags::RW) {
            Ok(()) => FaultAction::Retry,
            Err(_) => FaultAction::Fail("protect failed"),
        }
    };
    ctx(hv.op(Op::Write(gpa::RO, 0x7777), &mut handler, &mut Unassigned), "write")?;
    let q = q.ok_or("the write to a read-only page did not fault")?;
    println!("   qualification {q:?}");
    ensure!(q.write() && !q.fetch() && q.entry_rights() == MappingFlags::READ, "qualification {q:?}");
    ensure!(ctx(hv.op_plain(Op::Read(gpa::RO)), "read")? == 0x7777, "write after upgrade lost");
    Ok(Pass::Plain)
}

fn s_exec_nx(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    map_frame_with(hv, gpa::NX, &CODE_1234, MappingFlags::RW)?;
    let mut q = None;
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        q = Some(v.qualification);
        match hv.protect(gpa::NX, 0x1000, MappingFlags::RX) {
            Ok(()) => FaultAction::Retry,
            Err(_) => FaultAction::Fail("protect failed"),
        }
    };
    let r = ctx(hv.op(Op::Exec(gpa::NX), &mut handler, &mut Unassigned), "call")?;
    let q = q.ok_or("executing a no-execute page did not fault")?;
    println!("   qualification {q:?}");
    ensure!(q.fetch() && !q.write() && q.entry_rights() == MappingFlags::RW, "qualification {q:?}");
    ensure!(r == 0x1234, "code returned {r:#x}");
    Ok(Pass::Plain)
}

fn s_exec_only(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    map_frame_with(hv, gpa::XO, &CODE_1234, MappingFlags::EXECUTE)?;
    let r = ctx(hv.op_plain(Op::Exec(gpa::XO)), "call of execute-only code")?;
    ensure!(r == 0x1234, "code returned {r:#x}");
    let mut q = None;
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        q = Some(v.qualification);
        match hv.protect(gpa::XO, 0x1000, MappingFlags::RX) {
            Ok(()) => FaultAction::Retry,
            Err(_) => FaultAction::Fail("protect failed"),
        }
    };
    let bytes = ctx(hv.op(Op::Read(gpa::XO), &mut handler, &mut Unassigned), "read")?;
    let q = q.ok_or("reading an execute-only page did not fault")?;
    println!("   read of execute-only page: qualification {q:?}");
    ensure!(q.read() && q.entry_rights() == MappingFlags::EXECUTE, "qualification {q:?}");
    ensure!(bytes.to_le_bytes()[..6] == CODE_1234, "read {bytes:#x}");
    Ok(Pass::Plain)
}

fn s_recovered(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    let mut seen = None;
    let mut handler = |_: &mut Hv, v: &EptViolation| {
        seen = Some(v.gpa);
        FaultAction::Mmio
    };
    let r = ctx(hv.op(Op::Read(gpa::UNASSIGNED + 0x40), &mut handler, &mut Unassigned), "read of nothing")?;
    ensure!(
        r == u64::MAX && seen == Some(GuestPhysAddr::new(gpa::UNASSIGNED + 0x40)),
        "read {r:#x}, fault at {seen:?}"
    );
    let mut b = [0u8; 8];
    let e1 = hv.copy_from_guest(GuestPhysAddr::new(gpa::UNASSIGNED), &mut b);
    ensure!(
        e1 == Err(GuestMemError::Unmapped { gpa: GuestPhysAddr::new(gpa::UNASSIGNED), access: Access::Read }),
        "{e1:?}"
    );
    // Straddling the end of mapped guest RAM: the error names the first unmapped byte.
    let e2 = hv.copy_from_guest(GuestPhysAddr::new(guest::RAM_SIZE - 4), &mut b);
    ensure!(
        e2 == Err(GuestMemError::Unmapped { gpa: GuestPhysAddr::new(guest::RAM_SIZE), access: Access::Read }),
        "{e2:?}"
    );
    ensure!(b == [0u8; 8], "a failed copy changed the buffer");
    let bad = GuestVirtAddr::new(0x0000_8000_0000_0000);
    let e3 = hv.copy_from_guest_va(bad, &mut b);
    ensure!(e3 == Err(GvaError::Va(GuestVaError::NonCanonical { gva: bad, access: Access::Read })), "{e3:?}");
    let hole = GuestVirtAddr::new(guest::WINDOW_GVA + 0x20_0000);
    let e4 = hv.copy_from_guest_va(hole, &mut b);
    ensure!(
        matches!(e4, Err(GvaError::Va(GuestVaError::PageFault { kind: PageFaultKind::NotPresent, level: 1, .. }))),
        "{e4:?}"
    );
    println!("   guest read of unassigned GPA -> all ones; hypervisor copies: {e1:?}, {e2:?}, {e3:?}, {e4:?}");
    // The guest still runs.
    ctx(hv.op_plain(Op::Read(guest::CODE)), "guest alive")?;
    Ok(Pass::Plain)
}

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

fn s_misconfig(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
    let f = hv.zeroed_frame().ok_or("frames")?;
    hv.host_write(f + 0x18, &0x600Du64.to_le_bytes());
    ctx(hv.map(MISCONFIG, f, 0x1000, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)), "map")?;
    let e = leaf_entry(hv, MISCONFIG).ok_or("no 4K leaf")?;
    let good = e.load(Ordering::SeqCst);
    // Write without read is a misconfiguration (Intel SDM Vol. 3C 29.3.3.1).
    e.store((good & !0b111) | 0b010, Ordering::SeqCst);
    invept(&mut hv.vcpu, &twostage_npt::EptInvalidation::SingleContext { root: hv.ept.root() });
    let r = hv.op_plain(Op::Read(MISCONFIG + 0x18));
    e.store(good, Ordering::SeqCst);
    invept(&mut hv.vcpu, &twostage_npt::EptInvalidation::SingleContext { root: hv.ept.root() });
    let Err(RunError::Unhandled(VmExit::EptMisconfig { gpa })) = r else {
        return Err(alloc::format!("expected an EPT misconfiguration exit, got {r:?}"));
    };
    println!("   exit 49 at {gpa:?} (entry {:#x} made write-only, then restored)", good);
    ensure!(gpa == GuestPhysAddr::new(MISCONFIG + 0x18), "reported GPA {gpa:?}");
    // The read did not complete; after the repair the guest retries it.
    let v = ctx(hv.finish(), "read after repair")?;
    ensure!(v == 0x600D, "read {v:#x} after repair");
    Ok(Pass::Plain)
}

fn s_entry_failures(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
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
    Ok(Pass::Plain)
}

fn s_triple_fault(m: &mut Machine) -> Verdict {
    let hv = &mut m.hv;
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
    Ok(Pass::Plain)
}
