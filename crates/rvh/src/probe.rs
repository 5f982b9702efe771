//! Probing what the hart offers: the H extension, hgatp modes and VMIDLEN, by write and read-back.

use twostage_npt::{HgatpCapabilities, HgatpMode};

/// The hgatp CSR as a probe needs it: write a value, read what stuck (WARL, Privileged 1.12 §8.2.10).
pub trait HgatpRegister {
    /// Writes `value` to hgatp and returns what reads back.
    fn write_read(&mut self, value: u64) -> u64;
}

/// Probes hgatp: each of Sv39x4, Sv48x4, Sv57x4 is written with PPN 0 and VMID 0 and its MODE
/// field read back (an unsupported mode leaves the CSR unchanged, §8.2.10); VMIDLEN is found by
/// writing all ones to VMID (bits 57:44) with MODE Bare and counting the bits that stick.
/// The caller restores hgatp and fences afterwards.
pub fn probe_hgatp(reg: &mut impl HgatpRegister) -> HgatpCapabilities {
    use crate::csr::hgatp::*;
    let vmid = (reg.write_read(VMID_MASK << VMID_SHIFT) >> VMID_SHIFT) & VMID_MASK;
    HgatpCapabilities::from_probe(
        |m: HgatpMode| {
            reg.write_read(0);
            reg.write_read((m as u64) << MODE_SHIFT) >> MODE_SHIFT
        },
        vmid,
    )
}

/// The ISA string of the first hart (the device tree's `riscv,isa`), with extension letters
/// checked: `misa` itself is a machine-level CSR (Privileged 1.12 §3.1.1) that HS-mode cannot
/// read, so the H bit (misa bit 7) is learned from the string OpenSBI/QEMU put in the tree.
pub fn isa_has_h(isa: &str) -> bool {
    // "rv64imafdch_zicsr_..." : single-letter extensions come before the first '_'.
    let base = isa.split('_').next().unwrap_or("");
    base.len() > 4 && base.starts_with("rv") && base[4..].contains('h')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake hgatp keeping only the modes and VMID bits it implements.
    struct Fake {
        modes: &'static [u64],
        vmid_bits: u32,
        value: u64,
    }
    impl HgatpRegister for Fake {
        fn write_read(&mut self, v: u64) -> u64 {
            let mode = v >> 60;
            if mode == 0 || self.modes.contains(&mode) {
                let vmid = (v >> 44) & ((1 << self.vmid_bits) - 1);
                self.value = (mode << 60) | (vmid << 44) | (v & ((1 << 44) - 1));
            }
            self.value
        }
    }

    #[test]
    fn probes_modes_and_vmid_width() {
        let caps = probe_hgatp(&mut Fake { modes: &[8, 9], vmid_bits: 7, value: 0 });
        assert!(caps.sv39x4 && caps.sv48x4 && !caps.sv57x4);
        assert_eq!(caps.vmid_bits, 7);
        let caps = probe_hgatp(&mut Fake { modes: &[8, 9, 10], vmid_bits: 14, value: 0 });
        assert!(caps.sv57x4);
        assert_eq!(caps.vmid_bits, 14);
        // A mode refused after a supported one is not mistaken for supported.
        let caps = probe_hgatp(&mut Fake { modes: &[10], vmid_bits: 0, value: 0 });
        assert!(!caps.sv39x4 && !caps.sv48x4 && caps.sv57x4);
        assert_eq!(caps.vmid_bits, 0);
    }

    #[test]
    fn isa_strings() {
        assert!(isa_has_h("rv64imafdch_zicsr_zifencei_zba"));
        assert!(!isa_has_h("rv64imafdc_zihintpause"));
        assert!(!isa_has_h("rv64imafdc_h"), "h after '_' is not the H extension letter");
        assert!(!isa_has_h(""));
    }
}
