//! The part of GGUF (v3, little-endian) that control vectors use: string and u32 metadata and
//! 1-D F32 tensors. Reading skips every other metadata value, so files from other writers
//! (repeng, llama.cpp's cvector-generator, gguf-py) load too.
//!
//! Layout: magic "GGUF", version u32, tensor count u64, metadata count u64, metadata
//! (key string, value type u32, value), tensor infos (name, n_dims u32, dims u64 innermost
//! first, ggml type u32, offset u64 from the data section), padding to the alignment, data.
//! Strings are a u64 byte length and UTF-8 bytes.

use std::collections::HashMap;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// GGUF's default, and what llama.cpp writes; a file may override it with `general.alignment`.
const DEFAULT_ALIGNMENT: usize = 32;
const ALIGNMENT_KEY: &str = "general.alignment";
const GGML_TYPE_F32: u32 = 0;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; a cap keeps a crafted file from exhausting the stack.
const MAX_ARRAY_NESTING: usize = 8;

const TYPE_U32: u32 = 4;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// Byte width of GGUF's fixed-size metadata value types, `None` for string, array or unknown.
fn fixed_size(value_type: u32) -> Option<usize> {
    match value_type {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

pub(super) enum MetaValue<'a> {
    U32(u32),
    Str(&'a str),
}

/// Serialises metadata and 1-D F32 tensors with 32-byte alignment.
pub(super) fn write(metadata: &[(&str, MetaValue<'_>)], tensors: &[(String, Vec<f32>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(&mut out, key);
        match value {
            MetaValue::U32(v) => {
                out.extend_from_slice(&TYPE_U32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            MetaValue::Str(s) => {
                out.extend_from_slice(&TYPE_STRING.to_le_bytes());
                write_string(&mut out, s);
            }
        }
    }
    let mut offset = 0;
    for (name, values) in tensors {
        write_string(&mut out, name);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(values.len() as u64).to_le_bytes());
        out.extend_from_slice(&GGML_TYPE_F32.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += align_up(values.len() * 4, DEFAULT_ALIGNMENT);
    }
    for (_, values) in tensors {
        out.resize(align_up(out.len(), DEFAULT_ALIGNMENT), 0);
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    out.resize(align_up(out.len(), DEFAULT_ALIGNMENT), 0);
    out
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn align_up(n: usize, alignment: usize) -> usize {
    n.div_ceil(alignment) * alignment
}

/// What a control vector needs from a GGUF file.
#[derive(Debug)]
pub(super) struct Gguf {
    /// The string-valued metadata; other values are skipped.
    pub strings: HashMap<String, String>,
    /// Tensors in file order.
    pub tensors: Vec<Tensor>,
}

#[derive(Debug)]
pub(super) struct Tensor {
    pub name: String,
    pub values: Vec<f32>,
}

/// Parses a GGUF file whose tensors are all 1-D F32. Errors describe what is wrong and where.
pub(super) fn read(bytes: &[u8]) -> Result<Gguf, String> {
    let mut cur = Cursor { bytes, pos: 0 };
    let magic = cur.take(4, "the magic")?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file (starts with {magic:?}, expected \"GGUF\")"
        ));
    }
    let version = cur.u32("the version")?;
    if !(2..=VERSION).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (expected 2 or 3)"
        ));
    }
    let n_tensors = cur.u64("the tensor count")?;
    let n_metadata = cur.u64("the metadata count")?;

    let mut strings = HashMap::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut seen_keys = std::collections::HashSet::new();
    for _ in 0..n_metadata {
        let key = cur.string("a metadata key")?;
        if !seen_keys.insert(key.clone()) {
            return Err(format!("metadata key {key:?} appears twice"));
        }
        let value_type = cur.u32("a metadata value type")?;
        match value_type {
            TYPE_STRING => {
                let value = cur.string(&format!("the value of {key:?}"))?;
                strings.insert(key, value);
            }
            TYPE_U32 if key == ALIGNMENT_KEY => {
                let value = cur.u32("general.alignment")? as usize;
                if !value.is_power_of_two() {
                    return Err(format!(
                        "general.alignment is {value}; it must be a power of two"
                    ));
                }
                alignment = value;
            }
            _ => cur.skip_value(value_type, &key, 0)?,
        }
    }

    struct Info {
        name: String,
        len: usize,
        offset: usize,
    }
    let mut infos: Vec<Info> = Vec::new();
    for _ in 0..n_tensors {
        let name = cur.string("a tensor name")?;
        let n_dims = cur.u32(&format!("the dimension count of {name:?}"))?;
        if n_dims > MAX_DIMS {
            return Err(format!(
                "tensor {name:?} claims {n_dims} dimensions; ggml allows at most {MAX_DIMS}"
            ));
        }
        let dims = (0..n_dims)
            .map(|_| cur.u64(&format!("the shape of {name:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        let ggml_type = cur.u32(&format!("the type of {name:?}"))?;
        let offset = cur.u64(&format!("the offset of {name:?}"))?;
        if ggml_type != GGML_TYPE_F32 {
            return Err(format!("tensor {name:?} has ggml type {ggml_type}; control-vector directions must be F32 (type 0)"));
        }
        let [len] = dims[..] else {
            return Err(format!(
                "tensor {name:?} has shape {dims:?}; a control-vector direction is 1-D"
            ));
        };
        if infos.iter().any(|info| info.name == name) {
            return Err(format!("tensor {name:?} appears twice"));
        }
        let too_big = || format!("tensor {name:?} is larger than the file");
        infos.push(Info {
            len: usize::try_from(len).map_err(|_| too_big())?,
            offset: usize::try_from(offset).map_err(|_| too_big())?,
            name,
        });
    }

    let data_start = align_up(cur.pos, alignment);
    let mut tensors = Vec::with_capacity(infos.len());
    for Info { name, len, offset } in infos {
        let range = data_start
            .checked_add(offset)
            .and_then(|start| Some(start..start.checked_add(len.checked_mul(4)?)?))
            .filter(|range| range.end <= bytes.len())
            .ok_or_else(|| format!("the data of tensor {name:?} runs past the end of the file; the file is truncated"))?;
        let values = bytes[range]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.push(Tensor { name, values });
    }
    Ok(Gguf { strings, tensors })
}

/// Bounds-checked little-endian reads: every length in the file is checked against the bytes
/// that remain before anything is allocated.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.bytes.len() - self.pos < n {
            return Err(format!(
                "the file ends inside {what} (at byte {}); it is truncated",
                self.pos
            ));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    fn byte_count(&mut self, count: u64, width: usize, what: &str) -> Result<usize, String> {
        usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(width))
            .ok_or_else(|| format!("{what} claims {count} items, more than the file holds"))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        let len = self.byte_count(len, 1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("{what} is not valid UTF-8 (at byte {})", self.pos - len))
    }

    fn skip_value(&mut self, value_type: u32, key: &str, depth: usize) -> Result<(), String> {
        let what = format!("the value of {key:?}");
        if let Some(width) = fixed_size(value_type) {
            self.take(width, &what)?;
            return Ok(());
        }
        match value_type {
            TYPE_STRING => {
                let len = self.u64(&what)?;
                let len = self.byte_count(len, 1, &what)?;
                self.take(len, &what)?;
            }
            TYPE_ARRAY if depth < MAX_ARRAY_NESTING => {
                let element_type = self.u32(&what)?;
                let count = self.u64(&what)?;
                match fixed_size(element_type) {
                    Some(width) => {
                        let len = self.byte_count(count, width, &what)?;
                        self.take(len, &what)?;
                    }
                    // Each element consumes bytes, so a huge count ends at the end of the file.
                    None => (0..count)
                        .try_for_each(|_| self.skip_value(element_type, key, depth + 1))?,
                }
            }
            TYPE_ARRAY => {
                return Err(format!(
                    "{what} nests arrays deeper than {MAX_ARRAY_NESTING} levels"
                ))
            }
            other => return Err(format!("{what} has unknown GGUF value type {other}")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_documented_layout() {
        let bytes = write(
            &[("k", MetaValue::U32(7))],
            &[("t".to_string(), vec![1.0, 2.0])],
        );
        let mut expected = Vec::new();
        expected.extend_from_slice(b"GGUF");
        expected.extend_from_slice(&3u32.to_le_bytes());
        expected.extend_from_slice(&1u64.to_le_bytes()); // tensors
        expected.extend_from_slice(&1u64.to_le_bytes()); // metadata
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(b"k");
        expected.extend_from_slice(&4u32.to_le_bytes());
        expected.extend_from_slice(&7u32.to_le_bytes());
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(b"t");
        expected.extend_from_slice(&1u32.to_le_bytes()); // n_dims
        expected.extend_from_slice(&2u64.to_le_bytes()); // ne[0]
        expected.extend_from_slice(&0u32.to_le_bytes()); // F32
        expected.extend_from_slice(&0u64.to_le_bytes()); // offset
        assert_eq!(expected.len(), 74);
        expected.resize(96, 0); // header padded to the 32-byte alignment
        expected.extend_from_slice(&1.0f32.to_le_bytes());
        expected.extend_from_slice(&2.0f32.to_le_bytes());
        expected.resize(128, 0); // and the tensor too
        assert_eq!(bytes, expected);
    }

    #[test]
    fn skips_foreign_metadata_and_honours_the_alignment_key() {
        // Hand-built: a u64, a string array, a nested array, an f32 and a 64-byte alignment.
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&5u64.to_le_bytes());
        let key = |b: &mut Vec<u8>, k: &str, t: u32| {
            write_string(b, k);
            b.extend_from_slice(&t.to_le_bytes());
        };
        key(&mut b, "a.u64", 10);
        b.extend_from_slice(&5u64.to_le_bytes());
        key(&mut b, "a.strings", 9);
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        write_string(&mut b, "x");
        write_string(&mut b, "yz");
        key(&mut b, "a.nested", 9);
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        key(&mut b, "a.f32", 6);
        b.extend_from_slice(&1.5f32.to_le_bytes());
        key(&mut b, "general.alignment", 4);
        b.extend_from_slice(&64u32.to_le_bytes());
        write_string(&mut b, "direction.1");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.resize(align_up(b.len(), 64), 0);
        b.extend_from_slice(&4.25f32.to_le_bytes());
        let gguf = read(&b).unwrap();
        assert!(gguf.strings.is_empty());
        assert_eq!(gguf.tensors.len(), 1);
        assert_eq!(gguf.tensors[0].values, vec![4.25]);
    }

    #[test]
    fn huge_counts_fail_cleanly() {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        write_string(&mut b, "k");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(read(&b).unwrap_err().contains("truncated"));
    }
}
