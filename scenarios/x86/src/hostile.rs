//! The hostile-guest scenario: hundreds of short runs of pseudo-random 64-bit code, registers and
//! page tables on a `twostage-aspace` address space. Every exit must be handled without a panic,
//! every run must end (exit budget, triple fault, or the VMX-preemption timer as watchdog), and
//! afterwards the EPT must map only what the address space owns, with the frame count exact.

mod exits;
mod gen;

use crate::guest::{self, GuestOps, Op};
use crate::{ctx, Caps, Machine};
use alloc::format;
use alloc::string::String;
use exits::handle;
use gen::{self as g, Rng};
use twostage_aspace::{AddressSpace, Backend};
use twostage_baremetal::frames::Frames;
use twostage_harness::{ensure, Pass, Scenario, Verdict};
use twostage_hv_x86::hv::{invept, Hv};
use twostage_hv_x86::println;
use twostage_npt::{Ept4, GpaRange, GuestPhysAddr, GuestVirtAddr, MappingFlags, FRAME_SIZE};
use twostage_vmx::caps::IA32_VMX_MISC;
use twostage_vmx::exit::reason;
use twostage_vmx::hw::VmxHardware;
use twostage_vmx::{GuestEntry, VmcsField as F};

/// The hostile-guest scenario.
pub const SCENARIOS: &[Scenario<Machine>] = &[Scenario::new("hostile guest", s_hostile)];

type Space = AddressSpace<Ept4, &'static Frames>;

/// The seed of the whole scenario (printed, so a failure can be replayed by changing it here).
const SEED: u64 = 0x7a05_7a6e_0bad_c0de;
/// Guest runs.
const RUNS: u32 = 480;
/// A fresh address space every EPOCH runs (and a check that dropping it frees everything).
const EPOCH: u32 = 120;
/// Exits handled per run before the run is ended.
const MAX_EXITS: u32 = 64;
/// VMX-preemption timer value: reloaded at each entry, it bounds the time between two exits.
const TIMER_TICKS: u32 = 40_000;
/// Exit reasons counted one by one (the rest go to the last slot).
const REASONS: usize = 66;

/// How a run ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// The exit budget ran out (the guest kept making exits).
    Budget,
    /// The guest triple-faulted.
    TripleFault,
    /// The preemption timer fired: the guest ran too long without an exit.
    Watchdog,
    /// The hypervisor refused an access it does not emulate (and stopped the guest, unless the
    /// run catches its exceptions).
    Killed(&'static str),
    /// A hypervisor defect: an entry failure or an exit that must not happen.
    Defect,
}

/// Counters of the whole scenario.
struct Tally {
    exits: [u32; REASONS],
    total: u32,
    budget: u32,
    triple: u32,
    watchdog: u32,
    /// Runs the hypervisor ended by stopping the guest.
    stopped: u32,
    /// Accesses the hypervisor refused to emulate (some runs carry on after one).
    killed: u32,
    kill_reasons: [(&'static str, u32); 12],
    injected: u32,
    reinjected: u32,
    emulated: u32,
    defects: u32,
    first_defect: Option<String>,
}

impl Tally {
    fn kill(&mut self, why: &'static str) {
        self.killed += 1;
        if let Some(e) = self.kill_reasons.iter_mut().find(|(w, n)| *n > 0 && *w == why) {
            e.1 += 1;
        } else if let Some(e) = self.kill_reasons.iter_mut().find(|(_, n)| *n == 0) {
            *e = (why, 1);
        }
    }

    fn defect(&mut self, what: String) {
        self.defects += 1;
        if self.first_defect.is_none() {
            self.first_defect = Some(what);
        }
    }
}

/// The emulated device: registers that read back what was written (reads of untouched ones give
/// a pattern).
struct Scratch([u64; 512]);

impl Scratch {
    fn slot(gpa: GuestPhysAddr) -> usize {
        ((gpa.as_u64() >> 3) & 511) as usize
    }
}

/// What the handler decided for one exit.
enum Next {
    Resume,
    End(End),
}

fn new_space(frames: &'static Frames, c: &Caps) -> Result<Space, String> {
    let mut s: Space = ctx(AddressSpace::new(frames, c.ept.table_options(true)), "new address space")?;
    let regions = [
        ("ram", 0, g::RAM_END, MappingFlags::RWX, Backend::DemandZero),
        ("rom", g::ROM, g::ROM_LEN, MappingFlags::RX, Backend::DemandZero),
        ("device", g::MMIO, FRAME_SIZE as u64, MappingFlags::RW, Backend::Mmio),
    ];
    for (name, start, len, flags, backend) in regions {
        let range = GpaRange::from_start_len(GuestPhysAddr::new(start), len).ok_or("range")?;
        let (_, f) = ctx(s.add_region(name, range, flags, backend), name)?;
        s.flush_unloaded(f).expect("its own token");
    }
    Ok(s)
}

/// The EPT maps only what the address space owns: every leaf lies in a region that is not a
/// device, with no right the region lacks. Returns the 4 KiB pages mapped.
fn check_ept(space: &Space) -> Result<u64, String> {
    let mut pages = 0u64;
    let mut bad = None;
    space.table().for_each_leaf(GuestPhysAddr::new(0), 1 << 48, |l| {
        pages += l.size.bytes() / FRAME_SIZE as u64;
        let end = l.gpa + (l.size.bytes() - 1);
        let ok = space.region_at(l.gpa).is_some_and(|r| {
            r.range().contains(end) && r.backend() != Backend::Mmio && r.flags().contains(l.flags & MappingFlags::RWX)
        });
        if !ok && bad.is_none() {
            bad = Some(format!("EPT leaf {:?} ({:?}, {:?}) outside the regions' rights", l.gpa, l.size, l.flags));
        }
    });
    bad.map_or(Ok(pages), Err)
}

fn s_hostile(m: &mut Machine) -> Verdict {
    let (hv, c) = (&mut m.hv, &m.caps);
    let before = hv.frames.stats().in_use;
    let r = hostile_inner(hv, c);
    // Whatever happened, the bundled guest goes back to its own EPT and entry state.
    ctx(hv.vcpu.setup(&hv.ept, guest::entry()), "setup of the bundled guest")?;
    let after = hv.frames.stats().in_use;
    let detail = r?;
    ensure!(after == before, "host frames in use {before} before, {after} after the hostile runs");
    let v = ctx(hv.op_plain(Op::Read(guest::CODE)), "the bundled guest after the hostile runs")?;
    ensure!(v != 0, "bundled guest reads {v:#x} from its code");
    println!("   host frames back to {after}; the bundled guest runs again");
    Ok(Pass::With(detail))
}

fn hostile_inner(hv: &mut Hv, c: &Caps) -> Result<String, String> {
    let caps = *hv.vcpu.capabilities();
    let timer = caps.has_preemption_timer();
    let rate = if timer { hv.vcpu.hardware().read_msr(IA32_VMX_MISC) & 0x1f } else { 0 };
    println!(
        "   seed {SEED:#x}; {RUNS} runs of at most {MAX_EXITS} exits; preemption timer {}",
        if timer { format!("{TIMER_TICKS} ticks of 2^{rate} TSC cycles") } else { String::from("not offered") }
    );
    // MAXPHYADDR bounds what MOV to CR3 may load (Intel SDM Vol. 3A 4.1.4; CPUID.80000008H:EAX[7:0]),
    // as the guest's CPUID reports it.
    let maxphys = if hv.vcpu.hardware().cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        hv.vcpu.guest_cpuid(0x8000_0008, 0).eax & 0xff
    } else {
        36
    };
    let mut rng = Rng::new(SEED);
    let mut dev = Scratch([0x5a5a_5a5a_5a5a_5a5a; 512]);
    let mut t = Tally {
        exits: [0; REASONS],
        total: 0,
        budget: 0,
        triple: 0,
        watchdog: 0,
        stopped: 0,
        killed: 0,
        kill_reasons: [("", 0); 12],
        injected: 0,
        reinjected: 0,
        emulated: 0,
        defects: 0,
        first_defect: None,
    };
    let mut run = 0;
    while run < RUNS {
        let base = hv.frames.stats().in_use;
        let mut space = new_space(hv.frames, c)?;
        for _ in 0..EPOCH.min(RUNS - run) {
            one_run(hv, &mut space, &mut rng, &mut dev, &mut t, timer, maxphys)?;
            run += 1;
            let pages = check_ept(&space).map_err(|e| format!("run {run}: {e}"))?;
            let in_use = hv.frames.stats().in_use;
            let want = base + space.table().table_frames() + pages as usize;
            ensure!(
                in_use == want,
                "run {run}: {in_use} host frames in use, expected {want} ({base} before the space, {} table frames, {pages} data pages)",
                space.table().table_frames()
            );
        }
        // Leave this space: the vCPU must not keep its EPTP loaded once it is gone.
        ctx(hv.vcpu.load_ept(&hv.ept), "EPTP back to the bundled guest")?;
        drop(space);
        let in_use = hv.frames.stats().in_use;
        ensure!(
            in_use == base,
            "after run {run}: {in_use} host frames in use once the space was dropped, {base} before"
        );
    }
    if let Some(d) = &t.first_defect {
        return Err(format!("{} hypervisor defects, first: {d}", t.defects));
    }
    ensure!(t.total > RUNS, "only {} exits in {RUNS} runs", t.total);
    ensure!(!timer || t.watchdog > 0, "the preemption timer never ended a run (a `jmp $` was generated)");
    let mut kinds = String::new();
    let mut order: [usize; REASONS] = core::array::from_fn(|i| i);
    order.sort_by_key(|&i| core::cmp::Reverse(t.exits[i]));
    for &i in order.iter().filter(|&&i| t.exits[i] > 0) {
        let name = if i == REASONS - 1 { "other" } else { reason::name(i as u16) };
        kinds += &format!("{}{name} {}", if kinds.is_empty() { "" } else { ", " }, t.exits[i]);
    }
    let mut kills = String::new();
    for (w, n) in t.kill_reasons.iter().filter(|(_, n)| *n > 0) {
        kills += &format!("{}{w} {n}", if kills.is_empty() { "" } else { ", " });
    }
    println!("   exits by kind: {kinds}");
    println!(
        "   runs ended by: exit budget {}, triple fault {}, preemption timer {}, guest stopped {}",
        t.budget, t.triple, t.watchdog, t.stopped
    );
    println!("   {} accesses refused: {kills}", t.killed);
    println!(
        "   {} MMIO/unassigned accesses emulated, {} exceptions injected, {} interrupted events re-injected",
        t.emulated, t.injected, t.reinjected
    );
    Ok(format!(
        "{RUNS} runs, {} exits by kind ({kinds}); runs ended by exit budget {}, triple fault {}, preemption timer {}, guest stopped {}",
        t.total, t.budget, t.triple, t.watchdog, t.stopped
    ))
}

/// Loads fresh tables and code, random registers, and runs the guest until the run ends.
fn one_run(
    hv: &mut Hv,
    space: &mut Space,
    rng: &mut Rng,
    dev: &mut Scratch,
    t: &mut Tally,
    timer: bool,
    maxphys: u32,
) -> Result<(), String> {
    let tables = g::tables(rng);
    let code = g::code(rng);
    for (gpa, bytes) in [(g::PML4, &tables[..]), (g::CODE, &code[..])] {
        let f = space.load_image(GuestPhysAddr::new(gpa), bytes).map_err(|e| format!("load_image: {e:?}"))?;
        space
            .flush(f, |inv| {
                invept(&mut hv.vcpu, inv);
            })
            .expect("its own token");
    }
    let rip = g::CODE + if rng.below(4) == 0 { rng.below(4096) } else { 0 };
    let entry = GuestEntry::LongMode {
        rip: GuestVirtAddr::new(rip),
        rsp: GuestVirtAddr::new(0x8000),
        cr3: GuestPhysAddr::new(g::PML4),
    };
    ctx(hv.vcpu.setup(space.table(), entry), "setup")?;
    let r = &mut hv.vcpu.regs;
    for reg in [
        &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rbp, &mut r.r8, &mut r.r9,
        &mut r.r10, &mut r.r11, &mut r.r12, &mut r.r13, &mut r.r14, &mut r.r15,
    ] {
        *reg = rng.addr();
    }
    ctx(hv.vcpu.vmwrite(F::GUEST_RSP, rng.addr()), "RSP")?;
    // CF, PF, AF, ZF, SF, TF, DF, OF, AC may be anything; bit 1 is always 1 (Intel SDM Vol. 1
    // 3.4.3; entry check Vol. 3C 27.3.1.4).
    ctx(hv.vcpu.vmwrite(F::GUEST_RFLAGS, (rng.next() & 0x4_0dd5) | 2), "RFLAGS")?;
    // Half the runs see their exceptions as exits, half get them delivered through an empty IDT
    // (so they end in a triple fault).
    let bitmap = if rng.below(2) == 0 { u64::from(u32::MAX) } else { 0 };
    // A quarter of the runs have an IDT: a RAM page (untouched ones are demand-zero, so the
    // first delivery faults on it and must be re-injected; touched ones hold whatever the
    // guest wrote, so gates point anywhere).
    if rng.below(4) == 0 {
        let idt = 0x2_0000 + (rng.below(g::RAM_END - 0x2_0000) & !0xfff);
        ctx(hv.vcpu.vmwrite(F::GUEST_IDTR_BASE, idt), "IDTR base")?;
        ctx(hv.vcpu.vmwrite(F::GUEST_IDTR_LIMIT, 0xfff), "IDTR limit")?;
    }
    ctx(hv.vcpu.vmwrite(F::EXCEPTION_BITMAP, bitmap), "exception bitmap")?;
    if timer {
        ctx(hv.vcpu.set_preemption_timer(Some(TIMER_TICKS)), "preemption timer")?;
    }
    let mut end = End::Budget;
    for _ in 0..MAX_EXITS {
        let exit = match hv.vcpu.run() {
            Ok(e) => e,
            Err(e) => {
                t.defect(format!("VM entry failed: {e:?}"));
                end = End::Defect;
                break;
            }
        };
        t.total += 1;
        let basic = hv.vcpu.vmread(F::EXIT_REASON).map(|r| r as u16).unwrap_or(u16::MAX);
        t.exits[usize::from(basic).min(REASONS - 1)] += 1;
        match handle(hv, space, rng, dev, t, exit, maxphys) {
            Next::Resume => {}
            // In the runs that catch their exceptions, an access the hypervisor refuses is
            // caught too: the guest carries on elsewhere in its code, as its handler would.
            Next::End(End::Killed(why)) if bitmap != 0 => {
                t.kill(why);
                if hv.vcpu.vmwrite(F::GUEST_RIP, g::CODE + rng.below(4096)).is_err() {
                    end = End::Killed("RIP not written");
                    break;
                }
            }
            Next::End(e) => {
                end = e;
                break;
            }
        }
    }
    match end {
        End::Budget => t.budget += 1,
        End::TripleFault => t.triple += 1,
        End::Watchdog => t.watchdog += 1,
        End::Killed(why) => {
            t.stopped += 1;
            t.kill(why);
        }
        End::Defect => {}
    }
    Ok(())
}
