//! hgatp: the G-stage root, mode and VMID, checked against what the hart offers.

use crate::addr::HostPhysAddr;
use crate::format::{Format, Sv39x4, Sv48x4, Sv57x4};
use crate::frame::FrameAllocator;
use crate::table::PageTable;
use core::fmt;

/// hgatp.MODE (RISC-V Privileged §9.2.10 "Hypervisor Guest Address Translation and Protection
/// Register", Table 9.3: 0 Bare, 8 Sv39x4, 9 Sv48x4, 10 Sv57x4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HgatpMode {
    /// No G-stage translation.
    Bare = 0,
    /// Sv39x4.
    Sv39x4 = 8,
    /// Sv48x4.
    Sv48x4 = 9,
    /// Sv57x4.
    Sv57x4 = 10,
}

/// Formats hgatp can point at.
pub trait GStageFormat: Format<Family = crate::flush::GStageFamily> {
    /// The hgatp mode selecting this format.
    const MODE: HgatpMode;
}
impl GStageFormat for Sv39x4 {
    const MODE: HgatpMode = HgatpMode::Sv39x4;
}
impl GStageFormat for Sv48x4 {
    const MODE: HgatpMode = HgatpMode::Sv48x4;
}
impl GStageFormat for Sv57x4 {
    const MODE: HgatpMode = HgatpMode::Sv57x4;
}

/// What a hart offers, learned by writing hgatp and reading it back: a mode that is not
/// supported leaves hgatp unchanged (WARL, §9.2.10), and VMID bits that are not implemented read
/// as zero (VMIDLEN is found by writing ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HgatpCapabilities {
    /// Sv39x4 is offered.
    pub sv39x4: bool,
    /// Sv48x4 is offered.
    pub sv48x4: bool,
    /// Sv57x4 is offered.
    pub sv57x4: bool,
    /// VMIDLEN: how many VMID bits are implemented (0 to 14).
    pub vmid_bits: u8,
}

impl HgatpCapabilities {
    /// From the probe: `readback(mode)` is the MODE field read back after writing `mode`, and
    /// `vmid_readback` the VMID field read back after writing all ones.
    pub fn from_probe(mut readback: impl FnMut(HgatpMode) -> u64, vmid_readback: u64) -> Self {
        let mut probe = |m: HgatpMode| readback(m) == m as u64;
        Self {
            sv39x4: probe(HgatpMode::Sv39x4),
            sv48x4: probe(HgatpMode::Sv48x4),
            sv57x4: probe(HgatpMode::Sv57x4),
            vmid_bits: (vmid_readback & Hgatp::VMID_MASK).count_ones() as u8,
        }
    }

    /// Whether `mode` is offered (Bare always is).
    pub fn offers(&self, mode: HgatpMode) -> bool {
        match mode {
            HgatpMode::Bare => true,
            HgatpMode::Sv39x4 => self.sv39x4,
            HgatpMode::Sv48x4 => self.sv48x4,
            HgatpMode::Sv57x4 => self.sv57x4,
        }
    }
}

/// Why an hgatp value could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HgatpError {
    /// The hart does not offer this mode.
    ModeUnsupported(HgatpMode),
    /// The VMID needs more bits than VMIDLEN.
    VmidTooWide {
        /// The VMID asked for.
        vmid: u16,
        /// VMIDLEN.
        vmid_bits: u8,
    },
    /// MODE is Bare and the VMID or the root is not zero: with Bare the other fields must be
    /// zero (RISC-V Privileged spec, "Hypervisor Guest Address Translation and Protection
    /// Register (hgatp)"), and a nonzero one is no "table" that could be loaded.
    BareWithFields {
        /// The VMID asked for.
        vmid: u16,
        /// The root asked for.
        root: HostPhysAddr,
    },
    /// The root is not 16 KiB-aligned (its PPN's two low bits must be zero, §9.2.10) or is
    /// beyond the 44-bit PPN.
    BadRoot(HostPhysAddr),
}

impl fmt::Display for HgatpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ModeUnsupported(mode) => write!(f, "the hart does not offer hgatp mode {mode:?}"),
            Self::VmidTooWide { vmid, vmid_bits } => {
                write!(f, "VMID {vmid} does not fit in the hart's {vmid_bits} VMID bits")
            }
            Self::BareWithFields { vmid, root } => {
                write!(f, "hgatp mode Bare needs VMID and root zero (got VMID {vmid}, root {:#x})", root.as_u64())
            }
            Self::BadRoot(root) => {
                write!(f, "G-stage root {:#x} is not 16 KiB-aligned or does not fit the 44-bit PPN", root.as_u64())
            }
        }
    }
}
impl core::error::Error for HgatpError {}

/// An hgatp value: MODE (63:60), VMID (57:44), PPN (43:0).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Hgatp(u64);

impl Hgatp {
    const MODE_SHIFT: u32 = 60;
    const VMID_SHIFT: u32 = 44;
    /// VMID field mask once shifted down (14 bits).
    pub const VMID_MASK: u64 = (1 << 14) - 1;
    const PPN_MASK: u64 = (1 << 44) - 1;

    /// hgatp for a G-stage root in `mode` with `vmid`. For [`HgatpMode::Bare`] (no G-stage
    /// translation) `vmid` and `root` must be zero.
    pub fn new(mode: HgatpMode, vmid: u16, root: HostPhysAddr, caps: &HgatpCapabilities) -> Result<Self, HgatpError> {
        if !caps.offers(mode) {
            return Err(HgatpError::ModeUnsupported(mode));
        }
        if mode == HgatpMode::Bare && (vmid != 0 || root != HostPhysAddr::ZERO) {
            return Err(HgatpError::BareWithFields { vmid, root });
        }
        if u32::from(vmid) >> caps.vmid_bits != 0 {
            return Err(HgatpError::VmidTooWide { vmid, vmid_bits: caps.vmid_bits });
        }
        if !root.is_aligned(16 * 1024) || (root.as_u64() >> 12) > Self::PPN_MASK {
            return Err(HgatpError::BadRoot(root));
        }
        Ok(Self((mode as u64) << Self::MODE_SHIFT | (u64::from(vmid) << Self::VMID_SHIFT) | (root.as_u64() >> 12)))
    }

    /// hgatp for `table` with `vmid`.
    pub fn for_table<F: GStageFormat, A: FrameAllocator>(
        table: &PageTable<F, A>,
        vmid: u16,
        caps: &HgatpCapabilities,
    ) -> Result<Self, HgatpError> {
        Self::new(F::MODE, vmid, table.root(), caps)
    }

    /// The value to write into the CSR.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// The VMID.
    pub const fn vmid(self) -> u16 {
        ((self.0 >> Self::VMID_SHIFT) & Self::VMID_MASK) as u16
    }
    /// The root's address.
    pub const fn root(self) -> HostPhysAddr {
        HostPhysAddr::new_truncate((self.0 & Self::PPN_MASK) << 12)
    }
    /// The raw MODE field.
    pub const fn mode_bits(self) -> u64 {
        self.0 >> Self::MODE_SHIFT
    }
}

impl fmt::Debug for Hgatp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hgatp({:#x}: mode {}, vmid {}, root {:?})", self.0, self.mode_bits(), self.vmid(), self.root())
    }
}
