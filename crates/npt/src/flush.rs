//! Flush tokens: every change to a table names the invalidation it needs.

use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::format::{Family, Format};
use core::fmt;
use core::marker::PhantomData;

/// How many leaf addresses a token records before it widens to the whole context. Past this,
/// one HFENCE.GVMA by VMID is cheaper than a fence per page.
pub const FLUSH_ADDRESS_SLOTS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Nothing,
    Leaves { n: u8, addrs: [GuestPhysAddr; FLUSH_ADDRESS_SLOTS] },
    Context,
}

/// What must be invalidated after a change to a nested table, on every CPU that may have the
/// table loaded, before the change can be relied on (and before retired table frames are reused).
///
/// Carry it out with [`crate::PageTable::flush`], which then also frees the table frames the
/// change retired. [`Flush::ignore`] is only right for a table no CPU has loaded yet.
#[must_use = "a changed nested table must be invalidated: pass the token to PageTable::flush"]
pub struct Flush<F: Format> {
    root: HostPhysAddr,
    scope: Scope,
    _format: PhantomData<fn() -> F>,
}

/// The invalidation a [`Flush`] asks for, in hardware terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation<'a> {
    /// Nothing cached can be stale.
    None,
    /// INVEPT type 1 (single-context) with the EPTP whose root is `root`
    /// (Intel SDM Vol. 3C §29.4.3.1; INVEPT in Vol. 2A).
    InveptSingleContext {
        /// Root of the EPT whose EPTP is to be invalidated.
        root: HostPhysAddr,
    },
    /// One HFENCE.GVMA per address, rs1 = gpa >> 2, rs2 = the VMID that `root` runs under
    /// (RISC-V Privileged §9.3.2 "Hypervisor Memory-Management Fence Instructions").
    GvmaAddresses {
        /// Root of the G-stage table.
        root: HostPhysAddr,
        /// Guest-physical addresses of the leaves that changed.
        addrs: &'a [GuestPhysAddr],
    },
    /// HFENCE.GVMA with rs1 = x0 and rs2 = the VMID: a non-leaf entry changed, or too many leaves.
    GvmaAll {
        /// Root of the G-stage table.
        root: HostPhysAddr,
    },
}

impl<F: Format> Flush<F> {
    pub(crate) fn new(root: HostPhysAddr) -> Self {
        Self { root, scope: Scope::Nothing, _format: PhantomData }
    }

    /// Records that the leaf at `gpa` changed; `was_present` says whether it could have been
    /// cached before the change.
    pub(crate) fn note_leaf(&mut self, gpa: GuestPhysAddr, was_present: bool) {
        match F::FAMILY {
            // No EPT-derived translation or paging-structure-cache entry is made from a
            // not-present entry, so making one present needs no INVEPT (Intel SDM Vol. 3C
            // §29.4.2 and §29.4.3.4, as Vol. 3A §4.10.4.3 says for ordinary paging).
            Family::Ept if !was_present => {}
            Family::Ept => self.scope = Scope::Context,
            // RISC-V may cache invalid entries: even a new mapping needs a fence (this is what the
            // Svvptc extension exists to relax; it is not assumed).
            Family::GStage => match &mut self.scope {
                Scope::Context => {}
                Scope::Nothing => {
                    let mut addrs = [GuestPhysAddr::ZERO; FLUSH_ADDRESS_SLOTS];
                    addrs[0] = gpa;
                    self.scope = Scope::Leaves { n: 1, addrs };
                }
                Scope::Leaves { n, addrs } => {
                    if addrs[..*n as usize].contains(&gpa) {
                    } else if (*n as usize) < FLUSH_ADDRESS_SLOTS {
                        addrs[*n as usize] = gpa;
                        *n += 1;
                    } else {
                        self.scope = Scope::Context;
                    }
                }
            },
        }
    }

    /// Records that a non-leaf entry changed (a table was linked over a leaf, unlinked, or freed).
    pub(crate) fn note_nonleaf(&mut self) {
        self.scope = Scope::Context;
    }

    /// Root of the table the token belongs to.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// Whether nothing needs invalidating.
    pub fn is_empty(&self) -> bool {
        self.scope == Scope::Nothing
    }

    /// The invalidation to carry out.
    pub fn invalidation(&self) -> Invalidation<'_> {
        match (&self.scope, F::FAMILY) {
            (Scope::Nothing, _) => Invalidation::None,
            (_, Family::Ept) => Invalidation::InveptSingleContext { root: self.root },
            (Scope::Leaves { n, addrs }, Family::GStage) => {
                Invalidation::GvmaAddresses { root: self.root, addrs: &addrs[..*n as usize] }
            }
            (Scope::Context, Family::GStage) => Invalidation::GvmaAll { root: self.root },
        }
    }

    /// One token covering both changes. Both must come from the same table.
    #[track_caller]
    pub fn merge(mut self, other: Flush<F>) -> Flush<F> {
        assert_eq!(self.root, other.root, "merging flush tokens of two different tables");
        match other.scope {
            Scope::Nothing => {}
            Scope::Context => self.scope = Scope::Context,
            Scope::Leaves { n, addrs } => {
                for a in &addrs[..n as usize] {
                    self.note_leaf(*a, true);
                }
            }
        }
        self
    }

    /// Drops the token without invalidating anything.
    ///
    /// Right only when no CPU has this table loaded (it was never put in an EPTP or hgatp, or
    /// every CPU has since invalidated the whole context).
    pub fn ignore(self) {}
}

impl<F: Format> PartialEq for Flush<F> {
    fn eq(&self, other: &Self) -> bool {
        self.root == other.root && self.scope == other.scope
    }
}
impl<F: Format> Eq for Flush<F> {}

impl<F: Format> fmt::Debug for Flush<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flush<{}>({:?})", F::NAME, self.invalidation())
    }
}
