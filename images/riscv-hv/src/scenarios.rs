//! The scenario suite (part 1): framework, capabilities, demand-zero, huge pages, permissions,
//! copy-on-write, MMIO, guest-physical copies.

use crate::guest::{self, Routine, HC_DONE};
use crate::vm::{self, frames, Exit, Vm, UART_GPA};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use twostage_aspace::{GuestMemError, GuestMemory};
use twostage_npt::{FrameAllocator, GpaRange, GuestPhysAddr, MappingFlags, PageSize};
use twostage_npt::{Hgatp, HgatpMode};
use twostage_rvh::fault::GuestPageFault;
use twostage_rvh::{csr::cause, hw};

/// A scenario's verdict: `Err` carries the reason printed after `not ok`.
pub type Verdict = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}
pub(crate) use ensure;

/// Guest-physical address of the test guest's code.
pub const CODE: u64 = 0x8000_0000;
/// The test guest's demand-zero RAM.
pub const RAM_LEN: u64 = 64 << 20;

/// Shorthand for a guest-physical address.
pub fn gpa(v: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(v)
}

/// A VM with the test guest's code at [`CODE`] and demand-zero RAM behind it.
pub fn test_vm(vmid: u16) -> Result<Vm, String> {
    let mut vm = Vm::new(vmid);
    vm.demand_zero = GpaRange::from_start_len(gpa(CODE), RAM_LEN);
    vm.uart.echo = false;
    vm.uart.record = true;
    let blob = guest::blob();
    let len = (blob.len() as u64).next_multiple_of(4096);
    vm.map_new(gpa(CODE), len, MappingFlags::RWX, PageSize::Size4K).map_err(String::from)?;
    vm.phys().write(gpa(CODE), blob).map_err(|e| format!("loading the guest: {e}"))?;
    fresh_vs_context(&vm);
    Ok(vm)
}

/// Loads `vm`'s hgatp and gives it a fresh VS context: Bare vsatp, no pending virtual interrupt.
pub fn fresh_vs_context(vm: &Vm) {
    // SAFETY: hgatp is this VM's (so HFENCE.VVMA drops the VS-stage entries of its VMID); the VS
    // CSRs only affect the guest.
    unsafe {
        hw::hgatp::write(vm.hgatp.bits());
        hw::hfence_gvma_all();
        hw::vsatp::write(0);
        hw::vsstatus::write(0);
        hw::hvip::write(0);
    }
    hw::hfence_vvma_all();
}

/// Enters routine `r` with `args` in a0.. and runs until an exit the VM does not handle.
pub fn call(vm: &mut Vm, r: Routine, args: &[u64]) -> Exit {
    vm.regs.gpr[10..10 + args.len()].copy_from_slice(args);
    vm.pc = CODE + guest::offset(r);
    vm.run()
}

/// Expects the routine to finish with the done hypercall; returns its result.
pub fn done(exit: Exit) -> Result<u64, String> {
    match exit {
        Exit::Test { fid: HC_DONE, args } => Ok(args[0]),
        other => Err(format!("expected the guest to finish, got {}", describe(&other))),
    }
}

/// Expects an unresolved guest-page fault.
pub fn fault(exit: Exit) -> Result<(GuestPageFault, crate::trap::ExitCsrs), String> {
    match exit {
        Exit::Fault(f, t) => Ok((f, t)),
        other => Err(format!("expected a guest-page fault, got {}", describe(&other))),
    }
}

/// A one-line description of an exit.
pub fn describe(e: &Exit) -> String {
    match e {
        Exit::Test { fid, args } => format!("hypercall {fid} a0={:#x}", args[0]),
        Exit::Reset(r) => format!("reset {r:?}"),
        Exit::Fault(f, t) => format!("guest-page fault {:?} at pc {:#x} (scause {})", f.info, t.sepc, t.scause),
        Exit::Exception(t) => format!("{} at pc {:#x} stval {:#x}", cause::name(t.scause), t.sepc, t.stval),
        Exit::Budget => "exit budget exhausted".into(),
    }
}

/// Reads a u64 through the nested table (software translation).
pub fn peek(vm: &Vm, at: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    vm.phys().read(gpa(at), &mut b).map_err(|e| format!("peek {at:#x}: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

/// Writes a u64 through the nested table.
pub fn poke(vm: &Vm, at: u64, v: u64) -> Verdict {
    vm.phys().write(gpa(at), &v.to_le_bytes()).map_err(|e| format!("poke {at:#x}: {e}"))
}

struct Suite {
    n: u32,
    passed: u32,
    failed: u32,
    skipped: u32,
}

impl Suite {
    fn run(&mut self, name: &str, f: impl FnOnce() -> Verdict) {
        self.n += 1;
        match f() {
            Ok(()) => {
                self.passed += 1;
                println!("ok {} - {name}", self.n);
            }
            Err(e) => {
                self.failed += 1;
                println!("not ok {} - {name}: {e}", self.n);
            }
        }
    }

    /// Runs `f` if the hart offers `need`; otherwise reports it skipped, with the reason.
    fn run_needing(&mut self, name: &str, need: vm::Need, f: impl FnOnce() -> Verdict) {
        match vm::hart().lacks(need) {
            None => self.run(name, f),
            Some(why) => {
                self.n += 1;
                self.skipped += 1;
                println!("ok {} - {name} # SKIP {why}", self.n);
            }
        }
    }
}

/// Runs every scenario; the exit status is 0 when all passed.
pub fn run_all() -> i32 {
    let mut s = Suite { n: 0, passed: 0, failed: 0, skipped: 0 };
    let free_before = frames().free();
    s.run("capabilities report", capabilities);
    s.run("demand-zero paging", demand_zero);
    s.run("huge pages and splitting", huge_pages);
    s.run("permission faults (write to read-only, execute on no-execute)", permissions);
    s.run("copy-on-write and fork", cow_fork);
    s.run("MMIO exit decoding with an emulated UART", mmio_uart);
    s.run("guest-physical copies across page boundaries (software translation vs vsatp swap)", gpa_copies);
    s.run("guest-virtual copies across page boundaries (hlv/hsv)", crate::scenarios2::gva_copies);
    s.run("instruction fetch: compressed and page-crossing (hlvx)", crate::scenarios2::insn_fetch);
    s.run("recovered faults in hlv/hsv/hlvx", crate::scenarios2::recovered_faults);
    s.run("implicit VS-stage walk fault resolved", crate::scenarios2::implicit_walk);
    s.run("remap while the guest runs", crate::scenarios2::remap);
    s.run("dirty tracking (write-protect log)", crate::scenarios2::dirty_log);
    s.run_needing("accessed/dirty bits set by the hardware", vm::Need::HardwareAd, crate::scenarios2::ad_bits);
    s.run("virtual timer interrupt injected", crate::scenarios2::virtual_timer);
    s.run("hostile guest actions are contained", crate::scenarios2::hostile);
    s.run("address-space guest: demand-zero, MMIO region, dirty log from D bits", crate::scenarios3::space_guest);
    s.run("Sv48x4 and Sv57x4 G-stage tables run the guest at high GPAs", crate::scenarios3::wide_formats);
    s.run("random instructions and registers cannot crash or hang the hypervisor", crate::scenarios3::random_guest);
    s.run("every frame returned", || {
        // Each VM frees its frames and tables on drop; the suite's own allocations are gone too.
        let leaked = frames().in_use();
        ensure!(
            frames().free() == free_before,
            "{} frames not returned ({} in use)",
            free_before - frames().free(),
            leaked
        );
        Ok(())
    });
    if s.skipped > 0 {
        println!("{} skipped", s.skipped);
    }
    println!("{} passed, {} failed", s.passed, s.failed);
    if s.failed == 0 {
        0
    } else {
        1
    }
}

fn capabilities() -> Verdict {
    let h = vm::hart();
    let c = h.caps;
    println!(
        "# H extension: hstatus readable={} isa lists h={}; hgatp modes: Sv39x4={} Sv48x4={} Sv57x4={}; VMIDLEN={}; timebase {} Hz",
        h.h_csrs, h.isa_h, c.sv39x4, c.sv48x4, c.sv57x4, c.vmid_bits, h.timebase
    );
    ensure!(h.h_csrs && h.isa_h, "no H extension");
    ensure!(c.sv39x4, "Sv39x4 not offered");
    // The widest VMID fits, one more bit does not.
    let root = twostage_npt::HostPhysAddr::new(0x8040_0000);
    let max = ((1u32 << c.vmid_bits) - 1) as u16;
    let g = Hgatp::new(HgatpMode::Sv39x4, max, root, &c).map_err(|e| format!("hgatp: {e}"))?;
    ensure!(g.vmid() == max && g.mode_bits() == 8, "hgatp fields {g:?}");
    if c.vmid_bits < 14 {
        ensure!(Hgatp::new(HgatpMode::Sv39x4, max + 1, root, &c).is_err(), "too-wide VMID accepted");
    }
    // The value a VM loads reads back unchanged.
    let vm = Vm::new(1);
    // SAFETY: loads the fresh VM's table; no guest runs.
    unsafe { hw::hgatp::write(vm.hgatp.bits()) };
    ensure!(hw::hgatp::read() == vm.hgatp.bits(), "hgatp read back {:#x}", hw::hgatp::read());
    Ok(())
}

fn demand_zero() -> Verdict {
    let mut vm = test_vm(1)?;
    // First without demand paging: the load faults, and the fault names the GPA and the access.
    vm.demand_zero = None;
    let (f, t) = fault(call(&mut vm, Routine::Load64, &[0x8100_0010]))?;
    ensure!(f.info.fault_guest_paddr == gpa(0x8100_0010), "fault GPA {:?}", f.info.fault_guest_paddr);
    ensure!(f.info.access_flags == MappingFlags::READ && t.scause == 21, "fault {:?} scause {}", f.info, t.scause);
    ensure!(f.gva.map(|g| g.as_u64()) == Some(0x8100_0010), "GVA {:?}", f.gva);
    // Now with it: resuming at the same pc retries the load, which gets a fresh zero page.
    vm.demand_zero = GpaRange::from_start_len(gpa(CODE), RAM_LEN);
    let before = vm.stats.demand_zero;
    ensure!(done(vm.run())? == 0, "a fresh page is not zero");
    ensure!(vm.stats.demand_zero == before + 1, "one zero page expected");
    let leaf = vm.table().query(gpa(0x8100_0000)).ok_or("no leaf after the fault")?;
    ensure!(leaf.size == PageSize::Size4K, "leaf {leaf:?}");
    // A store to the same page needs no new page; one to another page does.
    done(call(&mut vm, Routine::Store64, &[0x8100_0008, 0x1234]))?;
    ensure!(peek(&vm, 0x8100_0008)? == 0x1234, "the guest's store is not in the page");
    done(call(&mut vm, Routine::Store64, &[0x8100_5000, 7]))?;
    ensure!(vm.stats.demand_zero == before + 2, "demand_zero {}", vm.stats.demand_zero);
    println!("# demand-zero: {} pages mapped on fault", vm.stats.demand_zero);
    Ok(())
}

fn huge_pages() -> Verdict {
    let mut vm = test_vm(1)?;
    let base = 0x8600_0000;
    vm.map_new(gpa(base), 2 << 20, MappingFlags::RWX, PageSize::Size2M).map_err(String::from)?;
    let l = vm.table().query(gpa(base + 0x1234)).ok_or("no leaf")?;
    ensure!(l.size == PageSize::Size2M && l.hpa.is_aligned(2 << 20), "leaf {l:?}");
    poke(&vm, base + 0x1000, 0xaaaa)?;
    poke(&vm, base + 0x1f_f008, 0xbbbb)?;
    ensure!(done(call(&mut vm, Routine::Load64, &[base + 0x1000]))? == 0xaaaa, "guest read through the 2 MiB leaf");
    // Split: 512 4 KiB leaves over the same frames; the guest sees the same data.
    let f = vm.table_mut().split(gpa(base)).map_err(|e| format!("split: {e:?}"))?;
    vm.apply(f);
    let l2 = vm.table().query(gpa(base + 0x1f_f008)).ok_or("no leaf after split")?;
    ensure!(l2.size == PageSize::Size4K && l2.hpa == l.hpa + 0x1f_f000, "after split {l2:?}");
    let mut n = 0;
    vm.table().for_each_leaf(gpa(base), 2 << 20, |_| n += 1);
    ensure!(n == 512, "{n} leaves after split");
    ensure!(done(call(&mut vm, Routine::Load64, &[base + 0x1f_f008]))? == 0xbbbb, "guest read after split");
    // One page of it read-only: a store there faults, next door it does not.
    let f =
        vm.table_mut().protect(gpa(base + 0x3000), 4096, MappingFlags::RX).map_err(|e| format!("protect: {e:?}"))?;
    vm.apply(f);
    let (flt, _) = fault(call(&mut vm, Routine::Store64, &[base + 0x3008, 1]))?;
    ensure!(
        flt.info.fault_guest_paddr == gpa(base + 0x3008) && flt.info.access_flags == MappingFlags::WRITE,
        "{:?}",
        flt.info
    );
    done(call(&mut vm, Routine::Store64, &[base + 0x4008, 2]))?;
    // Same rights again: collapse back into one 2 MiB leaf; the guest still reads its data.
    let f =
        vm.table_mut().protect(gpa(base + 0x3000), 4096, MappingFlags::RWX).map_err(|e| format!("protect: {e:?}"))?;
    vm.apply(f);
    let f = vm.table_mut().collapse(gpa(base), PageSize::Size2M).map_err(|e| format!("collapse: {e:?}"))?;
    vm.apply(f);
    ensure!(vm.table().query(gpa(base)).map(|l| l.size) == Some(PageSize::Size2M), "not collapsed");
    ensure!(done(call(&mut vm, Routine::Load64, &[base + 0x4008]))? == 2, "guest read after collapse");
    println!("# huge page {:?}: split into 512, one protected, collapsed back", l.hpa);
    Ok(())
}

fn permissions() -> Verdict {
    let mut vm = test_vm(1)?;
    let ro = 0x8700_0000;
    vm.map_new(gpa(ro), 4096, MappingFlags::READ, PageSize::Size4K).map_err(String::from)?;
    let (f, t) = fault(call(&mut vm, Routine::Store64, &[ro + 0x10, 0x5a5a]))?;
    ensure!(
        t.scause == 23 && f.info.fault_guest_paddr == gpa(ro + 0x10),
        "store fault {:?} scause {}",
        f.info,
        t.scause
    );
    ensure!(f.info.access_flags == MappingFlags::WRITE, "access {:?}", f.info.access_flags);
    ensure!(peek(&vm, ro + 0x10)? == 0, "the refused store landed");
    // Grant write and resume at the same pc: the store is retried and lands.
    let fl = vm.table_mut().protect(gpa(ro), 4096, MappingFlags::RW).map_err(|e| format!("{e:?}"))?;
    vm.apply(fl);
    done(vm.run())?;
    ensure!(peek(&vm, ro + 0x10)? == 0x5a5a, "the retried store did not land");
    // Execute on a no-execute page: `li a0, 42; ret`.
    let nx = 0x8700_1000;
    vm.map_new(gpa(nx), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    vm.phys().write(gpa(nx), &[0x13, 0x05, 0xa0, 0x02, 0x82, 0x80]).map_err(|e| format!("{e}"))?;
    let (f, t) = fault(call(&mut vm, Routine::Call, &[nx]))?;
    ensure!(
        t.scause == 20 && f.info.access_flags == MappingFlags::EXECUTE,
        "fetch fault {:?} scause {}",
        f.info,
        t.scause
    );
    ensure!(
        f.info.fault_guest_paddr == gpa(nx) && t.sepc == nx,
        "fetch fault at {:?} pc {:#x}",
        f.info.fault_guest_paddr,
        t.sepc
    );
    let fl = vm.table_mut().protect(gpa(nx), 4096, MappingFlags::RX).map_err(|e| format!("{e:?}"))?;
    vm.apply(fl);
    ensure!(done(vm.run())? == 42, "code did not run after granting execute");
    Ok(())
}

fn cow_fork() -> Verdict {
    crate::scenarios2::cow_fork()
}

fn mmio_uart() -> Verdict {
    let mut vm = test_vm(1)?;
    let text = b"hello from the guest's UART\0";
    let s = 0x8000_8000;
    vm.map_new(gpa(s), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    vm.phys().write(gpa(s), text).map_err(|e| format!("{e}"))?;
    let lsr = done(call(&mut vm, Routine::UartPuts, &[UART_GPA, s]))?;
    let out = core::str::from_utf8(&vm.uart.out).unwrap_or("?");
    println!("# guest UART said: {out:?} (LSR read {lsr:#x})");
    ensure!(vm.uart.out == text[..text.len() - 1], "UART got {:?}", out);
    ensure!(lsr == 0x60, "LSR emulation returned {lsr:#x}");
    ensure!(vm.stats.mmio_writes as usize == text.len() - 1 && vm.stats.mmio_reads == 1, "mmio counts {:?}", vm.stats);
    // Compressed c.sw / c.lw decoded from the instruction fetched with HLVX.
    // The register (MCR) is 8 bits wide: storing 0x1a5 keeps 0xa5, which c.lw reads back
    // zero-extended from the register's width.
    let v = done(call(&mut vm, Routine::MmioCompressed, &[UART_GPA, 0x1a5]))?;
    ensure!(v == 0xa5, "compressed MMIO round trip gave {v:#x}");
    ensure!(vm.table().query(gpa(UART_GPA)).is_none(), "the MMIO range got mapped");
    Ok(())
}

fn gpa_copies() -> Verdict {
    let mut vm = test_vm(1)?;
    let a = 0x8800_0000;
    vm.map_new(gpa(a), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    let spacer = frames().allocate_frame().ok_or("no frame")?;
    vm.map_new(gpa(a + 4096), 4096, MappingFlags::RW, PageSize::Size4K).map_err(String::from)?;
    // SAFETY: the spacer only kept the two pages' frames apart; never mapped.
    unsafe { frames().deallocate_frames(spacer, 1) };
    let (h0, _) = vm.table().translate(gpa(a)).ok_or("unmapped")?;
    let (h1, _) = vm.table().translate(gpa(a + 4096)).ok_or("unmapped")?;
    ensure!(h1 != h0 + 4096, "test needs discontiguous frames");
    let data: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(1)).collect();
    vm.phys().write(gpa(a + 4096 - 24), &data).map_err(|e| format!("copy_to_guest: {e}"))?;
    // The guest reads what was written, on both sides of the boundary.
    let g0 = done(call(&mut vm, Routine::Load64, &[a + 4096 - 8]))?;
    let g1 = done(call(&mut vm, Routine::Load64, &[a + 4096]))?;
    ensure!(g0.to_le_bytes() == data[16..24] && g1.to_le_bytes() == data[24..32], "guest sees {g0:#x} {g1:#x}");
    let mut back = [0u8; 64];
    vm.phys().read(gpa(a + 4096 - 24), &mut back).map_err(|e| format!("copy_from_guest: {e}"))?;
    ensure!(back[..] == data[..], "software copy round trip");
    // The vsatp-swap approach (hw::copy_from_guest_swap) reads the same bytes.
    let mut swap = [0u8; 64];
    // SAFETY: this VM's hgatp is loaded and the trap handler applies the exception table.
    unsafe { hw::copy_from_guest_swap(gpa(a + 4096 - 24), &mut swap) }.map_err(|e| format!("swap copy: {e}"))?;
    ensure!(swap[..] == data[..], "swap copy differs");
    // Unmapped and read-only GPAs are typed errors.
    let e = vm.phys().read(gpa(a + 8192 - 4), &mut back).unwrap_err();
    ensure!(matches!(e, GuestMemError::Unmapped { gpa: g, .. } if g == gpa(a + 8192)), "error {e:?}");
    // Measure: N copies of 64 bytes each way.
    const N: u64 = 2000;
    let t0 = (hw::rdtime(), hw::rdcycle());
    for i in 0..N {
        vm.phys().read(gpa(a + 4096 - 24 - (i & 7)), &mut back).map_err(|e| format!("{e}"))?;
    }
    let t1 = (hw::rdtime(), hw::rdcycle());
    for i in 0..N {
        // SAFETY: as above.
        unsafe { hw::copy_from_guest_swap(gpa(a + 4096 - 24 - (i & 7)), &mut swap) }.map_err(|e| format!("{e}"))?;
    }
    let t2 = (hw::rdtime(), hw::rdcycle());
    let per = |d: u64| d * 1000 / N;
    println!(
        "# {N} x 64-byte GPA reads: software translation {} time ticks ({} cycles), vsatp swap + 2x hfence.vvma {} ticks ({} cycles); per copy x1000: {} vs {} ticks",
        t1.0 - t0.0,
        t1.1 - t0.1,
        t2.0 - t1.0,
        t2.1 - t1.1,
        per(t1.0 - t0.0),
        per(t2.0 - t1.0)
    );
    Ok(())
}
