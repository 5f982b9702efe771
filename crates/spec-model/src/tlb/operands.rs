//! The operand checks of INVEPT and INVVPID: which invalidations the processor carries out and
//! which fail with VMfailValid, VM-instruction error 28 ("invalid operand to INVEPT/INVVPID").
//!
//! Sources: Intel SDM Vol. 2A "INVEPT" and "INVVPID" (Operation sections); Vol. 3C 29.4.3.1
//! (the invalidation types); Vol. 3D A.10 (IA32_VMX_EPT_VPID_CAP bits 20, 25, 26 for INVEPT and
//! 32, 40-43 for INVVPID). Only the checks on the operands are modelled: the instructions' own
//! faults (#UD outside VMX operation or in compatibility mode, #GP/#SS/#PF on the memory
//! operand) belong to the CPU, not to a model of translation.

use crate::ept::{EptCaps, Eptp, EptpError};

/// Why INVEPT or INVVPID would fail with VM-instruction error 28.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidOperand {
    /// The instruction is not supported at all (INVEPT: cap bit 20; INVVPID: cap bit 32).
    Unsupported,
    /// The type (the register operand) is not one the capabilities offer.
    Type(u64),
    /// INVEPT single-context: the descriptor's EPTP would fail the VM-entry checks.
    Eptp(EptpError),
    /// INVVPID: descriptor bits 63:16 are not zero (the VPID is a 16-bit field).
    VpidReserved(u64),
    /// INVVPID types 0, 1 and 3: VPID 0 (the VMX root's own) is not a valid operand.
    VpidZero,
    /// INVVPID type 0: the linear address is not canonical.
    NonCanonical(u64),
}

/// INVEPT types (Vol. 3C 29.4.3.1).
pub mod invept_type {
    /// Single-context: the mappings of one EPTP (its EP4TA).
    pub const SINGLE_CONTEXT: u64 = 1;
    /// All-context: the mappings of every EPTP.
    pub const ALL_CONTEXT: u64 = 2;
}

/// INVVPID types (Vol. 3C 29.4.3.3 / Vol. 2A "INVVPID").
pub mod invvpid_type {
    /// Individual-address: one linear address of one VPID.
    pub const INDIVIDUAL_ADDRESS: u64 = 0;
    /// Single-context: every mapping of one VPID.
    pub const SINGLE_CONTEXT: u64 = 1;
    /// All-context: every VPID except 0.
    pub const ALL_CONTEXT: u64 = 2;
    /// Single-context, retaining global translations.
    pub const SINGLE_CONTEXT_RETAINING_GLOBALS: u64 = 3;
}

/// Whether INVEPT of type `kind` with descriptor EPTP `eptp` succeeds (Vol. 2A "INVEPT",
/// Operation: an unsupported type fails; single-context fails if VM entry with that EPTP would
/// fail, 27.2.1.1; all-context ignores the descriptor).
pub fn invept(kind: u64, eptp: u64, caps: &EptCaps) -> Result<(), InvalidOperand> {
    if !caps.invept {
        return Err(InvalidOperand::Unsupported);
    }
    match kind {
        invept_type::SINGLE_CONTEXT if caps.invept_single_context => {
            Eptp::decode(eptp, caps).map(|_| ()).map_err(InvalidOperand::Eptp)
        }
        invept_type::ALL_CONTEXT if caps.invept_all_context => Ok(()),
        _ => Err(InvalidOperand::Type(kind)),
    }
}

/// Whether INVVPID of type `kind` with descriptor bits 63:0 `desc` (VPID in 15:0) and linear
/// address `linear` (descriptor bits 127:64) succeeds (Vol. 2A "INVVPID", Operation). Linear
/// addresses are canonical when bits 63:`linear_bits - 1` are equal (48, or 57 with 5-level
/// paging).
pub fn invvpid(kind: u64, desc: u64, linear: u64, linear_bits: u8, caps: &EptCaps) -> Result<(), InvalidOperand> {
    if caps.raw & (1 << 32) == 0 {
        return Err(InvalidOperand::Unsupported);
    }
    // IA32_VMX_EPT_VPID_CAP bits 40-43: types 0-3.
    if kind > 3 || caps.raw & (1 << (40 + kind)) == 0 {
        return Err(InvalidOperand::Type(kind));
    }
    if desc >> 16 != 0 {
        return Err(InvalidOperand::VpidReserved(desc >> 16));
    }
    if kind != invvpid_type::ALL_CONTEXT && desc == 0 {
        return Err(InvalidOperand::VpidZero);
    }
    let shift = 64 - u32::from(linear_bits.clamp(48, 57));
    if kind == invvpid_type::INDIVIDUAL_ADDRESS && (((linear << shift) as i64) >> shift) as u64 != linear {
        return Err(InvalidOperand::NonCanonical(linear));
    }
    Ok(())
}
