//! Flattened device trees (Devicetree Specification v0.4 §5): a reader for the host's, a writer for guests'.

use alloc::vec::Vec;
use core::fmt;

const MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;
const HEADER_LEN: usize = 40;

/// Why a blob is not a usable device tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdtError {
    /// The magic number is wrong.
    BadMagic(u32),
    /// An offset or length points outside the blob.
    Truncated {
        /// The offending offset.
        at: usize,
    },
    /// An unknown structure token.
    BadToken {
        /// The token.
        token: u32,
        /// Its offset.
        at: usize,
    },
}

impl fmt::Display for FdtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "not a device tree: magic {m:#010x}, expected {MAGIC:#010x}"),
            Self::Truncated { at } => write!(f, "device tree truncated or malformed at offset {at:#x}"),
            Self::BadToken { token, at } => write!(f, "device tree: unknown structure token {token} at offset {at:#x}"),
        }
    }
}

impl core::error::Error for FdtError {}

fn be32(b: &[u8], at: usize) -> Result<u32, FdtError> {
    let s = b.get(at..at + 4).ok_or(FdtError::Truncated { at })?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// One event of a depth-first walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdtEvent<'a> {
    /// A node starts (its unit name, e.g. `memory@80000000`); depth 0 is the root.
    Begin {
        /// Node name.
        name: &'a str,
        /// Depth.
        depth: usize,
    },
    /// A property of the innermost open node.
    Prop {
        /// Property name.
        name: &'a str,
        /// Raw value.
        value: &'a [u8],
        /// Depth of the node owning it.
        depth: usize,
    },
    /// The innermost node ends.
    End,
}

/// A device tree blob, checked on construction.
#[derive(Clone, Copy)]
pub struct Fdt<'a> {
    blob: &'a [u8],
    structs: usize,
    strings: usize,
}

impl<'a> Fdt<'a> {
    /// The length a blob at the start of `head` declares (its totalsize), for sizing the slice.
    pub fn total_size(head: &[u8]) -> Result<usize, FdtError> {
        let magic = be32(head, 0)?;
        if magic != MAGIC {
            return Err(FdtError::BadMagic(magic));
        }
        Ok(be32(head, 4)? as usize)
    }

    /// Parses the header of `blob`.
    pub fn new(blob: &'a [u8]) -> Result<Self, FdtError> {
        let total = Self::total_size(blob)?;
        let blob = blob.get(..total).ok_or(FdtError::Truncated { at: total })?;
        let structs = be32(blob, 8)? as usize;
        let strings = be32(blob, 12)? as usize;
        if structs > total || strings > total {
            return Err(FdtError::Truncated { at: structs.max(strings) });
        }
        Ok(Self { blob, structs, strings })
    }

    /// The whole blob.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.blob
    }

    fn cstr(&self, at: usize) -> Result<&'a str, FdtError> {
        let rest = self.blob.get(at..).ok_or(FdtError::Truncated { at })?;
        let len = rest.iter().position(|&c| c == 0).ok_or(FdtError::Truncated { at })?;
        core::str::from_utf8(&rest[..len]).map_err(|_| FdtError::Truncated { at })
    }

    /// Walks the structure block depth-first.
    pub fn walk(&self, mut f: impl FnMut(FdtEvent<'a>)) -> Result<(), FdtError> {
        let mut at = self.structs;
        let mut depth = 0usize;
        loop {
            let token = be32(self.blob, at)?;
            at += 4;
            match token {
                BEGIN_NODE => {
                    let name = self.cstr(at)?;
                    at += (name.len() + 1).next_multiple_of(4);
                    f(FdtEvent::Begin { name, depth });
                    depth += 1;
                }
                END_NODE => {
                    depth = depth.saturating_sub(1);
                    f(FdtEvent::End);
                }
                PROP => {
                    let len = be32(self.blob, at)? as usize;
                    let name = self.cstr(self.strings + be32(self.blob, at + 4)? as usize)?;
                    let value = self.blob.get(at + 8..at + 8 + len).ok_or(FdtError::Truncated { at })?;
                    at += 8 + len.next_multiple_of(4);
                    f(FdtEvent::Prop { name, value, depth: depth.saturating_sub(1) });
                }
                NOP => {}
                END => return Ok(()),
                token => return Err(FdtError::BadToken { token, at: at - 4 }),
            }
        }
    }

    /// The RAM ranges `(base, size)` of every `memory` node (root #address-cells and #size-cells
    /// of 2, as on QEMU virt; other cell counts are read as given).
    pub fn memory(&self, out: &mut [(u64, u64)]) -> Result<usize, FdtError> {
        let (mut ac, mut sc) = (2usize, 1usize);
        let mut in_memory = false;
        let mut n = 0;
        self.walk(|ev| match ev {
            FdtEvent::Prop { name: "#address-cells", value, depth: 0 } if value.len() == 4 => ac = value[3] as usize,
            FdtEvent::Prop { name: "#size-cells", value, depth: 0 } if value.len() == 4 => sc = value[3] as usize,
            FdtEvent::Begin { name, depth: 1 } => in_memory = name == "memory" || name.starts_with("memory@"),
            FdtEvent::Prop { name: "reg", value, depth: 1 } if in_memory => {
                let cells = |s: &[u8]| s.chunks(4).fold(0u64, |a, c| (a << 32) | u64::from(be32(c, 0).unwrap_or(0)));
                let step = 4 * (ac + sc);
                if step == 0 {
                    return;
                }
                for e in value.chunks_exact(step) {
                    if n < out.len() {
                        out[n] = (cells(&e[..4 * ac]), cells(&e[4 * ac..]));
                        n += 1;
                    }
                }
            }
            _ => {}
        })?;
        Ok(n)
    }

    /// The first property named `prop` in a node at `depth` whose name starts with `node`.
    pub fn find(&self, node: &str, depth: usize, prop: &str) -> Result<Option<&'a [u8]>, FdtError> {
        let mut stack: [bool; 16] = [false; 16];
        let mut d = 0usize;
        let mut found = None;
        self.walk(|ev| match ev {
            FdtEvent::Begin { name, depth: nd } => {
                if nd < 16 {
                    stack[nd] = nd == depth && name.starts_with(node);
                }
                d = nd + 1;
            }
            FdtEvent::End => d = d.saturating_sub(1),
            FdtEvent::Prop { name, value, depth: pd } => {
                if found.is_none() && pd == depth && pd < 16 && stack[pd] && name == prop && d == depth + 1 {
                    found = Some(value);
                }
            }
        })?;
        Ok(found)
    }
}

/// Builds a device tree blob (version 17, last compatible 16).
#[derive(Default)]
pub struct FdtWriter {
    structs: Vec<u8>,
    strings: Vec<u8>,
    depth: usize,
}

impl FdtWriter {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    fn pad(&mut self) {
        while !self.structs.len().is_multiple_of(4) {
            self.structs.push(0);
        }
    }

    /// Opens a node (`""` for the root).
    pub fn begin_node(&mut self, name: &str) -> &mut Self {
        self.structs.extend_from_slice(&BEGIN_NODE.to_be_bytes());
        self.structs.extend_from_slice(name.as_bytes());
        self.structs.push(0);
        self.pad();
        self.depth += 1;
        self
    }

    /// Closes the innermost node.
    pub fn end_node(&mut self) -> &mut Self {
        self.structs.extend_from_slice(&END_NODE.to_be_bytes());
        self.depth = self.depth.saturating_sub(1);
        self
    }

    fn name_offset(&mut self, name: &str) -> u32 {
        let mut at = 0;
        while at < self.strings.len() {
            let end = at + self.strings[at..].iter().position(|&c| c == 0).unwrap_or(0);
            if &self.strings[at..end] == name.as_bytes() {
                return at as u32;
            }
            at = end + 1;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        off
    }

    /// A property with a raw value.
    pub fn prop(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let off = self.name_offset(name);
        self.structs.extend_from_slice(&PROP.to_be_bytes());
        self.structs.extend_from_slice(&(value.len() as u32).to_be_bytes());
        self.structs.extend_from_slice(&off.to_be_bytes());
        self.structs.extend_from_slice(value);
        self.pad();
        self
    }

    /// A property of big-endian 32-bit cells.
    pub fn prop_cells(&mut self, name: &str, cells: &[u32]) -> &mut Self {
        let v: Vec<u8> = cells.iter().flat_map(|c| c.to_be_bytes()).collect();
        self.prop(name, &v)
    }

    /// A string property (NUL-terminated).
    pub fn prop_str(&mut self, name: &str, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.prop(name, &v)
    }

    /// The finished blob (all nodes must be closed).
    pub fn finish(&mut self) -> Vec<u8> {
        debug_assert_eq!(self.depth, 0, "unclosed device tree nodes");
        self.structs.extend_from_slice(&END.to_be_bytes());
        let rsv = HEADER_LEN;
        let st = rsv + 16;
        let strs = st + self.structs.len();
        let total = strs + self.strings.len();
        let mut out = Vec::with_capacity(total.next_multiple_of(8));
        for v in [
            MAGIC,
            total as u32,
            st as u32,
            strs as u32,
            rsv as u32,
            17,
            16,
            0,
            self.strings.len() as u32,
            self.structs.len() as u32,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&[0; 16]); // empty memory reservation map: one (0, 0) entry
        out.extend_from_slice(&self.structs);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// The device tree a twostage guest boots with: one hart, one RAM range, `/chosen` with empty
/// bootargs, compatible `riscv-virtio`, and the emulated UART if `uart` is given.
pub fn guest_tree(ram_base: u64, ram_size: u64, timebase: u32, isa: &str, uart: Option<u64>) -> Vec<u8> {
    let hi = |v: u64| (v >> 32) as u32;
    let lo = |v: u64| v as u32;
    let mut w = FdtWriter::new();
    w.begin_node("")
        .prop_cells("#address-cells", &[2])
        .prop_cells("#size-cells", &[2])
        .prop_str("compatible", "riscv-virtio")
        .prop_str("model", "twostage,riscv-guest");
    w.begin_node("chosen").prop_str("bootargs", "");
    if let Some(u) = uart {
        let mut path = alloc::string::String::from("/soc/serial@");
        use core::fmt::Write;
        let _ = write!(path, "{u:x}");
        w.prop_str("stdout-path", &path);
    }
    w.end_node();
    let mut mem = alloc::string::String::from("memory@");
    {
        use core::fmt::Write;
        let _ = write!(mem, "{ram_base:x}");
    }
    w.begin_node(&mem)
        .prop_str("device_type", "memory")
        .prop_cells("reg", &[hi(ram_base), lo(ram_base), hi(ram_size), lo(ram_size)])
        .end_node();
    w.begin_node("cpus")
        .prop_cells("#address-cells", &[1])
        .prop_cells("#size-cells", &[0])
        .prop_cells("timebase-frequency", &[timebase]);
    w.begin_node("cpu@0")
        .prop_str("device_type", "cpu")
        .prop_cells("reg", &[0])
        .prop_str("status", "okay")
        .prop_str("compatible", "riscv")
        .prop_str("riscv,isa", isa)
        .prop_str("mmu-type", "riscv,sv39");
    w.begin_node("interrupt-controller")
        .prop_cells("#interrupt-cells", &[1])
        .prop("interrupt-controller", &[])
        .prop_str("compatible", "riscv,cpu-intc")
        .end_node();
    w.end_node().end_node();
    if let Some(u) = uart {
        w.begin_node("soc")
            .prop_cells("#address-cells", &[2])
            .prop_cells("#size-cells", &[2])
            .prop_str("compatible", "simple-bus")
            .prop("ranges", &[]);
        let mut name = alloc::string::String::from("serial@");
        {
            use core::fmt::Write;
            let _ = write!(name, "{u:x}");
        }
        w.begin_node(&name)
            .prop_str("compatible", "ns16550a")
            .prop_cells("reg", &[hi(u), lo(u), 0, 0x100])
            .prop_cells("clock-frequency", &[3_686_400])
            .end_node();
        w.end_node();
    }
    w.end_node();
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_tree_reads_back() {
        let blob = guest_tree(0x8000_0000, 64 << 20, 10_000_000, "rv64imafdc", Some(0x1000_0000));
        assert_eq!(Fdt::total_size(&blob), Ok(blob.len()));
        let fdt = Fdt::new(&blob).unwrap();
        let mut mem = [(0, 0); 4];
        assert_eq!(fdt.memory(&mut mem), Ok(1));
        assert_eq!(mem[0], (0x8000_0000, 64 << 20));
        assert_eq!(fdt.find("cpus", 1, "timebase-frequency").unwrap(), Some(&10_000_000u32.to_be_bytes()[..]));
        assert_eq!(fdt.find("cpu@", 2, "riscv,isa").unwrap(), Some(&b"rv64imafdc\0"[..]));
        assert_eq!(fdt.find("chosen", 1, "bootargs").unwrap(), Some(&b"\0"[..]));
        assert_eq!(fdt.find("chosen", 1, "no-such").unwrap(), None);
        let mut events = 0;
        fdt.walk(|_| events += 1).unwrap();
        assert!(events > 20);
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert_eq!(Fdt::new(&[0u8; 64]).err(), Some(FdtError::BadMagic(0)));
        let mut blob = guest_tree(0x8000_0000, 1 << 20, 1, "rv64", None);
        let n = blob.len();
        assert!(matches!(Fdt::new(&blob[..n - 8]), Err(FdtError::Truncated { .. })));
        // Corrupt the first structure token.
        let st = u32::from_be_bytes(blob[8..12].try_into().unwrap()) as usize;
        blob[st..st + 4].copy_from_slice(&77u32.to_be_bytes());
        assert_eq!(Fdt::new(&blob).unwrap().walk(|_| {}), Err(FdtError::BadToken { token: 77, at: st }));
    }
}
