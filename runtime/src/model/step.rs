//! The inputs of one decode step on the device, shared by the model's decode path (which stages them) and the
//! attention layers (which read them): every sequence's token, position, cache slot, attended length and block
//! table, as views into one staging buffer uploaded once per step.

use candle_core::Tensor;

use crate::error::Result;

/// A decode step's per-sequence inputs as device tensors (views into one staging buffer, see [`StepShape`]). Made
/// only by the decode path, from values it checked against the step's pool: the kernels index the cache with
/// them.
#[derive(Debug, Clone)]
pub(crate) struct DeviceStep {
    /// `[batch]` u32: each sequence's new token.
    pub ids: Tensor,
    /// `[batch]` u32: its position (the tokens it already cached).
    pub positions: Tensor,
    /// `[batch]` u32: the cache row its new latent row goes to.
    pub slots: Tensor,
    /// `[batch]` u32: the tokens it attends to (position + 1).
    pub lens: Tensor,
    /// `[1]` u32: the sequences that are real (the rest pad the batch to a captured shape).
    pub real: Tensor,
    /// `[batch, max_blocks]` u32: its block table.
    pub tables: Tensor,
}

/// Rows and block-table width of a staged decode step. The staging buffer is `[ids | positions | slots | lens]`
/// (`batch` each), the number of real sequences, then the block tables (`batch * max_blocks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct StepShape {
    pub batch: usize,
    pub max_blocks: usize,
}

impl StepShape {
    /// Words of the staging buffer.
    pub fn len(&self) -> usize {
        4 * self.batch + 1 + self.batch * self.max_blocks
    }
}

impl DeviceStep {
    /// The step's views into `staging` (`[shape.len()]` u32 on the device).
    pub(crate) fn new(staging: &Tensor, shape: StepShape) -> Result<Self> {
        let b = shape.batch;
        Ok(Self {
            ids: staging.narrow(0, 0, b)?,
            positions: staging.narrow(0, b, b)?,
            slots: staging.narrow(0, 2 * b, b)?,
            lens: staging.narrow(0, 3 * b, b)?,
            real: staging.narrow(0, 4 * b, 1)?,
            tables: staging.narrow(0, 4 * b + 1, b * shape.max_blocks)?.reshape((b, shape.max_blocks))?,
        })
    }
}
