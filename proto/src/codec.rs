use bytes::Bytes;

/// A `bytes` field whose length is not a whole number of elements.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {len} bytes is not a multiple of {width}")]
pub struct CodecError {
    pub field: &'static str,
    pub len: usize,
    pub width: usize,
}

/// Encodes floats as little-endian bytes.
pub fn encode_f32(values: &[f32]) -> Bytes {
    encode(values, f32::to_le_bytes)
}

/// Decodes little-endian floats; `field` names the field in the error.
pub fn decode_f32(field: &'static str, bytes: &[u8]) -> Result<Vec<f32>, CodecError> {
    chunks(field, bytes).map(|c| c.map(f32::from_le_bytes).collect())
}

/// Encodes indices as little-endian bytes.
pub fn encode_u32(values: &[u32]) -> Bytes {
    encode(values, u32::to_le_bytes)
}

/// Decodes little-endian indices; `field` names the field in the error.
pub fn decode_u32(field: &'static str, bytes: &[u8]) -> Result<Vec<u32>, CodecError> {
    chunks(field, bytes).map(|c| c.map(u32::from_le_bytes).collect())
}

fn encode<T: Copy>(values: &[T], to_le_bytes: impl Fn(T) -> [u8; 4]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for &value in values {
        out.extend_from_slice(&to_le_bytes(value));
    }
    out.into()
}

fn chunks<'a>(
    field: &'static str,
    bytes: &'a [u8],
) -> Result<impl Iterator<Item = [u8; 4]> + 'a, CodecError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(CodecError {
            field,
            len: bytes.len(),
            width: 4,
        });
    }
    Ok(bytes.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn f32_round_trip(values in proptest::collection::vec(any::<f32>(), 0..200)) {
            let decoded = decode_f32("t", &encode_f32(&values)).unwrap();
            prop_assert_eq!(
                decoded.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }

        #[test]
        fn u32_round_trip(values in proptest::collection::vec(any::<u32>(), 0..200)) {
            prop_assert_eq!(decode_u32("t", &encode_u32(&values)).unwrap(), values);
        }
    }

    #[test]
    fn ragged_length_is_an_error() {
        let err = decode_f32("gradient", &[0, 0, 0, 0, 1]).unwrap_err();
        assert_eq!(err.len, 5);
        assert!(err.to_string().contains("gradient"));
    }

    #[test]
    fn little_endian_on_the_wire() {
        assert_eq!(&encode_f32(&[1.0])[..], &[0x00, 0x00, 0x80, 0x3f]);
    }
}
