//! Guest memory by guest-physical address: the consumer trait and the address space's copies.

use crate::error::NoFrame;
use crate::flush::SpaceFlush;
use crate::region::{Backend, Region};
use crate::space::{AddressSpace, PAGE};
use crate::tlb::{CachedRegion, DIRECT_WRITE, R, W, X};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use twostage_npt::{Access, Format, FrameAllocator, GuestPhysAddr, HostPhysAddr, MappingFlags};

/// Why a guest-memory access by guest-physical address failed. Each names the first address
/// that could not be reached and the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMemError {
    /// No region covers the address.
    Unmapped {
        /// The address.
        gpa: GuestPhysAddr,
        /// The access.
        access: Access,
    },
    /// The address is MMIO: only the device model can answer.
    Mmio {
        /// The address.
        gpa: GuestPhysAddr,
        /// The access.
        access: Access,
    },
    /// The region forbids the access.
    Forbidden {
        /// The address.
        gpa: GuestPhysAddr,
        /// The access.
        access: Access,
        /// The region's rights.
        rights: MappingFlags,
    },
    /// No frame could be had to back (or privately copy) the page.
    OutOfMemory {
        /// The page's address.
        gpa: GuestPhysAddr,
    },
    /// `gpa + len` leaves the guest-physical address space.
    Overflow {
        /// The start.
        gpa: GuestPhysAddr,
        /// The length.
        len: u64,
    },
    /// An atomic access was not naturally aligned.
    Misaligned {
        /// The address.
        gpa: GuestPhysAddr,
    },
}

impl GuestMemError {
    /// The address the error is about.
    pub fn gpa(&self) -> GuestPhysAddr {
        match *self {
            Self::Unmapped { gpa, .. }
            | Self::Mmio { gpa, .. }
            | Self::Forbidden { gpa, .. }
            | Self::OutOfMemory { gpa }
            | Self::Overflow { gpa, .. }
            | Self::Misaligned { gpa } => gpa,
        }
    }
}

impl fmt::Display for GuestMemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unmapped { gpa, access } => write!(f, "{access} at {gpa}: nothing mapped there"),
            Self::Mmio { gpa, access } => write!(f, "{access} at {gpa}: MMIO"),
            Self::Forbidden { gpa, access, rights } => write!(f, "{access} at {gpa}: region allows only {rights}"),
            Self::OutOfMemory { gpa } => write!(f, "no frame to back {gpa}"),
            Self::Overflow { gpa, len } => write!(f, "{gpa} + {len:#x} leaves the address space"),
            Self::Misaligned { gpa } => write!(f, "atomic access at {gpa} is misaligned"),
        }
    }
}

impl core::error::Error for GuestMemError {}

/// Which memory, in which state: two equal epochs of one [`GuestMemory`] say that between them no
/// guest-physical translation changed (no region added, removed or re-protected, no page mapped,
/// unmapped, copied on write or write-protected) and so no byte changed other than by writes
/// through the memory itself (the guest's, a device model's, the hypervisor's copies). Caches of
/// what the guest's memory holds ([`crate::guest::GuestTlb`]) keep their entries only while the
/// epoch is unchanged. Epochs of different address spaces never compare equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEpoch {
    /// The space's identity (unique in the process).
    space: u64,
    /// Its change count.
    changes: u64,
}

/// A remembered host view of guest pages, for repeated reads in them (the guest's page-table
/// entries, see [`GuestMemory::read_u64_hinted`]; the data pages of guest-virtual copies, see
/// [`GuestMemory::read_hinted`]). Opaque: only the memory that made it uses it, and only while
/// that memory's [`MemoryEpoch`] is the one it was made at (so the pages are still mapped where
/// they were, and still readable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageHint {
    /// The epoch it was made at (`None`: empty).
    epoch: Option<MemoryEpoch>,
    /// The first guest page (4 KiB-aligned).
    page: u64,
    /// The hypervisor's address of that page's first byte.
    host: usize,
    /// Bytes from `page` whose hypervisor view follows on from `host` (a multiple of 4 KiB).
    span: u64,
}

impl PageHint {
    /// The host address the hint gives for the 4 KiB-aligned guest page `page`, if it covers it
    /// and was made at `epoch`.
    #[inline]
    pub(crate) fn host_of(&self, epoch: MemoryEpoch, page: u64) -> Option<usize> {
        let within = page.wrapping_sub(self.page);
        (self.epoch == Some(epoch) && within < self.span).then(|| self.host + within as usize)
    }

    /// A hint for `span` bytes from guest page `page` at host address `host`, made of hints
    /// this crate got from the memory at `epoch` (its pages' host addresses, found to follow
    /// each other). Only the memory that made those hints may be given it.
    #[inline]
    pub(crate) fn joined(epoch: MemoryEpoch, page: u64, host: usize, span: u64) -> Self {
        Self { epoch: Some(epoch), page, host, span }
    }
}

/// Plain old data: a type for which every bit pattern is a valid value.
///
/// # Safety
/// The type must have no padding, no invalid bit patterns (no `bool`, `char`, enums,
/// references or pointers) and no drop glue.
pub unsafe trait Pod: Copy + 'static {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: a primitive integer: no padding, every bit pattern valid.
        unsafe impl Pod for $t {}
    )* };
}
pod!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize);
// SAFETY: an array of `Pod` has no padding between elements and every bit pattern is valid.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

/// Reads and writes guest memory by guest-physical address: the small trait that hypervisor
/// code (instruction emulation, virtio, loaders) sees. Region and page crossings are handled
/// inside; an access either completes or returns an error naming the first unreachable address
/// (a failed read leaves `buf` partly filled; a failed write may have written a prefix).
///
/// One name per operation: [`GuestMemory::read`] and [`GuestMemory::write`] move bytes,
/// [`GuestMemory::read_as`] reads as a given access (execute for instruction fetch),
/// [`GuestMemory::read_obj`] and [`GuestMemory::write_obj`] move one plain-old-data value,
/// [`GuestMemory::compare_exchange_u64`] updates a word atomically. By guest-virtual address the
/// same memory is reached with [`crate::copy_from_guest_va`] and [`crate::copy_to_guest_va`].
/// Implemented by [`AddressSpace`], `&`[`crate::SharedAddressSpace`] and
/// [`crate::TableMemory`] (and by `&mut M` for any implementation `M`).
pub trait GuestMemory {
    /// Reads `buf.len()` bytes at `gpa` as an access of kind `access` (read, or execute for
    /// instruction fetch), checked against the region's rights.
    fn read_as(&mut self, gpa: GuestPhysAddr, buf: &mut [u8], access: Access) -> Result<(), GuestMemError>;

    /// Writes `buf` at `gpa` (the regions must allow writing).
    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError>;

    /// Atomically replaces the 8-byte-aligned word at `gpa` by `new` if it equals `current`;
    /// returns the value found (`Ok(current)` when it was replaced). Used to update the A/D bits
    /// of the guest's own page-table entries.
    fn compare_exchange_u64(
        &mut self,
        gpa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, GuestMemError>;

    /// The memory's current [`MemoryEpoch`], or `None` if it cannot tell (then nothing derived
    /// from its contents may be kept from one access to the next). The default is `None`.
    fn epoch(&self) -> Option<MemoryEpoch> {
        None
    }

    /// Reads the little-endian 64-bit word at `gpa` (the guest's page-table entries), as one
    /// access if `gpa` is 8-byte aligned. `hint` is the caller's memory of the page last read
    /// this way: an implementation may fill it and use it on the next call for the same page to
    /// skip its translation (the address space does, while its epoch is unchanged); the
    /// default ignores it.
    fn read_u64_hinted(&mut self, gpa: GuestPhysAddr, hint: &mut PageHint) -> Result<u64, GuestMemError> {
        let _ = hint;
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads `buf.len()` bytes at `gpa` (as [`GuestMemory::read`]), through `hint`: the
    /// caller's memory of where the pages it reads lie in the hypervisor's view. An
    /// implementation may read straight from a hint it made at its current epoch that covers
    /// the span, and fill the hint on any other read (the address space does, with the
    /// readable pages from `gpa`'s page on that follow each other in host memory, up to the
    /// read's end); the default ignores it.
    fn read_hinted(&mut self, gpa: GuestPhysAddr, buf: &mut [u8], hint: &mut PageHint) -> Result<(), GuestMemError> {
        let _ = hint;
        self.read(gpa, buf)
    }

    /// Reads `buf.len()` bytes at `gpa`.
    fn read(&mut self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GuestMemError> {
        self.read_as(gpa, buf, Access::Read)
    }

    /// Reads a plain-old-data value at `gpa` (any alignment).
    fn read_obj<T: Pod>(&mut self, gpa: GuestPhysAddr) -> Result<T, GuestMemError>
    where
        Self: Sized,
    {
        // SAFETY: `T: Pod`, so the all-zero pattern is a valid `T`.
        let mut v: T = unsafe { core::mem::zeroed() };
        // SAFETY: `v` is a live `T` of `size_of::<T>()` bytes; any bytes written into it make a
        // valid `T` (`Pod`).
        let bytes = unsafe { core::slice::from_raw_parts_mut((&raw mut v).cast::<u8>(), core::mem::size_of::<T>()) };
        self.read(gpa, bytes)?;
        Ok(v)
    }

    /// Writes a plain-old-data value at `gpa` (any alignment).
    fn write_obj<T: Pod>(&mut self, gpa: GuestPhysAddr, v: &T) -> Result<(), GuestMemError>
    where
        Self: Sized,
    {
        // SAFETY: `T: Pod` has no padding, so all its `size_of::<T>()` bytes are initialized.
        let bytes = unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), core::mem::size_of::<T>()) };
        self.write(gpa, bytes)
    }
}

/// A mutable borrow of guest memory is guest memory (so `copy_from_guest_va(&mut &mut vm, ..)`
/// and generic code holding `&mut M` work).
impl<M: GuestMemory + ?Sized> GuestMemory for &mut M {
    fn read_as(&mut self, gpa: GuestPhysAddr, buf: &mut [u8], access: Access) -> Result<(), GuestMemError> {
        (**self).read_as(gpa, buf, access)
    }
    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        (**self).write(gpa, buf)
    }
    fn compare_exchange_u64(
        &mut self,
        gpa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, GuestMemError> {
        (**self).compare_exchange_u64(gpa, current, new)
    }
    fn epoch(&self) -> Option<MemoryEpoch> {
        (**self).epoch()
    }
    fn read_u64_hinted(&mut self, gpa: GuestPhysAddr, hint: &mut PageHint) -> Result<u64, GuestMemError> {
        (**self).read_u64_hinted(gpa, hint)
    }
    fn read_hinted(&mut self, gpa: GuestPhysAddr, buf: &mut [u8], hint: &mut PageHint) -> Result<(), GuestMemError> {
        (**self).read_hinted(gpa, buf, hint)
    }
}

/// Host pointer runs: calls `f(host_ptr, offset_in_buf, len)` for maximal runs of `len` bytes
/// at `hpa` that are contiguous in the hypervisor's view (frames whose `phys_to_virt` pointers
/// follow each other), so a large copy is a few `memcpy`s rather than one per page.
fn for_host_runs<A: FrameAllocator>(alloc: &A, hpa: HostPhysAddr, len: u64, mut f: impl FnMut(*mut u8, usize, usize)) {
    let mut done = 0u64;
    while done < len {
        let start = hpa + done;
        let base = alloc.phys_to_virt(start).as_ptr();
        let mut run = (PAGE - start.offset_in(PAGE)).min(len - done);
        while done + run < len {
            let next = start + run;
            // SAFETY: only address arithmetic, compared and never dereferenced here.
            if alloc.phys_to_virt(next).as_ptr() != base.wrapping_add(run as usize) {
                break;
            }
            run += PAGE.min(len - done - run);
        }
        f(base, done as usize, run as usize);
        done += run;
    }
}

/// The cache right an access needs.
#[inline]
fn access_bit(access: Access) -> u64 {
    match access {
        Access::Read => R,
        Access::Write => W,
        Access::Execute => X,
    }
}

/// The cache rights of region `r`'s pages: the region's rights, and for a linear region
/// `DIRECT_WRITE` (it is the caller's memory, never copied on write).
fn region_bits(r: &Region) -> u64 {
    let f = r.flags;
    let bit = |a, b| if f.allows(a) { b } else { 0 };
    let linear = if matches!(r.backend, Backend::Linear { .. }) { DIRECT_WRITE } else { 0 };
    bit(Access::Read, R) | bit(Access::Write, W) | bit(Access::Execute, X) | linear
}

/// Spans up to this many bytes (from the first page's start) are walked page by page.
const SHORT_SPAN: u64 = 8 * PAGE;

impl<F: Format, A: FrameAllocator + Clone> AddressSpace<F, A> {
    /// The space's [`MemoryEpoch`]: it changes with every change of a guest-physical translation
    /// (the count behind the space's own translation cache).
    pub fn epoch(&self) -> MemoryEpoch {
        MemoryEpoch { space: self.tlb.id(), changes: self.changes() }
    }

    /// [`GuestMemory::read_u64_hinted`] with a shared borrow: an aligned word of a page the
    /// hint remembers (made by this space at its current epoch) is one atomic load; otherwise a
    /// read, which fills the hint if the page is mapped and readable.
    pub fn read_u64_hinted(&self, gpa: GuestPhysAddr, hint: &mut PageHint) -> Result<u64, GuestMemError> {
        let epoch = self.epoch();
        let page = gpa.as_u64() & !(PAGE - 1);
        if gpa.is_aligned(8) {
            if hint.host_of(epoch, page).is_none() {
                let r = self.region_for(gpa, Access::Read, true)?;
                let frame = match r.linear_hpa(gpa) {
                    Some(h) => Some(h.align_down(PAGE)),
                    None => self.table.translate(gpa).map(|(h, _)| h.align_down(PAGE)),
                };
                *hint = match frame {
                    Some(f) => PageHint {
                        epoch: Some(epoch),
                        page,
                        host: self.alloc.phys_to_virt(f).as_ptr() as usize,
                        span: PAGE,
                    },
                    // Never touched: reads as zeros, and the first write will change the epoch.
                    None => return Ok(0),
                };
            }
            let p = (hint.host + (gpa.as_u64() - hint.page) as usize) as *mut u64;
            // SAFETY: the hint was made by this space (the epoch names it) at its current change
            // count, so the page is still mapped (hence allocated) and readable there: a frame is
            // freed, and a linear region's memory given back, only after a counted change (see
            // `crate::tlb`); `p` is 8-byte aligned inside that page. Guest CPUs may write the
            // word concurrently: the load is atomic.
            let v = unsafe { AtomicU64::from_ptr(p) }.load(Ordering::Relaxed);
            return Ok(u64::from_le(v));
        }
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// [`GuestMemory::read_hinted`] with a shared borrow: a span that a hint made by this space
    /// at its current epoch covers is one copy from host memory; any other read is
    /// [`AddressSpace::read`], after which the hint holds the readable pages from `gpa`'s page
    /// on, up to the read's end, whose hypervisor view follows on from the first (none if that
    /// page was never touched).
    pub fn read_hinted(&self, gpa: GuestPhysAddr, buf: &mut [u8], hint: &mut PageHint) -> Result<(), GuestMemError> {
        let epoch = self.epoch();
        let len = buf.len() as u64;
        let within = gpa.as_u64().wrapping_sub(hint.page);
        if hint.epoch == Some(epoch) && within < hint.span && len <= hint.span - within {
            let src = (hint.host + within as usize) as *const u8;
            // SAFETY: the hint was made by this space (the epoch names it) at its current change
            // count, covering `len` bytes from `gpa`: those pages are still mapped there (hence
            // allocated) and readable, one run in the hypervisor's view (see `read_u64_hinted`
            // and `fill_hint`); `buf` is our own buffer.
            unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
            return Ok(());
        }
        self.read(gpa, buf)?;
        *hint = self.fill_hint(gpa, len.max(1), epoch);
        Ok(())
    }

    /// The hint for the readable pages of `gpa..gpa+len` (a span just read, so inside regions
    /// that allow reading) from `gpa`'s page on, in `gpa`'s region, that are mapped and whose
    /// hypervisor view follows on from the first page's; empty if that page was never touched.
    fn fill_hint(&self, gpa: GuestPhysAddr, len: u64, epoch: MemoryEpoch) -> PageHint {
        let Some(r) = self.region_at(gpa) else { return PageHint::default() };
        if r.backend == Backend::Mmio || !r.flags.allows(Access::Read) {
            return PageHint::default();
        }
        let frame = |p: GuestPhysAddr| match r.linear_hpa(p) {
            Some(h) => Some(h),
            None => self.table.translate(p).map(|(h, _)| h.align_down(PAGE)),
        };
        let first = gpa.align_down(PAGE);
        let Some(h) = frame(first) else { return PageHint::default() };
        let host = self.alloc.phys_to_virt(h).as_ptr() as usize;
        let end = gpa.as_u64().saturating_add(len).min(r.range.end.as_u64());
        let mut span = PAGE;
        while first.as_u64() + span < end {
            let next = first + span;
            match frame(next) {
                Some(h) if self.alloc.phys_to_virt(h).as_ptr() as usize == host + span as usize => span += PAGE,
                _ => break,
            }
        }
        PageHint { epoch: Some(epoch), page: first.as_u64(), host, span }
    }

    /// The region containing `gpa` for an access, or the error that access gets.
    fn region_for(&self, gpa: GuestPhysAddr, access: Access, check_rights: bool) -> Result<&Region, GuestMemError> {
        let r = self.region_at(gpa).ok_or(GuestMemError::Unmapped { gpa, access })?;
        if r.backend == Backend::Mmio {
            return Err(GuestMemError::Mmio { gpa, access });
        }
        if check_rights && !r.flags.allows(access) {
            return Err(GuestMemError::Forbidden { gpa, access, rights: r.flags.rights() });
        }
        Ok(r)
    }

    /// Splits `gpa..gpa+len` into pieces that each lie in one region (and, for anonymous
    /// regions, one page); checks every piece before any is used.
    fn check_span(
        &self,
        gpa: GuestPhysAddr,
        len: usize,
        access: Access,
        check_rights: bool,
    ) -> Result<(), GuestMemError> {
        let len = len as u64;
        let end = gpa.checked_add(len).ok_or(GuestMemError::Overflow { gpa, len })?;
        let mut cur = gpa;
        while cur < end {
            let r = self.region_for(cur, access, check_rights)?;
            cur = r.range.end.min(end);
        }
        Ok(())
    }

    /// Checks the regions of a span up to `end` past its first region (which ends at `r_end`),
    /// before any byte moves. A span inside one region (the common case) costs nothing more.
    fn check_rest(
        &self,
        r_end: GuestPhysAddr,
        end: GuestPhysAddr,
        access: Access,
        check_rights: bool,
    ) -> Result<(), GuestMemError> {
        if end > r_end {
            self.check_span(r_end, (end - r_end) as usize, access, check_rights)?;
        }
        Ok(())
    }

    /// Writes `src` at `gpa` through the pages mapped writable from there on (private to this
    /// space), in host runs; stops at the first page that is not. Returns the bytes written.
    fn write_private_runs(&mut self, gpa: GuestPhysAddr, src: &[u8]) -> u64 {
        self.anon_runs(
            gpa,
            src.len() as u64,
            false,
            |leaf| leaf.flags.contains(MappingFlags::WRITE),
            |dst, o, n| {
                if let Some(dst) = dst {
                    // SAFETY: the frames are mapped writable in this space, hence private (count 1)
                    // and held through `&mut self`; the run stays inside frames whose
                    // `phys_to_virt` views follow each other; `src` is not guest memory.
                    unsafe { core::ptr::copy_nonoverlapping(src[o..o + n].as_ptr(), dst, n) }
                }
            },
        )
    }

    /// Visits the host memory behind `gpa..gpa+len`, all inside anonymous region pages, with
    /// one walk of the nested table: calls `f(host, offset, n)` for each maximal run of `n`
    /// bytes that is contiguous in the hypervisor's view (`host` is `None` for a run of pages
    /// never touched, which read as zeros). A mapped page for which `usable` says no, or an
    /// untouched page when `holes` is false, ends the visit there. Returns the bytes visited.
    fn anon_runs(
        &self,
        gpa: GuestPhysAddr,
        len: u64,
        holes: bool,
        usable: impl Fn(&twostage_npt::Leaf) -> bool,
        mut f: impl FnMut(Option<*mut u8>, usize, usize),
    ) -> u64 {
        let end = gpa + len;
        // The pending run: (host start or None for zeros, offset in the span, bytes).
        let mut run: Option<(Option<*mut u8>, u64, u64)> = None;
        let mut next = gpa;
        let mut stopped = false;
        let mut emit = |host: Option<*mut u8>, at: u64, n: u64, run: &mut Option<(Option<*mut u8>, u64, u64)>| {
            if let Some((h, o, l)) = run {
                let joins = match (*h, host) {
                    (None, None) => true,
                    (Some(p), Some(q)) => p.wrapping_add(*l as usize) == q,
                    _ => false,
                };
                if joins && *o + *l == at {
                    *l += n;
                    return;
                }
                f(*h, *o as usize, *l as usize);
            }
            *run = Some((host, at, n));
        };
        // Returns whether the visit goes on.
        let mut on_leaf = |leaf: &twostage_npt::Leaf| -> bool {
            if stopped {
                return false;
            }
            if leaf.gpa > next {
                if !holes {
                    stopped = true;
                    return false;
                }
                emit(None, next - gpa, leaf.gpa - next, &mut run);
                next = leaf.gpa;
            }
            if !usable(leaf) {
                stopped = true;
                return false;
            }
            let leaf_end = leaf.gpa.checked_add(leaf.size.bytes()).map_or(end, |e| e.min(end));
            // One host pointer per frame: frames are contiguous only where the allocator's
            // view says so.
            while next < leaf_end {
                let n = (PAGE - next.offset_in(PAGE)).min(leaf_end - next);
                let host = self.alloc.phys_to_virt(leaf.translate(next)).as_ptr();
                emit(Some(host), next - gpa, n, &mut run);
                next = next + n;
            }
            true
        };
        // A short span is cheapest as one lean walk per page; a long one as one walk of the
        // tables it covers.
        let first = gpa.align_down(PAGE);
        if end - first <= SHORT_SPAN {
            let mut page = first;
            while page < end {
                if let Some(leaf) = self.table.query(page) {
                    if !on_leaf(&leaf) {
                        break;
                    }
                }
                page = page + PAGE;
            }
        } else {
            self.table.for_each_leaf(gpa, len, |leaf| {
                on_leaf(leaf);
            });
        }
        if !stopped && next < end && holes {
            emit(None, next - gpa, end - next, &mut run);
            next = end;
        }
        if let Some((h, o, l)) = run {
            f(h, o as usize, l as usize);
        }
        next - gpa
    }

    /// Reads guest memory at `gpa`: [`GuestMemory::read`] with a shared borrow (see
    /// [`AddressSpace::read_as`]).
    pub fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GuestMemError> {
        self.read_as(gpa, buf, Access::Read)
    }

    /// Reads guest memory at `gpa` as an access of kind `access` (read, or execute for fetches),
    /// checked against the regions' rights: [`GuestMemory::read_as`] with a shared borrow, for
    /// readers that hold only `&AddressSpace` (such as [`crate::SharedAddressSpace::with`]).
    /// Pages of a demand-zero region that were never touched read as zeros and stay untouched:
    /// a read does not populate.
    pub fn read_as(&self, gpa: GuestPhysAddr, buf: &mut [u8], access: Access) -> Result<(), GuestMemError> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let gen = self.changes();
        let hint = self.region_hint(gpa, len, access_bit(access), gen);
        if gpa.offset_in(PAGE) + len <= PAGE {
            // Inside one page, hence one region (regions are page-aligned): the region last
            // used or one region lookup, then a linear offset, a cached translation or one lean
            // walk (remembered).
            let host = match hint {
                Some(c) => match c.linear {
                    Some(base) => Some(base + (gpa.as_u64() - c.start)),
                    None => self.anon_frame(gpa, c.bits, 0, gen),
                },
                None => {
                    let r = self.region_for(gpa, access, true)?;
                    self.tlb.remember_region(r, region_bits(r), gen);
                    match r.linear_hpa(gpa) {
                        Some(h) => Some(h),
                        None => self.anon_frame(gpa, region_bits(r), 0, gen),
                    }
                }
            };
            match host {
                Some(h) => {
                    let src = self.alloc.phys_to_virt(h).as_ptr();
                    if let Ok(word) = <&mut [u8; 8]>::try_from(&mut *buf) {
                        // A page-table entry or a u64: one unaligned load, no memcpy call.
                        // SAFETY: 8 bytes from `h` stay in one page that this space maps (as
                        // below).
                        *word = unsafe { core::ptr::read_unaligned(src.cast::<[u8; 8]>()) };
                        return Ok(());
                    }
                    // SAFETY: `len` bytes from `h` stay in one page, which this space maps (a
                    // linear region's host memory, or a frame it owns or shares and that stays
                    // allocated while `&self` is held; a cached translation is current, see
                    // `crate::tlb`); `buf` is our own buffer.
                    unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) }
                }
                // An anonymous page never touched reads as zeros.
                None => buf.fill(0),
            }
            return Ok(());
        }
        if let Some(c) = hint {
            // The whole span lies in the region last used, which allows the access.
            self.read_in_region(gpa, buf, c.linear.map(|base| base + (gpa.as_u64() - c.start)));
            return Ok(());
        }
        let end = gpa.checked_add(len).ok_or(GuestMemError::Overflow { gpa, len })?;
        let mut off = 0usize;
        while off < buf.len() {
            let cur = gpa + off as u64;
            let r = self.region_for(cur, access, true)?;
            if off == 0 {
                self.check_rest(r.range.end, end, access, true)?;
                self.tlb.remember_region(r, region_bits(r), gen);
            }
            let in_region = (r.range.end - cur).min((buf.len() - off) as u64);
            self.read_in_region(cur, &mut buf[off..off + in_region as usize], r.linear_hpa(cur));
            off += in_region as usize;
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes from `gpa`, inside one region whose rights were checked: a
    /// linear one whose host memory for `gpa` is at `linear`, or an anonymous one.
    fn read_in_region(&self, gpa: GuestPhysAddr, dst: &mut [u8], linear: Option<HostPhysAddr>) {
        let len = dst.len() as u64;
        if let Some(hpa) = linear {
            for_host_runs(&self.alloc, hpa, len, |src, o, n| {
                // SAFETY: `src..src+n` lies in frames the allocator's `phys_to_virt` reaches
                // (a linear region's host memory must be reachable: see `Backend::Linear`);
                // `dst` is our own buffer, which guest memory cannot overlap.
                unsafe { core::ptr::copy_nonoverlapping(src, dst[o..o + n].as_mut_ptr(), n) }
            });
        } else {
            let done = self.anon_runs(
                gpa,
                len,
                true,
                |_| true,
                |src, o, n| match src {
                    // SAFETY: the frames are mapped in this space (owned or shared), so they stay
                    // allocated while `&self` is held; the run stays inside frames whose
                    // `phys_to_virt` views follow each other; `dst` is our own buffer.
                    Some(src) => unsafe { core::ptr::copy_nonoverlapping(src, dst[o..o + n].as_mut_ptr(), n) },
                    None => dst[o..o + n].fill(0),
                },
            );
            debug_assert_eq!(done, len);
        }
    }

    /// The region last used (see [`crate::tlb`]) if it is current at change count `gen`, holds
    /// all of `gpa..gpa+len` and has the cache rights `need`.
    #[inline]
    fn region_hint(&self, gpa: GuestPhysAddr, len: u64, need: u64, gen: u64) -> Option<CachedRegion> {
        let end = gpa.as_u64().checked_add(len)?;
        self.tlb.region(gen).filter(|c| c.covers(gpa.as_u64(), end, need))
    }

    /// The host address of `gpa`, in an anonymous region whose pages have the cache rights
    /// `bits`, if its page is mapped and its entry has the rights `need` (`DIRECT_WRITE` for a
    /// write in place): a cached translation at change count `gen`, or a walk (remembered).
    #[inline]
    fn anon_frame(&self, gpa: GuestPhysAddr, bits: u64, need: u64, gen: u64) -> Option<HostPhysAddr> {
        if let Some(frame) = self.tlb.lookup(gpa, need, gen) {
            return Some(frame + gpa.offset_in(PAGE));
        }
        let (h, f) = self.table.translate(gpa)?;
        // A writable leaf of an anonymous region is private: shared frames are mapped
        // read-only in every holder, and so are the pages the dirty log write-protects.
        let direct = if f.contains(MappingFlags::WRITE) { DIRECT_WRITE } else { 0 };
        self.tlb.insert(gpa.align_down(PAGE), h.align_down(PAGE), bits & !DIRECT_WRITE | direct, gen);
        (direct & need == need).then_some(h)
    }

    /// Makes sure anonymous page `page` of `r` has a private frame (populating it, or copying
    /// it if shared), and returns the frame.
    fn private_frame(
        &mut self,
        r: &Region,
        page: GuestPhysAddr,
        flush: &mut SpaceFlush<F>,
    ) -> Result<HostPhysAddr, GuestMemError> {
        let oom = GuestMemError::OutOfMemory { gpa: page };
        for _ in 0..3 {
            match self.table.query(page) {
                None => flush.add(self.map_anon_page(r, page).map_err(|NoFrame| oom)?),
                // A writable leaf of an anonymous region is private: shared frames are mapped
                // read-only in every holder.
                Some(leaf) if leaf.flags.contains(MappingFlags::WRITE) => return Ok(leaf.translate(page)),
                Some(leaf) if self.refs.count(leaf.hpa) > 1 => {
                    let copied = self.break_cow(r, page, leaf.hpa).map_err(|NoFrame| oom)?;
                    *flush = core::mem::replace(flush, SpaceFlush::none()).merge(copied);
                }
                Some(leaf) => return Ok(leaf.translate(page)),
            }
        }
        Err(oom)
    }

    /// Writes `buf` at `gpa` ignoring the regions' rights (MMIO still refused): for loading
    /// firmware or code into a read-only or execute-only region. Otherwise as
    /// [`GuestMemory::write`] on the space, but the flush comes back (a failed load may have
    /// written a prefix; its flush is left pending, see [`AddressSpace::flush_pending`]).
    pub fn load_image(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<SpaceFlush<F>, GuestMemError> {
        let mut flush = SpaceFlush::none();
        match self.write_inner(gpa, buf, false, &mut flush) {
            Ok(()) => Ok(flush),
            Err(e) => {
                self.defer(flush);
                Err(e)
            }
        }
    }

    /// Writes `buf` at `gpa`; `check` says whether the regions' rights apply. Untouched
    /// demand-zero pages are populated (it is the guest's memory), shared copy-on-write pages
    /// are copied first, and the dirty log records the pages. `flush` collects the changes.
    fn write_inner(
        &mut self,
        gpa: GuestPhysAddr,
        buf: &[u8],
        check: bool,
        flush: &mut SpaceFlush<F>,
    ) -> Result<(), GuestMemError> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let gen = self.changes();
        let hint = self.region_hint(gpa, len, if check { W } else { 0 }, gen);
        if gpa.offset_in(PAGE) + len <= PAGE {
            // Inside one page (one region): a linear page, or a page already mapped writable, is
            // written at once.
            let host = match hint {
                Some(c) => match c.linear {
                    Some(base) => Some(base + (gpa.as_u64() - c.start)),
                    None => self.anon_frame(gpa, c.bits, DIRECT_WRITE, gen),
                },
                None => {
                    let r = self.region_for(gpa, Access::Write, check)?;
                    self.tlb.remember_region(r, region_bits(r), gen);
                    match r.linear_hpa(gpa) {
                        Some(h) => Some(h),
                        None => self.anon_frame(gpa, region_bits(r), DIRECT_WRITE, gen),
                    }
                }
            };
            if let Some(h) = host {
                let dst = self.alloc.phys_to_virt(h).as_ptr();
                if let Ok(word) = <&[u8; 8]>::try_from(buf) {
                    // A u64 or a page-table entry: one unaligned store, no memcpy call.
                    // SAFETY: 8 bytes from `h` stay in one page, which we may write (as below).
                    unsafe { core::ptr::write_unaligned(dst.cast::<[u8; 8]>(), *word) };
                } else {
                    // SAFETY: `len` bytes from `h` stay in one page: a linear region's host
                    // memory or a private frame of this space held by `&mut self` (a cached
                    // translation is current, see `crate::tlb`); `buf` is not guest memory.
                    unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) };
                }
                self.note_written(gpa, len);
                return Ok(());
            }
        } else if let Some(CachedRegion { start, linear: Some(base), .. }) = hint {
            // The whole span lies in the linear region last used, which allows the write.
            for_host_runs(&self.alloc, base + (gpa.as_u64() - start), len, |dst, o, n| {
                // SAFETY: as in `read_in_region`; `buf` is the caller's buffer, not guest memory.
                unsafe { core::ptr::copy_nonoverlapping(buf[o..o + n].as_ptr(), dst, n) }
            });
            self.note_written(gpa, len);
            return Ok(());
        }
        let end = gpa.checked_add(len).ok_or(GuestMemError::Overflow { gpa, len })?;
        // The whole span lies in the anonymous region last used, which allows the write: pages
        // already private are written without looking the region up.
        let in_hint = hint.is_some();
        let mut off = 0usize;
        while off < buf.len() {
            let cur = gpa + off as u64;
            if in_hint {
                let fast = self.write_private_runs(cur, &buf[off..]);
                if fast > 0 {
                    self.note_written(cur, fast);
                    off += fast as usize;
                    continue;
                }
            }
            let r = self.region_for(cur, Access::Write, check)?.clone();
            if off == 0 {
                self.check_rest(r.range.end, end, Access::Write, check)?;
                self.tlb.remember_region(&r, region_bits(&r), gen);
            }
            let in_region = (r.range.end - cur).min((buf.len() - off) as u64);
            let src = &buf[off..off + in_region as usize];
            if let Some(hpa) = r.linear_hpa(cur) {
                for_host_runs(&self.alloc, hpa, in_region, |dst, o, n| {
                    // SAFETY: as in `read_as`; `src` is the caller's buffer, not guest memory.
                    unsafe { core::ptr::copy_nonoverlapping(src[o..o + n].as_ptr(), dst, n) }
                });
                self.note_written(cur, in_region);
                off += in_region as usize;
                continue;
            }
            // Pages mapped writable are private to this space: write them in host runs with
            // one walk. The first page that is not (untouched, shared, write-protected) goes
            // the slow way below, then the fast way is tried again from the next page.
            let fast = self.write_private_runs(cur, src);
            if fast > 0 {
                self.note_written(cur, fast);
                off += fast as usize;
                continue;
            }
            let n = (PAGE - cur.offset_in(PAGE)).min(in_region) as usize;
            let page = cur.align_down(PAGE);
            let hpa = self.private_frame(&r, page, flush)?;
            let dst = self.alloc.phys_to_virt(hpa + cur.offset_in(PAGE)).as_ptr();
            // SAFETY: `hpa` is a private frame of this space (count 1, mapped), held by
            // `&mut self`; `n` bytes stay inside it; `buf` is not guest memory.
            unsafe { core::ptr::copy_nonoverlapping(buf[off..].as_ptr(), dst, n) };
            self.note_written(cur, n as u64);
            off += n;
        }
        Ok(())
    }

    /// Atomic compare-and-exchange of the aligned 64-bit word at `gpa` (populating or copying
    /// its page first, like a write). `flush` collects the changes.
    fn compare_exchange_inner(
        &mut self,
        gpa: GuestPhysAddr,
        current: u64,
        new: u64,
        flush: &mut SpaceFlush<F>,
    ) -> Result<Result<u64, u64>, GuestMemError> {
        if !gpa.is_aligned(8) {
            return Err(GuestMemError::Misaligned { gpa });
        }
        let r = self.region_for(gpa, Access::Write, true)?.clone();
        let hpa = match r.linear_hpa(gpa) {
            Some(h) => h,
            None => self.private_frame(&r, gpa.align_down(PAGE), flush)? + gpa.offset_in(PAGE),
        };
        let p = self.alloc.phys_to_virt(hpa).as_ptr().cast::<u64>();
        // SAFETY: `p` is 8-byte aligned (gpa is, and frames are page-aligned in both views), in
        // a frame this space owns or was given; guest CPUs access it concurrently only through
        // atomic-compatible hardware accesses.
        let atom = unsafe { AtomicU64::from_ptr(p) };
        let res = atom.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire);
        if res.is_ok() && current != new {
            self.note_written(gpa, 8);
        }
        Ok(res)
    }
}

/// The address space as guest memory, accessed as the guest would: reads and writes are
/// checked against the regions' rights (MMIO refused, see [`AddressSpace::load_image`] to load
/// into a read-only region).
///
/// A write (or compare-exchange) may back an untouched demand-zero page or give a
/// copy-on-write page a private copy; the trait has no room for the flush that needs, so it is
/// left in the space's pending list. **Carry it out with [`AddressSpace::flush_pending`] (or any
/// later [`AddressSpace::flush`]) before resuming a vCPU of this space**: until then a vCPU may
/// still reach the old shared frame through a stale translation. A write into pages already
/// private and writable needs nothing. Reads never change the space.
impl<F: Format, A: FrameAllocator + Clone> GuestMemory for AddressSpace<F, A> {
    fn epoch(&self) -> Option<MemoryEpoch> {
        Some(AddressSpace::epoch(self))
    }

    fn read_u64_hinted(&mut self, gpa: GuestPhysAddr, hint: &mut PageHint) -> Result<u64, GuestMemError> {
        AddressSpace::read_u64_hinted(self, gpa, hint)
    }

    fn read_hinted(&mut self, gpa: GuestPhysAddr, buf: &mut [u8], hint: &mut PageHint) -> Result<(), GuestMemError> {
        AddressSpace::read_hinted(self, gpa, buf, hint)
    }

    fn read_as(&mut self, gpa: GuestPhysAddr, buf: &mut [u8], access: Access) -> Result<(), GuestMemError> {
        AddressSpace::read_as(self, gpa, buf, access)
    }

    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        let mut flush = SpaceFlush::none();
        let r = self.write_inner(gpa, buf, true, &mut flush);
        self.defer(flush);
        r
    }

    fn compare_exchange_u64(
        &mut self,
        gpa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, GuestMemError> {
        let mut flush = SpaceFlush::none();
        let r = self.compare_exchange_inner(gpa, current, new, &mut flush);
        self.defer(flush);
        r
    }
}
