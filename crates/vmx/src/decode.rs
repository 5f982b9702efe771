//! Decoding the guest's MOV to or from an emulated device (an MMIO access that exited as an EPT
//! violation), from the instruction bytes fetched at its RIP (Intel SDM Vol. 2A 2.1, 2.2.1; MOV).
//!
//! The bytes are the guest's: any byte string must give a result or a typed error, never a
//! panic, and an accepted instruction is at most 15 bytes long (Intel SDM Vol. 2A 2.3.11) and
//! never longer than the bytes given.

/// The longest x86 instruction; a longer one raises #GP (Intel SDM Vol. 2A 2.3.11).
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// A general-purpose register operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioReg {
    /// Register number (ModRM.reg with REX.R; Intel SDM Vol. 2A 2.1.5, Table 2-2 order), 0..=15.
    pub num: u8,
    /// The operand is bits 15:8 of register `num` (AH, CH, DH, BH: an 8-bit operand encoded
    /// as 4..=7 without any REX prefix; Intel SDM Vol. 2A 3.1.1.1, Table 3-1 "+rb").
    pub high_byte: bool,
}

/// What the instruction does with memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Loads `size` bytes into `reg` (32-bit loads zero-extend, 8- and 16-bit ones merge).
    Load {
        /// The destination.
        reg: MmioReg,
    },
    /// Stores `reg`.
    StoreReg {
        /// The source.
        reg: MmioReg,
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
    /// Instruction length in bytes (how far to advance RIP), 1..=15.
    pub len: u8,
}

impl MmioInstruction {
    /// Whether the instruction writes memory (a store), as opposed to reading it.
    pub const fn is_store(&self) -> bool {
        !matches!(self.op, MmioOp::Load { .. })
    }

    /// The register's new value after a load of `value` into it, whose old value is `old`:
    /// 32-bit loads zero-extend, 8- and 16-bit loads merge, a high-byte load replaces bits 15:8
    /// (Intel SDM Vol. 1 3.4.1.1). Stores and immediates leave `old` as it was.
    pub const fn merge_load(&self, old: u64, value: u64) -> u64 {
        let m = self.mask();
        match self.op {
            MmioOp::Load { reg } if reg.high_byte => (old & !0xff00) | ((value & 0xff) << 8),
            MmioOp::Load { .. } if self.size >= 4 => value & m,
            MmioOp::Load { .. } => (old & !m) | (value & m),
            _ => old,
        }
    }

    /// The value a store writes, given the source register's value (`reg_value`, ignored for
    /// an immediate), cut to the access size.
    pub const fn store_value(&self, reg_value: u64) -> u64 {
        match self.op {
            MmioOp::StoreReg { reg } if reg.high_byte => (reg_value >> 8) & 0xff,
            MmioOp::StoreImm { value } => value & self.mask(),
            _ => reg_value & self.mask(),
        }
    }

    /// The bits of a register that an access of this size covers, at bit 0.
    pub const fn mask(&self) -> u64 {
        match self.size {
            1 => 0xff,
            2 => 0xffff,
            4 => 0xffff_ffff,
            _ => u64::MAX,
        }
    }
}

/// Why the bytes are not an MMIO access twostage emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does (needs `needed` bytes).
    Truncated {
        /// Bytes the instruction needs at least.
        needed: usize,
    },
    /// The instruction would be longer than 15 bytes (the CPU raises #GP; Intel SDM Vol. 2A
    /// 2.3.11).
    TooLong,
    /// An opcode other than MOV 88/89/8A/8B/C6/C7.
    UnsupportedOpcode(u8),
    /// ModRM.mod = 3: a register operand, which cannot have touched memory.
    RegisterOperand,
    /// C6/C7 with ModRM.reg other than 0 (XABORT, XBEGIN or undefined), or another form this
    /// decoder leaves out.
    UnsupportedForm,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Truncated { needed } => write!(f, "the instruction bytes end early: {needed} needed at least"),
            Self::TooLong => f.write_str("the instruction is longer than 15 bytes"),
            Self::UnsupportedOpcode(op) => write!(f, "opcode {op:#04x} is not a MOV the MMIO emulation handles"),
            Self::RegisterOperand => f.write_str("the instruction has a register operand, not a memory one"),
            Self::UnsupportedForm => f.write_str("a form of MOV the MMIO emulation leaves out"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Decodes one instruction of 64-bit code (default operand size 32, address size 64).
pub fn decode_mmio(bytes: &[u8]) -> Result<MmioInstruction, DecodeError> {
    let at = |i: usize| {
        if i >= MAX_INSTRUCTION_LEN {
            return Err(DecodeError::TooLong);
        }
        bytes.get(i).copied().ok_or(DecodeError::Truncated { needed: i + 1 })
    };
    let mut i = 0;
    let mut opsize16 = false;
    // REX counts only directly before the opcode: one followed by a legacy prefix is ignored,
    // and of several the last wins (Intel SDM Vol. 2A 2.2.1).
    let mut rex: Option<u8> = None;
    let opcode = loop {
        match at(i)? {
            0x66 => {
                opsize16 = true;
                rex = None;
            }
            // Segment overrides and address-size prefix do not change the GPA the exit reported.
            0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x67 => rex = None,
            b @ 0x40..=0x4f => rex = Some(b),
            b => break b,
        }
        i += 1;
    };
    i += 1;
    let rex_bits = rex.unwrap_or(0);
    let rex_w = rex_bits & 8 != 0;
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
    let modrm_reg = (modrm >> 3) & 7;
    let rm = modrm & 7;
    if md == 3 {
        return Err(DecodeError::RegisterOperand);
    }
    if kind == 2 && modrm_reg != 0 {
        return Err(DecodeError::UnsupportedForm);
    }
    let reg = MmioReg {
        num: modrm_reg | if rex_bits & 4 != 0 { 8 } else { 0 },
        high_byte: size == 1 && rex.is_none() && modrm_reg >= 4,
    };
    let reg = if reg.high_byte { MmioReg { num: reg.num - 4, high_byte: true } } else { reg };
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
    if disp > 0 {
        // The displacement's value is not needed, but its bytes must be there.
        at(i + disp - 1)?;
        i += disp;
    }
    let op = match kind {
        0 => MmioOp::StoreReg { reg },
        1 => MmioOp::Load { reg },
        _ => {
            let n = match size {
                1 => 1,
                2 => 2,
                _ => 4,
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
    // `at` refused every index from 15 on, so `i` <= 15.
    Ok(MmioInstruction { op, size, len: i as u8 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const fn r(num: u8) -> MmioReg {
        MmioReg { num, high_byte: false }
    }

    #[test]
    fn loads_and_stores() {
        // mov rcx, [rbx]
        assert_eq!(
            decode_mmio(&[0x48, 0x8b, 0x0b]),
            Ok(MmioInstruction { op: MmioOp::Load { reg: r(1) }, size: 8, len: 3 })
        );
        // mov [rbx], ecx
        assert_eq!(
            decode_mmio(&[0x89, 0x0b]),
            Ok(MmioInstruction { op: MmioOp::StoreReg { reg: r(1) }, size: 4, len: 2 })
        );
        // mov byte ptr [rdi + 5], al
        assert_eq!(
            decode_mmio(&[0x88, 0x47, 0x05]),
            Ok(MmioInstruction { op: MmioOp::StoreReg { reg: r(0) }, size: 1, len: 3 })
        );
        // mov r9w, [rax + rbx*4 + 0x100]
        assert_eq!(
            decode_mmio(&[0x66, 0x44, 0x8b, 0x8c, 0x98, 0x00, 0x01, 0x00, 0x00]),
            Ok(MmioInstruction { op: MmioOp::Load { reg: r(9) }, size: 2, len: 9 })
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
    fn byte_registers_4_to_7_are_ah_to_bh_without_rex_and_spl_to_dil_with_it() {
        // mov [rbx], ah (88 /r, reg = 4): bits 15:8 of RAX.
        assert_eq!(
            decode_mmio(&[0x88, 0x23]).map(|i| i.op),
            Ok(MmioOp::StoreReg { reg: MmioReg { num: 0, high_byte: true } })
        );
        // mov bh, [rax] (8a /r, reg = 7): bits 15:8 of RBX.
        assert_eq!(
            decode_mmio(&[0x8a, 0x38]).map(|i| i.op),
            Ok(MmioOp::Load { reg: MmioReg { num: 3, high_byte: true } })
        );
        // With an empty REX (40), reg 4 is SPL.
        assert_eq!(decode_mmio(&[0x40, 0x88, 0x23]).map(|i| i.op), Ok(MmioOp::StoreReg { reg: r(4) }));
        // A 32-bit operand with reg 4 is ESP, never a high byte.
        assert_eq!(decode_mmio(&[0x89, 0x23]).map(|i| i.op), Ok(MmioOp::StoreReg { reg: r(4) }));
    }

    #[test]
    fn loads_merge_and_stores_cut_like_the_cpu() {
        let old = 0x1122_3344_5566_7788;
        let d = |b: &[u8]| decode_mmio(b).unwrap();
        // mov ah, [rax]: bits 15:8 only.
        assert_eq!(d(&[0x8a, 0x20]).merge_load(old, 0xabcd), 0x1122_3344_5566_cd88);
        // mov al, [rax]; mov ax, [rax]; mov eax, [rax] (zero-extends); mov rax, [rax].
        assert_eq!(d(&[0x8a, 0x00]).merge_load(old, 0xabcd), 0x1122_3344_5566_77cd);
        assert_eq!(d(&[0x66, 0x8b, 0x00]).merge_load(old, 0xffff_abcd), 0x1122_3344_5566_abcd);
        assert_eq!(d(&[0x8b, 0x00]).merge_load(old, u64::MAX), 0xffff_ffff);
        assert_eq!(d(&[0x48, 0x8b, 0x00]).merge_load(old, u64::MAX), u64::MAX);
        // mov [rax], bh stores bits 15:8 of RBX; mov [rax], bx stores 16 bits.
        assert_eq!(d(&[0x88, 0x38]).store_value(old), 0x77);
        assert_eq!(d(&[0x66, 0x89, 0x18]).store_value(old), 0x7788);
        assert_eq!(d(&[0xc6, 0x00, 0x99]).store_value(old), 0x99);
        assert_eq!(d(&[0x89, 0x18]).merge_load(old, 0), old, "a store leaves the register alone");
    }

    #[test]
    fn rex_counts_only_right_before_the_opcode() {
        // REX.W then 66: the REX is ignored, the operand is 16-bit.
        assert_eq!(decode_mmio(&[0x48, 0x66, 0x89, 0x03]).map(|i| (i.size, i.len)), Ok((2, 4)));
        // Two REX prefixes: the last (41, REX.B) wins, so no REX.W: 32-bit.
        assert_eq!(decode_mmio(&[0x48, 0x41, 0x89, 0x03]).map(|i| (i.size, i.len)), Ok((4, 4)));
        // 66 then REX.W: 64-bit.
        assert_eq!(decode_mmio(&[0x66, 0x48, 0x89, 0x03]).map(|i| i.size), Ok(8));
    }

    #[test]
    fn refuses_what_it_cannot_emulate() {
        assert_eq!(decode_mmio(&[0x48, 0x89, 0xc8]), Err(DecodeError::RegisterOperand));
        assert_eq!(decode_mmio(&[0x0f, 0xb6, 0x03]), Err(DecodeError::UnsupportedOpcode(0x0f)));
        assert_eq!(decode_mmio(&[0xf0, 0x89, 0x03]), Err(DecodeError::UnsupportedOpcode(0xf0)));
        assert_eq!(decode_mmio(&[0x48, 0x8b]), Err(DecodeError::Truncated { needed: 3 }));
        assert_eq!(decode_mmio(&[0xc7, 0x03, 0x01]), Err(DecodeError::Truncated { needed: 4 }));
        assert_eq!(decode_mmio(&[]), Err(DecodeError::Truncated { needed: 1 }));
        // C7 /1 is not MOV (and C7 F8 is XBEGIN).
        assert_eq!(decode_mmio(&[0xc7, 0x08, 1, 2, 3, 4]), Err(DecodeError::UnsupportedForm));
    }

    #[test]
    fn a_displacement_must_be_there() {
        // mov [rax + disp32], ecx with the displacement cut off: the old decoder returned
        // len 6 for 2 bytes.
        assert_eq!(decode_mmio(&[0x89, 0x88]), Err(DecodeError::Truncated { needed: 6 }));
        assert_eq!(decode_mmio(&[0x89, 0x48]), Err(DecodeError::Truncated { needed: 3 }));
        // SIB with no base and mod 0: disp32 follows the SIB.
        assert_eq!(decode_mmio(&[0x89, 0x04, 0x25, 0, 0]), Err(DecodeError::Truncated { needed: 7 }));
        assert_eq!(decode_mmio(&[0x89, 0x04, 0x25, 0, 0, 0, 0]).map(|i| i.len), Ok(7));
    }

    #[test]
    fn at_most_15_bytes() {
        // 14 prefixes + opcode + ModRM = 16 bytes: too long, even with plenty of bytes.
        let mut b = [0x3e; 32];
        b[14] = 0x89;
        b[15] = 0x03;
        assert_eq!(decode_mmio(&b), Err(DecodeError::TooLong));
        // 13 prefixes + 89 03 = 15 bytes: fine.
        let mut b = [0x3e; 15];
        b[13] = 0x89;
        b[14] = 0x03;
        assert_eq!(decode_mmio(&b).map(|i| i.len), Ok(15));
        // An endless run of prefixes (the old decoder would walk all of them and wrap `len`).
        assert_eq!(decode_mmio(&[0x66; 300]), Err(DecodeError::TooLong));
        assert_eq!(decode_mmio(&[0x48; 300]), Err(DecodeError::TooLong));
        // 11 prefixes + C7 /0 with SIB and disp32 and imm32 = 11 + 1 + 1 + 1 + 4 + 4 = 22.
        let mut b = alloc_vec(&[0x2e; 11]);
        b.extend_from_slice(&[0xc7, 0x84, 0x24, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_mmio(&b), Err(DecodeError::TooLong));
    }

    fn alloc_vec(s: &[u8]) -> Vec<u8> {
        s.to_vec()
    }

    /// A MOV built from parts, with the length and operation it must decode to.
    #[derive(Debug, Clone)]
    struct Built {
        bytes: Vec<u8>,
        len: usize,
        size: u8,
        op: MmioOp,
    }

    fn built() -> impl Strategy<Value = Built> {
        (
            proptest::collection::vec(prop_oneof![Just(0x66u8), Just(0x67), Just(0x2e), Just(0x64), Just(0x65)], 0..4),
            proptest::option::of(0x40u8..=0x4f),
            0usize..6,
            any::<u8>(),
            any::<u8>(),
            any::<[u8; 8]>(),
        )
            .prop_map(|(prefixes, rex, opi, modrm, sib, extra)| {
                let opcode = [0x88u8, 0x89, 0x8a, 0x8b, 0xc6, 0xc7][opi];
                // A memory operand, and /0 for C6/C7.
                let modrm = (modrm % 0xc0) & if opcode >= 0xc6 { 0xc7 } else { 0xff };
                let mut bytes = prefixes.clone();
                bytes.extend(rex);
                bytes.push(opcode);
                bytes.push(modrm);
                let (md, rm) = (modrm >> 6, modrm & 7);
                let mut disp = [0, 1, 4][md as usize];
                if rm == 4 {
                    bytes.push(sib);
                    if md == 0 && sib & 7 == 5 {
                        disp = 4;
                    }
                } else if md == 0 && rm == 5 {
                    disp = 4;
                }
                bytes.extend_from_slice(&extra[..disp]);
                let w = rex.is_some_and(|r| r & 8 != 0);
                let o16 = prefixes.contains(&0x66);
                let size = if opcode & 1 == 0 {
                    1
                } else if w {
                    8
                } else if o16 {
                    2
                } else {
                    4
                };
                let mut num = ((modrm >> 3) & 7) | if rex.is_some_and(|r| r & 4 != 0) { 8 } else { 0 };
                let high_byte = size == 1 && rex.is_none() && num >= 4;
                if high_byte {
                    num -= 4;
                }
                let reg = MmioReg { num, high_byte };
                let op = match opcode {
                    0x88 | 0x89 => MmioOp::StoreReg { reg },
                    0x8a | 0x8b => MmioOp::Load { reg },
                    _ => {
                        let n = match size {
                            1 => 1,
                            2 => 2,
                            _ => 4,
                        };
                        let imm = &extra[4..4 + n];
                        let mut v = imm.iter().rev().fold(0u64, |a, &b| (a << 8) | u64::from(b));
                        if size == 8 {
                            v = v as u32 as i32 as i64 as u64;
                        }
                        bytes.extend_from_slice(imm);
                        MmioOp::StoreImm { value: v }
                    }
                };
                let len = bytes.len();
                Built { bytes, len, size, op }
            })
    }

    proptest! {
        /// Any byte string: no panic; an accepted instruction fits in 15 bytes and in the bytes
        /// given, names a real register, and decodes the same from exactly its own bytes, while
        /// every shorter prefix of it is reported truncated.
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(insn) = decode_mmio(&bytes) {
                let len = usize::from(insn.len);
                prop_assert!((1..=MAX_INSTRUCTION_LEN).contains(&len) && len <= bytes.len());
                prop_assert!(matches!(insn.size, 1 | 2 | 4 | 8));
                if let MmioOp::Load { reg } | MmioOp::StoreReg { reg } = insn.op {
                    prop_assert!(reg.num < 16);
                    prop_assert!(!reg.high_byte || (insn.size == 1 && reg.num < 4));
                }
                prop_assert_eq!(decode_mmio(&bytes[..len]), Ok(insn));
                for k in 0..len {
                    let is_truncated = matches!(decode_mmio(&bytes[..k]), Err(DecodeError::Truncated { .. }));
                    prop_assert!(is_truncated);
                }
            }
        }

        /// MOVs built from their parts decode to the length and operation they were built with
        /// (or are refused as too long when the parts exceed 15 bytes).
        #[test]
        fn built_movs_decode_exactly(b in built(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = b.bytes.clone();
            bytes.extend_from_slice(&tail);
            let got = decode_mmio(&bytes);
            if b.len > MAX_INSTRUCTION_LEN {
                prop_assert_eq!(got, Err(DecodeError::TooLong));
            } else {
                prop_assert_eq!(got, Ok(MmioInstruction { op: b.op, size: b.size, len: b.len as u8 }));
            }
        }
    }
}
