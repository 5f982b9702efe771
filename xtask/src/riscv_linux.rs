//! RISC-V: the project's Linux guest against the same kernel on bare QEMU, and on QEMU 10 (part
//! of `cargo xtask test`).
//!
//! - Console: on Debian's QEMU, the kernel boots bare (OpenSBI, no hypervisor) and under
//!   twostage, one vCPU and 128 MiB each; the two consoles, from the kernel's banner to its
//!   power-off, must be the same but for the lines of [`MUST_DIFFER`], each with the reason it
//!   differs.
//! - Cost: both runs use `-icount shift=0,sleep=off`, under which QEMU's virtual clock, the one
//!   the guest's `time` CSR reads, advances one nanosecond per emulated instruction (idle time
//!   skipped to the next timer). init's own phase timings (`twostage-linux: times:`) are then
//!   instruction counts: 1 ms = one million instructions, everything the hart executes counted,
//!   the hypervisor's exits included. Printed with the wall time of each run and the ratios,
//!   against a target of at most [`TARGET_RATIO`], and the wall time split by phase (to the
//!   kernel's banner, kernel boot, init's checks) from when each console line arrived.
//! - QEMU's own cost: a small S-mode program ([`EXIT_COST_ASM`]) run bare and as twostage's guest
//!   times an ALU loop, TLB fills, UART register reads and SBI calls; the per-operation costs are
//!   printed (a two-stage TLB fill costs QEMU over twice a one-stage one, and every exit flushes
//!   QEMU's whole TLB, twice: that, not the hypervisor's instructions, is most of the wall-time
//!   gap), and the hypervisor's instructions per emulated UART read are checked against
//!   [`MAX_UART_READ_INSNS`].
//! - QEMU 10 (bookworm-backports, harts without hardware A/D updating): the guest on four vCPUs
//!   runs init's checks to the end.

use crate::riscv::Qemu;
use crate::riscv_stage::{qemu_command, GuestOpts, Stage};
use crate::SuiteResult;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Wall-clock limit of one run.
const TIMEOUT: Duration = Duration::from_secs(180);
/// The most the guest may cost under twostage, as a multiple of bare QEMU (issue target).
const TARGET_RATIO: f64 = 1.25;
/// QEMU's instruction counting: 2^0 ns of virtual time per instruction, no real-time sleeping.
const ICOUNT: &str = "shift=0,sleep=off";
/// init's final line.
const PASSED: &str = "twostage-linux: all checks passed";

/// Console lines that differ between bare QEMU and twostage, and must: (the line's start, why).
pub const MUST_DIFFER: &[(&str, &str)] = &[
    (
        "SBI specification v",
        "twostage implements SBI 2.0 (it serves the debug console extension); OpenSBI 1.1 on QEMU 7.2 reports 1.0",
    ),
    (
        "SBI implementation ID=",
        "twostage reports its own implementation ID (0x7473) and version: claiming OpenSBI's would be false",
    ),
    ("riscv: base ISA extensions", "the guest's riscv,isa lacks 'h': twostage offers no nested hypervisor extension"),
    (
        "Memory: ",
        "8 KiB more reserved on bare QEMU: Linux allocates its unflattened device tree from memblock (booted \
         with memblock=debug: 0x284c bytes on bare QEMU, 0xbbc under twostage), and QEMU's tree describes \
         devices the guest does not get (eight virtio-mmio slots, the PCIe host bridge, flash, RTC, fw_cfg, the \
         test device and its poweroff/reboot nodes, the CLINT, the PMU, the platform bus); the flattened tree \
         itself has QEMU's address and the firmware tree's size",
    ),
    ("twostage-linux: times:", "init's timings of its own phases (compared below as instruction counts)"),
];

/// What one run printed.
struct Run {
    code: i32,
    out: String,
    wall: Duration,
    /// The console as it arrived: the bytes, and (offset, time since the start) of each read.
    raw: Vec<u8>,
    arrivals: Vec<(usize, Duration)>,
}

impl Run {
    /// When the first `needle` on the console had fully arrived (host time since QEMU started).
    fn time_of(&self, needle: &str) -> Option<Duration> {
        let n = needle.as_bytes();
        let end = self.raw.windows(n.len()).position(|w| w == n)? + n.len() - 1;
        let i = self.arrivals.partition_point(|&(off, _)| off <= end);
        self.arrivals.get(i.checked_sub(1)?).map(|&(_, t)| t)
    }

    /// Host time from the first `from` to the first `to` on the console.
    fn between(&self, from: &str, to: &str) -> Option<f64> {
        Some(self.time_of(to)?.as_secs_f64() - self.time_of(from)?.as_secs_f64())
    }
}

/// Runs `cmd` to its end (or [`TIMEOUT`]), capturing its console with the host time each part
/// arrived.
fn run(mut cmd: Command) -> Result<Run, String> {
    eprintln!("+ {cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let reader = std::thread::spawn(move || {
        let (mut all, mut arrivals) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            arrivals.push((all.len(), start.elapsed()));
            all.extend_from_slice(&buf[..n]);
        }
        (all, arrivals)
    });
    let code = loop {
        match child.try_wait().map_err(|e| format!("waiting for QEMU: {e}"))? {
            Some(s) => break s.code().unwrap_or(128),
            None if start.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("QEMU did not finish within {} s", TIMEOUT.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let wall = start.elapsed();
    let (raw, arrivals) = reader.join().unwrap_or_default();
    let out = String::from_utf8_lossy(&raw).replace('\r', "");
    Ok(Run { code, out, wall, raw, arrivals })
}

/// Runs per side of a wall-time comparison (the machine is shared: single runs vary by a third).
const PAIRS: usize = 3;

/// Runs [`PAIRS`] pairs, bare then twostage, alternately (so both sides see the same load).
fn pairs(
    bare: impl Fn() -> Result<Command, String>,
    hv: impl Fn() -> Result<Command, String>,
) -> Result<(Vec<Run>, Vec<Run>), String> {
    let (mut b, mut h) = (Vec::new(), Vec::new());
    for _ in 0..PAIRS {
        b.push(run(bare()?)?);
        h.push(run(hv()?)?);
    }
    Ok((b, h))
}

/// The median of `v` (the upper one of an even count); NaN when empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The kernel's console: from its banner to its power-off.
fn kernel_console(out: &str) -> Vec<&str> {
    out.lines()
        .skip_while(|l| !l.starts_with("Linux version"))
        .take_while(|l| !l.starts_with("reboot: Power down"))
        .collect()
}

/// Compares two consoles: the lines that differ other than as [`MUST_DIFFER`] allows. Empty when
/// they are the same.
pub fn console_differences(bare: &[&str], hv: &[&str]) -> Vec<String> {
    let allowed = |l: &str| MUST_DIFFER.iter().any(|(p, _)| l.starts_with(p));
    let b: Vec<&str> = bare.iter().copied().filter(|l| !allowed(l)).collect();
    let h: Vec<&str> = hv.iter().copied().filter(|l| !allowed(l)).collect();
    let mut out = Vec::new();
    for i in 0..b.len().max(h.len()) {
        let (x, y) = (b.get(i).copied(), h.get(i).copied());
        if x != y {
            out.push(format!("line {}: bare {x:?}, twostage {y:?}", i + 1));
        }
        if out.len() == 5 {
            break;
        }
    }
    // Every allowed line must really be there on both sides (a missing banner line is a
    // difference too).
    for (p, _) in MUST_DIFFER {
        let n = |c: &[&str]| c.iter().filter(|l| l.starts_with(p)).count();
        if n(bare) != n(hv) {
            out.push(format!("{p:?} lines: {} bare, {} under twostage", n(bare), n(hv)));
        }
    }
    out
}

/// init's phase timings in ms (`twostage-linux: times: fill 168 ms, cow 94 ms, ...`), summed.
pub fn phase_ms(out: &str) -> Option<u64> {
    let line = out.lines().find_map(|l| l.strip_prefix("twostage-linux: times:"))?;
    let mut sum = 0;
    for part in line.split(',') {
        let v = part.split_whitespace().nth(1)?;
        sum += v.parse::<u64>().ok()?;
    }
    Some(sum)
}

/// The kernel on bare QEMU (Debian's; OpenSBI), `vcpus` harts and 128 MiB as twostage's default.
fn bare(kernel: &Path, vcpus: u64) -> Command {
    let mut cmd = Command::new("qemu-system-riscv64");
    cmd.args(["-M", "virt", "-bios", "default", "-m", "128M", "-nographic", "-no-reboot", "-icount", ICOUNT])
        .arg("-smp")
        .arg(vcpus.to_string())
        .arg("-kernel")
        .arg(kernel);
    cmd
}

/// The Linux checks of `cargo xtask test` on `qemu` (see the module docs): console and cost
/// against bare QEMU on Debian's QEMU, a four-vCPU run on QEMU 10.
pub fn checks(qemu: &Qemu, image: &Path, tally: &mut SuiteResult) {
    let kernel = match crate::linux::kernel(crate::Arch::Riscv64) {
        Ok(k) => k,
        Err(e) => return tally.check(false, &format!("Linux guest: {e}")),
    };
    if qemu.dirs().is_some() {
        let opts = GuestOpts { vcpus: 4, ..GuestOpts::default() };
        let r = qemu_command(qemu, image, Stage::File(&kernel, &opts)).and_then(run);
        let what = "Linux 6.1 (4 vCPUs) on QEMU 10 without hardware A/D updating ran init's checks to the end";
        match r {
            Ok(r) => tally.check(
                r.code == 0 && r.out.contains(PASSED) && r.out.contains("twostage-linux: start (4 CPU"),
                &format!("{what}, exit status {}, {:.1} s", r.code, r.wall.as_secs_f64()),
            ),
            Err(e) => tally.check(false, &format!("{what}: {e}")),
        }
        return;
    }
    let opts = GuestOpts::default();
    let mk_hv = || {
        qemu_command(qemu, image, Stage::File(&kernel, &opts)).map(|mut c| {
            c.args(["-icount", ICOUNT]);
            c
        })
    };
    let (bares, hvs) = match pairs(|| Ok(bare(&kernel, opts.vcpus)), mk_hv) {
        Ok(r) => r,
        Err(e) => return tally.check(false, &format!("Linux against bare QEMU: {e}")),
    };
    let ran = |r: &Run| r.code == 0 && r.out.contains(PASSED);
    if let Some((bare, hv)) = bares.iter().zip(&hvs).find(|(b, h)| !ran(b) || !ran(h)) {
        return tally.check(
            false,
            &format!(
                "Linux against bare QEMU: bare exit {}, twostage exit {} (init finished: {}, {})",
                bare.code,
                hv.code,
                bare.out.contains(PASSED),
                hv.out.contains(PASSED)
            ),
        );
    }
    let (bare, hv) = (&bares[0], &hvs[0]);
    let diffs = console_differences(&kernel_console(&bare.out), &kernel_console(&hv.out));
    for d in &diffs {
        println!("  console difference: {d}");
    }
    tally.check(
        diffs.is_empty(),
        &format!(
            "Linux console under twostage is bare QEMU's but for the {} documented lines (xtask/src/riscv_linux.rs), 1 vCPU, 128 MiB",
            MUST_DIFFER.len()
        ),
    );
    match (phase_ms(&bare.out), phase_ms(&hv.out)) {
        (Some(b), Some(h)) if b > 0 => {
            let insns = h as f64 / b as f64;
            let walls = |rs: &[Run]| median(rs.iter().map(|r| r.wall.as_secs_f64()).collect());
            let (hw, bw) = (walls(&hvs), walls(&bares));
            let wall = hw / bw;
            let verdict = |r: f64| if r <= TARGET_RATIO { "target met" } else { "target missed" };
            println!(
                "Linux cost (1 vCPU, -icount {ICOUNT}): init's phases {h} M instructions under twostage, {b} M bare: \
                 {insns:.2}x ({}, target {TARGET_RATIO}x); whole run wall (median of {PAIRS}) {hw:.2} s vs {bw:.2} s: \
                 {wall:.2}x ({})",
                verdict(insns),
                verdict(wall)
            );
            // Where the wall time went, from when each console line arrived (medians).
            let part = |from: Option<&str>, to: &str| {
                let t = |rs: &[Run]| {
                    median(
                        rs.iter()
                            .filter_map(|r| match from {
                                Some(f) => r.between(f, to),
                                None => r.time_of(to).map(|d| d.as_secs_f64()),
                            })
                            .collect(),
                    )
                };
                match (t(&hvs), t(&bares)) {
                    (h, b) if b > 0.0 && h.is_finite() => format!("{h:.2} s vs {b:.2} s ({:.2}x)", h / b),
                    _ => String::from("not seen"),
                }
            };
            println!(
                "  wall by phase, twostage vs bare: QEMU start, OpenSBI (and twostage's boot) to the kernel's banner \
                 {}; kernel boot to /init {}; init's checks {}",
                part(None, "Linux version"),
                part(Some("Linux version"), "Run /init"),
                part(Some("Run /init"), PASSED)
            );
        }
        _ => println!("Linux cost: init printed no phase timings"),
    }
    let per_exit = exit_cost(qemu, image, tally);
    let walls = |rs: &[Run]| median(rs.iter().map(|r| r.wall.as_secs_f64()).collect());
    if let (Some(per), Some(n)) = (per_exit, exit_count(&hv.out)) {
        let (est, diff) = (n as f64 * per, walls(&hvs) - walls(&bares));
        println!(
            "  the Linux run's {n} exits (the hypervisor's count) at the microbenchmark's {:.1} us per UART-read exit: \
             about {est:.2} s of the {diff:.2} s wall difference; the rest is not exits (twostage's boot, above, and QEMU's two-stage TLB fills)",
            per * 1e6
        );
    }
}

/// The hypervisor's exit count from its statistics (`exits by kind: ecall-vs=120 ... interrupts=49`).
pub fn exit_count(out: &str) -> Option<u64> {
    let line = out.lines().find_map(|l| l.strip_prefix("exits by kind:"))?;
    line.split_whitespace().map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse::<u64>().ok())).sum()
}

/// The cost model's microbenchmark: an S-mode program (no Linux) that times, with the `time`
/// CSR, an ALU loop, TLB fills, UART register reads and SBI calls, run on bare QEMU and as
/// twostage's guest. Each phase ends with `@X[ticks]` on the console (SBI legacy putchar): the
/// `time` ticks since the previous marker, in hex.
const EXIT_COST_ASM: &str = r#"
    .section .text
    .globl _start
_start:
    la sp, stack_top
    la t0, trap
    csrw stvec, t0
    li a0, 'A'
    call mark
    # Sv39 tables: gigapages for 0x0 (the UART) and 0x80000000 (RAM, this program), and 16 MiB
    # of 4 KiB pages at VA 0x40000000 -> PA 0x81000000 (root -> l1 -> eight l0 tables).
    la s0, root
    li t0, 0xcf
    sd t0, 0(s0)
    li t0, 0x80000
    slli t0, t0, 10
    ori t0, t0, 0xcf
    sd t0, 16(s0)
    la s1, l1
    srli t0, s1, 12
    slli t0, t0, 10
    ori t0, t0, 1
    sd t0, 8(s0)
    la s2, l0
    li t1, 0
1:  slli t2, t1, 12
    add t2, t2, s2
    srli t0, t2, 12
    slli t0, t0, 10
    ori t0, t0, 1
    slli t3, t1, 3
    add t3, t3, s1
    sd t0, 0(t3)
    addi t1, t1, 1
    li t4, 8
    blt t1, t4, 1b
    li t1, 0
    li t5, 0x81000
2:  add t0, t5, t1
    slli t0, t0, 10
    ori t0, t0, 0xcf
    slli t3, t1, 3
    add t3, t3, s2
    sd t0, 0(t3)
    addi t1, t1, 1
    li t4, 4096
    blt t1, t4, 2b
    srli t0, s0, 12
    li t1, 8
    slli t1, t1, 60
    or t0, t0, t1
    csrw satp, t0
    sfence.vma
    # Touch every test page once (a hypervisor maps RAM on first touch).
    li s3, 0x40000000
    li t1, 4096
3:  sd zero, 0(s3)
    li t2, 4096
    add s3, s3, t2
    addi t1, t1, -1
    bnez t1, 3b
    li a0, 'B'
    call mark
    # ALU: 100 M iterations of two instructions.
    li t1, 100000000
4:  addi t1, t1, -1
    bnez t1, 4b
    li a0, 'C'
    call mark
    # TLB fills: 200 passes of sfence.vma and one load from each of the 4096 pages.
    li s4, 200
5:  sfence.vma
    li s3, 0x40000000
    li t1, 4096
6:  ld t0, 0(s3)
    li t2, 4096
    add s3, s3, t2
    addi t1, t1, -1
    bnez t1, 6b
    addi s4, s4, -1
    bnez s4, 5b
    li a0, 'D'
    call mark
    # 20000 reads of the UART's line status register.
    li s3, 0x10000005
    li t1, 20000
7:  lb t0, 0(s3)
    addi t1, t1, -1
    bnez t1, 7b
    li a0, 'E'
    call mark
    # 20000 SBI calls (base extension, get_spec_version).
    li s5, 20000
8:  li a7, 0x10
    li a6, 0
    ecall
    addi s5, s5, -1
    bnez s5, 8b
    li a0, 'F'
    call mark
    li a0, 10
    call putc
    # SBI SRST: shutdown.
    li a7, 0x53525354
    li a6, 0
    li a0, 0
    li a1, 0
    ecall
9:  j 9b
putc:
    li a7, 1
    ecall
    ret
# '@', the letter in a0, then '[', the time ticks since the last mark in hex, ']'.
mark:
    mv s6, ra
    mv s7, a0
    li a0, '@'
    call putc
    mv a0, s7
    call putc
    rdtime t0
    la t1, last
    ld t2, 0(t1)
    sd t0, 0(t1)
    sub s8, t0, t2
    li a0, '['
    call putc
    li s9, 60
1:  srl t5, s8, s9
    andi t5, t5, 15
    addi a0, t5, '0'
    li t2, 10
    blt t5, t2, 2f
    addi a0, a0, 39
2:  call putc
    addi s9, s9, -4
    bgez s9, 1b
    li a0, ']'
    call putc
    mv ra, s6
    ret
# Any trap: '!' and a failing shutdown.
trap:
    li a0, '!'
    call putc
    li a7, 0x53525354
    li a6, 0
    li a0, 0
    li a1, 1
    ecall
    j trap
    .section .data
    .balign 8
last: .dword 0
    .section .bss
    .balign 4096
root: .space 4096
l1:   .space 4096
l0:   .space 8 * 4096
    .space 16384
stack_top:
"#;

/// Its link script: loaded and entered at 0x80200000 (OpenSBI's and twostage's S-mode entry).
const EXIT_COST_LD: &str =
    "ENTRY(_start)\nSECTIONS { . = 0x80200000; .text : { *(.text*) } .data : { *(.data* .sdata*) } \
     .bss : ALIGN(4096) { *(.bss* .sbss*) } /DISCARD/ : { *(.note*) *(.riscv.attributes) } }\n";

/// Iterations of the UART and SBI loops, and TLB fills, of [`EXIT_COST_ASM`].
const EXITS: f64 = 20_000.0;
const FILLS: f64 = 200.0 * 4096.0;
/// QEMU virt's timebase (10 MHz); under `-icount shift=0` one tick is 100 instructions.
const INSNS_PER_TICK: f64 = 100.0;
/// The most instructions the hypervisor may spend on one emulated UART register read (exit,
/// decode, device, entry). 2208 before the PLIC's claim search went a word at a time; 1172 after.
const MAX_UART_READ_INSNS: f64 = 1500.0;

/// The `@X[ticks]` markers of a run: per phase B..F, (ticks, host seconds since the previous one).
fn exit_cost_phases(r: &Run) -> Option<Vec<(f64, f64)>> {
    let mut prev = r.time_of("@A[")?;
    let mut out = Vec::new();
    for m in ["@B[", "@C[", "@D[", "@E[", "@F["] {
        let at = r.out.find(m)? + m.len();
        let ticks = u64::from_str_radix(r.out.get(at..at + 16)?, 16).ok()? as f64;
        let t = r.time_of(m)?;
        out.push((ticks, t.as_secs_f64() - prev.as_secs_f64()));
        prev = t;
    }
    Some(out)
}

/// Builds [`EXIT_COST_ASM`] next to the hypervisor's image.
fn build_exit_cost(image: &Path) -> Result<std::path::PathBuf, String> {
    let dir = image.parent().ok_or("image has no directory")?;
    let (src, ld, elf) = (dir.join("exit-cost.S"), dir.join("exit-cost.ld"), dir.join("exit-cost.elf"));
    std::fs::write(&src, EXIT_COST_ASM).map_err(|e| format!("{}: {e}", src.display()))?;
    std::fs::write(&ld, EXIT_COST_LD).map_err(|e| format!("{}: {e}", ld.display()))?;
    let st = Command::new("riscv64-linux-gnu-gcc")
        .args(["-march=rv64gc", "-mabi=lp64d", "-nostdlib", "-static", "-Wl,--no-relax", "-Wl,--build-id=none"])
        .args(["-Wl,--no-warn-rwx-segments", "-o"])
        .arg(&elf)
        .arg(format!("-Wl,-T,{}", ld.display()))
        .arg(&src)
        .status()
        .map_err(|e| format!("riscv64-linux-gnu-gcc: {e}"))?;
    if !st.success() {
        return Err(format!("riscv64-linux-gnu-gcc failed on {}", src.display()));
    }
    Ok(elf)
}

/// Runs the microbenchmark bare and under twostage (`-icount`): prints what one operation costs
/// QEMU in each case (the two-stage translation's share of the Linux run's wall time), and
/// checks the hypervisor's instructions per emulated UART read.
/// Returns the wall time of one UART-read exit under twostage, less QEMU's own UART read.
fn exit_cost(qemu: &Qemu, image: &Path, tally: &mut SuiteResult) -> Option<f64> {
    let what = "an emulated UART register read (an MMIO exit) costs the hypervisor";
    let elf = match build_exit_cost(image) {
        Ok(e) => e,
        Err(e) => {
            tally.check(false, &format!("{what}: {e}"));
            return None;
        }
    };
    let opts = GuestOpts::default();
    let mk_hv = || {
        qemu_command(qemu, image, Stage::File(&elf, &opts)).map(|mut c| {
            c.args(["-icount", ICOUNT]);
            c
        })
    };
    let (bares, hvs) = match pairs(|| Ok(bare(&elf, 1)), mk_hv) {
        Ok(r) => r,
        Err(e) => {
            tally.check(false, &format!("{what}: {e}"));
            return None;
        }
    };
    let phases = |rs: &[Run]| rs.iter().map(exit_cost_phases).collect::<Option<Vec<_>>>();
    let (Some(bp), Some(hp)) = (phases(&bares), phases(&hvs)) else {
        tally.check(
            false,
            &format!(
                "{what}: the microbenchmark printed no timings (bare exit {}, twostage exit {})",
                bares[0].code, hvs[0].code
            ),
        );
        return None;
    };
    // Per phase: the first run's ticks (the same in every run under -icount), the median seconds.
    let med = |ps: &[Vec<(f64, f64)>]| -> Vec<(f64, f64)> {
        (0..ps[0].len()).map(|i| (ps[0][i].0, median(ps.iter().map(|p| p[i].1).collect()))).collect()
    };
    let (b, h) = (med(&bp), med(&hp));
    let (bare, hv) = (&bares[0], &hvs[0]);
    // Phases: [1] ALU, [2] TLB fills, [3] UART reads, [4] SBI calls.
    let per = |(_, s): (f64, f64), n: f64, unit: f64| s / n * unit;
    println!(
        "QEMU's cost per operation, bare vs under twostage (S-mode microbenchmark, -icount {ICOUNT}, median of {PAIRS}): \
         ALU loop of 200 M instructions {:.2} s vs {:.2} s; TLB fill (4 KiB Sv39 page; under twostage \
         the G-stage walk too) {:.0} ns vs {:.0} ns; UART register read {:.2} us vs {:.2} us (an exit); \
         SBI call {:.2} us vs {:.2} us (an exit)",
        b[1].1,
        h[1].1,
        per(b[2], FILLS, 1e9),
        per(h[2], FILLS, 1e9),
        per(b[3], EXITS, 1e6),
        per(h[3], EXITS, 1e6),
        per(b[4], EXITS, 1e6),
        per(h[4], EXITS, 1e6),
    );
    // Instructions per operation (bare: the loop's own, and OpenSBI's for an SBI call).
    let insns = |r: &[(f64, f64)], p: usize| r[p].0 * INSNS_PER_TICK / EXITS;
    let uart = insns(&h, 3) - insns(&b, 3);
    println!(
        "  instructions per operation, bare vs under twostage: UART read {:.0} vs {:.0}, SBI call {:.0} vs {:.0} \
         (the wall time of an exit is mostly QEMU's: it flushes its whole TLB on every change of virtualization mode)",
        insns(&b, 3),
        insns(&h, 3),
        insns(&b, 4),
        insns(&h, 4)
    );
    tally.check(
        bare.code == 0 && hv.code == 0 && uart <= MAX_UART_READ_INSNS,
        &format!("{what} {uart:.0} instructions (at most {MAX_UART_READ_INSNS})"),
    );
    Some(per(h[3], EXITS, 1.0) - per(b[3], EXITS, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BARE: &[&str] = &[
        "Linux version 6.1",
        "SBI specification v1.0 detected",
        "SBI implementation ID=0x1 Version=0x10001",
        "SBI IPI extension detected",
        "riscv: base ISA extensions acdfhim",
        "Memory: 124468K/129024K available",
        "Run /init as init process",
    ];
    const HV: &[&str] = &[
        "Linux version 6.1",
        "SBI specification v2.0 detected",
        "SBI implementation ID=0x7473 Version=0x1",
        "SBI IPI extension detected",
        "riscv: base ISA extensions acdfim",
        "Memory: 124476K/129024K available",
        "Run /init as init process",
    ];

    #[test]
    fn only_listed_lines_may_differ() {
        assert!(console_differences(BARE, HV).is_empty());
        // A missing line is seen.
        let hv: Vec<&str> = HV.iter().copied().filter(|l| !l.contains("IPI")).collect();
        assert!(console_differences(BARE, &hv)[0].contains("SBI IPI"));
        // Any other changed or added line is seen.
        let mut hv = HV.to_vec();
        hv[6] = "Run /sbin/init as init process";
        assert!(console_differences(BARE, &hv)[0].contains("/sbin/init"));
        let mut hv = HV.to_vec();
        hv.push("extra");
        assert!(console_differences(BARE, &hv)[0].contains("extra"));
        // An allowed line that vanished on one side is a difference.
        let hv: Vec<&str> = HV.iter().copied().filter(|l| !l.starts_with("Memory:")).collect();
        assert!(console_differences(BARE, &hv).iter().any(|d| d.contains("Memory")));
    }

    #[test]
    fn phase_timings_are_summed() {
        let out = "x\ntwostage-linux: times: fill 213 ms, cow 96 ms, threads 26 ms, shootdown 7 ms, churn 94 ms\n";
        assert_eq!(phase_ms(out), Some(436));
        assert_eq!(phase_ms("twostage-linux: times: fill x ms"), None);
        assert_eq!(phase_ms("nothing"), None);
    }

    #[test]
    fn exits_are_summed_from_the_statistics() {
        let out = "x\nexits by kind: ecall-vs=120 load-guest-page=3817 store-guest-page=4457 interrupts=49\n";
        assert_eq!(exit_count(out), Some(8443));
        assert_eq!(exit_count("exits by kind: ecall-vs=x"), None);
        assert_eq!(exit_count("nothing"), None);
    }

    #[test]
    fn the_kernel_console_is_banner_to_power_off() {
        let out = "OpenSBI v1.1\nLinux version 6.1\nmiddle\nreboot: Power down\nguest reset: type 0\n";
        assert_eq!(kernel_console(out), ["Linux version 6.1", "middle"]);
    }
}
