//! Decoding the guest's MOV to or from an emulated device (an MMIO access that exited as an EPT
//! violation), from the instruction bytes fetched at its RIP (Intel SDM Vol. 2A 2.1, 2.2.1; MOV).

/// What the instruction does with memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Loads `size` bytes into register `reg` (zero-extended for 32-bit, merged otherwise).
    Load {
        /// Register number (ModRM.reg with REX.R; Vol. 2A Table 2-2 order).
        reg: u8,
    },
    /// Stores register `reg`.
    StoreReg {
        /// Register number.
        reg: u8,
    },
    /// Stores an immediate.
    StoreImm {
        /// The value (sign-extended to the operand size for MOV r/m64, imm32).
        value: u64,
    },
}

/// A decoded MMIO instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioInstruction {
    /// The operation.
    pub op: MmioOp,
    /// Access size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// Instruction length in bytes (how far to advance RIP).
    pub len: u8,
}

/// Why the bytes are not an MMIO access twostage emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does (needs `needed` bytes).
    Truncated {
        /// Bytes the instruction needs at least.
        needed: usize,
    },
    /// An opcode other than MOV 88/89/8A/8B/C6/C7.
    UnsupportedOpcode(u8),
    /// ModRM.mod = 3: a register operand, which cannot have touched memory.
    RegisterOperand,
    /// RIP-relative or other forms this decoder leaves out.
    UnsupportedForm,
}

/// Decodes one instruction of 64-bit code (default operand size 32, address size 64).
pub fn decode_mmio(bytes: &[u8]) -> Result<MmioInstruction, DecodeError> {
    let at = |i: usize| bytes.get(i).copied().ok_or(DecodeError::Truncated { needed: i + 1 });
    let mut i = 0;
    let mut opsize16 = false;
    loop {
        match at(i)? {
            0x66 => opsize16 = true,
            // Segment overrides and address-size prefix do not change the GPA the exit reported.
            0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x67 => {}
            _ => break,
        }
        i += 1;
    }
    let mut rex = 0u8;
    if at(i)? & 0xf0 == 0x40 {
        rex = at(i)?;
        i += 1;
    }
    let rex_w = rex & 8 != 0;
    let opcode = at(i)?;
    i += 1;
    let full = if rex_w {
        8
    } else if opsize16 {
        2
    } else {
        4
    };
    let (size, kind) = match opcode {
        0x88 => (1, 0),
        0x89 => (full, 0),
        0x8a => (1, 1),
        0x8b => (full, 1),
        0xc6 => (1, 2),
        0xc7 => (full, 2),
        other => return Err(DecodeError::UnsupportedOpcode(other)),
    };
    let modrm = at(i)?;
    i += 1;
    let md = modrm >> 6;
    let reg = ((modrm >> 3) & 7) | if rex & 4 != 0 { 8 } else { 0 };
    let rm = modrm & 7;
    if md == 3 {
        return Err(DecodeError::RegisterOperand);
    }
    let mut disp = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = at(i)?;
        i += 1;
        if md == 0 && sib & 7 == 5 {
            disp = 4;
        }
    } else if md == 0 && rm == 5 {
        // RIP-relative: the GPA still comes from the exit, so only the length matters.
        disp = 4;
    }
    i += disp;
    let op = match kind {
        0 => MmioOp::StoreReg { reg },
        1 => MmioOp::Load { reg },
        _ => {
            let n = if size == 1 {
                1
            } else if size == 2 {
                2
            } else {
                4
            };
            let mut v: u64 = 0;
            for k in 0..n {
                v |= u64::from(at(i + k)?) << (8 * k);
            }
            i += n;
            // imm32 is sign-extended to 64 bits for REX.W (MOV r/m64, imm32).
            if size == 8 {
                v = v as u32 as i32 as i64 as u64;
            }
            MmioOp::StoreImm { value: v }
        }
    };
    Ok(MmioInstruction { op, size, len: i as u8 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_stores() {
        // mov rcx, [rbx]
        assert_eq!(
            decode_mmio(&[0x48, 0x8b, 0x0b]),
            Ok(MmioInstruction { op: MmioOp::Load { reg: 1 }, size: 8, len: 3 })
        );
        // mov [rbx], ecx
        assert_eq!(
            decode_mmio(&[0x89, 0x0b]),
            Ok(MmioInstruction { op: MmioOp::StoreReg { reg: 1 }, size: 4, len: 2 })
        );
        // mov byte ptr [rdi + 5], al
        assert_eq!(
            decode_mmio(&[0x88, 0x47, 0x05]),
            Ok(MmioInstruction { op: MmioOp::StoreReg { reg: 0 }, size: 1, len: 3 })
        );
        // mov r9w, [rax + rbx*4 + 0x100]
        assert_eq!(
            decode_mmio(&[0x66, 0x44, 0x8b, 0x8c, 0x98, 0x00, 0x01, 0x00, 0x00]),
            Ok(MmioInstruction { op: MmioOp::Load { reg: 9 }, size: 2, len: 9 })
        );
        // mov qword ptr [rbx], -1 (imm32 sign-extended)
        assert_eq!(
            decode_mmio(&[0x48, 0xc7, 0x03, 0xff, 0xff, 0xff, 0xff]),
            Ok(MmioInstruction { op: MmioOp::StoreImm { value: u64::MAX }, size: 8, len: 7 })
        );
        // mov byte ptr [rip + 0x10], 0x41
        assert_eq!(
            decode_mmio(&[0xc6, 0x05, 0x10, 0, 0, 0, 0x41]),
            Ok(MmioInstruction { op: MmioOp::StoreImm { value: 0x41 }, size: 1, len: 7 })
        );
    }

    #[test]
    fn refuses_what_it_cannot_emulate() {
        assert_eq!(decode_mmio(&[0x48, 0x89, 0xc8]), Err(DecodeError::RegisterOperand));
        assert_eq!(decode_mmio(&[0x0f, 0xb6, 0x03]), Err(DecodeError::UnsupportedOpcode(0x0f)));
        assert_eq!(decode_mmio(&[0x48, 0x8b]), Err(DecodeError::Truncated { needed: 3 }));
        assert_eq!(decode_mmio(&[0xc7, 0x03, 0x01]), Err(DecodeError::Truncated { needed: 4 }));
        assert_eq!(decode_mmio(&[]), Err(DecodeError::Truncated { needed: 1 }));
    }
}
