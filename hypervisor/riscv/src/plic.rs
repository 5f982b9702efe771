//! The emulated PLIC: QEMU virt's platform-level interrupt controller as the guest sees it.
//!
//! Plain code with host tests. Register layout from the RISC-V Platform-Level Interrupt
//! Controller Specification ("Memory Map", "Interrupt Priorities", "Interrupt Pending Bits",
//! "Interrupt Enables", "Priority Thresholds", "Interrupt Claim Process", "Interrupt Completion")
//! with QEMU virt's numbers: priority of source `id` at `4 * id`, pending bits at `0x1000`, the
//! enable bits of context `c` at `0x2000 + 0x80 * c`, threshold and claim/complete of context `c`
//! at `0x20_0000 + 0x1000 * c` and `+ 4`. Contexts come two per hart as QEMU virt numbers them
//! (and as the device tree's `interrupts-extended` says): `2 * hart` is the hart's M-mode context,
//! `2 * hart + 1` its S-mode context. A guest runs in (V)S-mode only, so its M-mode contexts read
//! 0 and ignore writes.
//!
//! Sources are level-triggered (the gateway of the spec's "Interrupt Gateways"): a source whose
//! line is high is pending until claimed; claiming clears the pending bit, and the source sends
//! no new request until its completion, after which a line still high makes it pending again. A
//! line that drops before the claim takes its pending bit with it (as QEMU's model does), so a
//! device that withdraws its request leaves no spurious claim behind.

use twostage_rvh::insn::{self, MemAccess, MemOp};

/// Interrupt IDs 0..`SOURCES`: sources 1..=riscv,ndev exist (96 on QEMU virt), ID 0 means "none".
pub const SOURCES: usize = crate::boot::PLIC_NDEV as usize + 1;
const WORDS: usize = SOURCES.div_ceil(32);
/// Priorities are 3 bits wide on QEMU virt (WARL: the higher bits read 0).
const PRIORITY_MASK: u32 = 7;

const PENDING: u64 = 0x1000;
const ENABLE: u64 = 0x2000;
const ENABLE_STRIDE: u64 = 0x80;
const CONTEXT: u64 = 0x20_0000;
const CONTEXT_STRIDE: u64 = 0x1000;

/// A PLIC for `harts` harts (contexts `0..2 * harts`).
#[derive(Clone, Debug)]
pub struct Plic {
    priority: [u32; SOURCES],
    /// The device lines, as the devices last set them.
    level: [u32; WORDS],
    pending: [u32; WORDS],
    /// Claimed and not yet completed: no new request until completion.
    claimed: [u32; WORDS],
    /// Enable bits and threshold of each hart's S-mode context.
    enable: alloc::vec::Vec<[u32; WORDS]>,
    threshold: alloc::vec::Vec<u32>,
}

fn bit(words: &[u32; WORDS], id: usize) -> bool {
    words[id / 32] >> (id % 32) & 1 == 1
}

fn put(words: &mut [u32; WORDS], id: usize, on: bool) {
    let m = 1 << (id % 32);
    if on {
        words[id / 32] |= m;
    } else {
        words[id / 32] &= !m;
    }
}

impl Plic {
    /// A PLIC with every source at priority 0 (never interrupts), nothing enabled, thresholds 0.
    pub fn new(harts: usize) -> Self {
        Self {
            priority: [0; SOURCES],
            level: [0; WORDS],
            pending: [0; WORDS],
            claimed: [0; WORDS],
            enable: alloc::vec![[0; WORDS]; harts],
            threshold: alloc::vec![0; harts],
        }
    }

    /// The S-mode context of `hart`.
    pub fn s_context(hart: usize) -> usize {
        2 * hart + 1
    }

    /// The hart whose S-mode context `ctx` is; `None` for M-mode contexts and absent ones.
    fn s_hart(&self, ctx: u64) -> Option<usize> {
        let hart = usize::try_from(ctx / 2).ok()?;
        (ctx % 2 == 1 && hart < self.enable.len()).then_some(hart)
    }

    /// A device sets the line of source `id` (out-of-range IDs and source 0 are ignored).
    pub fn set_level(&mut self, id: usize, high: bool) {
        if id == 0 || id >= SOURCES {
            return;
        }
        put(&mut self.level, id, high);
        if !high {
            put(&mut self.pending, id, false);
        } else if !bit(&self.claimed, id) {
            put(&mut self.pending, id, true);
        }
    }

    /// Whether source `id` is pending (its bit in the pending array).
    pub fn is_pending(&self, id: usize) -> bool {
        id < SOURCES && bit(&self.pending, id)
    }

    /// The source a claim by `hart`'s S-mode context would return: the pending, enabled source of
    /// highest priority above the threshold, the lowest ID among equals; 0 when none.
    pub fn best(&self, hart: usize) -> usize {
        let (Some(en), Some(&th)) = (self.enable.get(hart), self.threshold.get(hart)) else { return 0 };
        let mut best = (0, 0);
        // A word at a time, looking only at the sources both pending and enabled (the
        // hypervisor asks after every emulated UART or PLIC access: a per-source scan of all
        // `SOURCES` was most of the instructions of an MMIO exit). Ascending IDs with a strict
        // `>` keep the lowest ID among equal priorities.
        for (w, (&p, &e)) in self.pending.iter().zip(en.iter()).enumerate() {
            let mut both = p & e;
            while both != 0 {
                let id = w * 32 + both.trailing_zeros() as usize;
                both &= both - 1;
                let Some(&prio) = self.priority.get(id).filter(|_| id != 0) else { continue };
                if prio > th && prio > best.1 {
                    best = (id, prio);
                }
            }
        }
        best.0
    }

    /// The interrupt output of `hart`'s S-mode context: something claimable ("Interrupt
    /// Notifications"). The hypervisor turns it into hvip.VSEIP.
    pub fn s_output(&self, hart: usize) -> bool {
        self.best(hart) != 0
    }

    fn claim(&mut self, hart: usize) -> u32 {
        let id = self.best(hart);
        if id != 0 {
            put(&mut self.pending, id, false);
            put(&mut self.claimed, id, true);
        }
        id as u32
    }

    fn complete(&mut self, hart: usize, id: u32) {
        let id = id as usize;
        // "Interrupt Completion": an ID not enabled for the context is silently ignored.
        if id == 0 || id >= SOURCES || !bit(&self.enable[hart], id) {
            return;
        }
        put(&mut self.claimed, id, false);
        if bit(&self.level, id) {
            put(&mut self.pending, id, true);
        }
    }

    /// A 32-bit read of the register at `offset` in the PLIC window (a claim has its effect).
    pub fn read(&mut self, offset: u64) -> u32 {
        match offset {
            0..PENDING => self.priority.get((offset / 4) as usize).copied().unwrap_or(0),
            PENDING..ENABLE => self.pending.get(((offset - PENDING) / 4) as usize).copied().unwrap_or(0),
            ENABLE..CONTEXT => {
                let (ctx, word) = ((offset - ENABLE) / ENABLE_STRIDE, (offset - ENABLE) % ENABLE_STRIDE / 4);
                match self.s_hart(ctx) {
                    Some(h) => self.enable[h].get(word as usize).copied().unwrap_or(0),
                    None => 0,
                }
            }
            _ => {
                let (ctx, reg) = ((offset - CONTEXT) / CONTEXT_STRIDE, (offset - CONTEXT) % CONTEXT_STRIDE);
                match (self.s_hart(ctx), reg) {
                    (Some(h), 0) => self.threshold[h],
                    (Some(h), 4) => self.claim(h),
                    _ => 0,
                }
            }
        }
    }

    /// A 32-bit write of `value` to the register at `offset`.
    pub fn write(&mut self, offset: u64, value: u32) {
        match offset {
            0..PENDING => {
                if let Some(p) = self.priority.get_mut((offset / 4) as usize).filter(|_| offset >= 4) {
                    *p = value & PRIORITY_MASK;
                }
            }
            // The pending bits are read-only.
            PENDING..ENABLE => {}
            ENABLE..CONTEXT => {
                let (ctx, word) = ((offset - ENABLE) / ENABLE_STRIDE, (offset - ENABLE) % ENABLE_STRIDE / 4);
                if let Some(w) = self.s_hart(ctx).and_then(|h| self.enable[h].get_mut(word as usize)) {
                    // Source 0 does not exist: its enable bit is hardwired to 0.
                    *w = if word == 0 { value & !1 } else { value };
                }
            }
            _ => {
                let (ctx, reg) = ((offset - CONTEXT) / CONTEXT_STRIDE, (offset - CONTEXT) % CONTEXT_STRIDE);
                match (self.s_hart(ctx), reg) {
                    (Some(h), 0) => self.threshold[h] = value & PRIORITY_MASK,
                    (Some(h), 4) => self.complete(h, value),
                    _ => {}
                }
            }
        }
    }
}

/// Carries out a decoded access against `plic` at `offset` in its window: registers are 32 bits;
/// an 8-byte access covers two neighbouring registers (low one first), a narrower one reads or
/// writes the low bytes of its register. A store's data comes from `regs[rs2]`; a load's result is
/// extended and written to `regs[rd]` (x0 stays 0).
pub fn emulate_plic(plic: &mut Plic, offset: u64, m: MemAccess, regs: &mut [u64; 32]) {
    let reg = offset & !3;
    match m.op {
        MemOp::Store { rs2 } => {
            let v = regs[rs2 as usize];
            plic.write(reg, v as u32);
            if m.width == 8 {
                plic.write(reg + 4, (v >> 32) as u32);
            }
        }
        MemOp::Load { rd, signed } => {
            let mut v = u64::from(plic.read(reg));
            if m.width == 8 {
                v |= u64::from(plic.read(reg + 4)) << 32;
            } else {
                v >>= (offset & 3) * 8;
            }
            if rd != 0 {
                regs[rd as usize] = insn::extend_loaded(v, m.width, signed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S0: u64 = 1; // hart 0's S-mode context
    fn enable_at(ctx: u64) -> u64 {
        ENABLE + ENABLE_STRIDE * ctx
    }
    fn claim_at(ctx: u64) -> u64 {
        CONTEXT + CONTEXT_STRIDE * ctx + 4
    }

    #[test]
    fn claim_takes_the_highest_priority_above_threshold_and_complete_rearms() {
        let mut p = Plic::new(1);
        p.write(4 * 10, 1);
        p.write(4 * 33, 5);
        p.write(enable_at(S0), 1 << 10);
        p.write(enable_at(S0) + 4, 1 << 1); // source 33
        p.set_level(10, true);
        p.set_level(33, true);
        assert_eq!(p.read(PENDING), 1 << 10);
        assert_eq!(p.read(PENDING + 4), 1 << 1);
        assert!(p.s_output(0));
        assert_eq!(p.read(claim_at(S0)), 33, "the higher priority first");
        assert!(!p.is_pending(33));
        assert_eq!(p.read(claim_at(S0)), 10);
        assert_eq!(p.read(claim_at(S0)), 0, "nothing left to claim");
        assert!(!p.s_output(0), "claimed sources do not interrupt");
        // Still high at completion: pending again.
        p.write(claim_at(S0), 33);
        assert!(p.is_pending(33) && p.s_output(0));
        // Low at completion: stays quiet.
        p.set_level(10, false);
        p.write(claim_at(S0), 10);
        assert!(!p.is_pending(10));
        // Threshold: priority must exceed it.
        p.write(CONTEXT + CONTEXT_STRIDE * S0, 5);
        assert_eq!(p.read(CONTEXT + CONTEXT_STRIDE * S0), 5);
        assert!(!p.s_output(0));
        assert_eq!(p.read(claim_at(S0)), 0);
        p.write(CONTEXT + CONTEXT_STRIDE * S0, 4);
        assert_eq!(p.read(claim_at(S0)), 33);
    }

    #[test]
    fn ties_go_to_the_lowest_id_and_priority_zero_never_interrupts() {
        let mut p = Plic::new(1);
        p.write(enable_at(S0), u32::MAX);
        for id in [3, 7] {
            p.write(4 * id, 2);
            p.set_level(id as usize, true);
        }
        p.set_level(5, true); // priority 0
        assert_eq!(p.read(claim_at(S0)), 3);
        assert_eq!(p.read(claim_at(S0)), 7);
        assert_eq!(p.read(claim_at(S0)), 0);
        assert!(p.is_pending(5));
        assert_eq!(p.read(enable_at(S0)), !1, "source 0 has no enable bit");
    }

    #[test]
    fn a_dropped_line_leaves_no_claim_and_disabled_sources_do_not_interrupt() {
        let mut p = Plic::new(1);
        p.write(4 * 10, 1);
        p.set_level(10, true);
        assert!(!p.s_output(0), "not enabled");
        p.write(enable_at(S0), 1 << 10);
        assert!(p.s_output(0));
        p.set_level(10, false);
        assert!(!p.s_output(0));
        assert_eq!(p.read(claim_at(S0)), 0);
        // Completing a source not enabled for the context is ignored: it stays claimed.
        p.set_level(10, true);
        assert_eq!(p.read(claim_at(S0)), 10);
        p.write(enable_at(S0), 0);
        p.write(claim_at(S0), 10);
        p.write(enable_at(S0), 1 << 10);
        assert!(!p.s_output(0), "still claimed");
        p.write(claim_at(S0), 10);
        assert!(p.s_output(0));
    }

    #[test]
    fn m_contexts_and_absent_ones_read_zero_and_ignore_writes() {
        let mut p = Plic::new(2);
        p.write(4, 7); // source 1
        p.set_level(1, true);
        for ctx in [0, 2, 4, 5, 1000] {
            p.write(enable_at(ctx), u32::MAX);
            assert_eq!(p.read(enable_at(ctx)), 0);
            p.write(CONTEXT + CONTEXT_STRIDE * ctx, 3);
            assert_eq!(p.read(CONTEXT + CONTEXT_STRIDE * ctx), 0);
            assert_eq!(p.read(claim_at(ctx)), 0);
        }
        assert!(!p.s_output(0) && !p.s_output(1));
        // Hart 1's S context is context 3.
        p.write(enable_at(3), 1 << 1);
        assert!(p.s_output(1) && !p.s_output(0));
        assert_eq!(p.read(claim_at(3)), 1);
        // Priorities are 3 bits; source 0 has none; the pending array ignores writes.
        p.write(4 * 2, 0xff);
        assert_eq!(p.read(4 * 2), 7);
        p.write(0, 5);
        assert_eq!(p.read(0), 0);
        p.write(PENDING, u32::MAX);
        assert_eq!(p.read(PENDING), 0);
        assert_eq!(p.read(4 * SOURCES as u64), 0, "past the last source");
    }

    #[test]
    fn decoded_accesses_reach_the_registers() {
        let mut p = Plic::new(1);
        let mut regs = [0u64; 32];
        let sw = MemAccess { op: MemOp::Store { rs2: 5 }, width: 4, insn_len: 4 };
        let lw = |rd| MemAccess { op: MemOp::Load { rd, signed: true }, width: 4, insn_len: 4 };
        regs[5] = 1;
        emulate_plic(&mut p, 4 * UART, sw, &mut regs);
        regs[5] = 1 << UART;
        emulate_plic(&mut p, enable_at(S0), sw, &mut regs);
        p.set_level(UART as usize, true);
        emulate_plic(&mut p, claim_at(S0), lw(6), &mut regs);
        assert_eq!(regs[6], UART);
        regs[5] = UART;
        emulate_plic(&mut p, claim_at(S0), sw, &mut regs);
        assert!(p.s_output(0), "completed while the line is still high");
        // A doubleword covers two registers; x0 stays 0.
        let ld = MemAccess { op: MemOp::Load { rd: 7, signed: false }, width: 8, insn_len: 4 };
        emulate_plic(&mut p, enable_at(S0), ld, &mut regs);
        assert_eq!(regs[7], 1 << UART);
        emulate_plic(&mut p, 4 * UART, lw(0), &mut regs);
        assert_eq!(regs[0], 0);
    }

    const UART: u64 = 10;

    /// The claim rule read straight off the spec, one source at a time.
    fn best_by_definition(p: &Plic, hart: usize) -> usize {
        let mut best = (0, 0);
        for id in 1..SOURCES {
            let prio = p.priority[id];
            if bit(&p.pending, id) && bit(&p.enable[hart], id) && prio > p.threshold[hart] && prio > best.1 {
                best = (id, prio);
            }
        }
        best.0
    }

    #[test]
    fn the_word_scan_claims_what_the_per_source_rule_does() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut p = Plic::new(2);
            // A few sources with random priorities, levels and enables (sparse, as on a real
            // machine, and sometimes dense), random thresholds.
            let dense = rnd() % 4 == 0;
            for id in 1..SOURCES {
                if dense || rnd() % 16 == 0 {
                    p.write(4 * id as u64, rnd() as u32);
                    p.set_level(id, rnd() % 2 == 0);
                    for ctx in [1, 3] {
                        let w = enable_at(ctx) + 4 * (id / 32) as u64;
                        let on = rnd() % 3 != 0;
                        let v = p.read(w) & !(1 << (id % 32)) | u32::from(on) << (id % 32);
                        p.write(w, v);
                    }
                }
            }
            p.write(CONTEXT + CONTEXT_STRIDE, rnd() as u32);
            p.write(CONTEXT + CONTEXT_STRIDE * 3, rnd() as u32);
            for hart in 0..2 {
                assert_eq!(p.best(hart), best_by_definition(&p, hart));
            }
        }
    }
}
