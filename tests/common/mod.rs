//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// `../shared` beside the project: golden tensors, fixtures (see shared/README.md).
pub fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shared")
}

pub fn golden_dir(variant: &str) -> PathBuf {
    shared_dir().join("golden").join(variant)
}

pub const VARIANTS: [&str; 4] = ["rope0_diff0", "rope0_diff1", "rope1_diff0", "rope1_diff1"];

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Largest absolute difference, asserting equal shapes.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    to_vec(a).iter().zip(to_vec(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Every element within `abs` absolute or `rel` relative tolerance; returns the worst offender.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, abs: f32, rel: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    for (i, (g, w)) in to_vec(got).iter().zip(to_vec(want)).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= abs || err <= rel * w.abs(),
            "{what}[{i}]: got {g}, want {w} (abs err {err})"
        );
    }
}

/// Writes a Parquet file with one optional string column `text`, snappy-compressed as
/// HF `datasets` writes it.
pub fn write_parquet(path: &std::path::Path, rows: &[String]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;
    let schema = Arc::new(parse_message_type("message schema { optional binary text (STRING); }").unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = writer.next_row_group().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let values: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.as_str())).collect();
    let def_levels = vec![1i16; rows.len()];
    col.typed::<ByteArrayType>().write_batch(&values, Some(&def_levels), None).unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    writer.close().unwrap();
}

/// Lays out `files` (path in repo -> bytes) in a Hugging Face cache exactly as huggingface_hub
/// does: `refs/main` holding the sha, `blobs/<sha256-like etag>`, and
/// `snapshots/<sha>/<path>` relative symlinks into `blobs/`.
pub fn fake_hub_repo(cache: &std::path::Path, folder: &str, sha: &str, files: &[(&str, Vec<u8>)]) {
    let root = cache.join(folder);
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs").join("main"), sha).unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let etag = format!("{:064x}", 0xabcdef_u64 + i as u64);
        std::fs::write(root.join("blobs").join(&etag), bytes).unwrap();
        let pointer = root.join("snapshots").join(sha).join(name);
        std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
        let depth = name.split('/').count() + 1; // snapshots/<sha>/<name...>
        let target = format!("{}blobs/{etag}", "../".repeat(depth));
        std::os::unix::fs::symlink(target, &pointer).unwrap();
        assert!(pointer.exists(), "symlink resolves");
    }
}
