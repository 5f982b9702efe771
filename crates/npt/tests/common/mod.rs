//! Shared by the engine's tests: the fake host RAM as the spec model reads it.

use twostage_npt::testing::HostRam;
use twostage_spec_model::{Hpa, PhysMem};

/// The engine's fake RAM seen through the model's memory trait (None outside the RAM).
pub struct Ram<'a>(pub &'a HostRam);

impl PhysMem for Ram<'_> {
    fn read_u64(&mut self, pa: Hpa) -> Option<u64> {
        self.0.contains(pa.0, 8).then(|| self.0.read_u64(pa.0))
    }
    fn write_u64(&mut self, pa: Hpa, v: u64) -> Option<()> {
        self.0.contains(pa.0, 8).then(|| self.0.write_u64(pa.0, v))
    }
}
