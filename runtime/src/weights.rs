//! Hugging Face checkpoints: memory-mapped safetensors (`model.safetensors`, or the shards listed by
//! `model.safetensors.index.json`), with DeepSeek-V3 FP8 block dequantization, and a [`VarBuilder`] over them so
//! model code can use `vb.pp("model").pp("layers")...` paths that mirror tensor names.

pub mod fp8;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use safetensors::Dtype as StDtype;

use crate::{Error, Result};

/// Single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Sharded checkpoint index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Suffix of the per-block inverse scales that accompany an FP8 weight (`{name}_scale_inv`).
pub const SCALE_INV_SUFFIX: &str = "_scale_inv";

/// An opened Hugging Face model directory: memory-mapped safetensors (`model.safetensors`, or the shards listed
/// by `model.safetensors.index.json`). `model.safetensors` wins when both exist, as in transformers.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    tensors: MmapedSafetensors,
    /// Every tensor name, sorted.
    names: Vec<String>,
    fp8_block: Option<[usize; 2]>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files)
            .field("tensors", &self.names.len())
            .field("fp8_block", &self.fp8_block)
            .finish()
    }
}

/// The `weight_map` of `model.safetensors.index.json`.
#[derive(serde::Deserialize)]
struct Index {
    weight_map: std::collections::HashMap<String, String>,
}

impl Checkpoint {
    /// Opens `dir`. `fp8_block`: DeepSeek-V3 FP8 block size `[rows, cols]` from `config.json`
    /// `quantization_config.weight_block_size` (`None` when the checkpoint is not FP8-quantized).
    pub fn open(dir: &Path, fp8_block: Option<[usize; 2]>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint(format!("model directory {} does not exist", dir.display())));
        }
        if let Some([br, bc]) = fp8_block
            && (br == 0 || bc == 0)
        {
            return Err(Error::Checkpoint(format!("FP8 block size [{br}, {bc}] must be positive")));
        }
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let (files, index_map) = if single.is_file() {
            (vec![single], None)
        } else if index.is_file() {
            let (files, map) = read_index(dir, &index)?;
            (files, Some(map))
        } else {
            return Err(Error::Checkpoint(format!(
                "no weights in {}: looked for {SINGLE_FILE} and {INDEX_FILE}",
                dir.display()
            )));
        };
        let tensors = mmap_safetensors(&files)?;
        let names: BTreeSet<String> = tensors.tensors().into_iter().map(|(name, _)| name).collect();
        if let Some(map) = index_map {
            let missing = map.keys().filter(|n| !names.contains(*n)).count();
            if missing > 0 {
                tracing::warn!(dir = %dir.display(), missing, "{INDEX_FILE} lists tensors its shards do not hold");
            }
        }
        Ok(Self { dir: dir.to_path_buf(), files, tensors, names: names.into_iter().collect(), fp8_block })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files backing this checkpoint.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// FP8 block size given at open.
    pub fn fp8_block(&self) -> Option<[usize; 2]> {
        self.fp8_block
    }

    /// Every tensor name in the checkpoint (including `_scale_inv` companions), sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        self.names.clone()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
    }

    /// The stored shape of a tensor, without loading it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.shape().to_vec())
    }

    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        if !self.contains(name) {
            return Err(Error::tensor(name, format!("missing from the checkpoint in {}", self.dir.display())));
        }
        self.tensors.get(name).map_err(|e| Error::tensor(name, e.to_string()))
    }

    /// Loads one tensor converted to `dtype` on `device`. FP8 (`F8_E4M3`) weights with a `{name}_scale_inv`
    /// companion are dequantized block-wise, `w[i, j] = e4m3(q[i, j]) * scale_inv[i / br, j / bc]` (partial edge
    /// blocks allowed), in f32, then cast; FP8 weights without a companion are decoded unscaled. f32/bf16/f16
    /// tensors load and cast. Other dtypes are an [`Error::Tensor`] naming the dtype.
    ///
    /// `dtype` [`DType::U8`] reads an FP8 weight's raw `e4m3fn` bytes, neither decoded nor scaled (its scales are
    /// the `{name}_scale_inv` tensor): how `--quantize fp8` keeps a checkpoint's FP8 weights in 8 bits. Only FP8
    /// tensors can be read so.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let view = self.view(name)?;
        let shape = view.shape();
        if dtype == DType::U8 {
            if view.dtype() != StDtype::F8_E4M3 {
                return Err(Error::tensor(
                    name,
                    format!("only F8_E4M3 weights can be read as raw bytes, this one is {:?}", view.dtype()),
                ));
            }
            return Tensor::from_raw_buffer(view.data(), DType::U8, shape, device)
                .map_err(|e| Error::tensor(name, e.to_string()));
        }
        let tensor = match view.dtype() {
            StDtype::F32 | StDtype::BF16 | StDtype::F16 => {
                let stored = DType::try_from(view.dtype()).map_err(|e| Error::tensor(name, e.to_string()))?;
                Tensor::from_raw_buffer(view.data(), stored, shape, device)
                    .map_err(|e| Error::tensor(name, e.to_string()))?
            }
            StDtype::F8_E4M3 => {
                let values = self.dequant_fp8(name, view.data(), shape)?;
                Tensor::from_vec(values, shape, device).map_err(|e| Error::tensor(name, e.to_string()))?
            }
            other => {
                return Err(Error::tensor(
                    name,
                    format!("unsupported dtype {other:?} (expected F32, BF16, F16 or F8_E4M3)"),
                ));
            }
        };
        tensor.to_dtype(dtype).map_err(|e| Error::tensor(name, format!("cannot convert to {dtype:?}: {e}")))
    }

    /// Like [`Checkpoint::load`] but checks the shape first; a mismatch is an [`Error::Tensor`] naming the tensor,
    /// the expected and the found shapes.
    pub fn load_shaped(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let found = self.view(name)?.shape().to_vec();
        if found != shape {
            return Err(Error::tensor(name, format!("expected shape {shape:?}, found {found:?}")));
        }
        self.load(name, dtype, device)
    }

    fn dequant_fp8(&self, name: &str, q: &[u8], shape: &[usize]) -> Result<Vec<f32>> {
        let scale_name = format!("{name}{SCALE_INV_SUFFIX}");
        if !self.contains(&scale_name) {
            return Ok(fp8::decode(q));
        }
        let Some(block) = self.fp8_block else {
            return Err(Error::tensor(
                name,
                "FP8 weight with a scale_inv companion, but no block size was given \
                 (config.json quantization_config.weight_block_size)",
            ));
        };
        let [rows, cols] = match shape {
            [r, c] => [*r, *c],
            _ => return Err(Error::tensor(name, format!("block-quantized FP8 weight must be 2-D, found {shape:?}"))),
        };
        let scale_view = self.view(&scale_name)?;
        let want = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
        let scale_shape = scale_view.shape();
        if scale_shape != want {
            return Err(Error::tensor(
                &scale_name,
                format!("expected shape {want:?} for {name} {shape:?} with block {block:?}, found {scale_shape:?}"),
            ));
        }
        let scales = floats_from_le(&scale_name, scale_view.dtype(), scale_view.data())?;
        fp8::dequant_blocks(q, rows, cols, &scales, block)
            .ok_or_else(|| Error::tensor(name, "FP8 data length does not match its shape"))
    }
}

/// Decodes little-endian f32/bf16/f16 bytes (scale tensors) to f32.
fn floats_from_le(name: &str, dtype: StDtype, data: &[u8]) -> Result<Vec<f32>> {
    let out = match dtype {
        StDtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        StDtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        StDtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => return Err(Error::tensor(name, format!("unsupported scale dtype {other:?}"))),
    };
    Ok(out)
}

/// Reads the index: the distinct shard files (sorted, each checked to exist) and the weight map.
fn read_index(dir: &Path, index: &Path) -> Result<(Vec<PathBuf>, std::collections::HashMap<String, String>)> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index =
        serde_json::from_str(&text).map_err(|e| Error::Json { path: index.to_path_buf(), source: e })?;
    let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
    if shards.is_empty() {
        return Err(Error::Checkpoint(format!("{} has an empty weight_map", index.display())));
    }
    let mut files = Vec::with_capacity(shards.len());
    for shard in shards {
        let path = dir.join(shard);
        if !path.is_file() {
            return Err(Error::Checkpoint(format!(
                "{} names shard {shard}, but {} does not exist",
                index.display(),
                path.display()
            )));
        }
        files.push(path);
    }
    Ok((files, parsed.weight_map))
}

/// Memory-maps the safetensors files and parses their headers.
#[allow(unsafe_code)]
fn mmap_safetensors(files: &[PathBuf]) -> Result<MmapedSafetensors> {
    // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on the checkpoint not being
    // modified or truncated while the runtime holds it open (mutation would be undefined behaviour).
    unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::Checkpoint(format!("cannot read safetensors: {e}")))
}

/// Our error as a candle error, keeping the tensor name in the message (candle errors pass through unchanged).
fn to_candle(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(inner) => inner,
        other => candle_core::Error::wrap(other),
    }
}

impl SimpleBackend for Checkpoint {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_shaped(name, s.dims(), dtype, dev).map_err(to_candle)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev).map_err(to_candle)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// A [`VarBuilder`] over the checkpoint: `vb.pp("model").pp("layers").pp("0")...` paths mirror tensor names;
/// tensors load as `dtype` on `device` (FP8 weights dequantized on the way).
pub fn var_builder(ckpt: Checkpoint, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(ckpt), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_decoding_reads_little_endian_floats() {
        let mut data = Vec::new();
        data.extend_from_slice(&1.5f32.to_le_bytes());
        data.extend_from_slice(&(-2.0f32).to_le_bytes());
        assert_eq!(floats_from_le("s", StDtype::F32, &data).unwrap(), [1.5, -2.0]);
        let bf = half::bf16::from_f32(0.375).to_le_bytes();
        assert_eq!(floats_from_le("s", StDtype::BF16, &bf).unwrap(), [0.375]);
        assert!(floats_from_le("s", StDtype::I64, &[0; 8]).is_err());
    }
}
