//! The exception table: which hypervisor instructions may fault, where to resume, what faulted.
//!
//! Each hlv/hsv/hlvx wrapper in `hw` emits an entry `(instruction address, fixup
//! address)` into the `.rvh_extable` section. When such an instruction traps into HS-mode, the
//! trap handler calls [`fixup_trap`]: it finds sepc in the table, records scause/stval/htval in
//! a [`FaultSlot`] and returns the fixup address, which the handler writes to sepc before SRET.
//! The wrapper's fixup path then takes the recorded fault and returns it as a typed error.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One table entry, as laid out by the `.dword 1b, 2b` pairs in the wrappers' assembly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ExTableEntry {
    /// Address of the instruction that may fault.
    pub insn: usize,
    /// Where to resume when it does.
    pub fixup: usize,
}

/// A fault recorded by the trap handler for a wrapper to pick up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HwFault {
    /// scause at the trap (Privileged 1.12 §4.1.9).
    pub scause: u64,
    /// stval at the trap: the guest virtual address for HLV/HSV/HLVX faults (§4.1.10, §8.2.1 GVA).
    pub stval: u64,
    /// htval at the trap: GPA >> 2 for guest-page faults, else 0 (§8.2.8).
    pub htval: u64,
}

/// Where the trap handler leaves the last recovered fault (one per hart; the image has one hart).
#[derive(Debug)]
pub struct FaultSlot {
    pending: AtomicBool,
    scause: AtomicU64,
    stval: AtomicU64,
    htval: AtomicU64,
}

impl FaultSlot {
    /// An empty slot.
    pub const fn new() -> Self {
        Self {
            pending: AtomicBool::new(false),
            scause: AtomicU64::new(0),
            stval: AtomicU64::new(0),
            htval: AtomicU64::new(0),
        }
    }

    /// Stores a fault (called from the trap handler).
    pub fn record(&self, f: HwFault) {
        self.scause.store(f.scause, Ordering::Relaxed);
        self.stval.store(f.stval, Ordering::Relaxed);
        self.htval.store(f.htval, Ordering::Relaxed);
        self.pending.store(true, Ordering::Release);
    }

    /// Takes the recorded fault, if any.
    pub fn take(&self) -> Option<HwFault> {
        if !self.pending.swap(false, Ordering::Acquire) {
            return None;
        }
        Some(HwFault {
            scause: self.scause.load(Ordering::Relaxed),
            stval: self.stval.load(Ordering::Relaxed),
            htval: self.htval.load(Ordering::Relaxed),
        })
    }
}

impl Default for FaultSlot {
    fn default() -> Self {
        Self::new()
    }
}

/// The slot that `hw`'s wrappers and the image's trap handler share.
pub static FAULT_SLOT: FaultSlot = FaultSlot::new();

/// The fixup address for a faulting instruction at `pc`, if the table lists it.
pub fn search(table: &[ExTableEntry], pc: usize) -> Option<usize> {
    table.iter().find(|e| e.insn == pc).map(|e| e.fixup)
}

/// Trap-handler entry point for a trap taken in HS-mode itself: if `sepc` is a listed
/// instruction, records the fault in `slot` and returns the address to resume at.
/// `None` means the trap is a hypervisor bug (the caller should report it and stop).
pub fn fixup_trap(table: &[ExTableEntry], slot: &FaultSlot, sepc: usize, fault: HwFault) -> Option<usize> {
    let fixup = search(table, sepc)?;
    slot.record(fault);
    Some(fixup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_records_and_resumes() {
        let table = [ExTableEntry { insn: 0x100, fixup: 0x180 }, ExTableEntry { insn: 0x200, fixup: 0x280 }];
        let slot = FaultSlot::new();
        assert_eq!(slot.take(), None);
        let f = HwFault { scause: 21, stval: 0x5000, htval: 0x1400 };
        assert_eq!(fixup_trap(&table, &slot, 0x200, f), Some(0x280));
        assert_eq!(slot.take(), Some(f));
        assert_eq!(slot.take(), None, "a fault is taken once");
        // An unlisted pc is not recovered and records nothing.
        assert_eq!(fixup_trap(&table, &slot, 0x204, f), None);
        assert_eq!(slot.take(), None);
    }
}
