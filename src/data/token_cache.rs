//! Tokenized splits on disk, memory-mapped.
//!
//! File: a 32-byte header (`DLTOKv1\0`, id width 2 or 4, token count, CRC-32C of the
//! payload) then the ids, little-endian. u16 ids when the vocabulary fits, else u32. A file
//! whose size or checksum does not match its header is never used: it is rebuilt.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::atomic_file;

const MAGIC: &[u8; 8] = b"DLTOKv1\0";
const HEADER: usize = 32;

/// A split's token ids, memory-mapped from the cache (or held in memory).
pub struct TokenStream {
    storage: Storage,
    width: usize,
    len: usize,
}

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u32>),
}

impl std::fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenStream({} tokens, u{})", self.len, self.width * 8)
    }
}

impl TokenStream {
    pub fn from_vec(ids: Vec<u32>) -> Self {
        let len = ids.len();
        Self { storage: Storage::Owned(ids), width: 4, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ids `start..start + n` appended to `out`.
    pub fn extend_into(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        match &self.storage {
            Storage::Owned(v) => out.extend_from_slice(&v[start..start + n]),
            Storage::Mapped(m) => {
                let bytes = &m[HEADER + start * self.width..HEADER + (start + n) * self.width];
                if self.width == 2 {
                    out.extend(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32));
                } else {
                    out.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                }
            }
        }
    }

    pub fn to_vec(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.len);
        self.extend_into(0, self.len, &mut out);
        out
    }

    /// Largest id, to check against the model's vocabulary.
    pub fn max_id(&self) -> Option<u32> {
        self.to_vec().into_iter().max()
    }

    /// Full blocks of `block_size` tokens (the final remainder is dropped, as `run_clm.py`).
    pub fn num_blocks(&self, block_size: usize) -> usize {
        self.len / block_size
    }
}

/// Why a cache file was not used.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    Missing,
    Corrupt(String),
}

/// Writes `ids` to `path` atomically; `vocab_size` picks the id width.
pub fn write(path: &Path, ids: &[u32], vocab_size: usize) -> std::io::Result<()> {
    let width = if vocab_size <= 1 << 16 { 2 } else { 4 };
    let mut payload = Vec::with_capacity(ids.len() * width);
    for &id in ids {
        if width == 2 {
            payload.extend_from_slice(&(id as u16).to_le_bytes());
        } else {
            payload.extend_from_slice(&id.to_le_bytes());
        }
    }
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&(width as u32).to_le_bytes());
    header[16..24].copy_from_slice(&(ids.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    atomic_file::write_with(path, |w| {
        w.write_all(&header)?;
        w.write_all(&payload)
    })
}

/// Opens and verifies a cache file.
pub fn open(path: &Path) -> Result<TokenStream, Invalid> {
    let file = File::open(path).map_err(|_| Invalid::Missing)?;
    // Safety: cache files are only ever replaced by rename, never modified in place, so the
    // mapped bytes cannot change under us.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Invalid::Corrupt(e.to_string()))?;
    if map.len() < HEADER || &map[..8] != MAGIC {
        return Err(Invalid::Corrupt("bad header".into()));
    }
    let word = |r: std::ops::Range<usize>| map[r].iter().rev().fold(0u64, |acc, b| (acc << 8) | *b as u64);
    let width = word(8..12) as usize;
    let len = word(16..24) as usize;
    let crc = word(24..28) as u32;
    if !(width == 2 || width == 4) || map.len() != HEADER + len * width {
        return Err(Invalid::Corrupt(format!("size {} does not match {len} ids of {width} bytes", map.len())));
    }
    if crc32c::crc32c(&map[HEADER..]) != crc {
        return Err(Invalid::Corrupt("checksum mismatch".into()));
    }
    Ok(TokenStream { storage: Storage::Mapped(map), width, len })
}

/// The cache file for a split: the key hashes everything that changes its content.
pub fn path_for(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join("tokens").join(format!("{:016x}.bin", crate::fingerprint::fnv1a(key.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_u16_and_u32() {
        let dir = tempfile::tempdir().unwrap();
        for (vocab, width) in [(50257, 2), (70_000, 4)] {
            let path = dir.path().join(format!("{vocab}.bin"));
            let ids: Vec<u32> = (0..1000).map(|i| (i * 37) % vocab as u32).collect();
            write(&path, &ids, vocab).unwrap();
            let s = open(&path).unwrap();
            assert_eq!(s.width, width);
            assert_eq!(s.to_vec(), ids);
            let mut part = vec![];
            s.extend_into(10, 5, &mut part);
            assert_eq!(part, ids[10..15]);
        }
    }

    #[test]
    fn truncated_or_flipped_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        write(&path, &(0..500).collect::<Vec<u32>>(), 1000).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        assert!(matches!(open(&path), Err(Invalid::Corrupt(_))));
        let mut flipped = bytes.clone();
        flipped[HEADER + 100] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(open(&path).unwrap_err(), Invalid::Corrupt("checksum mismatch".into()));
        assert_eq!(open(&dir.path().join("none.bin")).unwrap_err(), Invalid::Missing);
    }
}
