//! hgatp as a register: what a write leaves in it, for modelling how a hypervisor probes the
//! G-stage modes and VMIDLEN.
//!
//! Source: RISC-V Privileged, "Hypervisor Extension", "Hypervisor Guest Address Translation and
//! Protection (hgatp) Register": MODE is WARL, and "a write to hgatp with an unsupported MODE
//! value is not ignored as it is for satp. Instead, the fields of hgatp are WARL in the normal
//! way" (any legal value may result); VMIDLEN may be 0 to 14 and is found by writing ones to
//! the VMID field and reading back which bits hold them, the least-significant bits being the
//! implemented ones; for the paged modes "the lowest two bits of the physical page number
//! (PPN) in hgatp always read as zeros"; and when MODE = Bare "the remaining fields in hgatp
//! must be set to zeros", so a write of Bare with a non-zero VMID or PPN leaves them
//! unspecified. The choices the specification leaves open are parameters of the model.

use crate::gstage::HgatpMode;

/// What an unsupported MODE write turns into (any legal value is allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsupportedMode {
    /// MODE keeps its previous value (what satp does with the whole write).
    KeepOld,
    /// MODE becomes Bare.
    Bare,
    /// MODE becomes the widest mode the hart has.
    Widest,
}

/// What a write of MODE = Bare with non-zero VMID or PPN does to those fields (unspecified).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareFields {
    /// They are kept (within VMIDLEN and the PPN width) as written.
    Kept,
    /// They read as zero.
    Zeroed,
}

/// One hart's hgatp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HgatpCsr {
    /// Sv39x4, Sv48x4, Sv57x4 implemented (Bare always is).
    pub modes: [bool; 3],
    /// VMIDLEN, 0 to 14.
    pub vmidlen: u8,
    /// The choice for unsupported MODE writes.
    pub unsupported: UnsupportedMode,
    /// The choice for Bare writes with other fields set.
    pub bare_fields: BareFields,
    value: u64,
}

const PAGED: [HgatpMode; 3] = [HgatpMode::Sv39x4, HgatpMode::Sv48x4, HgatpMode::Sv57x4];

impl HgatpCsr {
    /// A hart with these choices; hgatp starts as zero.
    pub fn new(modes: [bool; 3], vmidlen: u8, unsupported: UnsupportedMode, bare_fields: BareFields) -> Self {
        Self { modes, vmidlen: vmidlen.min(14), unsupported, bare_fields, value: 0 }
    }

    /// Whether the hart implements `mode`.
    pub fn has(&self, mode: HgatpMode) -> bool {
        PAGED.iter().zip(self.modes).any(|(&m, on)| on && m == mode) || mode == HgatpMode::Bare
    }

    /// csrw hgatp.
    pub fn write(&mut self, v: u64) {
        let written = (v >> 60) as u8;
        let legal = PAGED.iter().copied().find(|&m| m.bits() as u8 == written && self.has(m));
        let mode = match (written, legal) {
            (0, _) => HgatpMode::Bare,
            (_, Some(m)) => m,
            (_, None) => match self.unsupported {
                UnsupportedMode::KeepOld => self.mode(),
                UnsupportedMode::Bare => HgatpMode::Bare,
                UnsupportedMode::Widest => {
                    PAGED.iter().rev().copied().find(|&m| self.has(m)).unwrap_or(HgatpMode::Bare)
                }
            },
        };
        let mut vmid = (v >> 44) & ((1 << self.vmidlen) - 1);
        let mut ppn = v & ((1 << 44) - 1);
        if mode == HgatpMode::Bare {
            if self.bare_fields == BareFields::Zeroed {
                vmid = 0;
                ppn = 0;
            }
        } else {
            ppn &= !3;
        }
        // Bits 59:58 are zero fields.
        self.value = mode.bits() << 60 | vmid << 44 | ppn;
    }

    /// csrr hgatp.
    pub fn read(&self) -> u64 {
        self.value
    }

    fn mode(&self) -> HgatpMode {
        PAGED.iter().copied().find(|m| m.bits() == self.value >> 60).unwrap_or(HgatpMode::Bare)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warl_fields() {
        let mut h = HgatpCsr::new([true, true, false], 7, UnsupportedMode::KeepOld, BareFields::Kept);
        h.write(9 << 60 | 0x3fff << 44 | 0x8_0403);
        assert_eq!(h.read(), 9 << 60 | 0x7f << 44 | 0x8_0400, "VMID to VMIDLEN, PPN[1:0] zero");
        h.write(10 << 60);
        assert_eq!(h.read() >> 60, 9, "Sv57x4 unsupported: MODE kept");
        let mut w = HgatpCsr::new([true, true, false], 0, UnsupportedMode::Widest, BareFields::Zeroed);
        w.write(10 << 60 | 5 << 44);
        assert_eq!(w.read(), 9 << 60);
        w.write(0x3fff << 44);
        assert_eq!(w.read(), 0, "Bare with a VMID: zeroed on this hart");
    }
}
