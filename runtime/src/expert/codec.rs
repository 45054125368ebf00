//! candle [`Tensor`] ↔ wire [`proto::Tensor`]: a 2-D f32/bf16/f16 tensor as its dtype name, its shape and its
//! raw little-endian element bytes. The round trip is exact (bit for bit); tensors on an accelerator are copied
//! to the CPU to encode, and decoding always yields a CPU tensor.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::proto;
use crate::{Error, Result};

/// Wire name of [`DType::F32`].
pub const DTYPE_F32: &str = "f32";
/// Wire name of [`DType::BF16`].
pub const DTYPE_BF16: &str = "bf16";
/// Wire name of [`DType::F16`].
pub const DTYPE_F16: &str = "f16";

/// Encodes a 2-D f32, bf16 or f16 tensor (any device, any layout).
pub fn encode(tensor: &Tensor) -> Result<proto::Tensor> {
    let dims = tensor.dims();
    if dims.len() != 2 {
        return Err(Error::Expert(format!("can only send 2-D tensors, got shape {:?}", tensor.shape())));
    }
    let shape = dims
        .iter()
        .map(|&d| u32::try_from(d).map_err(|_| Error::Expert(format!("dimension {d} does not fit in u32"))))
        .collect::<Result<Vec<u32>>>()?;
    let flat = tensor.to_device(&Device::Cpu)?.flatten_all()?;
    let (dtype, data) = match tensor.dtype() {
        DType::F32 => (DTYPE_F32, le_bytes(&flat.to_vec1::<f32>()?)),
        DType::BF16 => (DTYPE_BF16, le_bytes(&flat.to_vec1::<bf16>()?)),
        DType::F16 => (DTYPE_F16, le_bytes(&flat.to_vec1::<f16>()?)),
        other => return Err(Error::Expert(format!("can only send f32, bf16 or f16 tensors, got {other:?}"))),
    };
    Ok(proto::Tensor { dtype: dtype.to_owned(), shape, data: data.into() })
}

/// Decodes a wire tensor into a CPU tensor, checking that the byte length matches the shape and dtype.
pub fn decode(tensor: &proto::Tensor) -> Result<Tensor> {
    if tensor.shape.len() != 2 {
        return Err(Error::Expert(format!("expected a 2-D tensor, got shape {:?}", tensor.shape)));
    }
    let shape: Vec<usize> = tensor.shape.iter().map(|&d| d as usize).collect();
    let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let elem_size = match tensor.dtype.as_str() {
        DTYPE_F32 => 4,
        DTYPE_BF16 | DTYPE_F16 => 2,
        other => return Err(Error::Expert(format!("unknown tensor dtype `{other}` (expected f32, bf16 or f16)"))),
    };
    let needed = elements.and_then(|n| n.checked_mul(elem_size));
    if needed != Some(tensor.data.len()) {
        return Err(Error::Expert(format!(
            "tensor of shape {:?} and dtype {} needs {} bytes, got {}",
            tensor.shape,
            tensor.dtype,
            needed.map_or_else(|| "too many".to_owned(), |n| n.to_string()),
            tensor.data.len()
        )));
    }
    let data = &tensor.data[..];
    let out = match tensor.dtype.as_str() {
        DTYPE_F32 => Tensor::from_vec(from_le_bytes::<f32>(data), shape, &Device::Cpu)?,
        DTYPE_BF16 => Tensor::from_vec(from_le_bytes::<bf16>(data), shape, &Device::Cpu)?,
        _ => Tensor::from_vec(from_le_bytes::<f16>(data), shape, &Device::Cpu)?,
    };
    Ok(out)
}

/// The elements' little-endian bytes: one copy of the whole buffer on little-endian machines.
fn le_bytes<T: bytemuck::Pod>(values: &[T]) -> Vec<u8> {
    let mut bytes = bytemuck::cast_slice::<T, u8>(values).to_vec();
    if cfg!(target_endian = "big") {
        bytes.chunks_exact_mut(size_of::<T>()).for_each(<[u8]>::reverse);
    }
    bytes
}

/// Elements from their little-endian bytes (`data.len()` is a multiple of the element size, checked by the
/// caller): one copy on little-endian machines, whatever the buffer's alignment.
fn from_le_bytes<T: bytemuck::Pod>(data: &[u8]) -> Vec<T> {
    let mut values = vec![T::zeroed(); data.len() / size_of::<T>()];
    let bytes = bytemuck::cast_slice_mut::<T, u8>(&mut values);
    bytes.copy_from_slice(data);
    if cfg!(target_endian = "big") {
        bytes.chunks_exact_mut(size_of::<T>()).for_each(<[u8]>::reverse);
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dtype: DType) -> Tensor {
        let t = Tensor::arange(0f32, 24f32, &Device::Cpu).unwrap().reshape((4, 6)).unwrap();
        let t = ((t - 11.5).unwrap() * 0.37).unwrap();
        t.to_dtype(dtype).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let flat = t.flatten_all().unwrap();
        match t.dtype() {
            DType::F32 => flat.to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect(),
            DType::BF16 => flat.to_vec1::<bf16>().unwrap().into_iter().map(|v| u32::from(v.to_bits())).collect(),
            DType::F16 => flat.to_vec1::<f16>().unwrap().into_iter().map(|v| u32::from(v.to_bits())).collect(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn round_trip_is_exact_for_every_supported_dtype() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = sample(dtype);
            let wire = encode(&t).unwrap();
            assert_eq!(wire.shape, vec![4, 6]);
            assert_eq!(wire.data.len(), 24 * dtype.size_in_bytes());
            let back = decode(&wire).unwrap();
            assert_eq!(back.dtype(), dtype);
            assert_eq!(back.dims(), &[4, 6]);
            assert_eq!(bits(&back), bits(&t), "{dtype:?}");
        }
    }

    #[test]
    fn bytes_are_little_endian_row_major() {
        let t = Tensor::new(&[[1f32, 2.0], [3.0, -0.5]], &Device::Cpu).unwrap();
        let wire = encode(&t).unwrap();
        assert_eq!(wire.dtype, "f32");
        assert_eq!(&wire.data[..4], &1f32.to_le_bytes());
        assert_eq!(&wire.data[12..], &(-0.5f32).to_le_bytes());
    }

    #[test]
    fn non_contiguous_tensors_encode_in_logical_order() {
        let t = sample(DType::F32).t().unwrap();
        let back = decode(&encode(&t).unwrap()).unwrap();
        assert_eq!(back.dims(), &[6, 4]);
        assert_eq!(bits(&back), bits(&t.contiguous().unwrap()));
    }

    #[test]
    fn empty_rows_round_trip() {
        let t = Tensor::zeros((0, 8), DType::BF16, &Device::Cpu).unwrap();
        let back = decode(&encode(&t).unwrap()).unwrap();
        assert_eq!(back.dims(), &[0, 8]);
    }

    #[test]
    fn rejects_wrong_rank_dtype_and_length() {
        let t3 = Tensor::zeros((2, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(encode(&t3).is_err());
        let ints = Tensor::zeros((2, 2), DType::U32, &Device::Cpu).unwrap();
        assert!(encode(&ints).is_err());

        let mut wire = encode(&sample(DType::F32)).unwrap();
        wire.data = wire.data.slice(..wire.data.len() - 1);
        let err = decode(&wire).unwrap_err().to_string();
        assert!(err.contains("needs 96 bytes, got 95"), "{err}");
        wire.dtype = "f64".into();
        assert!(decode(&wire).unwrap_err().to_string().contains("unknown tensor dtype `f64`"));
        let flat = proto::Tensor { dtype: "f32".into(), shape: vec![4], data: vec![0; 16].into() };
        assert!(decode(&flat).is_err());
    }
}
