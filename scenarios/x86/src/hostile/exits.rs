//! The hostile guest's exits: how the hypervisor serves each one (or ends the run), the MSR
//! accesses it virtualizes and the MOVs to device or unassigned space it emulates.

use super::gen::{self as g, Rng};
use super::{End, Next, Scratch, Space, Tally};
use alloc::format;
use twostage_aspace::{fetch_guest_instruction, FaultOutcome, GuestPaging, Isa};
use twostage_hv_x86::hv::{invept, Hv};
use twostage_npt::GuestVirtAddr;
use twostage_vmx::caps::IA32_EFER;
use twostage_vmx::decode::{decode_mmio, MmioOp};
use twostage_vmx::emulate::{cr3_load_allowed, efer_write};
use twostage_vmx::exit::reason;
use twostage_vmx::vcpu::exception_has_error_code;
use twostage_vmx::{CrAccess, EptViolation, VmExit, VmcsField as F};

fn advance(hv: &mut Hv) -> Next {
    match hv.vcpu.advance_rip() {
        Ok(()) => Next::Resume,
        Err(_) => Next::End(End::Killed("RIP not advanced")),
    }
}

fn inject(hv: &mut Hv, t: &mut Tally, vector: u8) -> Next {
    let code = exception_has_error_code(vector).then_some(0);
    match hv.vcpu.inject_exception(vector, code) {
        Ok(()) => {
            t.injected += 1;
            Next::Resume
        }
        Err(e) => {
            t.defect(format!("injecting vector {vector}: {e:?}"));
            Next::End(End::Defect)
        }
    }
}

/// #UD (Intel SDM Vol. 3A 7.15).
const UD: u8 = 6;
/// #GP.
const GP: u8 = 13;

pub(super) fn handle(
    hv: &mut Hv,
    space: &mut Space,
    rng: &mut Rng,
    dev: &mut Scratch,
    t: &mut Tally,
    exit: VmExit,
    maxphys: u32,
) -> Next {
    match exit {
        VmExit::EptViolation(v) => match space.handle_fault(v.nested_page_fault_info()) {
            FaultOutcome::Resolved { flush } => {
                space
                    .flush(flush, |inv| {
                        invept(&mut hv.vcpu, inv);
                    })
                    .expect("its own token");
                // A fault taken while delivering an event: deliver it again.
                match hv.vcpu.reinject_interrupted_event() {
                    Ok(true) => {
                        t.reinjected += 1;
                        Next::Resume
                    }
                    Ok(false) => Next::Resume,
                    Err(_) => Next::End(End::Killed("event not re-injected")),
                }
            }
            FaultOutcome::Mmio { .. } => emulate(hv, space, t, &v, Some(dev)),
            // Unassigned addresses read as all ones and drop writes; so do writes to the
            // read-only region (a ROM).
            FaultOutcome::Unmapped { .. } | FaultOutcome::Violation { .. } => emulate(hv, space, t, &v, None),
            FaultOutcome::OutOfMemory { .. } => Next::End(End::Killed("out of memory")),
        },
        VmExit::EptMisconfig { gpa } => {
            t.defect(format!("EPT misconfiguration at {gpa:?}"));
            Next::End(End::Defect)
        }
        VmExit::Vmcall => {
            // Hypercall 0 answers 0; every other number is unknown (-1).
            let r = &mut hv.vcpu.regs;
            r.rax = if r.rax == 0 { 0 } else { u64::MAX };
            advance(hv)
        }
        VmExit::Io(q) => {
            if q.is_in() && !q.is_string() {
                hv.vcpu.regs.rax = q.merge_in(hv.vcpu.regs.rax, u64::MAX);
            }
            // OUTs go nowhere; string I/O is skipped (no device on these ports).
            advance(hv)
        }
        VmExit::Hlt => advance(hv), // as if an interrupt woke it at once
        VmExit::TripleFault => Next::End(End::TripleFault),
        VmExit::PreemptionTimer => Next::End(End::Watchdog),
        VmExit::Exception { .. } => {
            // Exceptions exit only in the runs with the full exception bitmap: carry on
            // somewhere else in the code page.
            match hv.vcpu.vmwrite(F::GUEST_RIP, g::CODE + rng.below(4096)) {
                Ok(()) => Next::Resume,
                Err(_) => Next::End(End::Killed("RIP not written")),
            }
        }
        VmExit::Cpuid => {
            // The host's answer, filtered for the guest (VMX hidden, MAXPHYADDR within the EPT
            // walk): twostage_vmx::cpuid::filter.
            let r = hv.vcpu.guest_cpuid(hv.vcpu.regs.rax as u32, hv.vcpu.regs.rcx as u32);
            let regs = &mut hv.vcpu.regs;
            regs.rax = u64::from(r.eax);
            regs.rbx = u64::from(r.ebx);
            regs.rcx = u64::from(r.ecx);
            regs.rdx = u64::from(r.edx);
            advance(hv)
        }
        VmExit::Msr { write } => msr(hv, t, write),
        VmExit::CrAccess(q) => match q.access() {
            CrAccess::MovTo { cr: 3, reg } => {
                // Bits above MAXPHYADDR are reserved: #GP, as the CPU would (Intel SDM Vol. 3A
                // 4.5.2); letting them into the VMCS would fail the next entry (Vol. 3C 27.3.1.1).
                let v = hv.read_gpr(reg);
                if !cr3_load_allowed(v, maxphys) {
                    return inject(hv, t, GP);
                }
                match hv.vcpu.vmwrite(F::GUEST_CR3, v) {
                    Ok(()) => advance(hv),
                    Err(_) => Next::End(End::Killed("CR3 not written")),
                }
            }
            CrAccess::MovFrom { cr: 3, reg } => {
                let v = hv.vcpu.vmread(F::GUEST_CR3).unwrap_or(0);
                if hv.write_gpr(reg, v).is_err() {
                    return Next::End(End::Killed("RSP not written"));
                }
                advance(hv)
            }
            CrAccess::MovFrom { cr: 8, reg } => {
                if hv.write_gpr(reg, 0).is_err() {
                    return Next::End(End::Killed("RSP not written"));
                }
                advance(hv)
            }
            CrAccess::MovTo { cr: 8, .. } | CrAccess::Clts | CrAccess::Lmsw { .. } => advance(hv),
            // A change of a bit the host owns (CR0.PE/PG/NE, CR4.VMXE, ...): refused.
            CrAccess::MovTo { .. } => inject(hv, t, GP),
            CrAccess::MovFrom { .. } => Next::End(End::Killed("unexpected CR read")),
        },
        VmExit::EntryFailed(f) => {
            t.defect(format!("entry failed after the guest ran: {f:?}"));
            Next::End(End::Defect)
        }
        VmExit::Other { reason: r, .. } => match r {
            // GETSEC, RSM, the VMX instructions, INVEPT, INVVPID, VMFUNC: the guest has no VMX.
            11 | 17 | 19..=27 | 50 | 53 | 59 => inject(hv, t, UD),
            // XSETBV: no XSAVE features are offered to the guest.
            reason::XSETBV => inject(hv, t, GP),
            // INVD, INVLPG, MOV DR, MWAIT, MONITOR, PAUSE, WBINVD: nothing to do.
            13 | 14 | 29 | 36 | 39 | 40 | 54 => advance(hv),
            // RDPMC, RDTSC, RDTSCP: a zero counter.
            15 | 16 | 51 => {
                let regs = &mut hv.vcpu.regs;
                regs.rax = 0;
                regs.rdx = 0;
                if r == 51 {
                    regs.rcx = 0;
                }
                advance(hv)
            }
            _ => Next::End(End::Killed("exit reason not handled")),
        },
    }
}

/// RDMSR/WRMSR: EFER is virtualized (checked as the CPU checks it); every other MSR is #GP.
fn msr(hv: &mut Hv, t: &mut Tally, write: bool) -> Next {
    if hv.vcpu.regs.rcx as u32 != IA32_EFER {
        return inject(hv, t, GP);
    }
    let Ok(efer) = hv.vcpu.vmread(F::GUEST_IA32_EFER) else { return Next::End(End::Killed("EFER unreadable")) };
    if write {
        let requested = (hv.vcpu.regs.rdx << 32) | (hv.vcpu.regs.rax & 0xffff_ffff);
        // The guest runs with paging on (long mode).
        let Ok(v) = efer_write(efer, requested, true) else { return inject(hv, t, GP) };
        if hv.vcpu.vmwrite(F::GUEST_IA32_EFER, v).is_err() {
            return Next::End(End::Killed("EFER not written"));
        }
    } else {
        hv.vcpu.regs.rax = efer & 0xffff_ffff;
        hv.vcpu.regs.rdx = efer >> 32;
    }
    advance(hv)
}

/// Emulates the MOV behind an EPT violation against the device (`Some`) or as unassigned bus
/// space (`None`). Anything that is not a data access by a MOV it decodes stops the guest.
fn emulate(hv: &mut Hv, space: &mut Space, t: &mut Tally, v: &EptViolation, dev: Option<&mut Scratch>) -> Next {
    let q = v.qualification;
    if q.fetch() {
        return Next::End(End::Killed("fetch from device or unassigned space"));
    }
    if !q.linear_address_valid() || !q.linear_translation() {
        // The CPU's own walk of the guest's tables touched this GPA: there is no MOV to emulate.
        return Next::End(End::Killed("guest page table outside RAM"));
    }
    let read = |f| hv.vcpu.vmread(f).unwrap_or(0);
    if read(F::IDT_VECTORING_INFO) & (1 << 31) != 0 {
        // Delivering an event (its IDT entry or stack frame) touched this GPA, not the
        // instruction at RIP (Intel SDM Vol. 3C 28.2.4).
        return Next::End(End::Killed("event delivery outside RAM"));
    }
    let rip = read(F::GUEST_RIP);
    let Ok(paging) = GuestPaging::x86_64(
        read(F::GUEST_CR0),
        read(F::GUEST_CR3),
        read(F::GUEST_CR4),
        read(F::GUEST_IA32_EFER),
        hv.paging_cpu(),
    ) else {
        return Next::End(End::Killed("paging mode not walkable"));
    };
    let fetched = fetch_guest_instruction(space, &paging, GuestVirtAddr::new(rip), Isa::X86);
    // Setting A bits in the guest's tables may have backed a page: carry out its flush.
    space.flush_pending(|inv| {
        invept(&mut hv.vcpu, inv);
    });
    let Ok(fetched) = fetched else { return Next::End(End::Killed("instruction unreadable")) };
    let Ok(insn) = decode_mmio(fetched.bytes()) else { return Next::End(End::Killed("not a MOV the decoder takes")) };
    if insn.is_store() != q.write() {
        // The bytes at RIP are not what exited (the guest rewrote them, or a read-modify-write).
        return Next::End(End::Killed("instruction does not match the exit"));
    }
    match insn.op {
        MmioOp::Load { reg } => {
            let val = match dev {
                Some(d) => d.0[Scratch::slot(v.gpa)],
                None => u64::MAX,
            };
            let old = hv.read_gpr(reg.num);
            if hv.write_gpr(reg.num, insn.merge_load(old, val)).is_err() {
                return Next::End(End::Killed("RSP not written"));
            }
        }
        MmioOp::StoreReg { reg } => {
            let val = insn.store_value(hv.read_gpr(reg.num));
            if let Some(d) = dev {
                d.0[Scratch::slot(v.gpa)] = val;
            }
        }
        MmioOp::StoreImm { .. } => {
            if let Some(d) = dev {
                d.0[Scratch::slot(v.gpa)] = insn.store_value(0);
            }
        }
    }
    t.emulated += 1;
    match hv.vcpu.vmwrite(F::GUEST_RIP, rip.wrapping_add(u64::from(insn.len))) {
        Ok(()) => Next::Resume,
        Err(_) => Next::End(End::Killed("RIP not written")),
    }
}
