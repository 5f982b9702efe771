//! Flush tokens: every change to a table names the invalidation it needs.

use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::format::Format;
use core::fmt;
use core::marker::PhantomData;
use sealed::Scope;

/// How many leaf addresses a token records before it widens to the whole context. Past this,
/// one HFENCE.GVMA by VMID is cheaper than a fence per page. Kept small because tokens move by
/// value on every fault (four addresses: a token fits in 48 bytes, moved without a memcpy call;
/// with 16 the moves were about a fifth of a demand fault's instructions).
pub const FLUSH_ADDRESS_SLOTS: usize = 4;

/// What must be invalidated after a change to a nested table, on every CPU that may have the
/// table loaded, before the change can be relied on (and before retired table frames are reused).
///
/// Carry it out with [`crate::PageTable::flush`], which then also frees the table frames the
/// change retired. [`Flush::ignore`] is only right for a table no CPU has loaded yet.
#[must_use = "a changed nested table must be invalidated: pass the token to PageTable::flush"]
pub struct Flush<F: Format> {
    root: HostPhysAddr,
    scope: Scope,
    /// G-stage: whether a hart other than the one carrying the token out may hold a
    /// translation the change made wrong (see [`GvmaInvalidation::Local`] for when it cannot).
    others: bool,
    _format: PhantomData<fn() -> F>,
}

/// Which kind of invalidation a family of formats uses (for code that must branch on it, such as
/// the choice of a dirty-logging method).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyKind {
    /// Intel EPT: invalidated per EPTP with INVEPT; not-present entries are never cached.
    Ept,
    /// RISC-V G-stage: invalidated with HFENCE.GVMA by guest-physical address and VMID.
    GStage,
}

mod sealed {
    /// What a token covers (crate-private: reachable only through the sealed trait).
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Scope {
        Nothing,
        Leaves { n: u8, addrs: [super::GuestPhysAddr; super::FLUSH_ADDRESS_SLOTS] },
        Context,
    }

    pub trait Sealed {}
    impl Sealed for super::EptFamily {}
    impl Sealed for super::GStageFamily {}
}

/// A family of formats that share one invalidation instruction. Sealed: the engine knows how each
/// family caches translations, so no other family can be added from outside.
pub trait Family: sealed::Sealed + 'static {
    /// What the family's kind is.
    const KIND: FamilyKind;
    /// The invalidation a token of this family asks for: only instructions of this family can be
    /// named, so an EPT token can never be handed to HFENCE.GVMA, nor the reverse.
    type Invalidation<'a>: Copy + fmt::Debug + PartialEq + Eq;
    /// The invalidation that asks for nothing.
    fn nothing<'a>() -> Self::Invalidation<'a>;
    #[doc(hidden)]
    fn invalidation(root: HostPhysAddr, scope: &Scope, others: bool) -> Self::Invalidation<'_>;
}

/// Intel EPT ([`crate::Ept4`], [`crate::Ept5`]): invalidated with INVEPT.
#[derive(Debug)]
pub enum EptFamily {}

/// RISC-V G-stage ([`crate::Sv39x4`], [`crate::Sv48x4`], [`crate::Sv57x4`]): invalidated with
/// HFENCE.GVMA.
#[derive(Debug)]
pub enum GStageFamily {}

/// The invalidation an EPT token asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptInvalidation {
    /// Nothing cached can be stale (only not-present entries became present).
    None,
    /// INVEPT type 1 (single-context) with the EPTP whose root is `root`
    /// (Intel SDM Vol. 3C §29.4.3.1 "Operations that invalidate cached mappings"; INVEPT in
    /// Vol. 2A). Where the CPU offers only all-context INVEPT, that one covers it too.
    SingleContext {
        /// Root of the EPT whose EPTP is to be invalidated.
        root: HostPhysAddr,
    },
}

/// The invalidation a G-stage token asks for (RISC-V Privileged spec, "Hypervisor
/// Memory-Management Fence Instructions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GvmaInvalidation<'a> {
    /// Nothing changed.
    None,
    /// One HFENCE.GVMA per address, rs1 = gpa >> 2, rs2 = the VMID that `root` runs under.
    Addresses {
        /// Root of the G-stage table.
        root: HostPhysAddr,
        /// Guest-physical addresses of the leaves that changed.
        addrs: &'a [GuestPhysAddr],
    },
    /// HFENCE.GVMA with rs1 = x0 and rs2 = the VMID: a non-leaf entry changed, or too many leaves.
    All {
        /// Root of the G-stage table.
        root: HostPhysAddr,
    },
    /// The change only widened what the table allows: entries that were invalid became valid
    /// (a new leaf, a new table linked into an empty entry), a leaf gained rights (`protect`
    /// keeping its frame and memory type) or its accessed/dirty bits, or nothing changed and a hart faulted on an entry that is already valid (a stale
    /// fault). Only the hart carrying the token out fences: by address for each of `addrs`, or
    /// the whole VMID for `None`.
    ///
    /// No other hart can be harmed by what it cached of the old entries. A hart may cache an
    /// invalid entry (RISC-V Privileged spec, "Virtual Address Translation Process": "This
    /// specification permits the caching of PTEs whose V (Valid) bit is clear") and keep using
    /// it until it fences, but all it does with such an entry is take a guest-page fault; and a
    /// cached leaf that lacks A, D or a permission the new entry has also only faults (the
    /// access-fault checks of the same section, and Svade's). The old entry never gave an
    /// answer the new one contradicts, only faults. Such a fault reaches the hypervisor, which
    /// finds the entry valid and allowing the access and resolves it as stale, with a fence on
    /// that hart alone ([`crate::PageTable::stale_fault_flush`]). What an HFENCE.GVMA on
    /// another hart would buy is one trap less on that hart, paid with an interrupt and a
    /// fence on every hart for every change. Svvptc, where present, bounds how long the
    /// invalid entry is kept; it is not assumed.
    Local {
        /// Root of the G-stage table.
        root: HostPhysAddr,
        /// The leaves to fence by address, or `None` for the whole VMID (a table was linked,
        /// or a stale fault, whose cached entry may be an invalid non-leaf one).
        addrs: Option<&'a [GuestPhysAddr]>,
    },
}

/// The invalidation type of format `F`'s family: [`EptInvalidation`] or [`GvmaInvalidation`].
pub type InvalidationOf<'a, F> = <<F as Format>::Family as Family>::Invalidation<'a>;

impl Family for EptFamily {
    const KIND: FamilyKind = FamilyKind::Ept;
    type Invalidation<'a> = EptInvalidation;
    fn nothing<'a>() -> Self::Invalidation<'a> {
        EptInvalidation::None
    }
    fn invalidation(root: HostPhysAddr, scope: &Scope, _others: bool) -> EptInvalidation {
        match scope {
            Scope::Nothing => EptInvalidation::None,
            _ => EptInvalidation::SingleContext { root },
        }
    }
}

impl Family for GStageFamily {
    const KIND: FamilyKind = FamilyKind::GStage;
    type Invalidation<'a> = GvmaInvalidation<'a>;
    fn nothing<'a>() -> GvmaInvalidation<'a> {
        GvmaInvalidation::None
    }
    fn invalidation(root: HostPhysAddr, scope: &Scope, others: bool) -> GvmaInvalidation<'_> {
        match (scope, others) {
            (Scope::Nothing, _) => GvmaInvalidation::None,
            (Scope::Leaves { n, addrs }, true) => GvmaInvalidation::Addresses { root, addrs: &addrs[..*n as usize] },
            (Scope::Context, true) => GvmaInvalidation::All { root },
            (Scope::Leaves { n, addrs }, false) => GvmaInvalidation::Local { root, addrs: Some(&addrs[..*n as usize]) },
            (Scope::Context, false) => GvmaInvalidation::Local { root, addrs: None },
        }
    }
}

impl<F: Format> Flush<F> {
    pub(crate) fn new(root: HostPhysAddr) -> Self {
        Self { root, scope: Scope::Nothing, others: false, _format: PhantomData }
    }

    /// Records that the leaf at `gpa` changed; `was_present` says whether it could have been
    /// cached before the change (G-stage: if it was, other harts must fence too).
    pub(crate) fn note_leaf(&mut self, gpa: GuestPhysAddr, was_present: bool) {
        self.others |= was_present;
        self.note_leaf_address(gpa, was_present);
    }

    /// Records that the valid leaf at `gpa` gained accessed/dirty bits and nothing else: on the
    /// G-stage a hart that cached it without them only faults ([`GvmaInvalidation::Local`]).
    pub(crate) fn note_leaf_widened(&mut self, gpa: GuestPhysAddr) {
        if <F::Family as Family>::KIND == FamilyKind::Ept {
            self.others = true;
        }
        self.note_leaf_address(gpa, true);
    }

    /// Records a fault on an entry that already allows the access: the faulting hart must drop
    /// what it cached (G-stage: the whole VMID, [`GvmaInvalidation::Local`]); nothing changed
    /// for the others.
    pub(crate) fn note_stale(&mut self) {
        if <F::Family as Family>::KIND == FamilyKind::GStage {
            self.scope = Scope::Context;
        }
    }

    fn note_leaf_address(&mut self, gpa: GuestPhysAddr, was_present: bool) {
        match <F::Family as Family>::KIND {
            // No EPT-derived translation or paging-structure-cache entry is made from a
            // not-present entry, so making one present needs no INVEPT (Intel SDM Vol. 3C
            // §29.4.2 and §29.4.3.4, as Vol. 3A §4.10.4.3 says for ordinary paging).
            FamilyKind::Ept if !was_present => {}
            FamilyKind::Ept => self.scope = Scope::Context,
            // RISC-V may cache invalid entries: even a new mapping needs a fence (this is what the
            // Svvptc extension exists to relax; it is not assumed).
            FamilyKind::GStage => match &mut self.scope {
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
        self.others = true;
    }

    /// Records that a new table was linked into an entry that was not present.
    ///
    /// EPT: nothing is cached from a not-present entry (Intel SDM Vol. 3C §29.4.2), so nothing
    /// is needed. G-stage: this is a change to a non-leaf entry, and an HFENCE.GVMA with an
    /// address covers only leaf entries (RISC-V Privileged spec, "Supervisor Memory-Management
    /// Fence Instruction" commentary, which "Hypervisor Memory-Management Fence Instructions"
    /// follows: after modifying a non-leaf PTE, fence with rs1 = x0), while the hart may have
    /// cached the invalid entry: the whole VMID is fenced, on this hart only
    /// ([`GvmaInvalidation::Local`]: another hart that cached the invalid entry only faults).
    pub(crate) fn note_table_linked(&mut self) {
        match <F::Family as Family>::KIND {
            FamilyKind::Ept => {}
            FamilyKind::GStage => self.scope = Scope::Context,
        }
    }

    /// Root of the table the token belongs to.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// Whether nothing needs invalidating.
    pub fn is_empty(&self) -> bool {
        self.scope == Scope::Nothing
    }

    /// Whether the invalidation covers every translation and paging-structure entry of the table
    /// (INVEPT single-context; HFENCE.GVMA by VMID), and so also every table frame any change
    /// retired, whichever token that change returned.
    pub fn covers_whole_table(&self) -> bool {
        match <F::Family as Family>::KIND {
            FamilyKind::Ept => self.scope != Scope::Nothing,
            // A fence on one hart only ([`GvmaInvalidation::Local`]) leaves the others' caches.
            FamilyKind::GStage => self.scope == Scope::Context && self.others,
        }
    }

    /// Whether every hart that may hold the table's translations must carry the invalidation
    /// out, not only the one that made the change (G-stage; always true for a non-empty EPT
    /// token).
    pub fn needs_other_harts(&self) -> bool {
        match <F::Family as Family>::KIND {
            FamilyKind::Ept => self.scope != Scope::Nothing,
            FamilyKind::GStage => self.scope != Scope::Nothing && self.others,
        }
    }

    /// The invalidation to carry out: an [`EptInvalidation`] for EPT formats, a
    /// [`GvmaInvalidation`] for G-stage formats.
    pub fn invalidation(&self) -> InvalidationOf<'_, F> {
        F::Family::invalidation(self.root, &self.scope, self.others)
    }

    /// One token covering both changes. Both must come from the same table.
    #[track_caller]
    pub fn merge(mut self, other: Flush<F>) -> Flush<F> {
        assert_eq!(self.root, other.root, "merging flush tokens of two different tables");
        self.others |= other.others;
        match other.scope {
            Scope::Nothing => {}
            Scope::Context => self.scope = Scope::Context,
            Scope::Leaves { n, addrs } => {
                for a in &addrs[..n as usize] {
                    self.note_leaf_address(*a, true);
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

/// A flush token handed to [`crate::PageTable::flush`] of a table it does not belong to. Nothing
/// was invalidated and no frame was freed; the token is inside, to be carried out on its own
/// table ([`ForeignFlush::into_token`]).
#[must_use = "the token inside still needs carrying out on its own table"]
pub struct ForeignFlush<F: Format> {
    // Boxed so that `Result<(), ForeignFlush<F>>` stays two words on the path that succeeds.
    token: alloc::boxed::Box<Flush<F>>,
    table: HostPhysAddr,
}

impl<F: Format> ForeignFlush<F> {
    pub(crate) fn new(token: Flush<F>, table: HostPhysAddr) -> Self {
        Self { token: alloc::boxed::Box::new(token), table }
    }
    /// Root of the table the token was handed to.
    pub fn table_root(&self) -> HostPhysAddr {
        self.table
    }
    /// The token, given back whole.
    pub fn into_token(self) -> Flush<F> {
        *self.token
    }
}

impl<F: Format> fmt::Debug for ForeignFlush<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForeignFlush").field("token", &self.token).field("table", &self.table).finish()
    }
}

impl<F: Format> fmt::Display for ForeignFlush<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} flush token of the table rooted at {:#x} handed to the table rooted at {:#x}: nothing was invalidated",
            F::NAME,
            self.token.root().as_u64(),
            self.table.as_u64()
        )
    }
}

impl<F: Format> core::error::Error for ForeignFlush<F> {}

impl<F: Format> PartialEq for Flush<F> {
    fn eq(&self, other: &Self) -> bool {
        self.root == other.root && self.scope == other.scope && self.others == other.others
    }
}
impl<F: Format> Eq for Flush<F> {}

impl<F: Format> fmt::Debug for Flush<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flush<{}>({:?})", F::NAME, self.invalidation())
    }
}
