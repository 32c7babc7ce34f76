//! What runs of each shape have measured on this machine, for estimates before a run starts
//! (the picker's "~2 min here"). One small JSON file in difflab's cache, keyed by what decides
//! the speed: model shape, sequence and micro-batch, tokenizer, variant, device, world size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;

pub const FILE: &str = "throughput.json";

/// A shape's last measurement: wall-clock training tokens per second, evaluations included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub tokens_per_second: f64,
    /// Seconds since the Unix epoch.
    pub when: f64,
    pub steps: u64,
}

pub fn path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(FILE)
}

/// What decides a run's speed, as a key.
pub fn key(c: &RunConfig, world_size: usize) -> String {
    format!(
        "{}x{}x{} block {} micro {} {} rope {} diff {} ckpt {} {} x{world_size}",
        c.n_layer,
        c.n_embd,
        c.n_head,
        c.block_size,
        c.micro_batch_size,
        c.tokenizer_spec(),
        c.rope,
        c.research,
        c.gradient_checkpointing,
        c.device
    )
}

pub fn load(cache_dir: &Path) -> BTreeMap<String, Measured> {
    std::fs::read_to_string(path(cache_dir)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// Records a finished run's speed (runs of fewer than 20 steps are too short to say).
pub fn record(cache_dir: &Path, key: String, m: Measured) -> std::io::Result<()> {
    // what a kill during an earlier write left behind
    crate::atomic_file::remove_dead_temps(cache_dir);
    if m.steps < 20 || !m.tokens_per_second.is_finite() {
        return Ok(());
    }
    let mut all = load(cache_dir);
    all.insert(key, m);
    std::fs::create_dir_all(cache_dir)?;
    let json = serde_json::to_string_pretty(&all).map_err(std::io::Error::other)?;
    crate::atomic_file::write(&path(cache_dir), json.as_bytes())
}

/// "~3 min" style, for estimates.
pub fn rough_duration(secs: f64) -> String {
    if secs < 90.0 {
        format!("~{:.0} s", secs.max(1.0))
    } else if secs < 90.0 * 60.0 {
        format!("~{:.0} min", secs / 60.0)
    } else {
        format!("~{:.1} h", secs / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_are_kept_per_shape_and_short_runs_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = RunConfig::default();
        let k = key(&c, 1);
        record(dir.path(), k.clone(), Measured { tokens_per_second: 1000.0, when: 1.0, steps: 5 }).unwrap();
        assert!(load(dir.path()).is_empty(), "5 steps say nothing");
        record(dir.path(), k.clone(), Measured { tokens_per_second: 1000.0, when: 1.0, steps: 400 }).unwrap();
        assert_eq!(load(dir.path())[&k].tokens_per_second, 1000.0);
        let other = RunConfig { n_layer: 2, ..c };
        assert_ne!(key(&other, 1), k);
        assert_eq!(rough_duration(30.0), "~30 s");
        assert_eq!(rough_duration(600.0), "~10 min");
    }
}
