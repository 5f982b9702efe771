//! Mapping rights and attributes, and the kind of access that faulted.

use core::fmt;

bitflags::bitflags! {
    /// Rights and attributes of a mapping, independent of the format that encodes them.
    ///
    /// In a nested table READ/WRITE/EXECUTE are the guest's rights on guest-physical memory;
    /// USER is meaningful only for guest stage-1 (a nested leaf never carries it: the RISC-V
    /// G-stage encoder sets U=1 on every leaf as the spec demands, whatever this says).
    /// DEVICE and UNCACHED choose the memory type (EPT bits 5:3; Svpbmt where enabled).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MappingFlags: u32 {
        /// Guest may read.
        const READ = 1 << 0;
        /// Guest may write.
        const WRITE = 1 << 1;
        /// Guest may execute.
        const EXECUTE = 1 << 2;
        /// User-mode accessible (guest stage-1 only).
        const USER = 1 << 3;
        /// Device memory: strongly uncached, guest PAT ignored.
        const DEVICE = 1 << 4;
        /// Uncached normal memory.
        const UNCACHED = 1 << 5;
    }
}

impl MappingFlags {
    /// Read + write.
    pub const RW: Self = Self::READ.union(Self::WRITE);
    /// Read + execute.
    pub const RX: Self = Self::READ.union(Self::EXECUTE);
    /// Read + write + execute.
    pub const RWX: Self = Self::READ.union(Self::WRITE).union(Self::EXECUTE);

    /// The access rights only (read, write, execute).
    pub const fn rights(self) -> Self {
        self.intersection(Self::RWX)
    }

    /// Whether these rights allow `access`.
    pub const fn allows(self, access: Access) -> bool {
        self.contains(access.as_flags())
    }
}

impl fmt::Debug for MappingFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |flag: MappingFlags, ch: char| if self.contains(flag) { ch } else { '-' };
        write!(f, "{}{}{}", c(Self::READ, 'r'), c(Self::WRITE, 'w'), c(Self::EXECUTE, 'x'))?;
        if self.contains(Self::USER) {
            f.write_str(" user")?;
        }
        if self.contains(Self::DEVICE) {
            f.write_str(" device")?;
        }
        if self.contains(Self::UNCACHED) {
            f.write_str(" uncached")?;
        }
        Ok(())
    }
}

impl fmt::Display for MappingFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The kind of memory access that a guest (or the hypervisor on its behalf) made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

impl Access {
    /// The single right this access needs.
    pub const fn as_flags(self) -> MappingFlags {
        match self {
            Self::Read => MappingFlags::READ,
            Self::Write => MappingFlags::WRITE,
            Self::Execute => MappingFlags::EXECUTE,
        }
    }
}

impl From<Access> for MappingFlags {
    fn from(a: Access) -> Self {
        a.as_flags()
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Execute => "execute",
        })
    }
}
