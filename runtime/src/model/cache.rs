//! The latent KV cache of one sequence: per layer, one row of `kv_lora_rank + qk_rope_head_dim` values per token
//! (the normalized compressed KV and the rotated shared key) — all MLA needs in its absorbed form.
//!
//! Rows live in a preallocated buffer per layer that doubles when full; a forward pass writes each layer's new
//! rows and then reads the layer's whole context as one contiguous view.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct LatentCache {
    layers: Vec<LayerRows>,
    latent_dim: usize,
    dtype: DType,
    device: Device,
}

#[derive(Debug, Clone, Default)]
struct LayerRows {
    buf: Option<Tensor>,
    len: usize,
}

impl LatentCache {
    pub fn new(num_layers: usize, latent_dim: usize, dtype: DType, device: &Device) -> Self {
        Self { layers: vec![LayerRows::default(); num_layers], latent_dim, dtype, device: device.clone() }
    }

    /// Tokens cached (in every layer, between forward passes).
    pub fn len(&self) -> usize {
        self.layers.last().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the cached rows (not the spare capacity).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.len).sum::<usize>() * self.latent_dim * self.dtype.size_in_bytes()
    }

    /// Appends `rows` (`[n, latent_dim]`) to `layer` and returns the layer's whole context `[len + n, latent_dim]`.
    pub fn append(&mut self, layer: usize, rows: &Tensor) -> Result<Tensor> {
        let (n, dim) = rows.dims2()?;
        if dim != self.latent_dim {
            return Err(Error::InvalidRequest(format!("latent row width {dim} != cache width {}", self.latent_dim)));
        }
        let (dtype, device, latent_dim) = (self.dtype, self.device.clone(), self.latent_dim);
        let slot =
            self.layers.get_mut(layer).ok_or_else(|| Error::InvalidRequest(format!("cache has no layer {layer}")))?;
        let needed = slot.len + n;
        let capacity = slot.buf.as_ref().map_or(0, |b| b.dim(0).unwrap_or(0));
        if needed > capacity {
            let new_capacity = needed.max(capacity * 2).max(16);
            let grown = Tensor::zeros((new_capacity, latent_dim), dtype, &device)?;
            if let Some(old) = &slot.buf
                && slot.len > 0
            {
                grown.slice_set(&old.narrow(0, 0, slot.len)?, 0, 0)?;
            }
            slot.buf = Some(grown);
        }
        let buf = slot.buf.as_ref().ok_or_else(|| Error::InvalidRequest("cache buffer missing".into()))?;
        buf.slice_set(&rows.to_dtype(dtype)?.contiguous()?, 0, slot.len)?;
        slot.len = needed;
        Ok(buf.narrow(0, 0, needed)?)
    }

    /// Drops every token at or after `len` (used to roll back a failed step).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
    }
}
