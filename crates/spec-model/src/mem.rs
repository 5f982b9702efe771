//! Physical memory as the model's table walker sees it: 8-byte aligned reads and writes.

use alloc::collections::BTreeMap;

use crate::Hpa;

/// Host-physical memory holding page tables, as a hardware walker reads it.
///
/// Every access is 8 bytes wide and 8-byte aligned (page-table entries are 8 bytes in EPT,
/// Intel SDM Vol. 3C 29.3.2, and in Sv39/Sv48/Sv57, RISC-V Privileged "PTESIZE equals 8").
/// `None` means there is no memory at that address; the walkers turn it into a typed model
/// error (an access fault on RISC-V, [`crate::ept::EptExit::NoMemory`] on x86).
///
/// Implementations for the engine's tests wrap their fake host memory; the model's own tests
/// use [`SparseMem`].
pub trait PhysMem {
    /// Reads the 8-byte word at `pa` (8-byte aligned).
    fn read_u64(&mut self, pa: Hpa) -> Option<u64>;
    /// Writes the 8-byte word at `pa` (8-byte aligned).
    fn write_u64(&mut self, pa: Hpa, value: u64) -> Option<()>;
}

impl<T: PhysMem + ?Sized> PhysMem for &mut T {
    fn read_u64(&mut self, pa: Hpa) -> Option<u64> {
        (**self).read_u64(pa)
    }
    fn write_u64(&mut self, pa: Hpa, value: u64) -> Option<()> {
        (**self).write_u64(pa, value)
    }
}

/// Sparse physical memory: every address below `limit` exists and reads as zero until written.
///
/// Also counts reads and writes, so tests can see that a walk really re-read memory (or that a
/// TLB hit did not).
#[derive(Clone, Debug, Default)]
pub struct SparseMem {
    words: BTreeMap<u64, u64>,
    limit: u64,
    /// Number of successful [`PhysMem::read_u64`] calls.
    pub reads: u64,
    /// Number of successful [`PhysMem::write_u64`] calls.
    pub writes: u64,
}

impl SparseMem {
    /// Memory covering host-physical addresses `0..limit`.
    pub fn new(limit: u64) -> Self {
        Self { words: BTreeMap::new(), limit, reads: 0, writes: 0 }
    }

    /// Reads a word without counting it (for test assertions).
    pub fn peek(&self, pa: Hpa) -> Option<u64> {
        self.exists(pa).then(|| self.words.get(&pa.0).copied().unwrap_or(0))
    }

    /// Writes a word without counting it (for building tables in tests).
    ///
    /// # Panics
    /// If `pa` is misaligned or beyond the limit: building a table there is a bug in the test.
    #[track_caller]
    pub fn poke(&mut self, pa: Hpa, value: u64) {
        assert!(self.exists(pa), "SparseMem::poke: no memory at {:#x}", pa.0);
        self.words.insert(pa.0, value);
    }

    /// Writes entry `index` of the table at `table` (8-byte entries).
    #[track_caller]
    pub fn set_entry(&mut self, table: Hpa, index: u64, value: u64) {
        self.poke(Hpa(table.0 + index * 8), value);
    }

    /// Reads entry `index` of the table at `table`.
    pub fn entry(&self, table: Hpa, index: u64) -> u64 {
        self.peek(Hpa(table.0 + index * 8)).unwrap_or(0)
    }

    fn exists(&self, pa: Hpa) -> bool {
        pa.0 & 7 == 0 && pa.0 < self.limit
    }
}

impl PhysMem for SparseMem {
    fn read_u64(&mut self, pa: Hpa) -> Option<u64> {
        let v = self.peek(pa)?;
        self.reads += 1;
        Some(v)
    }

    fn write_u64(&mut self, pa: Hpa, value: u64) -> Option<()> {
        if !self.exists(pa) {
            return None;
        }
        self.words.insert(pa.0, value);
        self.writes += 1;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_mem_bounds_and_counts() {
        let mut m = SparseMem::new(0x1000);
        assert_eq!(m.read_u64(Hpa(0x8)), Some(0));
        assert_eq!(m.write_u64(Hpa(0x8), 42), Some(()));
        assert_eq!(m.read_u64(Hpa(0x8)), Some(42));
        assert_eq!(m.read_u64(Hpa(0x1000)), None);
        assert_eq!(m.read_u64(Hpa(0x4)), None, "misaligned");
        assert_eq!(m.write_u64(Hpa(0x2000), 1), None);
        assert_eq!((m.reads, m.writes), (2, 1));
    }
}
