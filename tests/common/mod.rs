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
        assert!(err <= abs || err <= rel * w.abs(), "{what}[{i}]: got {g}, want {w} (abs err {err})");
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

/// The difflab binary, isolated: its own cache, HOME (no user presets) and offline hub.
pub fn difflab(home: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_difflab"));
    cmd.env("HOME", home)
        .env("DIFFLAB_CACHE", home.join("cache"))
        .env("HF_HOME", home.join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "2")
        .env_remove("DIFFLAB_PRESET_DIR")
        .env_remove("DIFFLAB_FAULT")
        .env_remove("DIFFLAB_INJECT_NONFINITE");
    cmd
}

/// A small local text corpus with learnable structure, written into `dir`.
pub fn tiny_corpus(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("corpus.txt");
    let words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"];
    let text: String = (0..3000)
        .map(|i| {
            let line: Vec<&str> = (0..8).map(|j| words[(i * 7 + j * 3 + i / 5) % words.len()]).collect();
            format!(" {} .\n", line.join(" "))
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Flags for a run that takes a few seconds on 2 cores.
pub fn tiny_flags(corpus: &std::path::Path, out: &std::path::Path) -> Vec<String> {
    [
        "--dataset",
        &corpus.display().to_string(),
        "--tokenizer",
        "byte",
        "--output_dir",
        &out.display().to_string(),
        "--n_layer",
        "1",
        "--n_head",
        "2",
        "--n_embd",
        "32",
        "--block_size",
        "32",
        "--batch_size",
        "4",
        "--micro_batch_size",
        "2",
        "--learning_rate",
        "3e-3",
        "--lr_scheduler_type",
        "cosine",
        "--warmup_steps",
        "2",
        "--max_steps",
        "20",
        "--eval_steps",
        "10",
        "--save_steps",
        "10",
        "--logging_steps",
        "1",
        "--eval_max_blocks",
        "8",
        "--rope",
        "true",
        "--research",
        "true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The JSON objects of a JSON-lines text, asserting every line parses.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

/// Every file under `dir` with its bytes.
pub fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A small model of each variant's shape: 2 layers x 32, 4 heads, 16 positions.
pub fn tiny_config(vocab_size: usize, rope: bool, differential: bool) -> difflab::model::GptConfig {
    difflab::model::GptConfig {
        vocab_size,
        n_positions: 16,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
        rope,
        rope_theta: 10_000.0,
        differential,
        dropout: 0.0,
    }
}

/// A child process that is ended when this goes out of scope, also when a test panics while it
/// runs: SIGTERM first (mpirun passes it on to its ranks), then SIGKILL after ten seconds.
pub struct Reaped(pub std::process::Child);

impl Reaped {
    /// Waits for the process at most `limit`: a hang fails the test instead of stalling it
    /// (and the process is ended as this drops).
    pub fn wait_within(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "still running after {limit:?}: it hangs");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits, at most `limit`, until `ready` holds, the process still running.
    pub fn wait_until(&mut self, limit: std::time::Duration, what: &str, ready: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + limit;
        while !ready() {
            assert!(self.0.try_wait().unwrap().is_none(), "the process ended before {what}");
            assert!(std::time::Instant::now() < deadline, "no {what} within {limit:?}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // Safety: kill(2) on the PID of a child this test started and has not reaped.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            let asked = std::time::Instant::now();
            while let Ok(None) = self.0.try_wait() {
                if asked.elapsed() > std::time::Duration::from_secs(10) {
                    let _ = self.0.kill();
                    let _ = self.0.wait();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}
