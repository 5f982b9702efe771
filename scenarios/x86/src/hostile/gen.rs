//! What the hostile guest is made of: a seeded generator of register values, guest page tables
//! that reach random guest-physical addresses, and a page of code mixing random bytes with
//! instructions that make every kind of exit.

/// The guest's RAM: GPA 0..RAM_END, demand-zero, RWX.
pub const RAM_END: u64 = 0x20_0000;
/// A read-only (RX) demand-zero region after RAM: guest writes to it are EPT violations the
/// address space refuses.
pub const ROM: u64 = 0x20_0000;
/// Length of [`ROM`].
pub const ROM_LEN: u64 = 0x1_0000;
/// One page of emulated device registers.
pub const MMIO: u64 = 0xfeb0_0000;
/// The guest's PML4; its tables fill 0x1000..TABLES_END.
pub const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
/// Four PDs identity-mapping the first 4 GiB with 2 MiB pages.
const PD_ID: u64 = 0x3000;
/// A PD for GVA 4 GiB..5 GiB whose entries point at random GPAs.
const PD_RANDOM: u64 = 0x7000;
/// A PDPT for GVA 1 TiB..1.5 TiB of 1 GiB pages at random GPAs.
const PDPT_1G: u64 = 0x8000;
/// End of the table pages.
pub const TABLES_END: u64 = 0x9000;
/// The page of generated code (identity-mapped).
pub const CODE: u64 = 0x1_0000;

/// Guest-physical addresses the random tables point at stay below this (every CPU's MAXPHYADDR
/// is at least 36, Intel SDM Vol. 3A 4.1.4), so they are EPT violations, not reserved-bit faults.
const GPA_REACH: u64 = 1 << 36;

/// The hostile guests' generator: the harness's seeded xorshift64*, with the address and value
/// choices a hostile guest makes.
pub struct Rng(twostage_harness::XorShift64Star);

impl Rng {
    /// A generator from a seed.
    pub const fn new(seed: u64) -> Self {
        Self(twostage_harness::XorShift64Star::new(seed))
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    /// An address a hostile guest would try: its RAM, the read-only region, the device, unmapped
    /// GPAs, the random-table windows, tiny values, non-canonical ones, or anything.
    pub fn addr(&mut self) -> u64 {
        match self.below(11) {
            0 => self.next(),
            1 => self.below(RAM_END),
            2 => ROM + self.below(ROM_LEN),
            3 => MMIO + (self.below(0x1000) & !self.below(8)),
            4 => self.below(1 << 32),
            5 => (4 << 30) + self.below(1 << 30),
            6 => (512 << 30) + self.below(512 << 30),
            7 => (1024 << 30) + self.below(512 << 30),
            8 => self.below(0x100),
            9 => 0x8000_0000_0000_0000 | self.next(),
            _ => u64::MAX - self.below(0x1000),
        }
    }

    fn page_gpa(&mut self) -> u64 {
        self.below(GPA_REACH) & !0xfff
    }
}

/// The guest's page tables for 0x1000..TABLES_END (Intel SDM Vol. 3A 5.5: P|RW = 0x3, PS =
/// 0x80): the first 4 GiB identity-mapped, plus windows whose tables and pages sit at random
/// GPAs (mostly unmapped or device space, so the CPU's own walk exits too).
pub fn tables(rng: &mut Rng) -> [u8; (TABLES_END - PML4) as usize] {
    let mut t = [0u8; (TABLES_END - PML4) as usize];
    let mut put = |gpa: u64, v: u64| {
        let o = (gpa - PML4) as usize;
        t[o..o + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(PML4, PDPT | 3);
    // GVA 512 GiB..: a PDPT at a random GPA.
    put(PML4 + 8, rng.page_gpa() | 3);
    put(PML4 + 16, PDPT_1G | 3);
    put(PML4 + 8 * 511, rng.next());
    for i in 0..4u64 {
        put(PDPT + 8 * i, (PD_ID + 0x1000 * i) | 3);
        for j in 0..512u64 {
            put(PD_ID + 0x1000 * i + 8 * j, (i << 30) | (j << 21) | 0x83);
        }
    }
    put(PDPT + 8 * 4, PD_RANDOM | 3);
    put(PDPT + 8 * 5, rng.page_gpa() | 3);
    for j in 0..512u64 {
        let e = if j % 4 == 0 {
            // A page table at a random GPA.
            rng.page_gpa() | 3
        } else {
            (rng.below(GPA_REACH) & !0x1f_ffff) | 0x83 | (rng.next() & 0x64)
        };
        put(PD_RANDOM + 8 * j, e);
    }
    for k in 0..512u64 {
        // 1 GiB pages (a reserved-bit #PF where the CPU lacks them: just as hostile).
        put(PDPT_1G + 8 * k, (rng.below(GPA_REACH) & !0x3fff_ffff) | 0x83);
    }
    t
}

/// MSR numbers worth trying besides random ones.
const MSRS: [u32; 10] = [0x10, 0x1b, 0x3a, 0x480, 0x48c, 0xc000_0080, 0xc000_0081, 0xc000_0100, 0xc000_0102, 0x277];

/// Appends one instruction (or a short sequence) that exits, or random bytes.
fn piece(rng: &mut Rng, out: &mut [u8; 4096], at: &mut usize) {
    let mut buf = [0u8; 24];
    let mut n = 0;
    let mut emit = |b: &[u8]| {
        for &x in b {
            if n < buf.len() {
                buf[n] = x;
                n += 1;
            }
        }
    };
    let imm32 = |rng: &mut Rng| (rng.next() as u32).to_le_bytes();
    let small32 = |rng: &mut Rng| (rng.below(8) as u32).to_le_bytes();
    match rng.below(34) {
        0..=5 => {
            let k = 1 + rng.below(6);
            for _ in 0..k {
                emit(&[rng.next() as u8]);
            }
        }
        6 => {
            // vmcall with a small or random number in RAX.
            emit(&[0xb8]);
            let v = if rng.below(2) == 0 { small32(rng) } else { imm32(rng) };
            emit(&v);
            emit(&[0x0f, 0x01, 0xc1]);
        }
        7 => {
            emit(&[0xb8]);
            emit(&imm32(rng));
            emit(&[0xb9]);
            emit(&small32(rng));
            emit(&[0x0f, 0xa2]); // cpuid
        }
        8 | 9 => {
            let msr = if rng.below(2) == 0 { MSRS[rng.below(MSRS.len() as u64) as usize] } else { rng.next() as u32 };
            emit(&[0xb9]);
            emit(&msr.to_le_bytes());
            emit(if rng.below(2) == 0 { &[0x0f, 0x32] } else { &[0x0f, 0x30] });
            // rdmsr / wrmsr
        }
        10 => emit(&[0xf4]), // hlt
        11 => {
            // in/out through DX, an immediate port, or a string with REP.
            emit(&[0x66, 0xba]);
            emit(&(rng.next() as u16).to_le_bytes());
            const IO: [&[u8]; 9] =
                [&[0xec], &[0xed], &[0xee], &[0xef], &[0x66, 0xed], &[0xf3, 0x6c], &[0xf3, 0x6e], &[0x6d], &[0x6f]];
            emit(IO[rng.below(IO.len() as u64) as usize]);
        }
        12 => {
            let port = rng.next() as u8;
            emit(&[[0xe4, 0xe5, 0xe6, 0xe7][rng.below(4) as usize], port]);
        }
        13 => {
            // A control register access, with a random value first.
            emit(&[0x48, 0xb8]);
            emit(&rng.next().to_le_bytes());
            const CR: [&[u8]; 10] = [
                &[0x0f, 0x22, 0xc0],       // mov cr0, rax
                &[0x0f, 0x22, 0xe0],       // mov cr4, rax
                &[0x0f, 0x22, 0xd8],       // mov cr3, rax
                &[0x0f, 0x20, 0xd8],       // mov rax, cr3
                &[0x0f, 0x20, 0xdc],       // mov rsp, cr3
                &[0x44, 0x0f, 0x22, 0xc0], // mov cr8, rax
                &[0x44, 0x0f, 0x20, 0xc0], // mov rax, cr8
                &[0x0f, 0x06],             // clts
                &[0x0f, 0x01, 0xf0],       // lmsw ax
                &[0x0f, 0x20, 0xc0],       // mov rax, cr0
            ];
            emit(CR[rng.below(CR.len() as u64) as usize]);
        }
        14 => {
            const VMX: [&[u8]; 9] = [
                &[0x0f, 0x78, 0xc0],             // vmread rax, rax
                &[0x0f, 0x79, 0xc0],             // vmwrite rax, rax
                &[0x0f, 0x01, 0xc4],             // vmxoff
                &[0x0f, 0x01, 0xc2],             // vmlaunch
                &[0x0f, 0x01, 0xc3],             // vmresume
                &[0xf3, 0x0f, 0xc7, 0x30],       // vmxon [rax]
                &[0x0f, 0xc7, 0x30],             // vmptrld [rax]
                &[0x66, 0x0f, 0x38, 0x80, 0x00], // invept rax, [rax]
                &[0x66, 0x0f, 0x38, 0x81, 0x00], // invvpid rax, [rax]
            ];
            emit(VMX[rng.below(VMX.len() as u64) as usize]);
        }
        15 => {
            const MISC: [&[u8]; 14] = [
                &[0x0f, 0x01, 0x38], // invlpg [rax]
                &[0x0f, 0x01, 0xd1], // xsetbv
                &[0x0f, 0x08],       // invd
                &[0x0f, 0x09],       // wbinvd
                &[0x0f, 0x31],       // rdtsc
                &[0x0f, 0x33],       // rdpmc
                &[0x0f, 0x01, 0xf9], // rdtscp
                &[0xf3, 0x90],       // pause
                &[0x0f, 0x37],       // getsec
                &[0x0f, 0x01, 0xc8], // monitor
                &[0x0f, 0x01, 0xc9], // mwait
                &[0x0f, 0x0b],       // ud2
                &[0xcc],             // int3
                &[0x0f, 0x05],       // syscall
            ];
            emit(MISC[rng.below(MISC.len() as u64) as usize]);
        }
        16..=23 => {
            // movabs rax, ADDR; then a memory access through RAX (MOV forms the decoder takes,
            // and forms it must refuse).
            emit(&[0x48, 0xb8]);
            emit(&rng.addr().to_le_bytes());
            const MEM: [&[u8]; 16] = [
                &[0x48, 0x89, 0x08],                         // mov [rax], rcx
                &[0x89, 0x08],                               // mov [rax], ecx
                &[0x88, 0x20],                               // mov [rax], ah
                &[0x8b, 0x08],                               // mov ecx, [rax]
                &[0x8a, 0x38],                               // mov bh, [rax]
                &[0x66, 0x89, 0x08],                         // mov [rax], cx
                &[0x48, 0xc7, 0x00, 0x78, 0x56, 0x34, 0x12], // mov qword [rax], imm32
                &[0xc6, 0x00, 0x5a],                         // mov byte [rax], 0x5a
                &[0x48, 0x8b, 0x00],                         // mov rax, [rax]
                &[0x4c, 0x8b, 0x78, 0x10],                   // mov r15, [rax + 0x10]
                &[0x48, 0x8b, 0x20],                         // mov rsp, [rax]
                &[0xff, 0x00],                               // inc dword [rax] (read-modify-write)
                &[0x0f, 0xb6, 0x00],                         // movzx eax, byte [rax]
                &[0xff, 0xd0],                               // call rax
                &[0xff, 0xe0],                               // jmp rax
                &[0x0f, 0x01, 0x18],                         // lidt [rax]
            ];
            emit(MEM[rng.below(MEM.len() as u64) as usize]);
        }
        24 => {
            emit(&[0x48, 0xbc]); // movabs rsp, ADDR; push / pop / call / ret
            emit(&rng.addr().to_le_bytes());
            emit(&[[0x50, 0x58, 0xc3, 0xe8][rng.below(4) as usize]]);
        }
        25 => emit(&[0xeb, 0xfe]), // jmp $ (the watchdog's business)
        26 => {
            emit(&[0xcd, rng.next() as u8]); // int n
        }
        27 => emit(&[[0xfb, 0xfa, 0x48, 0x9c, 0x9d][rng.below(5) as usize], 0xcf]), // sti/cli/.. + iret
        28 => emit(&[0x8e, 0xd0]),                                                  // mov ss, ax
        _ => {
            // Random bytes that start like a two-byte opcode.
            emit(&[0x0f, rng.next() as u8, rng.next() as u8, rng.next() as u8]);
        }
    }
    for &b in &buf[..n] {
        if *at < out.len() {
            out[*at] = b;
            *at += 1;
        }
    }
}

/// A page of code: pieces from [`piece`] until the page is full.
pub fn code(rng: &mut Rng) -> [u8; 4096] {
    let mut out = [0u8; 4096];
    let mut at = 0;
    while at < out.len() {
        piece(rng, &mut out, &mut at);
    }
    out
}
