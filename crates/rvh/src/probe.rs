//! Probing what the hart offers: the H extension, hgatp modes and VMIDLEN, G-stage A/D updating.

use crate::csr::cause;
use crate::csr::hgatp::{MODE_SHIFT, VMID_MASK, VMID_SHIFT};
use crate::extable::HwFault;
use core::fmt;
use twostage_npt::{HgatpCapabilities, HgatpMode};

/// The hgatp CSR and the fence a probe needs, as a trait so that host tests can fake the hart.
///
/// hgatp is WARL (Privileged spec, "Hypervisor Guest Address Translation and Protection Register
/// (hgatp)"): a write of an unsupported MODE has no effect at all, and VMID bits beyond VMIDLEN
/// read as zero.
pub trait HgatpAccess {
    /// Reads hgatp.
    fn read(&mut self) -> u64;
    /// Writes hgatp.
    fn write(&mut self, value: u64);
    /// HFENCE.GVMA with rs1 = rs2 = x0: forgets every guest-physical translation of every VMID.
    fn fence_all(&mut self);
}

/// The paged modes, narrowest first: the VMID probe uses the first one the hart offers.
const PAGED: [HgatpMode; 3] = [HgatpMode::Sv39x4, HgatpMode::Sv48x4, HgatpMode::Sv57x4];

/// Probes hgatp and leaves it as it was.
///
/// Each paged mode is written with VMID 0 and PPN 0, after a write of 0 (Bare with every other
/// field zero, as the spec requires of Bare), and is offered when its MODE reads back. VMIDLEN is
/// then found by writing VMID all ones with the first offered paged mode and PPN 0, and counting
/// the bits that stick. Bare is never written with a non-zero VMID or PPN: the spec leaves what
/// then happens unspecified, and a hart may keep garbage there. A hart with no paged mode has no
/// use for a VMID: VMIDLEN is reported as 0. Finally the saved value is written back and every
/// VMID fenced, since the probe values may have been cached under any VMID.
pub fn probe_hgatp(hart: &mut impl HgatpAccess) -> HgatpCapabilities {
    let saved = hart.read();
    let mut offered = [false; PAGED.len()];
    for (o, m) in offered.iter_mut().zip(PAGED) {
        hart.write(0);
        hart.write((m as u64) << MODE_SHIFT);
        *o = hart.read() >> MODE_SHIFT == m as u64;
    }
    let vmid = match PAGED.iter().zip(offered).find(|(_, o)| *o) {
        Some((&m, _)) => {
            hart.write(0);
            hart.write(((m as u64) << MODE_SHIFT) | (VMID_MASK << VMID_SHIFT));
            let r = hart.read();
            if r >> MODE_SHIFT == m as u64 {
                (r >> VMID_SHIFT) & VMID_MASK
            } else {
                0
            }
        }
        None => 0,
    };
    hart.write(saved);
    hart.fence_all();
    HgatpCapabilities { sv39x4: offered[0], sv48x4: offered[1], sv57x4: offered[2], vmid_bits: vmid.count_ones() as u8 }
}

/// The ISA string of the first hart (the device tree's `riscv,isa`), with extension letters
/// checked: `misa` itself is a machine-level CSR (Privileged spec, "Machine ISA Register misa")
/// that HS-mode cannot read, so the H bit (misa bit 7) is learned from the string OpenSBI/QEMU
/// put in the tree.
pub fn isa_has_h(isa: &str) -> bool {
    // "rv64imafdch_zicsr_..." : single-letter extensions come before the first '_'.
    let base = isa.split('_').next().unwrap_or("");
    base.len() > 4 && base.starts_with("rv") && base[4..].contains('h')
}

/// How the hart treats the A and D bits of G-stage leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GStageAd {
    /// The hart sets A on an access, and D on a store, itself (Svadu with menvcfg.ADUE = 1;
    /// QEMU 7.2 always does): tables may start with A = D = 0 ([`twostage_npt::AdMode::Hardware`]).
    Hardware,
    /// An access through a leaf with A = 0, or a store through one with D = 0, is a guest-page
    /// fault (Svade behaviour; Privileged spec, "Svade" and "Svadu" extension chapters): tables
    /// must preset them ([`twostage_npt::AdMode::Preset`]) or the fault handler must set them
    /// ([`twostage_npt::AdMode::Software`]).
    Faults,
}

/// The A/D probe ended in a way neither behaviour explains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdProbeError {
    /// The load completed but A stayed clear.
    NeitherSetNorFaulted,
    /// The load took a fault other than a load guest-page fault.
    UnexpectedFault(HwFault),
}

impl fmt::Display for AdProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NeitherSetNorFaulted => f.write_str("the load through an A=0 leaf neither set A nor faulted"),
            Self::UnexpectedFault(h) => {
                write!(f, "the load through an A=0 leaf took scause {} ({})", h.scause, cause::name(h.scause))
            }
        }
    }
}

impl core::error::Error for AdProbeError {}

/// Reads the A/D probe: an HLV load through a G-stage leaf that allows it but has A = 0 either
/// completed with A now set ([`GStageAd::Hardware`]) or took a load guest-page fault (scause 21)
/// with A still clear ([`GStageAd::Faults`]).
pub fn classify_ad_probe(load: Result<(), HwFault>, accessed_after: bool) -> Result<GStageAd, AdProbeError> {
    match load {
        Ok(()) if accessed_after => Ok(GStageAd::Hardware),
        Ok(()) => Err(AdProbeError::NeitherSetNorFaulted),
        Err(f) if f.scause == cause::LOAD_GUEST_PAGE && !accessed_after => Ok(GStageAd::Faults),
        Err(f) => Err(AdProbeError::UnexpectedFault(f)),
    }
}

/// Whether a device tree's ISA description names extension `ext` (lower case, e.g. "svadu"):
/// `value` is a `riscv,isa` string ("rv64imafdch_zicsr_svadu", multi-letter extensions after
/// underscores) or a `riscv,isa-extensions` string list ("i\0m\0...\0svadu\0"). Only a hint: QEMU
/// 7.2 updates A/D bits without listing Svadu, so the image decides by [`classify_ad_probe`].
pub fn isa_lists(value: &[u8], ext: &str) -> bool {
    value.split(|&b| b == 0 || b == b'_').any(|name| name.eq_ignore_ascii_case(ext.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// A fake hart's hgatp: WARL as the spec says for the modes it implements, and, when
    /// `bare_garbage`, keeping every VMID bit written with MODE = Bare (what a hart may do with a
    /// write the spec leaves unspecified). Records every write and fence.
    struct Fake {
        modes: &'static [u64],
        vmid_bits: u32,
        bare_garbage: bool,
        value: u64,
        log: Vec<Op>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Op {
        Write(u64),
        Fence,
    }

    impl Fake {
        fn new(modes: &'static [u64], vmid_bits: u32) -> Self {
            Self { modes, vmid_bits, bare_garbage: false, value: 0, log: Vec::new() }
        }
    }

    impl HgatpAccess for Fake {
        fn read(&mut self) -> u64 {
            self.value
        }
        fn write(&mut self, v: u64) {
            self.log.push(Op::Write(v));
            let mode = v >> 60;
            if mode == 0 && self.bare_garbage {
                self.value = v | (0x3fff << 44);
            } else if mode == 0 || self.modes.contains(&mode) {
                let vmid = (v >> 44) & ((1 << self.vmid_bits) - 1);
                self.value = (mode << 60) | (vmid << 44) | (v & ((1 << 44) - 1));
            }
        }
        fn fence_all(&mut self) {
            self.log.push(Op::Fence);
        }
    }

    fn no_bare_with_fields(log: &[Op]) {
        for op in log {
            if let Op::Write(v) = *op {
                assert!(v >> 60 != 0 || v == 0, "Bare written with non-zero fields: {v:#x}");
            }
        }
    }

    #[test]
    fn probes_modes_and_vmid_width() {
        let caps = probe_hgatp(&mut Fake::new(&[8, 9], 7));
        assert!(caps.sv39x4 && caps.sv48x4 && !caps.sv57x4);
        assert_eq!(caps.vmid_bits, 7);
        let caps = probe_hgatp(&mut Fake::new(&[8, 9, 10], 14));
        assert!(caps.sv57x4);
        assert_eq!(caps.vmid_bits, 14);
        // A mode refused after a supported one is not mistaken for supported.
        let caps = probe_hgatp(&mut Fake::new(&[10], 0));
        assert!(!caps.sv39x4 && !caps.sv48x4 && caps.sv57x4);
        assert_eq!(caps.vmid_bits, 0);
        // VMIDLEN through the only paged mode there is.
        assert_eq!(probe_hgatp(&mut Fake::new(&[10], 5)).vmid_bits, 5);
        // No paged mode: nothing to tag, VMIDLEN 0.
        let caps = probe_hgatp(&mut Fake::new(&[], 14));
        assert!(!caps.sv39x4 && !caps.sv48x4 && !caps.sv57x4);
        assert_eq!(caps.vmid_bits, 0);
    }

    #[test]
    fn bare_is_never_written_with_fields_even_where_the_hart_would_keep_them() {
        for modes in [&[8u64, 9][..], &[8, 9, 10], &[10], &[]] {
            let mut hart = Fake::new(modes, 7);
            hart.bare_garbage = true;
            let caps = probe_hgatp(&mut hart);
            no_bare_with_fields(&hart.log);
            assert_eq!(caps.vmid_bits, if modes.is_empty() { 0 } else { 7 }, "modes {modes:?}");
        }
    }

    #[test]
    fn the_old_value_is_restored_then_fenced() {
        let old = (8 << 60) | (3 << 44) | 0x8_0400;
        let mut hart = Fake::new(&[8, 9], 7);
        hart.value = old;
        probe_hgatp(&mut hart);
        assert_eq!(hart.value, old);
        let n = hart.log.len();
        assert_eq!(&hart.log[n - 2..], &[Op::Write(old), Op::Fence]);
        assert_eq!(hart.log.iter().filter(|o| **o == Op::Fence).count(), 1);
        // Every probe write with a paged mode has PPN 0.
        for op in &hart.log[..n - 2] {
            if let Op::Write(v) = *op {
                assert_eq!(v & ((1 << 44) - 1), 0, "probe write {v:#x} has a PPN");
            }
        }
    }

    #[test]
    fn isa_strings() {
        assert!(isa_has_h("rv64imafdch_zicsr_zifencei_zba"));
        assert!(!isa_has_h("rv64imafdc_zihintpause"));
        assert!(!isa_has_h("rv64imafdc_h"), "h after '_' is not the H extension letter");
        assert!(!isa_has_h(""));
    }

    #[test]
    fn ad_probe_outcomes() {
        assert_eq!(classify_ad_probe(Ok(()), true), Ok(GStageAd::Hardware));
        let gpf = HwFault { scause: cause::LOAD_GUEST_PAGE, stval: 0x8000_0000, htval: 0x8000_0000 >> 2 };
        assert_eq!(classify_ad_probe(Err(gpf), false), Ok(GStageAd::Faults));
        assert_eq!(classify_ad_probe(Ok(()), false), Err(AdProbeError::NeitherSetNorFaulted));
        let access = HwFault { scause: cause::LOAD_ACCESS, ..gpf };
        assert_eq!(classify_ad_probe(Err(access), false), Err(AdProbeError::UnexpectedFault(access)));
        assert!(std::format!("{}", AdProbeError::UnexpectedFault(access)).contains("load-access"));
    }

    #[test]
    fn svadu_in_either_device_tree_property() {
        assert!(isa_lists(b"rv64imafdch_zicsr_svadu_sstc\0", "svadu"));
        assert!(isa_lists(b"i\0m\0a\0svade\0svadu\0", "svadu"));
        assert!(!isa_lists(b"rv64imafdch_zicsr_svade\0", "svadu"));
        assert!(!isa_lists(b"rv64imafdch_svadux\0", "svadu"));
        assert!(!isa_lists(b"", "svadu"));
    }
}
