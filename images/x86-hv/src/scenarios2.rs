//! The suite, second half: address-space fork, MMIO, guest-memory access, fetch, remap, A/D and
//! dirty tracking, recovered faults.

use crate::ensure;
use crate::guest::{self, Op, Unassigned};
use crate::hv::{FaultAction, GvaError, Hv, MmioDevice};
use crate::println;
use crate::scenarios::{ctx, gpa, Ctx, Outcome, Res};
use alloc::vec;
use alloc::vec::Vec;
use twostage_aspace::guest::PageFaultKind;
use twostage_aspace::{AddressSpace, Backend, DirtyMode, FaultOutcome};
use twostage_aspace::{GuestMemError, GuestVaError};
use twostage_npt::Access;
use twostage_npt::{
    AdClear, Ept4, FrameAllocator, GpaRange, GuestPhysAddr, GuestVirtAddr, MapSize, MappingFlags, PageSize,
};
use twostage_vmx::exit::EptViolation;

type Space = AddressSpace<Ept4, &'static twostage_baremetal::frames::Frames>;

/// Runs `op` with the vCPU on `space`'s EPT, faults resolved by the address space.
fn op_on(hv: &mut Hv, space: &mut Space, op: Op) -> Result<u64, alloc::string::String> {
    let mut handler = |hv: &mut Hv, v: &EptViolation| match space.handle_fault(v.nested_page_fault_info()) {
        FaultOutcome::Resolved { flush } => {
            space.flush(flush, |inv| {
                crate::hv::invept(&mut hv.vcpu, inv);
            });
            FaultAction::Retry
        }
        _ => FaultAction::Fail("address space did not resolve the fault"),
    };
    ctx(hv.op(op, &mut handler, &mut Unassigned), "guest op")
}

fn load_eptp(vcpu: &mut crate::hv::Vcpu, table: &crate::hv::Ept) -> Result<(), alloc::string::String> {
    ctx(vcpu.load_ept(table), "EPTP").map(drop)
}

pub(crate) fn s_fork(hv: &mut Hv, c: &Ctx) -> Res {
    let before = hv.frames.stats().in_use;
    let r = fork_inner(hv, c);
    // Whatever happened, the bundled guest goes back to its own EPT.
    load_eptp(&mut hv.vcpu, &hv.ept)?;
    let after = hv.frames.stats().in_use;
    r?;
    ensure!(after == before, "frames in use {before} before, {after} after both spaces were dropped");
    println!("   both spaces dropped: host frames back to {after}");
    Ok(Outcome::Pass)
}

/// An address space holding a copy of the bundled guest's RAM (code, page tables, stack), so
/// the guest can run on it, plus a demand-zero data region of `data_len` bytes at `data`.
fn guest_space(
    hv: &mut Hv,
    c: &Ctx,
    data: u64,
    data_len: u64,
) -> Result<(Space, twostage_aspace::RegionId), alloc::string::String> {
    let mut space: Space = ctx(AddressSpace::new(hv.frames, c.ept.table_options(true)), "new address space")?;
    let ram = GpaRange::from_start_len(GuestPhysAddr::new(0), guest::RAM_SIZE).ok_or("range")?;
    let (_, f) = ctx(space.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero), "ram region")?;
    space.flush_unloaded(f);
    let range = GpaRange::from_start_len(GuestPhysAddr::new(data), data_len).ok_or("range")?;
    let (id, f) = ctx(space.add_region("data", range, MappingFlags::RW, Backend::DemandZero), "data region")?;
    space.flush_unloaded(f);
    let mut snapshot = vec![0u8; guest::RAM_SIZE as usize];
    ctx(hv.copy_from_guest(GuestPhysAddr::new(0), &mut snapshot), "snapshot")?;
    let f = space.load_image(GuestPhysAddr::new(0), &snapshot).map_err(|e| alloc::format!("load_image: {e:?}"))?;
    space.flush_unloaded(f);
    Ok((space, id))
}

fn fork_inner(hv: &mut Hv, c: &Ctx) -> Result<(), alloc::string::String> {
    let (mut space, _) = guest_space(hv, c, gpa::FORK_DATA, 0x10000)?;
    load_eptp(&mut hv.vcpu, space.table())?;
    op_on(hv, &mut space, Op::Write(gpa::FORK_DATA + 8, 0xFA7E))?;
    let (mut child, f) = space.fork().map_err(|e| alloc::format!("fork: {e:?}"))?;
    space.flush(f, |inv| {
        crate::hv::invept(&mut hv.vcpu, inv);
    });
    load_eptp(&mut hv.vcpu, child.table())?;
    let seen = op_on(hv, &mut child, Op::Read(gpa::FORK_DATA + 8))?;
    ensure!(seen == 0xFA7E, "child reads {seen:#x} before writing");
    op_on(hv, &mut child, Op::Write(gpa::FORK_DATA + 8, 0xC41D))?;
    let child_sees = op_on(hv, &mut child, Op::Read(gpa::FORK_DATA + 8))?;
    load_eptp(&mut hv.vcpu, space.table())?;
    let parent_sees = op_on(hv, &mut space, Op::Read(gpa::FORK_DATA + 8))?;
    let (ps, cs) = (space.stats(), child.stats());
    println!("   parent: {ps:?}");
    println!("   child:  {cs:?}");
    ensure!(child_sees == 0xC41D && parent_sees == 0xFA7E, "child sees {child_sees:#x}, parent {parent_sees:#x}");
    ensure!(cs.cow_copies + ps.cow_copies + cs.cow_reuses + ps.cow_reuses >= 1, "no copy-on-write happened");
    load_eptp(&mut hv.vcpu, &hv.ept)?;
    drop(child);
    drop(space);
    Ok(())
}

/// A 16550-like UART model: THR/RBR at 0, LSR at 5 (THR empty + transmitter empty), scratch at 7.
struct Uart {
    out: Vec<u8>,
    scratch: u8,
    accesses: u32,
}

impl MmioDevice for Uart {
    fn read(&mut self, gpa: GuestPhysAddr, _size: u8) -> u64 {
        self.accesses += 1;
        match gpa.as_u64() - gpa::MMIO {
            5 => 0x60,
            7 => u64::from(self.scratch),
            _ => 0,
        }
    }
    fn write(&mut self, gpa: GuestPhysAddr, _size: u8, value: u64) {
        self.accesses += 1;
        match gpa.as_u64() - gpa::MMIO {
            0 => self.out.push(value as u8),
            7 => self.scratch = value as u8,
            _ => {}
        }
    }
}

pub(crate) fn s_mmio(hv: &mut Hv, _c: &Ctx) -> Res {
    let mut uart = Uart { out: Vec::new(), scratch: 0, accesses: 0 };
    let mut handler = |_: &mut Hv, v: &EptViolation| {
        if (gpa::MMIO..gpa::MMIO + 0x1000).contains(&v.gpa.as_u64()) && v.qualification.entry_rights().is_empty() {
            FaultAction::Mmio
        } else {
            FaultAction::Fail("fault outside the device")
        }
    };
    let before = hv.stats.mmio_emulated;
    for b in *b"OK" {
        ctx(hv.op(Op::Write32(gpa::MMIO, u32::from(b)), &mut handler, &mut uart), "THR write")?;
    }
    let lsr = ctx(hv.op(Op::Read32(gpa::MMIO + 5), &mut handler, &mut uart), "LSR read")?;
    ctx(hv.op(Op::Write32(gpa::MMIO + 7, 0xA5), &mut handler, &mut uart), "scratch write")?;
    let scr32 = ctx(hv.op(Op::Read32(gpa::MMIO + 7), &mut handler, &mut uart), "scratch read (32-bit)")?;
    let scr64 = ctx(hv.op(Op::Read(gpa::MMIO + 7), &mut handler, &mut uart), "scratch read (64-bit)")?;
    println!(
        "   device saw {:?}, LSR {lsr:#x}, scratch {scr32:#x}/{scr64:#x}; {} accesses emulated",
        core::str::from_utf8(&uart.out).unwrap_or("?"),
        hv.stats.mmio_emulated - before
    );
    ensure!(uart.out == b"OK", "device output {:?}", uart.out);
    ensure!(lsr == 0x60 && scr32 == 0xA5 && scr64 == 0xA5, "reads: LSR {lsr:#x}, scratch {scr32:#x} {scr64:#x}");
    ensure!(hv.stats.mmio_emulated - before == 6 && uart.accesses == 6, "{} emulated", hv.stats.mmio_emulated - before);
    Ok(Outcome::Pass)
}

pub(crate) fn s_gpa_copy(hv: &mut Hv, _c: &Ctx) -> Res {
    let (p0, p1) = (hv.ept.translate(GuestPhysAddr::new(0x20000)), hv.ept.translate(GuestPhysAddr::new(0x21000)));
    let (Some((h0, _)), Some((h1, _))) = (p0, p1) else { return Err("guest RAM unmapped".into()) };
    ensure!(h1 != h0 + 0x1000, "pages adjacent in host memory: the test would not cross");
    let data: [u8; 16] = *b"0123456789abcdef";
    ctx(hv.copy_to_guest(GuestPhysAddr::new(0x20ff8), &data), "copy_to_guest")?;
    let lo = ctx(hv.op_plain(Op::Read(0x20ff8)), "read")?;
    let hi = ctx(hv.op_plain(Op::Read(0x21000)), "read")?;
    ensure!(lo.to_le_bytes() == data[..8] && hi.to_le_bytes() == data[8..], "guest sees {lo:#x} {hi:#x}");
    ctx(hv.op_plain(Op::Write(0x21ffc, 0x1122_3344_5566_7788)), "guest write across")?;
    let mut back = [0u8; 8];
    ctx(hv.copy_from_guest(GuestPhysAddr::new(0x21ffc), &mut back), "copy_from_guest")?;
    ensure!(u64::from_le_bytes(back) == 0x1122_3344_5566_7788, "read back {:#x}", u64::from_le_bytes(back));
    println!("   GPA 0x20000 -> {h0:?}, 0x21000 -> {h1:?}: 16-byte copies across the boundary both ways");
    Ok(Outcome::Pass)
}

pub(crate) fn s_gva_copy(hv: &mut Hv, _c: &Ctx) -> Res {
    let w = guest::WINDOW_GVA;
    let data: [u8; 16] = *b"FEDCBA9876543210";
    ctx(hv.copy_to_guest_va(GuestVirtAddr::new(w + 0xff8), &data), "copy_to_guest_va")?;
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    ctx(hv.copy_from_guest(GuestPhysAddr::new(guest::WINDOW_GPAS[0] + 0xff8), &mut a), "gpa read")?;
    ctx(hv.copy_from_guest(GuestPhysAddr::new(guest::WINDOW_GPAS[1]), &mut b), "gpa read")?;
    ensure!(a == data[..8] && b == data[8..], "bytes did not land on the guest's scattered pages");
    let mid = ctx(hv.op_plain(Op::Read(w + 0xffc)), "guest read across its own pages")?;
    ensure!(mid.to_le_bytes() == data[4..12], "guest sees {mid:#x}");
    ctx(hv.op_plain(Op::Write(w + 0x1ffa, 0x0102_0304_0506_0708)), "guest write across")?;
    let mut back = [0u8; 8];
    ctx(hv.copy_from_guest_va(GuestVirtAddr::new(w + 0x1ffa), &mut back), "copy_from_guest_va")?;
    ensure!(u64::from_le_bytes(back) == 0x0102_0304_0506_0708, "read back {:#x}", u64::from_le_bytes(back));
    let g = ctx(hv.guest_va_to_pa(GuestVirtAddr::new(w + 0x1000), Access::Read), "walk")?;
    ensure!(g == GuestPhysAddr::new(guest::WINDOW_GPAS[1]), "walk gave {g:?}");
    println!(
        "   GVA {w:#x}+0xff8 spans GPA {:#x} and {:#x}; guest and hypervisor agree",
        guest::WINDOW_GPAS[0],
        guest::WINDOW_GPAS[1]
    );
    Ok(Outcome::Pass)
}

pub(crate) fn s_fetch_across(hv: &mut Hv, _c: &Ctx) -> Res {
    // mov rax, imm64; ret  (11 bytes) starting 6 bytes before the end of window page 2.
    let imm: u64 = 0x5EED_F00D_0BAD_CAFE;
    let mut code = [0u8; 11];
    code[0] = 0x48;
    code[1] = 0xb8;
    code[2..10].copy_from_slice(&imm.to_le_bytes());
    code[10] = 0xc3;
    let at = guest::WINDOW_GVA + 0x2ffa;
    ctx(hv.copy_to_guest_va(GuestVirtAddr::new(at), &code), "write code")?;
    let insn = ctx(hv.fetch_guest_instruction(GuestVirtAddr::new(at)), "fetch")?;
    ensure!(insn.len() == 15 && insn.bytes()[..11] == code, "fetched {:02x?}", insn.bytes());
    let r = ctx(hv.op_plain(Op::Exec(at)), "guest call")?;
    ensure!(r == imm, "guest got {r:#x}");
    println!(
        "   11-byte instruction at GVA {at:#x} (GPA {:#x} / {:#x}) fetched and executed",
        guest::WINDOW_GPAS[2] + 0xffa,
        guest::WINDOW_GPAS[3]
    );
    Ok(Outcome::Pass)
}

pub(crate) fn s_remap(hv: &mut Hv, _c: &Ctx) -> Res {
    let a = hv.zeroed_frame().ok_or("frames")?;
    let b = hv.zeroed_frame().ok_or("frames")?;
    hv.host_write(a, &0xAAAAu64.to_le_bytes());
    hv.host_write(b, &0xBBBBu64.to_le_bytes());
    ctx(hv.map(gpa::REMAP, a, 0x1000, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)), "map A")?;
    ensure!(ctx(hv.op_plain(Op::Read(gpa::REMAP)), "read")? == 0xAAAA, "not A");
    let invepts = hv.stats.invepts;
    ctx(hv.unmap(gpa::REMAP, 0x1000), "unmap")?;
    ctx(hv.map(gpa::REMAP, b, 0x1000, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)), "map B")?;
    ensure!(hv.stats.invepts > invepts, "the remap issued no INVEPT");
    ensure!(ctx(hv.op_plain(Op::Read(gpa::REMAP)), "read")? == 0xBBBB, "guest still sees A after remap + INVEPT");
    ctx(hv.op_plain(Op::Write(gpa::REMAP, 0xCCCC)), "write")?;
    let (mut ra, mut rb) = ([0u8; 8], [0u8; 8]);
    hv.host_read(a, &mut ra);
    hv.host_read(b, &mut rb);
    ensure!(u64::from_le_bytes(ra) == 0xAAAA && u64::from_le_bytes(rb) == 0xCCCC, "write went to the wrong frame");
    // SAFETY: A is no longer mapped (the unmap was flushed) and nothing else refers to it.
    unsafe { hv.frames.deallocate_frames(a, 1) };
    println!("   {a:?} -> {b:?} under the running guest; {} INVEPT for it", hv.stats.invepts - invepts);
    Ok(Outcome::Pass)
}

fn ad_leaves(hv: &mut Hv, base: u64, clear: AdClear) -> Vec<(u64, bool, bool)> {
    let mut v = Vec::new();
    let f = hv.ept.take_accessed_dirty(GuestPhysAddr::new(base), 0x4000, clear, |l| {
        v.push(((l.gpa.as_u64() - base) / 0x1000, l.accessed, l.dirty))
    });
    hv.flush(f);
    v
}

fn map4(hv: &mut Hv, base: u64) -> Result<(), alloc::string::String> {
    for i in 0..4 {
        let f = hv.zeroed_frame().ok_or("frames")?;
        ctx(hv.map(base + i * 0x1000, f, 0x1000, MappingFlags::RW, MapSize::Exactly(PageSize::Size4K)), "map")?;
    }
    Ok(())
}

pub(crate) fn s_ept_ad(hv: &mut Hv, _c: &Ctx) -> Res {
    if !hv.vcpu.ept_ad_enabled() {
        return Ok(Outcome::Skip("no EPT A/D on this CPU (IA32_VMX_EPT_VPID_CAP bit 21 clear)".into()));
    }
    map4(hv, gpa::AD)?;
    let fresh = ad_leaves(hv, gpa::AD, AdClear::Both);
    ctx(hv.op_plain(Op::Read(gpa::AD)), "read")?;
    ctx(hv.op_plain(Op::Write(gpa::AD + 0x2000, 1)), "write")?;
    let seen = ad_leaves(hv, gpa::AD, AdClear::Both);
    println!("   after mapping: {fresh:?}; after read p0, write p2 (page, A, D): {seen:?}");
    ensure!(fresh.is_empty(), "fresh leaves have A/D set: {fresh:?}");
    ensure!(seen == vec![(0, true, false), (2, true, true)], "hardware set {seen:?}");
    ctx(hv.op_plain(Op::Read(gpa::AD + 0x2000)), "read")?;
    let again = ad_leaves(hv, gpa::AD, AdClear::None);
    println!("   after clearing + INVEPT, read p2: {again:?}");
    ensure!(again == vec![(2, true, false)], "after clear: {again:?}");
    Ok(Outcome::Pass)
}

pub(crate) fn s_dirty_log(hv: &mut Hv, c: &Ctx) -> Res {
    if !hv.vcpu.ept_ad_enabled() {
        println!("   no EPT A/D: dirty log by write protection");
        return dirty_by_write_protection(hv, c, gpa::DIRTY);
    }
    map4(hv, gpa::DIRTY)?;
    let _ = ad_leaves(hv, gpa::DIRTY, AdClear::Dirty);
    for p in [1u64, 3] {
        ctx(hv.op_plain(Op::Write(gpa::DIRTY + p * 0x1000 + 8, p)), "write")?;
    }
    ctx(hv.op_plain(Op::Read(gpa::DIRTY)), "read")?;
    let dirty: Vec<u64> = ad_leaves(hv, gpa::DIRTY, AdClear::Dirty).into_iter().filter(|l| l.2).map(|l| l.0).collect();
    let again: Vec<u64> = ad_leaves(hv, gpa::DIRTY, AdClear::Dirty).into_iter().filter(|l| l.2).map(|l| l.0).collect();
    println!("   dirty log by EPT D bits: pages {dirty:?}, then {again:?} after re-arming");
    ensure!(dirty == vec![1, 3] && again.is_empty(), "dirty {dirty:?}, again {again:?}");
    Ok(Outcome::Pass)
}

pub(crate) fn s_dirty_wp(hv: &mut Hv, c: &Ctx) -> Res {
    dirty_by_write_protection(hv, c, gpa::DIRTY_WP)
}

fn dirty_by_write_protection(hv: &mut Hv, _c: &Ctx, base: u64) -> Res {
    map4(hv, base)?;
    ctx(hv.protect(base, 0x4000, MappingFlags::READ), "write-protect")?;
    let mut log: Vec<u64> = Vec::new();
    let mut handler = |hv: &mut Hv, v: &EptViolation| {
        let page = v.gpa.align_down(0x1000u64).as_u64();
        if !v.qualification.write() || !(base..base + 0x4000).contains(&page) {
            return FaultAction::Fail("not a dirty-log fault");
        }
        log.push((page - base) / 0x1000);
        match hv.protect(page, 0x1000, MappingFlags::RW) {
            Ok(()) => FaultAction::Retry,
            Err(_) => FaultAction::Fail("protect failed"),
        }
    };
    for p in [3u64, 1, 3] {
        ctx(hv.op(Op::Write(base + p * 0x1000, p), &mut handler, &mut Unassigned), "write")?;
    }
    ctx(hv.op(Op::Read(base), &mut handler, &mut Unassigned), "read")?;
    println!("   dirty log by write protection: pages {log:?} (a second write to page 3 did not fault)");
    ensure!(log == vec![3, 1], "log {log:?}");
    Ok(Outcome::Pass)
}

pub(crate) fn s_recovered(hv: &mut Hv, _c: &Ctx) -> Res {
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
    Ok(Outcome::Pass)
}

/// Runs `f` against a fresh guest address space, then puts the bundled guest back on its own
/// EPT and checks that dropping the space returned every frame.
fn with_space_accounting(hv: &mut Hv, f: impl FnOnce(&mut Hv) -> Result<(), alloc::string::String>) -> Res {
    let before = hv.frames.stats().in_use;
    let r = f(hv);
    load_eptp(&mut hv.vcpu, &hv.ept)?;
    let after = hv.frames.stats().in_use;
    r?;
    ensure!(after == before, "frames in use {before} before, {after} after the space was dropped");
    Ok(Outcome::Pass)
}

pub(crate) fn s_dirty_aspace(hv: &mut Hv, c: &Ctx) -> Res {
    with_space_accounting(hv, |hv| {
        let base = gpa::DIRTY_AS;
        let (mut space, data) = guest_space(hv, c, base, 16 * 0x1000)?;
        let f = space.populate(data).map_err(|e| alloc::format!("populate: {e:?}"))?;
        space.flush_unloaded(f);
        load_eptp(&mut hv.vcpu, space.table())?;
        let range = GpaRange::from_start_len(GuestPhysAddr::new(base), 16 * 0x1000).ok_or("range")?;
        let (mode, f) = space.start_dirty_log(range).map_err(|e| alloc::format!("start_dirty_log: {e:?}"))?;
        space.flush(f, |inv| {
            crate::hv::invept(&mut hv.vcpu, inv);
        });
        for p in [2u64, 5, 5] {
            op_on(hv, &mut space, Op::Write(base + p * 0x1000 + 16, p))?;
        }
        op_on(hv, &mut space, Op::Read(base + 7 * 0x1000))?;
        let harvest = |hv: &mut Hv, space: &mut Space| -> Result<Vec<u64>, alloc::string::String> {
            let (bits, f) = space.harvest_dirty().map_err(|e| alloc::format!("harvest: {e:?}"))?;
            space.flush(f, |inv| {
                crate::hv::invept(&mut hv.vcpu, inv);
            });
            Ok(bits.iter().map(|g| (g.as_u64() - base) / 0x1000).collect())
        };
        let first = harvest(hv, &mut space)?;
        op_on(hv, &mut space, Op::Write(base + 9 * 0x1000, 9))?;
        op_on(hv, &mut space, Op::Write(base + 5 * 0x1000, 9))?;
        let second = harvest(hv, &mut space)?;
        println!("   twostage-aspace chose {mode:?}; dirty pages {first:?}, after re-arming {second:?}");
        let want = if hv.vcpu.ept_ad_enabled() { DirtyMode::DirtyBits } else { DirtyMode::WriteProtect };
        ensure!(mode == want, "mode {mode:?} but the EPTP has A/D {}", hv.vcpu.ept_ad_enabled());
        ensure!(first == vec![2, 5] && second == vec![5, 9], "dirty {first:?} then {second:?}");
        Ok(())
    })
}
