//! One kind of guest-memory copy, repeated a fixed number of times, for instruction counts:
//!
//! `valgrind --tool=callgrind --instr-atstart=no target/release/examples/copycount SIDE DIR SIZE`
//!
//! (`--instr-atstart=no`: the program switches callgrind's instrumentation on itself once the
//! setup is done, so the run takes seconds rather than minutes.)
//! then instructions per copy = the total ÷ the count this prints. SIDE is `ts`
//! (twostage, a populated demand-zero region: scattered frames reached through the nested
//! table), `ts-linear` (twostage, one linear region over contiguous bench RAM), `vmm` (vm-memory
//! over the same bytes as `ts-linear`), `memcpy` (a plain copy to or from the same bytes),
//! `gva-x86` or `gva-sv39` (twostage by guest-virtual address through 4 KiB guest pages, over
//! `ts`'s memory); DIR is `read` or `write`; SIZE is 8, 4096, 65536 or 1048576. The offsets are
//! the criterion rows' (bench/src/copy.rs).

use std::hint::black_box;

use twostage_aspace::guest::{copy_from_guest_va, copy_to_guest_va, GuestTlb};
use twostage_aspace::GuestMemory;
use twostage_bench::copy::{vmm_over, COPY_SPAN};
use twostage_bench::engine::GPA_BASE;
use twostage_bench::ram::BenchRam;
use twostage_bench::space::{ts_linear, ts_populated};
use twostage_bench::{random_offsets, MIB};
use twostage_npt::{GuestPhysAddr, GuestVirtAddr};
use vm_memory::{Bytes, GuestAddress};

/// Valgrind's client requests to callgrind (valgrind.h's `VALGRIND_DO_CLIENT_REQUEST` for amd64,
/// callgrind.h's request numbers): `START_INSTRUMENTATION` is `'C' << 24 | 'T' << 16 | 4`,
/// `STOP_INSTRUMENTATION` the next. Outside
/// valgrind the magic sequence is a few rotations of `rdi` that cancel out and a no-op exchange.
#[cfg(target_arch = "x86_64")]
fn callgrind_request(request: u64) {
    let args: [u64; 6] = [request, 0, 0, 0, 0, 0];
    let mut result: u64 = 0;
    // SAFETY: valgrind's documented client-request sequence: rdi is rotated by 3+13+61+51 = 128
    // bits (unchanged), `xchg rbx, rbx` does nothing; valgrind reads `args` through rax and may
    // write rdx. Natively it changes nothing but rdx and the flags.
    unsafe {
        std::arch::asm!(
            "rol rdi, 3", "rol rdi, 13", "rol rdi, 61", "rol rdi, 51", "xchg rbx, rbx",
            inout("rdx") result, in("rax") args.as_ptr(), out("rdi") _,
        );
    }
    black_box(result);
}

#[cfg(not(target_arch = "x86_64"))]
fn callgrind_request(_: u64) {}

/// The counted part: callgrind instruments only this loop.
#[inline(never)]
fn measured(n: usize, mut f: impl FnMut(usize)) {
    callgrind_request(0x4354_0004);
    for i in 0..n {
        f(i);
    }
    callgrind_request(0x4354_0005);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, side, dir, size] = &args[..] else { panic!("usage: copycount SIDE read|write SIZE") };
    let size: u64 = size.parse().expect("size");
    let write = match dir.as_str() {
        "read" => false,
        "write" => true,
        d => panic!("direction {d}"),
    };
    // About 64 MiB moved per run, at least 64 copies.
    let n = ((64 * MIB) / size).clamp(64, 100_000) as usize;
    let offs = random_offsets(0xc0c0 ^ size, COPY_SPAN, size, 1024);
    let mut buf = vec![0x5au8; size as usize];
    let ram = BenchRam::leak((COPY_SPAN + 64 * MIB) as usize);
    let gpa = |i: usize| GuestPhysAddr::new(GPA_BASE + black_box(offs[i % offs.len()]));
    match side.as_str() {
        "ts" | "ts-linear" => {
            let mut s = if side == "ts" { ts_populated(ram, COPY_SPAN) } else { ts_linear(ram, COPY_SPAN).0 };
            measured(n, |i| {
                if write {
                    s.write(gpa(i), &buf).expect("write");
                    s.flush_pending(|_| {});
                } else {
                    s.read(gpa(i), &mut buf).expect("read");
                }
                black_box(&buf);
            });
        }
        "vmm" => {
            let (_s, host) = ts_linear(ram, COPY_SPAN);
            let vmm = vmm_over(ram, host, COPY_SPAN);
            measured(n, |i| {
                let addr = GuestAddress(GPA_BASE + black_box(offs[i % offs.len()]));
                match (write, size) {
                    (false, 8) => {
                        let v: u64 = vmm.read_obj(addr).expect("read");
                        buf.copy_from_slice(&v.to_ne_bytes());
                    }
                    (true, 8) => vmm.write_obj(u64::from_ne_bytes(buf[..8].try_into().unwrap()), addr).expect("write"),
                    (false, _) => vmm.read_slice(&mut buf, addr).expect("read"),
                    (true, _) => vmm.write_slice(&buf, addr).expect("write"),
                }
                black_box(&buf);
            });
        }
        "memcpy" => {
            let (_s, host) = ts_linear(ram, COPY_SPAN);
            let base = ram.ptr(host);
            // SAFETY: the linear region's bytes, a block of the leaked bench RAM that nothing else
            // touches while this slice lives.
            let plain = unsafe { std::slice::from_raw_parts_mut(base, COPY_SPAN as usize) };
            measured(n, |i| {
                let off = black_box(offs[i % offs.len()]) as usize;
                if write {
                    plain[off..off + size as usize].copy_from_slice(&buf);
                } else {
                    buf.copy_from_slice(&plain[off..off + size as usize]);
                }
                black_box(&buf);
            });
        }
        "gva-x86" | "gva-sv39" | "gva-x86-tlb" | "gva-sv39-tlb" => {
            // Like the criterion rows: a linear region (the guest's tables after the data), and
            // for the `-tlb` sides one `GuestTlb` kept across the copies (no fence in between).
            let mut s = ts_linear(ram, COPY_SPAN + 2 * MIB).0;
            let paging = twostage_bench::gva::install(&mut s, side.starts_with("gva-x86"));
            let mut tlb = side.ends_with("-tlb").then(GuestTlb::new);
            let mut mem = &mut s;
            measured(n, |i| {
                let gva = GuestVirtAddr::new(twostage_bench::gva::GVA_BASE + black_box(offs[i % offs.len()]));
                match (&mut tlb, write) {
                    (Some(t), true) => t.copy_to(&mut mem, &paging, gva, &buf).expect("write"),
                    (Some(t), false) => t.copy_from(&mut mem, &paging, gva, &mut buf).expect("read"),
                    (None, true) => copy_to_guest_va(&mut mem, &paging, gva, &buf).expect("write"),
                    (None, false) => copy_from_guest_va(&mut mem, &paging, gva, &mut buf).expect("read"),
                }
                black_box(&buf);
            });
        }
        other => panic!("side {other}"),
    }
    println!("{n}");
}
