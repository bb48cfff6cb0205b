//! The graph's file form: a header, the levels, the adjacency and the codes, each field and id
//! checked when read; a mapped file's codes and level-0 rows are read in place.
use super::*;

/// The graph file's first format; the second adds a padding field so that the adjacency
/// starts 8-byte aligned in the file and can be mapped.
pub(super) const MAGIC: &[u8; 8] = b"RFHNSW01";
const MAGIC2: &[u8; 8] = b"RFHNSW02";
/// The second format's header: magic and ten words.
pub(super) const HEAD2: usize = 8 + 10 * 8;

impl Hnsw {
    /// The graph in a self-describing binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_at(0)
    }

    /// [`Hnsw::to_bytes`] for a file in which the bytes start at offset `origin`: padded so
    /// that the adjacency starts 8-byte aligned in the file, for [`Hnsw::from_map`].
    pub fn to_bytes_at(&self, origin: usize) -> Vec<u8> {
        let (entry, top) = self.entry().map_or((u32::MAX, 0), |(e, l)| (e, l));
        let pad = (8 - (origin + HEAD2 + self.len) % 8) % 8;
        let mut out = Vec::with_capacity(
            HEAD2 + self.len + pad + (self.layer0.len() + self.upper.len()) * 4 + self.codes.len(),
        );
        out.extend_from_slice(MAGIC2);
        for x in [
            self.dim as u64,
            self.params.m as u64,
            self.params.ef_construction as u64,
            self.params.seed,
            self.len as u64,
            entry as u64,
            top as u64,
            self.upper.len() as u64,
            self.scale.to_bits() as u64,
            pad as u64,
        ] {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.extend_from_slice(&self.levels);
        out.resize(out.len() + pad, 0);
        for x in self.layer0.iter().chain(&self.upper) {
            out.extend_from_slice(&x.load(Relaxed).to_le_bytes());
        }
        out.extend(self.codes.iter().map(|c| *c as u8));
        out
    }

    /// A graph from [`Hnsw::to_bytes`] (either format), copied into memory; every field and
    /// id is checked.
    pub fn from_bytes(bytes: &[u8]) -> Result<Hnsw, String> {
        Hnsw::parse(bytes, None)
    }

    /// A graph from the bytes of `map` from `offset` on ([`Hnsw::to_bytes_at`] with that
    /// origin): the codes and level-0 rows stay in the map (format 2, aligned), the rest is
    /// read into memory; every field and id is checked.
    pub fn from_map(map: Arc<memmap2::Mmap>, offset: usize) -> Result<Hnsw, String> {
        let bytes = map.get(offset..).ok_or("offset past the map")?;
        Hnsw::parse(bytes, Some((&map, offset)))
    }

    fn parse(bytes: &[u8], map: Option<(&Arc<memmap2::Mmap>, usize)>) -> Result<Hnsw, String> {
        let v2 = bytes.get(..8) == Some(MAGIC2.as_slice());
        if !v2 && bytes.get(..8) != Some(MAGIC.as_slice()) {
            return Err("not an HNSW graph file".into());
        }
        let head = if v2 { HEAD2 } else { 8 + 9 * 8 };
        if bytes.len() < head {
            return Err("not an HNSW graph file".into());
        }
        let word = |i: usize| {
            u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"))
        };
        let (dim, m, efc, seed, len) = (
            word(0) as usize,
            word(1) as usize,
            word(2) as usize,
            word(3),
            word(4) as usize,
        );
        let (entry, top, upper_len) = (word(5), word(6) as usize, word(7) as usize);
        let scale = f32::from_bits(word(8) as u32);
        let pad = if v2 { word(9) as usize } else { 0 };
        if pad >= 8 {
            return Err(format!("bad padding {pad}"));
        }
        if !(scale.is_finite() && (len == 0 || scale > 0.0)) {
            return Err(format!("bad int8 scale {scale}"));
        }
        if dim == 0 || !(2..=128).contains(&m) || top > MAX_LEVEL {
            return Err(format!("bad header: dim {dim}, m {m}, top level {top}"));
        }
        let m0 = 2 * m;
        let words = len
            .checked_mul(m0 + 1)
            .and_then(|x| x.checked_add(upper_len))
            .ok_or("size overflow")?;
        let codes_len = len.checked_mul(dim).ok_or("size overflow")?;
        let expected = words
            .checked_mul(4)
            .and_then(|w| w.checked_add(head + len + pad))
            .and_then(|w| w.checked_add(codes_len))
            .ok_or("size overflow")?;
        if bytes.len() != expected {
            return Err(format!("{} bytes, expected {expected}", bytes.len()));
        }
        let ids_at = head + len + pad;
        let codes_at = expected - codes_len;
        let in_map = |at: usize| map.map(|(m, offset)| (m, offset + at));
        let codes = in_map(codes_at)
            .and_then(|(m, at)| Store::mapped(m, at, codes_len))
            .unwrap_or_else(|| Store::Owned(bytes[codes_at..].iter().map(|b| *b as i8).collect()));
        let levels = bytes[head..head + len].to_vec();
        let mut upper_at = Vec::with_capacity(len);
        let mut at = 0usize;
        for &l in &levels {
            if l as usize > top {
                return Err(format!("node level {l} above the top level {top}"));
            }
            upper_at.push(at);
            at += l as usize * (m + 1);
        }
        if at != upper_len {
            return Err("upper levels do not add up".into());
        }
        let read_ids = |from: usize, n: usize| -> Vec<AtomicU32> {
            bytes[from..from + n * 4]
                .chunks_exact(4)
                .map(|c| AtomicU32::new(u32::from_le_bytes(c.try_into().expect("4 bytes"))))
                .collect()
        };
        let layer0_len = len * (m0 + 1);
        let layer0 = in_map(ids_at)
            .filter(|_| cfg!(target_endian = "little"))
            .and_then(|(m, at)| Store::mapped(m, at, layer0_len))
            .unwrap_or_else(|| Store::Owned(read_ids(ids_at, layer0_len)));
        let upper = read_ids(ids_at + layer0_len * 4, upper_len);
        let mapped = matches!(layer0, Store::Mapped { .. });
        let entry = match entry {
            e if e == u32::MAX as u64 && len == 0 => None,
            e if (e as usize) < len && levels[e as usize] as usize == top => Some((e as u32, top)),
            e => return Err(format!("bad entry point {e}")),
        };
        let g = Hnsw {
            dim,
            params: HnswParams {
                m,
                ef_construction: efc,
                seed,
            },
            len,
            codes,
            scale,
            levels,
            layer0,
            upper_at,
            upper,
            entry: Mutex::new(entry),
            // a mapped graph is read only: growing it copies it first
            locks: if mapped {
                Vec::new()
            } else {
                (0..len).map(|_| Mutex::new(())).collect()
            },
            cold: Default::default(),
        };
        for i in 0..len as u32 {
            for l in 0..=g.levels[i as usize] as usize {
                let row = g.row(i, l);
                let count = row[0].load(Relaxed) as usize;
                if count > row.len() - 1 {
                    return Err(format!("node {i} level {l}: {count} neighbours"));
                }
                if row[1..1 + count]
                    .iter()
                    .any(|x| x.load(Relaxed) as usize >= len)
                {
                    return Err(format!("node {i} level {l}: neighbour out of range"));
                }
            }
        }
        Ok(g)
    }
}
