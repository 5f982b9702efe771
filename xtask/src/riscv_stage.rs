//! RISC-V: what xtask stages for the hypervisor (the guest file, the staging header with the
//! guest's RAM, command line and vCPUs, the initrd) and the QEMU command line that stages it.
//!
//! The layout and the checks are the hypervisor's own (`twostage_hv_riscv::boot`), run here
//! before booting so that a file the hypervisor would refuse never boots.

use crate::riscv::Qemu;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use twostage_hv_riscv::boot::{self, Header, LiveOp, INITRD_STAGE, MAX_FILE, MAX_INITRD, STAGE_ADDR, STAGE_HEADER};

/// Host RAM QEMU gets on top of the guest's: the hypervisor, its heap and tables, the staging
/// area (file and initrd).
const HOST_EXTRA: u64 = 256 << 20;

/// `--mem`, `--append`, `--initrd`, `--smp` of `cargo xtask run --arch riscv64`.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    /// Guest RAM bytes.
    pub mem: u64,
    /// The kernel command line.
    pub append: String,
    /// An initrd to stage.
    pub initrd: Option<PathBuf>,
    /// vCPUs.
    pub vcpus: u64,
    /// `--fork [--fork-after N]` or `--migrate [--migrate-after N]`.
    pub live: LiveOp,
}

impl Default for GuestOpts {
    fn default() -> Self {
        Self { mem: boot::DEFAULT_MEM, append: String::new(), initrd: None, vcpus: 1, live: LiveOp::None }
    }
}

impl GuestOpts {
    /// Sets one option from the command line, checked as the hypervisor would.
    pub fn set(&mut self, opt: &str, v: &str) -> Result<(), String> {
        match opt {
            "--mem" => {
                let mem = boot::parse_size(v).map_err(|e| format!("--mem: {e}"))?;
                boot::check_mem(mem).map_err(|e| format!("--mem {v}: {e}"))?;
                self.mem = mem;
            }
            "--append" => {
                if v.len() > boot::MAX_BOOTARGS || v.contains('\0') {
                    return Err(format!("--append: at most {} bytes", boot::MAX_BOOTARGS));
                }
                self.append = v.into();
            }
            "--initrd" => self.initrd = Some(v.into()),
            "--smp" => {
                let n: u64 = v.parse().map_err(|_| format!("--smp takes a number of vCPUs, not {v:?}"))?;
                boot::check_vcpus(n).map_err(|e| format!("--smp {v}: {e}"))?;
                self.vcpus = n;
            }
            "--fork" | "--fork-after" | "--migrate" | "--migrate-after" => {
                let after = match opt {
                    "--fork-after" | "--migrate-after" => match v.parse() {
                        Ok(n @ 1..) => n,
                        _ => return Err(format!("{opt} takes a count of exits from user space from 1, not {v:?}")),
                    },
                    _ => match self.live {
                        LiveOp::Fork { after } | LiveOp::Migrate { after } => after,
                        LiveOp::None => 1,
                    },
                };
                let live = if opt.starts_with("--fork") { LiveOp::Fork { after } } else { LiveOp::Migrate { after } };
                if core::mem::discriminant(&live) != core::mem::discriminant(&self.live) && self.live != LiveOp::None {
                    return Err("--fork and --migrate exclude each other".into());
                }
                self.live = live;
            }
            _ => unreachable!("only the guest options reach here"),
        }
        Ok(())
    }

    fn header(&self, file_len: u64, initrd_len: u64) -> Header {
        Header {
            file_len,
            mem: self.mem,
            initrd_len,
            vcpus: self.vcpus,
            bootargs: self.append.clone(),
            live: self.live,
        }
    }
}

/// What xtask stages for the hypervisor.
pub enum Stage<'a> {
    /// Nothing: the hypervisor runs its scenario suite.
    Nothing,
    /// A guest file (of 1 to [`MAX_FILE`] bytes) with its options.
    File(&'a Path, &'a GuestOpts),
    /// Only the staging header, saying `len` bytes: what the hypervisor sees of an empty or an
    /// oversized file when it is booted without xtask.
    HeaderOnly(u64),
}

/// `path` as one QEMU option value: each comma doubled, so a comma in a file name cannot end the
/// value (`-device loader,file=a,,b` names the file `a,b`).
fn qemu_value(path: &Path) -> OsString {
    let mut v = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        v.push(b);
        if b == b',' {
            v.push(b',');
        }
    }
    OsString::from_vec(v)
}

/// `-device loader,file=PATH,addr=ADDR,force-raw=on`.
fn load_file(cmd: &mut Command, path: &Path, addr: u64) -> Result<(), String> {
    let file = path.canonicalize().map_err(|e| format!("{}: {e}", path.display()))?;
    let mut device = OsString::from("loader,file=");
    device.push(qemu_value(&file));
    device.push(format!(",addr={addr:#x},force-raw=on"));
    cmd.arg("-device").arg(device);
    Ok(())
}

/// Writes a staging header page to a file of its own in the target directory.
fn header_file(h: &Header) -> Result<PathBuf, String> {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = crate::riscv::target_dir().join("riscv-stage");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("header-{}-{}.bin", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, h.to_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn file_len(what: &str, p: &Path) -> Result<u64, String> {
    Ok(std::fs::metadata(p).map_err(|e| format!("{what} {}: {e}", p.display()))?.len())
}

/// The QEMU command line for `image` on `qemu`, with `stage` staged.
pub fn qemu_command(qemu: &Qemu, image: &Path, stage: Stage<'_>) -> Result<Command, String> {
    let mut cmd = Command::new(qemu.program());
    if let Some((modules, data)) = qemu.dirs() {
        // Its own modules (not the system QEMU's) and its own firmware directory for `-bios default`.
        cmd.env("QEMU_MODULE_DIR", modules).arg("-L").arg(data);
    }
    let (mem, harts) = match &stage {
        Stage::File(_, o) => (o.mem, o.vcpus),
        _ => (boot::DEFAULT_MEM, 1),
    };
    cmd.args(["-machine", "virt", "-cpu", qemu.cpu(), "-nographic", "-bios", "default", "-m"])
        .arg(format!("{}M", (mem + HOST_EXTRA) >> 20))
        // One physical hart per vCPU: the hypervisor starts the others through SBI HSM.
        .arg("-smp")
        .arg(harts.to_string())
        .arg("-kernel")
        .arg(image);
    let header = match stage {
        Stage::Nothing => return Ok(cmd),
        Stage::HeaderOnly(len) => Header::new(len),
        Stage::File(g, opts) => {
            let len = file_len("guest file", g)?;
            if len == 0 || len > MAX_FILE {
                return Err(format!("guest file {} is {len} bytes; 1 to {MAX_FILE} can be staged", g.display()));
            }
            load_file(&mut cmd, g, STAGE_ADDR).map_err(|e| format!("guest file {e}"))?;
            let initrd_len = match &opts.initrd {
                Some(i) => {
                    load_file(&mut cmd, i, INITRD_STAGE).map_err(|e| format!("initrd {e}"))?;
                    file_len("initrd", i)?
                }
                None => 0,
            };
            opts.header(len, initrd_len)
        }
    };
    let mut device = OsString::from("loader,file=");
    device.push(qemu_value(&header_file(&header)?));
    device.push(format!(",addr={STAGE_HEADER:#x},force-raw=on"));
    cmd.arg("-device").arg(device);
    Ok(cmd)
}

/// The hypervisor's checks on a guest file and its options (`twostage_hv_riscv::boot`), run
/// before booting: `Ok(Some(message))` when the file would be refused, `Ok(None)` when it would
/// run, `Err` when it cannot be read.
pub fn guest_refusal(path: &Path, opts: &GuestOpts) -> Result<Option<String>, String> {
    let len = file_len("guest file", path)?;
    if len > MAX_FILE {
        return Ok(Some(format!(
            "the file is {len} bytes: the hypervisor's staging area holds at most {MAX_FILE} ({} MiB)",
            MAX_FILE >> 20
        )));
    }
    let initrd = match &opts.initrd {
        Some(i) if file_len("initrd", i)? > MAX_INITRD => {
            return Ok(Some(format!("the initrd {} is larger than {} MiB", i.display(), MAX_INITRD >> 20)))
        }
        Some(i) => Some(std::fs::read(i).map_err(|e| format!("initrd {}: {e}", i.display()))?),
        None => None,
    };
    let file = std::fs::read(path).map_err(|e| format!("guest file {}: {e}", path.display()))?;
    if let Err(e) = opts.header(len, initrd.as_ref().map_or(0, |i| i.len() as u64)).check() {
        return Ok(Some(e));
    }
    let checked = boot::plan(&file, opts.mem, initrd.as_deref()).and_then(|(plan, at)| {
        let tree = boot::guest_tree(&boot::TreeSpec {
            mem: opts.mem,
            timebase: 10_000_000,
            isa: boot::guest_isa(true),
            vcpus: opts.vcpus as u32,
            bootargs: &opts.append,
            initrd: at.map(|a| a..a + 1),
            plic: true,
            // The hypervisor pads the tree to the size of its firmware's (tens of KiB), unknown
            // here: only a guest that leaves less than that free at the top of its RAM could be
            // refused by the hypervisor after passing this check.
            room: 0,
        });
        boot::place_dtb(&plan, opts.mem, tree.len() as u64).map(drop)
    });
    Ok(checked.err())
}

#[cfg(test)]
mod tests {
    use super::GuestOpts;
    use twostage_hv_riscv::boot::LiveOp;

    fn opts(args: &[(&str, &str)]) -> Result<GuestOpts, String> {
        let mut o = GuestOpts::default();
        for (opt, v) in args {
            o.set(opt, v)?;
        }
        Ok(o)
    }

    #[test]
    fn fork_and_migrate_options() {
        assert_eq!(opts(&[("--fork", "")]).unwrap().live, LiveOp::Fork { after: 1 });
        assert_eq!(opts(&[("--fork-after", "10")]).unwrap().live, LiveOp::Fork { after: 10 });
        assert_eq!(opts(&[("--fork-after", "10"), ("--fork", "")]).unwrap().live, LiveOp::Fork { after: 10 });
        assert_eq!(opts(&[("--migrate", ""), ("--migrate-after", "3")]).unwrap().live, LiveOp::Migrate { after: 3 });
        assert!(opts(&[("--fork", ""), ("--migrate", "")]).unwrap_err().contains("exclude each other"));
        assert!(opts(&[("--migrate-after", "2"), ("--fork-after", "2")]).unwrap_err().contains("exclude"));
        assert!(opts(&[("--fork-after", "0")]).unwrap_err().contains("from 1"));
        assert!(opts(&[("--migrate-after", "x")]).is_err());
        // The vCPU check is the header's, shared with the hypervisor.
        let o = opts(&[("--fork", ""), ("--smp", "2")]).unwrap();
        assert!(o.live.check(o.vcpus).unwrap_err().contains("one vCPU"));
        let o = opts(&[("--migrate", ""), ("--smp", "2")]).unwrap();
        assert!(o.live.check(o.vcpus).is_ok());
    }
}
