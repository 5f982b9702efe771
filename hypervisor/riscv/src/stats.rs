//! What the run loop and the memory subsystem counted, and the report printed from it.

use crate::hart::frames;
use crate::vm::Vm;
use twostage_npt::{GuestPhysAddr, PageSize};
use twostage_rvh::csr::cause;

/// Counts of what the memory subsystem and the run loop did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Exits by scause (exceptions 0..24; interrupts are counted in `irq_exits`).
    pub exits: [u32; 24],
    /// Interrupt exits.
    pub irq_exits: u32,
    /// Guest-page faults resolved by mapping a zero page.
    pub demand_zero: u32,
    /// Guest-page faults the address space resolved (demand-zero, copy-on-write, dirty log).
    pub space_resolved: u32,
    /// Guest-page faults passed back to the VM's owner.
    pub faults_unresolved: u32,
    /// Copy-on-write breaks.
    pub cow_breaks: u32,
    /// Emulated MMIO reads.
    pub mmio_reads: u32,
    /// Emulated MMIO writes.
    pub mmio_writes: u32,
    /// HFENCE.GVMA by address issued.
    pub gvma_addr: u32,
    /// HFENCE.GVMA by VMID issued.
    pub gvma_vmid: u32,
    /// SBI calls served.
    pub sbi_calls: u32,
    /// Virtual timer interrupts injected.
    pub timer_injections: u32,
    /// Exceptions handed back to the guest ([`Vm::reflect`]).
    pub reflected: u32,
    /// Exits after which the guest's FP registers were dirty and saved.
    pub fp_saves: u32,
    /// Exits taken while the guest ran in VU-mode (its user space).
    pub user_exits: u32,
}

impl Vm {
    /// Leaves by page size: (4K, 2M, 1G).
    pub fn leaves_by_size(&self) -> (usize, usize, usize) {
        let mut n = (0, 0, 0);
        self.with_table(|t| {
            t.for_each_leaf(GuestPhysAddr::ZERO, 1 << 41, |l| match l.size {
                PageSize::Size4K => n.0 += 1,
                PageSize::Size2M => n.1 += 1,
                _ => n.2 += 1,
            })
        });
        n
    }

    /// Prints the statistics block (after any waiting note, [`crate::notes`]).
    pub fn print_stats(&self, label: &str) {
        crate::notes::flush();
        let _ = self.write_stats(&mut crate::console::Console, label);
    }

    /// Writes the statistics block to `w`.
    pub fn write_stats(&self, w: &mut dyn core::fmt::Write, label: &str) -> core::fmt::Result {
        let s = &self.stats;
        writeln!(w, "== memory subsystem report ({label})")?;
        write!(w, "exits by kind:")?;
        for (c, n) in s.exits.iter().enumerate() {
            if *n > 0 {
                write!(w, " {}={}", cause::name(c as u64), n)?;
            }
        }
        writeln!(w, " interrupts={}", s.irq_exits)?;
        let (p4, p2, p1) = self.leaves_by_size();
        writeln!(
            w,
            "pages mapped now: 4K={p4} 2M={p2} 1G={p1} (table frames {})",
            self.with_table(|t| t.table_frames())
        )?;
        writeln!(
            w,
            "faults resolved: by the address space={} by demand-zero mapping={} unresolved={}; copy-on-write breaks={}",
            s.space_resolved, s.demand_zero, s.faults_unresolved, s.cow_breaks
        )?;
        writeln!(w, "MMIO accesses: reads={} writes={}", s.mmio_reads, s.mmio_writes)?;
        writeln!(w, "flushes issued: hfence.gvma by address={} by VMID={}", s.gvma_addr, s.gvma_vmid)?;
        // What the hardware path costs (issue 6): guest-page exits that were not MMIO, per page
        // now mapped; fences per fault the memory subsystem resolved.
        let gpf = s.exits[20] + s.exits[21] + s.exits[23];
        let touched = (gpf.saturating_sub(s.mmio_reads + s.mmio_writes)) as f64;
        let pages = (p4 + 512 * p2 + 512 * 512 * p1).max(1) as f64;
        // Issue 11: huge-page backing cuts the faults per MiB first touched (256 per MiB
        // with 4 KiB pages, one per 2 MiB page with huge ones): nested page faults that were not MMIO, against the memory mapped now.
        let mib = (p4 as u64 * 4096 + p2 as u64 * (2 << 20) + p1 as u64 * (1 << 30)) >> 20;
        writeln!(
            w,
            "nested page faults: {} for {mib} MiB touched (MMIO exits apart: {})",
            touched as u64,
            s.mmio_reads + s.mmio_writes
        )?;
        let changes = (s.space_resolved + s.demand_zero).max(1) as f64;
        writeln!(
            w,
            "hardware path cost: {:.2} guest-page exits per 4 KiB page first touched; {:.2} HFENCE.GVMA per resolved fault",
            touched / pages,
            f64::from(s.gvma_addr + s.gvma_vmid) / changes
        )?;
        writeln!(w, "SBI calls={} virtual timer interrupts={}", s.sbi_calls, s.timer_injections)?;
        writeln!(
            w,
            "vCPU: exceptions handed to the guest={} FP register saves (FS dirty)={} exits from VU-mode={}",
            s.reflected, s.fp_saves, s.user_exits
        )?;
        let heap = (crate::board().heap_stats)();
        let fs = frames().stats();
        writeln!(
            w,
            "host frames in use={} high water={} ({} allocations, {:.1} bitmap words searched each); heap in use={} KiB of {} KiB claimed",
            fs.in_use,
            fs.high_water,
            fs.allocations,
            fs.words_searched as f64 / fs.allocations.max(1) as f64,
            heap.in_use >> 10,
            heap.claimed >> 10
        )?;
        if let Some(space) = self.space() {
            let st = space.stats();
            writeln!(
                w,
                "address space: frames allocated={} cow copies={} cow reuses={} faults resolved={}",
                st.frames_allocated, st.cow_copies, st.cow_reuses, st.faults_resolved
            )?;
            writeln!(
                w,
                "huge pages: 2M mapped={} 1G mapped={} fallbacks to 4K (no aligned run)={} split={} collapsed={}",
                st.huge_2m_mapped, st.huge_1g_mapped, st.huge_fallbacks, st.huge_splits, st.huge_collapses
            )?;
            write!(w, "{space}")?;
        }
        Ok(())
    }
}
