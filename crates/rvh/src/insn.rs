//! Decoding of guest loads and stores (full, compressed, or htinst-transformed) for MMIO emulation.

use core::fmt;

/// Whether a decoded access reads or writes, and the register it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemOp {
    /// A load into `rd`, sign-extended when `signed`.
    Load {
        /// Destination register number (0-31).
        rd: u8,
        /// Sign-extend the loaded value to 64 bits.
        signed: bool,
    },
    /// A store of the low `width` bytes of `rs2`.
    Store {
        /// Source register number (0-31).
        rs2: u8,
    },
}

/// A decoded guest load or store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemAccess {
    /// Load or store, with its register.
    pub op: MemOp,
    /// Access width in bytes: 1, 2, 4 or 8.
    pub width: u8,
    /// Length of the original instruction in bytes (2 or 4): how far to advance sepc.
    pub insn_len: u8,
}

/// Why an instruction could not be decoded as a load or store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsnError {
    /// The encoding is not a scalar integer load or store.
    NotLoadStore {
        /// The raw instruction bits.
        raw: u32,
    },
}

impl fmt::Display for InsnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLoadStore { raw } => write!(f, "instruction {raw:#010x} is not an integer load or store"),
        }
    }
}

impl core::error::Error for InsnError {}

/// Length in bytes of the instruction whose first 16-bit parcel is `parcel`: 4 when its low two
/// bits are 0b11, else 2 (Unprivileged ISA 20191213 §1.5, Figure 1.1; only 16/32-bit encodings exist
/// in RV64GC).
pub const fn insn_len(parcel: u16) -> u8 {
    if parcel & 0b11 == 0b11 {
        4
    } else {
        2
    }
}

/// Decodes a raw instruction (`raw` holds 16 bits for a compressed one) as a load or store
/// (Unprivileged ISA §2.6 LOAD/STORE, §16.3/§16.4 RVC load/store formats).
pub fn decode_mem_access(raw: u32) -> Result<MemAccess, InsnError> {
    if raw & 0b11 == 0b11 {
        decode32(raw, 4)
    } else {
        decode16(raw as u16)
    }
}

/// Decodes the value a hypervisor finds in htinst for a load/store guest-page fault: a transformed
/// instruction (Privileged 1.12 §8.6.3) whose bit 0 is 1 and whose bit 1 says whether the trapping
/// instruction was 32-bit (1) or compressed (0). Returns `None` for zero, pseudo-instructions and
/// custom values (the caller then fetches the instruction itself).
pub fn decode_transformed(htinst: u64) -> Option<MemAccess> {
    let raw = htinst as u32;
    if htinst >> 32 != 0 || raw & 1 == 0 {
        return None;
    }
    let len = if raw & 0b10 != 0 { 4 } else { 2 };
    decode32(raw | 0b10, len).ok()
}

fn decode32(raw: u32, len: u8) -> Result<MemAccess, InsnError> {
    let opcode = raw & 0x7f;
    let funct3 = (raw >> 12) & 7;
    let rd = ((raw >> 7) & 31) as u8;
    let rs2 = ((raw >> 20) & 31) as u8;
    let bad = InsnError::NotLoadStore { raw };
    match opcode {
        // LOAD: LB LH LW LD LBU LHU LWU (funct3 0..=6).
        0x03 => {
            let (width, signed) = match funct3 {
                0 => (1, true),
                1 => (2, true),
                2 => (4, true),
                3 => (8, true),
                4 => (1, false),
                5 => (2, false),
                6 => (4, false),
                _ => return Err(bad),
            };
            Ok(MemAccess { op: MemOp::Load { rd, signed }, width, insn_len: len })
        }
        // STORE: SB SH SW SD.
        0x23 if funct3 <= 3 => Ok(MemAccess { op: MemOp::Store { rs2 }, width: 1 << funct3, insn_len: len }),
        _ => Err(bad),
    }
}

fn decode16(p: u16) -> Result<MemAccess, InsnError> {
    let op = p & 0b11;
    let funct3 = p >> 13;
    let rd_prime = (((p >> 2) & 7) + 8) as u8; // rd'/rs2' in bits 4:2 (§16.2 Table 16.2)
    let rd_full = ((p >> 7) & 31) as u8;
    let rs2_full = ((p >> 2) & 31) as u8;
    let bad = InsnError::NotLoadStore { raw: p as u32 };
    let (mem, width) = match (op, funct3) {
        (0b00, 0b010) => (MemOp::Load { rd: rd_prime, signed: true }, 4), // C.LW
        (0b00, 0b011) => (MemOp::Load { rd: rd_prime, signed: true }, 8), // C.LD (RV64)
        (0b00, 0b110) => (MemOp::Store { rs2: rd_prime }, 4),             // C.SW
        (0b00, 0b111) => (MemOp::Store { rs2: rd_prime }, 8),             // C.SD (RV64)
        (0b10, 0b010) if rd_full != 0 => (MemOp::Load { rd: rd_full, signed: true }, 4), // C.LWSP
        (0b10, 0b011) if rd_full != 0 => (MemOp::Load { rd: rd_full, signed: true }, 8), // C.LDSP
        (0b10, 0b110) => (MemOp::Store { rs2: rs2_full }, 4),             // C.SWSP
        (0b10, 0b111) => (MemOp::Store { rs2: rs2_full }, 8),             // C.SDSP
        _ => return Err(bad),
    };
    Ok(MemAccess { op: mem, width, insn_len: 2 })
}

/// Extends a value loaded with `width` bytes as the load instruction would.
pub fn extend_loaded(value: u64, width: u8, signed: bool) -> u64 {
    let bits = u32::from(width) * 8;
    if bits >= 64 {
        return value;
    }
    let v = value & ((1u64 << bits) - 1);
    if signed && v >> (bits - 1) & 1 == 1 {
        v | (u64::MAX << bits)
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_width_loads_and_stores() {
        // sb a1, 0(a0) = 0x00b50023
        assert_eq!(
            decode_mem_access(0x00b5_0023),
            Ok(MemAccess { op: MemOp::Store { rs2: 11 }, width: 1, insn_len: 4 })
        );
        // sd t0, 8(sp) = 0x00513423
        assert_eq!(
            decode_mem_access(0x0051_3423),
            Ok(MemAccess { op: MemOp::Store { rs2: 5 }, width: 8, insn_len: 4 })
        );
        // lbu a0, 5(a1) = 0x0055c503
        assert_eq!(
            decode_mem_access(0x0055_c503),
            Ok(MemAccess { op: MemOp::Load { rd: 10, signed: false }, width: 1, insn_len: 4 })
        );
        // lw a2, 0(a0) = 0x00052603
        assert_eq!(
            decode_mem_access(0x0005_2603),
            Ok(MemAccess { op: MemOp::Load { rd: 12, signed: true }, width: 4, insn_len: 4 })
        );
        // addi a0, a0, 1 is not a memory access.
        assert_eq!(decode_mem_access(0x0015_0513), Err(InsnError::NotLoadStore { raw: 0x0015_0513 }));
    }

    #[test]
    fn compressed_loads_and_stores() {
        // c.sw a1, 0(a0) = 0xc10c
        assert_eq!(decode_mem_access(0xc10c), Ok(MemAccess { op: MemOp::Store { rs2: 11 }, width: 4, insn_len: 2 }));
        // c.ld a0, 0(a1) = 0x6188
        assert_eq!(
            decode_mem_access(0x6188),
            Ok(MemAccess { op: MemOp::Load { rd: 10, signed: true }, width: 8, insn_len: 2 })
        );
        // c.sdsp ra, 8(sp) = 0xe406
        assert_eq!(decode_mem_access(0xe406), Ok(MemAccess { op: MemOp::Store { rs2: 1 }, width: 8, insn_len: 2 }));
        // c.nop is not.
        assert!(decode_mem_access(0x0001).is_err());
    }

    #[test]
    fn transformed_instructions() {
        // A transformed 32-bit sb keeps bits 1:0 = 11.
        assert_eq!(decode_transformed(0x00b0_0023).map(|m| m.insn_len), Some(4));
        // A transformed c.sw becomes sw with bit 1 cleared: insn_len 2.
        let t = decode_transformed(0x00b0_2021).expect("transformed compressed store");
        assert_eq!(t, MemAccess { op: MemOp::Store { rs2: 11 }, width: 4, insn_len: 2 });
        // Zero and the pseudo-instructions decode to nothing.
        assert_eq!(decode_transformed(0), None);
        assert_eq!(decode_transformed(0x3020), None);
    }

    #[test]
    fn extension() {
        assert_eq!(extend_loaded(0x80, 1, true), 0xffff_ffff_ffff_ff80);
        assert_eq!(extend_loaded(0x1_0080, 1, false), 0x80);
        assert_eq!(extend_loaded(0x8000_0000, 4, true), 0xffff_ffff_8000_0000);
        assert_eq!(extend_loaded(u64::MAX, 8, true), u64::MAX);
        assert_eq!(insn_len(0x4501), 2);
        assert_eq!(insn_len(0x0513), 4);
    }
}
