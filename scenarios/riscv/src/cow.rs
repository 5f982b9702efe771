//! Copy-on-write: an address space forked while its guest runs; each side's writes stay its own.

use crate::guest::Routine;
use crate::{ensure, gpa, Machine, CODE};
use alloc::format;
use alloc::string::String;
use twostage_harness::{Pass, Scenario, Verdict};
use twostage_hv_riscv::hart::{frames, g_stage_options, hart};
use twostage_hv_riscv::println;
use twostage_hv_riscv::trap::{self, VcpuRegs};
use twostage_npt::{Hgatp, MappingFlags, Sv39x4};
use twostage_rvh::csr::cause;
use twostage_rvh::fault::{decode_guest_page_fault, TrapCsrs};
use twostage_rvh::hw;

/// The copy-on-write scenarios.
pub const SCENARIOS: &[Scenario<Machine>] = &[Scenario::new("copy-on-write and fork", cow_fork)];

/// One run of a guest over an address space, resolving its faults through it.
fn run_space(
    space: &mut twostage_aspace::AddressSpace<Sv39x4, &'static twostage_baremetal::frames::Frames>,
    hgatp: Hgatp,
    regs: &mut VcpuRegs,
    r: Routine,
    args: &[u64],
) -> Result<u64, String> {
    regs.gpr[10..10 + args.len()].copy_from_slice(args);
    let mut pc = CODE + crate::guest::offset(r);
    let vmid = hgatp.vmid();
    // SAFETY: the space's table maps only its own frames; a fresh VS context.
    unsafe {
        hw::hgatp::write(hgatp.bits());
        hw::hedeleg::write(0);
    }
    hw::hfence_gvma_all();
    for _ in 0..1000 {
        // SAFETY: as above.
        let t = unsafe { trap::run_guest(regs, pc) };
        pc = t.sepc;
        match t.scause {
            cause::ECALL_VS if regs.gpr[17] == twostage_rvh::sbi::eid::TWOSTAGE_TEST => return Ok(regs.gpr[10]),
            cause::INSN_GUEST_PAGE | cause::LOAD_GUEST_PAGE | cause::STORE_GUEST_PAGE => {
                let c =
                    TrapCsrs { scause: t.scause, stval: t.stval, htval: t.htval, htinst: t.htinst, gva_valid: true };
                let f = decode_guest_page_fault(&c).map_err(|e| format!("{e}"))?;
                match space.handle_fault(f.info) {
                    twostage_aspace::FaultOutcome::Resolved { flush } => space
                        .flush(flush, |inv| {
                            twostage_rvh::fence::plan_gvma(inv, vmid, hw::hfence_gvma);
                        })
                        .map_err(|e| format!("{e}"))?,
                    other => return Err(format!("fault {:?}: {other:?}", f.info)),
                }
            }
            other => return Err(format!("{} at {:#x}", cause::name(other), t.sepc)),
        }
    }
    Err("exit budget".into())
}

fn cow_fork(_: &mut Machine) -> Verdict {
    use twostage_aspace::{AddressSpace, Backend};
    let caps = hart().caps;
    let free0 = frames().free();
    {
        let mut parent =
            AddressSpace::<Sv39x4, _>::new(frames(), g_stage_options::<Sv39x4>(true)).map_err(|e| format!("{e:?}"))?;
        let ram = twostage_npt::GpaRange::from_start_len(gpa(CODE), 16 << 20).ok_or("range")?;
        let (_, f) =
            parent.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero).map_err(|e| format!("{e:?}"))?;
        parent.flush_unloaded(f).expect("its own token");
        let f = parent.load_image(gpa(CODE), crate::guest::blob()).map_err(|e| format!("{e:?}"))?;
        parent.flush_unloaded(f).expect("its own token");
        let hp = Hgatp::new(twostage_npt::HgatpMode::Sv39x4, 2, parent.root(), &caps).map_err(|e| format!("{e}"))?;
        // SAFETY: a fresh VS context.
        unsafe { hw::vsatp::write(0) };
        let mut regs = VcpuRegs::new();
        let x = 0x8040_0000;
        let y = 0x8040_1000;
        run_space(&mut parent, hp, &mut regs, Routine::Store64, &[x, 0x1111])?;
        run_space(&mut parent, hp, &mut regs, Routine::Store64, &[y, 0x5555])?;
        let (mut child, f) = parent.fork().map_err(|e| format!("fork: {e:?}"))?;
        parent
            .flush(f, |inv| {
                twostage_rvh::fence::plan_gvma(inv, 2, hw::hfence_gvma);
            })
            .expect("its own token");
        let hc = Hgatp::new(twostage_npt::HgatpMode::Sv39x4, 3, child.root(), &caps).map_err(|e| format!("{e}"))?;
        let mut cregs = VcpuRegs::new();
        ensure!(
            run_space(&mut child, hc, &mut cregs, Routine::Load64, &[x])? == 0x1111,
            "child reads the parent's page"
        );
        run_space(&mut child, hc, &mut cregs, Routine::Store64, &[x, 0x2222])?;
        ensure!(run_space(&mut child, hc, &mut cregs, Routine::Load64, &[x])? == 0x2222, "child sees its write");
        ensure!(
            run_space(&mut parent, hp, &mut regs, Routine::Load64, &[x])? == 0x1111,
            "parent isolated from the child's write"
        );
        run_space(&mut parent, hp, &mut regs, Routine::Store64, &[y, 0x6666])?;
        ensure!(
            run_space(&mut child, hc, &mut cregs, Routine::Load64, &[y])? == 0x5555,
            "child isolated from the parent's write"
        );
        let (ps, cs) = (parent.stats(), child.stats());
        println!(
            "# fork: parent cow copies {} reuses {}, child cow copies {} reuses {}; frames in use {}",
            ps.cow_copies,
            ps.cow_reuses,
            cs.cow_copies,
            cs.cow_reuses,
            frames().in_use()
        );
        ensure!(ps.cow_copies + ps.cow_reuses + cs.cow_copies + cs.cow_reuses >= 2, "no copy-on-write breaks counted");
        // SAFETY: neither table stays loaded.
        unsafe { hw::hgatp::write(0) };
        hw::hfence_gvma_all();
    }
    ensure!(frames().free() == free0, "{} frames leaked by fork", free0 - frames().free());
    Ok(Pass::Plain)
}
