//! Several vCPUs on one address space: a fair reader-writer lock and a stored invalidation.
#![forbid(unsafe_code)]

use crate::dirty::PageBitmap;
use crate::error::{DirtyLogError, ForkError};
use crate::fault::FaultOutcome;
use crate::flush::SpaceFlush;
use crate::lock::FairRwLock;
use crate::mem::{GuestMemError, GuestMemory};
use crate::space::AddressSpace;
use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, Ordering};
use twostage_npt::{Access, Format, FrameAllocator, GuestPhysAddr, InvalidationOf, NestedPageFaultInfo};

/// The invalidation callback for format `F`: carries out an invalidation of `F`'s family on every
/// CPU that may have the table loaded (INVEPT, HFENCE.GVMA, with shootdowns to the other
/// harts/cores).
pub type Invalidator<F> = Box<dyn for<'a> Fn(&InvalidationOf<'a, F>) + Send + Sync>;

/// How many CPUs a [`SharedAddressSpace`] tells apart: the `current_cpu` function given to
/// [`SharedAddressSpace::new`] returns an index below this.
pub const MAX_CPUS: usize = 256;

/// An [`AddressSpace`] shared by several vCPUs.
///
/// Locking model: one fair reader-writer lock around the whole space (readers and writers
/// enter in the order they asked, so a fault or a harvest waits only for the accesses already
/// inside or queued before it, never for readers that keep coming). Reads of guest memory take
/// the read lock (any number at once). Everything that may change the table or the frames takes
/// the write lock: fault resolution, writes (they may populate a page or break copy-on-write),
/// compare-exchange, fork, dirty harvest, region changes. The flush of each change, and
/// whatever the space had pending, is carried out with the stored [`Invalidator`] before the
/// write lock is released, so a reader never sees a frame that is being freed and a vCPU
/// resumed after a fault sees the new mapping. Guest CPUs themselves access memory without the
/// lock, as hardware does.
///
/// Re-entrance: calling into the same `SharedAddressSpace` from inside [`SharedAddressSpace::with`]
/// or [`SharedAddressSpace::with_mut`] on the same CPU (for example resolving a fault, or reading
/// through `&SharedAddressSpace` as [`GuestMemory`], while the closure runs) would wait for
/// itself forever. It is a programming error, detected through the CPU index: it panics with a
/// message naming the CPU instead of hanging.
pub struct SharedAddressSpace<F: Format, A: FrameAllocator + Clone> {
    inner: FairRwLock<AddressSpace<F, A>>,
    invalidate: Invalidator<F>,
    current_cpu: fn() -> usize,
    /// Which CPUs are inside the lock now (only each CPU writes and reads its own entry).
    inside: [AtomicBool; MAX_CPUS],
}

/// Marks the current CPU inside the lock for as long as it lives.
struct Inside<'a>(&'a AtomicBool);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl<F: Format, A: FrameAllocator + Clone> SharedAddressSpace<F, A> {
    /// Wraps `space`; `invalidate` carries out every flush. `current_cpu` returns the index
    /// (below [`MAX_CPUS`]) of the CPU calling it: the hart or core number in a hypervisor, a
    /// per-thread number in tests. It is used only to detect re-entrance.
    pub fn new(space: AddressSpace<F, A>, invalidate: Invalidator<F>, current_cpu: fn() -> usize) -> Self {
        Self {
            inner: FairRwLock::new(space, core::hint::spin_loop),
            invalidate,
            current_cpu,
            inside: [const { AtomicBool::new(false) }; MAX_CPUS],
        }
    }

    /// Sets what a CPU waiting for the lock does between checks (`core::hint::spin_loop` by
    /// default, right when each vCPU thread has a physical CPU of its own). Where threads may
    /// outnumber CPUs (tests on a host, a preempting scheduler), give a function that yields
    /// (`std::thread::yield_now`): the lock serves waiters in order, and the one whose turn it
    /// is must get a CPU.
    pub fn relax_with(mut self, relax: fn()) -> Self {
        self.inner = FairRwLock::new(self.inner.into_inner(), relax);
        self
    }

    /// Gives the space back.
    pub fn into_inner(self) -> AddressSpace<F, A> {
        self.inner.into_inner()
    }

    /// Panics if the calling CPU is already inside the lock; marks it inside otherwise.
    fn enter(&self) -> Inside<'_> {
        let cpu = (self.current_cpu)();
        assert!(cpu < MAX_CPUS, "SharedAddressSpace: CPU index {cpu} is not below MAX_CPUS ({MAX_CPUS})");
        if self.inside[cpu].swap(true, Ordering::Relaxed) {
            panic!(
                "SharedAddressSpace re-entered on CPU {cpu}: it is already locked by this CPU (inside `with` or \
                 `with_mut`), and waiting for itself would never end"
            );
        }
        Inside(&self.inside[cpu])
    }

    /// Runs `f` with the read lock held.
    ///
    /// # Panics
    /// If called from inside `with` or `with_mut` on the same CPU (see the type's documentation).
    pub fn with<R>(&self, f: impl FnOnce(&AddressSpace<F, A>) -> R) -> R {
        let _inside = self.enter();
        f(&self.inner.read())
    }

    /// Runs `f` with the write lock held; `f` returns a flush, carried out (with everything
    /// pending in the space) before unlocking.
    ///
    /// # Panics
    /// If called from inside `with` or `with_mut` on the same CPU (see the type's documentation),
    /// or if `f` returns the token of another address space (one it captured).
    pub fn with_mut<R>(&self, f: impl FnOnce(&mut AddressSpace<F, A>) -> (R, SpaceFlush<F>)) -> R {
        let _inside = self.enter();
        let mut g = self.inner.write();
        let (r, flush) = f(&mut g);
        if let Err(e) = g.flush(flush, &*self.invalidate) {
            panic!("SharedAddressSpace::with_mut: {e}");
        }
        r
    }

    /// Resolves a nested page fault and carries out its flush. A `Resolved` outcome comes back
    /// with an empty flush.
    pub fn handle_fault(&self, info: NestedPageFaultInfo) -> FaultOutcome<F> {
        self.with_mut(|s| match s.handle_fault(info) {
            FaultOutcome::Resolved { flush } => (FaultOutcome::Resolved { flush: SpaceFlush::none() }, flush),
            other => (other, SpaceFlush::none()),
        })
    }

    /// Forks the space (see [`AddressSpace::fork`]); the parent's flush is carried out.
    pub fn fork(&self) -> Result<AddressSpace<F, A>, ForkError> {
        self.with_mut(|s| match s.fork() {
            Ok((child, flush)) => (Ok(child), flush),
            Err(e) => (Err(e), SpaceFlush::none()),
        })
    }

    /// Harvests the dirty log (see [`AddressSpace::harvest_dirty`]); the re-arming flush is
    /// carried out.
    pub fn harvest_dirty(&self) -> Result<PageBitmap, DirtyLogError> {
        self.with_mut(|s| match s.harvest_dirty() {
            Ok((bits, flush)) => (Ok(bits), flush),
            Err(e) => (Err(e), SpaceFlush::none()),
        })
    }
}

/// Reads take the read lock; writes and compare-exchange take the write lock and carry out
/// their flush before returning.
impl<F: Format, A: FrameAllocator + Clone> GuestMemory for &SharedAddressSpace<F, A> {
    fn read_as(&mut self, gpa: GuestPhysAddr, buf: &mut [u8], access: Access) -> Result<(), GuestMemError> {
        self.with(|s| s.read_as(gpa, buf, access))
    }
    fn epoch(&self) -> Option<crate::MemoryEpoch> {
        Some(self.with(|s| s.epoch()))
    }
    fn read_u64_hinted(&mut self, gpa: GuestPhysAddr, hint: &mut crate::PageHint) -> Result<u64, GuestMemError> {
        self.with(|s| s.read_u64_hinted(gpa, hint))
    }
    fn read_hinted(
        &mut self,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
        hint: &mut crate::PageHint,
    ) -> Result<(), GuestMemError> {
        self.with(|s| s.read_hinted(gpa, buf, hint))
    }
    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        self.with_mut(|s| (GuestMemory::write(s, gpa, buf), SpaceFlush::none()))
    }
    fn compare_exchange_u64(
        &mut self,
        gpa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, GuestMemError> {
        self.with_mut(|s| (s.compare_exchange_u64(gpa, current, new), SpaceFlush::none()))
    }
}
