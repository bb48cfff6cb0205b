//! A bounds-checked GGUF (v2/v3) reader: metadata, tensor directory, and dequantisation of
//! F32, F16, Q8_0 and Q4_1 tensors. A truncated or corrupt file is an error, never a panic.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::ModelError;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer.
    U64(u64),
    /// Any signed integer.
    I64(i64),
    /// Any float.
    F64(f64),
    /// Bool.
    Bool(bool),
    /// String.
    Str(String),
    /// Array.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    /// As a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A tensor's directory entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Row-major shape (GGUF's dimensions reversed).
    pub shape: Vec<usize>,
    /// ggml type id.
    pub ggml_type: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file (the whole file is held in memory).
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Metadata.
    pub meta: HashMap<String, Value>,
    /// Tensors.
    pub tensors: HashMap<String, TensorInfo>,
    data_start: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> ModelError {
        ModelError::format(self.path, format!("{what} at byte {}", self.pos))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| self.err("truncated"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn len(&mut self) -> Result<usize, ModelError> {
        let n = self.u64()?;
        if n > self.b.len() as u64 {
            return Err(self.err("implausible length"));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, ModelError> {
        let n = self.len()?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, t: u32, depth: u32) -> Result<Value, ModelError> {
        Ok(match t {
            0 => Value::U64(self.take(1)?[0] as u64),
            1 => Value::I64(self.take(1)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_le_bytes(self.take(4)?.try_into().expect("4")) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deep"));
                }
                let et = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            other => return Err(self.err(&format!("unknown metadata type {other}"))),
        })
    }
}

fn block(ggml_type: u32) -> Option<(usize, usize)> {
    // (values per block, bytes per block)
    match ggml_type {
        0 => Some((1, 4)),
        1 => Some((1, 2)),
        3 => Some((32, 20)),
        8 => Some((32, 34)),
        _ => None,
    }
}

impl Gguf {
    /// Reads and parses a file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// Parses bytes.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, ModelError> {
        let mut r = Reader {
            b: &bytes,
            pos: 0,
            path,
        };
        if r.take(4)? != b"GGUF" {
            return Err(ModelError::format(path, "not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::format(
                path,
                format!("GGUF version {version} not supported"),
            ));
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut meta = HashMap::new();
        for _ in 0..n_kv {
            let k = r.string()?;
            let t = r.u32()?;
            let v = r.value(t, 0)?;
            meta.insert(k, v);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd == 0 || nd > 4 {
                return Err(r.err("bad tensor rank"));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.len()?);
            }
            dims.reverse();
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.insert(
                name,
                TensorInfo {
                    shape: dims,
                    ggml_type,
                    offset,
                },
            );
        }
        let align = meta
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = r.pos.div_ceil(align) * align;
        let g = Gguf {
            path: path.to_path_buf(),
            bytes,
            meta,
            tensors,
            data_start,
        };
        for (name, t) in &g.tensors {
            g.tensor_bytes(name, t)?;
        }
        Ok(g)
    }

    fn tensor_bytes(&self, name: &str, t: &TensorInfo) -> Result<&[u8], ModelError> {
        let n: usize = t.shape.iter().product();
        let (per, bytes) = block(t.ggml_type).ok_or_else(|| {
            ModelError::format(
                &self.path,
                format!("tensor {name}: ggml type {} not supported", t.ggml_type),
            )
        })?;
        if !n.is_multiple_of(per) {
            return Err(ModelError::format(
                &self.path,
                format!("tensor {name}: {n} values is not whole blocks"),
            ));
        }
        let len = n / per * bytes;
        let start = self.data_start.checked_add(t.offset as usize);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.bytes.len() => Ok(&self.bytes[s..e]),
            _ => Err(ModelError::format(
                &self.path,
                format!("tensor {name} lies outside the file (truncated?)"),
            )),
        }
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    /// A required unsigned metadata value.
    pub fn req_u64(&self, key: &str) -> Result<u64, ModelError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| ModelError::format(&self.path, format!("metadata {key} missing")))
    }

    /// A tensor dequantised to f32, with its row-major shape.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let raw = self.tensor_bytes(name, t)?;
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let out: Vec<f32> = match t.ggml_type {
            0 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            1 => raw.chunks_exact(2).map(f16).collect(),
            8 => {
                let mut v = Vec::with_capacity(raw.len() / 34 * 32);
                for b in raw.chunks_exact(34) {
                    let d = f16(&b[0..2]);
                    v.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
                }
                v
            }
            3 => {
                let mut v = Vec::with_capacity(raw.len() / 20 * 32);
                for b in raw.chunks_exact(20) {
                    let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
                    let qs = &b[4..20];
                    v.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                    v.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
                }
                v
            }
            other => {
                return Err(ModelError::format(
                    &self.path,
                    format!("ggml type {other} not supported"),
                ))
            }
        };
        Ok((t.shape.clone(), out))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        for (k, t, v) in kv {
            s(&mut b, k);
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        let mut off = 0u64;
        for (name, dims, t, data) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.to_le_bytes());
            b.extend(off.to_le_bytes());
            off += data.len() as u64;
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        for (_, _, _, data) in tensors {
            b.extend(data);
        }
        b
    }

    #[test]
    fn dequantizes_q4_1_and_q8_0_and_reverses_dims() {
        let mut q41 = Vec::new();
        q41.extend(half::f16::from_f32(0.5).to_le_bytes());
        q41.extend(half::f16::from_f32(-1.0).to_le_bytes());
        q41.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut q80 = Vec::new();
        q80.extend(half::f16::from_f32(0.25).to_le_bytes());
        q80.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let bytes = build(
            &[("general.alignment", 4, 32u32.to_le_bytes().to_vec())],
            &[("a", vec![16, 2], 3, q41), ("b", vec![32], 8, q80)],
        );
        let g = Gguf::parse(Path::new("t.gguf"), bytes).unwrap();
        let (shape, v) = g.dequantize("a").unwrap();
        assert_eq!(shape, vec![2, 16]);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[3], 0.5 * 3.0 - 1.0);
        assert_eq!(v[16], 0.5 * 15.0 - 1.0);
        let (_, v) = g.dequantize("b").unwrap();
        assert_eq!(v[0], -4.0);
        assert_eq!(v[31], 15.0 * 0.25);
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let bytes = build(
            &[(
                "k",
                8,
                [3u64.to_le_bytes().to_vec(), b"abc".to_vec()].concat(),
            )],
            &[("t", vec![4], 0, vec![0; 16])],
        );
        assert!(Gguf::parse(Path::new("ok"), bytes.clone()).is_ok());
        for cut in 0..bytes.len() {
            assert!(
                Gguf::parse(Path::new("cut"), bytes[..cut].to_vec()).is_err(),
                "cut at {cut} accepted"
            );
        }
        assert!(Gguf::parse(
            Path::new("g"),
            b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff".to_vec()
        )
        .is_err());
        assert!(Gguf::parse(Path::new("g"), b"NOPE".to_vec()).is_err());
    }
}
