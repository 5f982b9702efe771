//! Guest stage-1 walks (x86-64 paging, RISC-V VS-stage) whose table accesses go through stage 2.
//!
//! Every guest paging-structure read, every guest A/D update and the final access are
//! guest-physical accesses that a [`Stage2`] translates; a stage-2 fault on the way is reported as
//! `Stage2 { fault, during_walk }`. Adapters: [`EptStage2`] and [`GstageStage2`] (fresh walks),
//! [`EptTlbStage2`] and [`GstageTlbStage2`] (through a TLB model), [`NoStage2`] (identity).

pub mod riscv;
pub mod x86;

use core::convert::Infallible;

use crate::ept::{self, EptAccess, EptCaps, EptExit, GuestLinear};
use crate::gstage::{self, GRequest, GstageConfig, GstageFault};
use crate::tlb::{EptTlb, GstageTlb};
use crate::{Access, Gpa, Gva, Hpa, PhysMem};

/// The privilege of the guest code making the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// x86 CPL 3 / RISC-V VU-mode.
    User,
    /// x86 CPL 0-2 / RISC-V VS-mode.
    Supervisor,
}

/// What a guest-physical access made during a stage-1 translation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage2Kind {
    /// An implicit read of a guest paging-structure entry.
    TableRead,
    /// An implicit write of a guest paging-structure entry (setting A and/or D).
    TableUpdate,
    /// The access itself, at the translated guest-physical address.
    Final,
}

/// One guest-physical access to translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stage2Request {
    /// The guest-physical address (of a guest PTE, or the final address).
    pub gpa: Gpa,
    /// The guest-virtual address being translated.
    pub gva: Gva,
    /// The guest's original access.
    pub original: Access,
    /// What this access is for.
    pub kind: Stage2Kind,
}

/// A second stage: translates the guest-physical accesses a stage-1 walk makes.
pub trait Stage2 {
    /// What a failed translation reports.
    type Fault;
    /// Translates `req.gpa` for the access `req` describes.
    fn translate(&mut self, mem: &mut dyn PhysMem, req: &Stage2Request) -> Result<Hpa, Self::Fault>;
}

/// No second stage: guest-physical equals host-physical (for testing stage 1 alone).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoStage2;

impl Stage2 for NoStage2 {
    type Fault = Infallible;
    fn translate(&mut self, _mem: &mut dyn PhysMem, req: &Stage2Request) -> Result<Hpa, Infallible> {
        Ok(Hpa(req.gpa.0))
    }
}

/// The EPT access and guest-linear information for a stage-1 access (Intel SDM Vol. 3C).
///
/// - Guest paging-structure reads are data reads (29.3.3.2); "If accessed and dirty flags for
///   EPT are enabled, processor accesses to guest paging-structure entries are treated as
///   writes" and such a violation sets both bits 0 and 1 of the qualification (29.3.5,
///   Table 28-7 footnote).
/// - Guest A/D updates are read and write, with EPT A/D enabled or not. The processor sets a
///   guest accessed or dirty flag with a locked read-modify-write of the entry (Intel SDM
///   Vol. 3A 9.1.2.1 "Automatic Locking", 8.1.2.1 in older editions: "the processor uses
///   locked cycles to set the accessed and dirty flag"), and 29.3.3.2 counts those writes as
///   data writes. Table 28-7 (note to bits 0-1): an EPT violation caused by a read-modify-write
///   sets bit 1, and whether it also sets bit 0 is implementation-specific. Intel processors
///   set both for this update, which is what kvm-unit-tests' `ept_access_test_paddr_read_only_
///   ad_disabled` expects (RD | WR | PERM_RD with EPT A/D off); the model does the same (it
///   used to report bit 1 alone). Checked as read and write, the update needs bits 0 and 1 of
///   the EPT entries; write without read is a misconfiguration anyway, so only the reported
///   qualification differs from a write-only check.
/// - Bit 7 (GLA valid) is set for all of them; bit 8 only for the final access.
pub fn ept_request(eptp: u64, req: &Stage2Request) -> (EptAccess, GuestLinear) {
    let ad = eptp & (1 << 6) != 0;
    match req.kind {
        Stage2Kind::TableRead if ad => (EptAccess::READ_WRITE, GuestLinear::PAGING_STRUCTURE),
        Stage2Kind::TableRead => (EptAccess::READ, GuestLinear::PAGING_STRUCTURE),
        Stage2Kind::TableUpdate => (EptAccess::READ_WRITE, GuestLinear::PAGING_STRUCTURE),
        Stage2Kind::Final => (EptAccess::from(req.original), GuestLinear::TRANSLATION),
    }
}

/// The G-stage request for a stage-1 access (RISC-V Privileged, "Guest Physical Address
/// Translation" and the htinst pseudoinstruction table): implicit reads are checked as loads,
/// A/D updates as stores, and any fault is reported for the original access type.
pub fn gstage_request(req: &Stage2Request) -> GRequest {
    match req.kind {
        Stage2Kind::TableRead => GRequest::vs_table_read(req.original),
        Stage2Kind::TableUpdate => GRequest::vs_table_update(req.original),
        Stage2Kind::Final => GRequest::explicit(req.original),
    }
}

/// EPT as the second stage, walking the tables afresh for every access.
#[derive(Clone, Copy, Debug)]
pub struct EptStage2 {
    /// The raw EPTP.
    pub eptp: u64,
    /// The processor's capabilities.
    pub caps: EptCaps,
}

impl Stage2 for EptStage2 {
    type Fault = EptExit;
    fn translate(&mut self, mem: &mut dyn PhysMem, req: &Stage2Request) -> Result<Hpa, EptExit> {
        let (access, gla) = ept_request(self.eptp, req);
        ept::walk(mem, self.eptp, &self.caps, req.gpa, access, gla).map(|w| w.hpa)
    }
}

/// G-stage as the second stage, walking the tables afresh for every access.
#[derive(Clone, Copy, Debug)]
pub struct GstageStage2 {
    /// The raw hgatp.
    pub hgatp: u64,
    /// The hart's G-stage options.
    pub cfg: GstageConfig,
}

impl Stage2 for GstageStage2 {
    type Fault = GstageFault;
    fn translate(&mut self, mem: &mut dyn PhysMem, req: &Stage2Request) -> Result<Hpa, GstageFault> {
        gstage::walk_with(mem, self.hgatp, &self.cfg, req.gpa, gstage_request(req)).map(|w| w.hpa)
    }
}

/// EPT as the second stage, through an [`EptTlb`].
#[derive(Debug)]
pub struct EptTlbStage2<'a> {
    /// The TLB model (may hold stale translations: that is the point).
    pub tlb: &'a mut EptTlb,
    /// The raw EPTP.
    pub eptp: u64,
    /// The processor's capabilities.
    pub caps: EptCaps,
}

impl Stage2 for EptTlbStage2<'_> {
    type Fault = EptExit;
    fn translate(&mut self, mem: &mut dyn PhysMem, req: &Stage2Request) -> Result<Hpa, EptExit> {
        let (access, gla) = ept_request(self.eptp, req);
        self.tlb.translate(mem, self.eptp, &self.caps, req.gpa, access, gla).map(|w| w.hpa)
    }
}

/// G-stage as the second stage, through a [`GstageTlb`].
#[derive(Debug)]
pub struct GstageTlbStage2<'a> {
    /// The TLB model.
    pub tlb: &'a mut GstageTlb,
    /// The raw hgatp.
    pub hgatp: u64,
    /// The hart's G-stage options.
    pub cfg: GstageConfig,
}

impl Stage2 for GstageTlbStage2<'_> {
    type Fault = GstageFault;
    fn translate(&mut self, mem: &mut dyn PhysMem, req: &Stage2Request) -> Result<Hpa, GstageFault> {
        self.tlb.translate_with(mem, self.hgatp, &self.cfg, req.gpa, gstage_request(req)).map(|w| w.hpa)
    }
}
