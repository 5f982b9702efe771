//! The anchor: axaddrspace 0.6.0's `AddrSpace` over a page-table-generic 0.9.1 table in the x86 EPT format.
//!
//! axaddrspace 0.6.0 ships no page table of its own: it is generic over
//! [`NestedPageTableOps`], and its tests supply one built on page-table-generic. A hypervisor
//! using it does the same, so this module is that wiring, written for this benchmark: an EPT
//! entry format for page-table-generic (4 levels, 4 KiB pages and 2 MiB blocks, like the
//! `corei7_skylake_x` capabilities the x86 images run with) and the `NestedPageTableOps`
//! methods over it. Host frames come from the same [`BenchRam`] as twostage's.

use ax_memory_addr::{PhysAddr, VirtAddr};
use axaddrspace::{AddrSpace, AddrSpaceError, AddrSpaceResult, MappingFlags, NestedPageTableOps, PageSize};
use axvm_types::GuestPhysAddr as AxGpa;
use page_table_generic as ptg;

use crate::ram::BenchRam;

/// The frame allocator handed to page-table-generic (which wants `Clone + Send + Sync + 'static`).
#[derive(Clone, Copy)]
pub struct AxAlloc(pub &'static BenchRam);

impl ptg::FrameAllocator for AxAlloc {
    fn alloc_frame(&self) -> Option<ptg::PhysAddr> {
        self.0.alloc().map(|pa| PhysAddr::from_usize(pa as usize))
    }
    fn dealloc_frame(&self, frame: ptg::PhysAddr) {
        // SAFETY: page-table-generic frees only table frames it allocated, once.
        unsafe { self.0.free_n(frame.as_usize() as u64, 1) }
    }
    fn alloc_frames(&self, frames: usize, align: usize) -> Option<ptg::PhysAddr> {
        // page-table-generic passes the alignment in bytes.
        let align_frames = (align / twostage_npt::FRAME_SIZE).max(1);
        self.0.alloc_n(frames, align_frames).map(|pa| PhysAddr::from_usize(pa as usize))
    }
    fn dealloc_frames(&self, start: ptg::PhysAddr, frames: usize, _frame_size: usize) {
        // SAFETY: as in `dealloc_frame`, for a multi-frame root.
        unsafe { self.0.free_n(start.as_usize() as u64, frames) }
    }
    fn phys_to_virt(&self, paddr: ptg::PhysAddr) -> *mut u8 {
        self.0.ptr(paddr.as_usize() as u64)
    }
}

/// An EPT paging-structure entry (Intel SDM Vol. 3C 29.3.2, Tables 29-1 to 29-6).
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct EptEntry(u64);

impl EptEntry {
    /// Read access (Intel SDM Vol. 3C 29.3.2, Table 29-6 bit 0).
    const R: u64 = 1 << 0;
    /// Write access (bit 1).
    const W: u64 = 1 << 1;
    /// Execute access for supervisor-mode linear addresses (bit 2).
    const X: u64 = 1 << 2;
    /// EPT memory type, bits 5:3 of a leaf; 6 = write-back (Intel SDM Vol. 3C 29.3.7).
    const MT_WB: u64 = 6 << 3;
    /// Page size: a PDE or PDPTE with bit 7 set maps a page (Intel SDM Vol. 3C 29.3.2, Table 29-4).
    const PS: u64 = 1 << 7;
    /// Physical address bits 51:12 (Intel SDM Vol. 3C 29.3.2).
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
}

impl ptg::PageTableEntry for EptEntry {
    type PteConfig = MappingFlags;

    fn new_page(paddr: PhysAddr, config: MappingFlags, is_huge: bool) -> Self {
        let mut bits = paddr.as_usize() as u64 & Self::ADDR;
        if config.contains(MappingFlags::READ) {
            bits |= Self::R;
        }
        if config.contains(MappingFlags::WRITE) {
            bits |= Self::W;
        }
        if config.contains(MappingFlags::EXECUTE) {
            bits |= Self::X;
        }
        bits |= Self::MT_WB;
        if is_huge {
            bits |= Self::PS;
        }
        Self(bits)
    }

    fn new_table(paddr: PhysAddr) -> Self {
        // A non-leaf entry grants every right; the leaf decides (Intel SDM Vol. 3C 29.3.2).
        Self((paddr.as_usize() as u64 & Self::ADDR) | Self::R | Self::W | Self::X)
    }

    fn paddr(&self, _is_dir: bool) -> PhysAddr {
        PhysAddr::from_usize((self.0 & Self::ADDR) as usize)
    }

    fn config(&self, _is_dir: bool) -> MappingFlags {
        let mut flags = MappingFlags::empty();
        flags.set(MappingFlags::READ, self.0 & Self::R != 0);
        flags.set(MappingFlags::WRITE, self.0 & Self::W != 0);
        flags.set(MappingFlags::EXECUTE, self.0 & Self::X != 0);
        flags
    }

    fn present(&self) -> bool {
        // An EPT entry is present when any of bits 2:0 is set (Intel SDM Vol. 3C 29.3.2).
        self.0 & (Self::R | Self::W | Self::X) != 0
    }

    fn huge(&self, is_dir: bool) -> bool {
        is_dir && self.0 & Self::PS != 0
    }

    fn unused(&self) -> bool {
        self.0 == 0
    }

    fn clear(&mut self) {
        self.0 = 0;
    }
}

/// Four-level EPT with 2 MiB blocks at most (level 2 in page-table-generic's numbering).
#[derive(Clone, Copy)]
pub struct Ept4Meta;

impl ptg::TableMeta for Ept4Meta {
    type P = EptEntry;
    const PAGE_SIZE: usize = 4096;
    const LEVEL_BITS: &[usize] = &[9, 9, 9, 9];
    const MAX_BLOCK_LEVEL: usize = 2;
    fn flush(_vaddr: Option<ptg::VirtAddr>) {
        // No CPU has this table loaded; twostage's flush tokens are likewise carried out with a
        // no-op invalidation.
    }
}

/// [`NestedPageTableOps`] over page-table-generic's table, as a hypervisor would wire it.
pub struct AxEpt {
    inner: ptg::PageTable<Ept4Meta, AxAlloc>,
    ram: &'static BenchRam,
    /// Whether 2 MiB blocks may be used (the CPU capability); off for the 4 KiB-only rows.
    huge: bool,
    /// Whether guest data frames are zeroed before use (on for every row but the one that
    /// shows axaddrspace as shipped).
    zero: bool,
}

fn paging(_e: ptg::PagingError) -> AddrSpaceError {
    AddrSpaceError::MappingState
}

fn ptg_va(gpa: AxGpa) -> ptg::VirtAddr {
    VirtAddr::from_usize(gpa.as_usize())
}

impl AxEpt {
    /// An empty table whose frames come from `ram`; data frames zeroed when `zero`.
    pub fn new(ram: &'static BenchRam, huge: bool, zero: bool) -> Self {
        Self { inner: ptg::PageTable::new(AxAlloc(ram)).expect("root frame"), ram, huge, zero }
    }
}

impl NestedPageTableOps for AxEpt {
    fn root_paddr(&self) -> PhysAddr {
        self.inner.root_paddr()
    }

    fn levels(&self) -> usize {
        4
    }

    fn alloc_frame(&self) -> Option<PhysAddr> {
        // Guest data frames are zeroed before a guest may see them (as twostage's demand-zero
        // regions do), so that both sides do the same work and neither leaks host data.
        // axaddrspace's alloc backend itself does not zero: `zero = false` shows it as shipped.
        let pa = self.ram.alloc()?;
        if self.zero {
            // SAFETY: the frame was just allocated and is not mapped anywhere yet.
            unsafe { std::ptr::write_bytes(self.ram.ptr(pa), 0, twostage_npt::FRAME_SIZE) };
        }
        Some(PhysAddr::from_usize(pa as usize))
    }

    fn dealloc_frame(&self, paddr: PhysAddr) {
        // SAFETY: axaddrspace frees only frames that `alloc_frame` gave it, once.
        unsafe { self.ram.free_n(paddr.as_usize() as u64, 1) }
    }

    fn phys_to_virt(&self, paddr: PhysAddr) -> VirtAddr {
        VirtAddr::from_usize(self.ram.ptr(paddr.as_usize() as u64) as usize)
    }

    fn map(&mut self, vaddr: AxGpa, paddr: PhysAddr, size: PageSize, flags: MappingFlags) -> AddrSpaceResult {
        let config = ptg::MapConfig {
            vaddr: ptg_va(vaddr),
            paddr,
            size: size.into(),
            pte: flags,
            allow_huge: size.is_huge(),
            flush: false,
        };
        self.inner.map(&config).map_err(paging)
    }

    fn unmap(&mut self, vaddr: AxGpa) -> AddrSpaceResult<(PhysAddr, MappingFlags, PageSize)> {
        let (paddr, flags, size) = self.query(vaddr)?;
        let base = vaddr.as_usize() & !(usize::from(size) - 1);
        self.inner.unmap(VirtAddr::from_usize(base), size.into()).map_err(paging)?;
        Ok((paddr, flags, size))
    }

    fn map_linear(
        &mut self,
        vaddr: AxGpa,
        paddr: PhysAddr,
        size: usize,
        flags: MappingFlags,
        allow_huge: bool,
    ) -> AddrSpaceResult {
        self.inner.map_linear_pages(ptg_va(vaddr), paddr, size, flags, allow_huge && self.huge).map_err(paging)
    }

    fn unmap_region(&mut self, start: AxGpa, size: usize) -> AddrSpaceResult {
        self.inner.unmap(ptg_va(start), size).map_err(paging)
    }

    fn remap(&mut self, start: AxGpa, paddr: PhysAddr, flags: MappingFlags) -> bool {
        // A demand fault finds nothing mapped: try the plain map first (one walk), and replace an
        // existing leaf only when there is one.
        let base = AxGpa::from(start.as_usize() & !0xfff);
        match self.map(base, paddr, PageSize::Size4K, flags) {
            Ok(()) => true,
            Err(_) => self.inner.remap_page(ptg_va(base), paddr, flags).is_ok(),
        }
    }

    fn protect_region(&mut self, start: AxGpa, size: usize, new_flags: MappingFlags) -> bool {
        self.inner.protect_region(ptg_va(start), size, new_flags).is_ok()
    }

    fn query(&self, vaddr: AxGpa) -> AddrSpaceResult<(PhysAddr, MappingFlags, PageSize)> {
        let (paddr, flags, size) = self.inner.query(ptg_va(vaddr)).map_err(paging)?;
        let size = match size {
            0x1000 => PageSize::Size4K,
            0x20_0000 => PageSize::Size2M,
            0x4000_0000 => PageSize::Size1G,
            _ => return Err(AddrSpaceError::MappingState),
        };
        Ok((paddr, flags, size))
    }
}

/// An axaddrspace address space spanning `size` bytes of guest-physical space from 0, whose
/// data frames are zeroed.
pub fn ax_space(ram: &'static BenchRam, huge: bool, size: usize) -> AddrSpace<AxEpt> {
    AddrSpace::new_empty(AxEpt::new(ram, huge, true), AxGpa::from(0), size).expect("address space")
}

/// The same with data frames not zeroed (axaddrspace's alloc backend as shipped).
pub fn ax_space_unzeroed(ram: &'static BenchRam, size: usize) -> AddrSpace<AxEpt> {
    AddrSpace::new_empty(AxEpt::new(ram, true, false), AxGpa::from(0), size).expect("address space")
}

/// The GPA type of axaddrspace, for the benchmark loops.
pub fn ax_gpa(gpa: u64) -> AxGpa {
    AxGpa::from(gpa as usize)
}

/// Host-physical address in axaddrspace's type.
pub fn ax_pa(pa: u64) -> PhysAddr {
    PhysAddr::from_usize(pa as usize)
}
