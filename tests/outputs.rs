//! What users open with other tools: TensorBoard event files (read back by TensorBoard itself),
//! figures, and model directories in the HF layout.

mod common;

use std::path::Path;

use common::*;

fn run(home: &Path, out: &Path, extra: &[&str]) {
    let corpus = tiny_corpus(home);
    let mut flags = tiny_flags(&corpus, out);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let o = difflab(home).arg("train").args(&flags).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn figures_are_pngs_of_the_stated_size_and_the_switches_work() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("run");
    run(home.path(), &out, &[]);
    for name in ["loss", "loss_log", "learning_rate", "grad_norm", "diff_norm_hist", "position_loss"] {
        let bytes = std::fs::read(out.join("figures").join(format!("{name}.png"))).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (800, 480), "{name}");
    }
    assert!(std::fs::read_dir(out.join("runs")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("tfevents")));

    let off = home.path().join("off");
    run(home.path(), &off, &["--log_tensorboard", "false", "--log_figures", "false", "--max_steps", "3"]);
    assert!(!off.join("runs").exists() && !off.join("figures").exists());
    assert!(off.join("metrics.jsonl").exists(), "metrics.jsonl is always written");

    // baselines have no histogram figure
    let base = home.path().join("base");
    run(home.path(), &base, &["--research", "false", "--max_steps", "3"]);
    assert!(base.join("figures/loss.png").exists() && !base.join("figures/diff_norm_hist.png").exists());
}

/// TensorBoard's own `EventAccumulator` reads the run: needs `DIFFLAB_PYTHON` with the
/// `tensorboard` package (scripts/test.sh sets it up and runs the ignored tests).
#[test]
#[ignore = "needs DIFFLAB_PYTHON with tensorboard; scripts/test.sh runs it"]
fn tensorboard_reads_the_event_files() {
    let python = std::env::var("DIFFLAB_PYTHON").expect("DIFFLAB_PYTHON: a python with tensorboard (scripts/test.sh)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_tensorboard.py");
    let home = tempfile::tempdir().unwrap();
    for (name, extra, args) in [
        ("diff", vec![], vec!["--differential", "--figures"]),
        ("base-nofig", vec!["--research", "false", "--log_figures", "false"], vec![]),
    ] {
        let out = home.path().join(name);
        run(home.path(), &out, &extra);
        let o = std::process::Command::new(&python).arg(&script).arg(&out).args(&args).output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{name}: {stdout} {}", String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(summary["points"]["train/loss"], 20, "{name}: every progress marker");
        assert_eq!(summary["points"]["eval/loss"], 2);
        // RoPE in both (tiny_flags): no wpe
        let layers = serde_json::json!(["h.0", "ln_f", "wte"]);
        assert_eq!(summary["layers"], layers, "{name}: a grad norm and update ratio per layer");
        assert_eq!(summary["points"]["layers/update_ratio/h.0"], 20, "{name}");
        if name == "diff" {
            assert_eq!(summary["histograms"], 20);
            assert_eq!(summary["images"], 12, "6 figures at each of 2 evaluations");
        }
    }
}

/// TensorBoard's HParams dashboard, asked over HTTP by a real server, lists each run as a
/// session with the settings it ran with, its status and the outcome its `train_end` reported.
#[test]
#[ignore = "needs DIFFLAB_PYTHON with tensorboard; scripts/test.sh runs it"]
fn the_hparams_dashboard_lists_each_run_with_its_settings_and_outcome() {
    let python = std::env::var("DIFFLAB_PYTHON").expect("DIFFLAB_PYTHON: a python with tensorboard (scripts/test.sh)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_hparams.py");
    let home = tempfile::tempdir().unwrap();
    let logs = home.path().join("logs");
    let corpus = tiny_corpus(home.path());
    let mut ends = Vec::new();
    for (name, lr) in [("low", "1e-3"), ("high", "1e-2")] {
        let mut flags = tiny_flags(&corpus, &logs.join(name));
        flags.extend(["--learning_rate", lr, "--max_steps", "10", "--eval_steps", "5"].map(String::from));
        let o = difflab(home.path()).arg("train").args(&flags).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let end =
            json_lines(&String::from_utf8_lossy(&o.stdout)).into_iter().find(|m| m["event"] == "train_end").unwrap();
        ends.push((name, lr.parse::<f64>().unwrap(), end));
    }
    let o = std::process::Command::new(&python).arg(&script).arg(&logs).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout} {}", String::from_utf8_lossy(&o.stderr));
    let sessions: Vec<serde_json::Value> = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(sessions.len(), 2, "{stdout}");
    for (name, lr, end) in ends {
        let s =
            sessions.iter().find(|s| s["run"] == format!("{name}/runs")).unwrap_or_else(|| panic!("{name}: {stdout}"));
        let logged = s["hparams"]["learning_rate"].as_f64().unwrap();
        assert!((logged - lr).abs() < 1e-12, "{name}: learning_rate {logged}");
        assert_eq!(s["hparams"]["n_embd"], 32.0, "{name}");
        assert_eq!(s["hparams"]["variant"], "differential + RoPE", "{name}");
        assert_eq!(s["status"], "STATUS_SUCCESS", "{name}: {end}");
        for (metric, key) in [("hparams/final_eval_loss", "eval_loss"), ("hparams/best_eval_loss", "best_eval_loss")] {
            let want = end[key].as_f64().unwrap();
            let got = s["metrics"][metric].as_f64().unwrap_or(f64::NAN);
            // TensorBoard keeps scalars as f32
            assert!((got - want).abs() < 1e-5 * want.abs(), "{name}: {metric} {got} vs train_end {want}");
        }
    }
}

#[test]
fn eval_accepts_a_gpt2_directory_without_the_transformer_prefix() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("gpt2-bare");
    std::fs::create_dir_all(&dir).unwrap();
    let golden = golden_dir("rope0_diff0").join("model");
    std::fs::copy(golden.join("config.json"), dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(golden.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let bare: std::collections::HashMap<String, candle_core::Tensor> =
        tensors.into_iter().map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v)).collect();
    assert!(bare.contains_key("h.0.attn.c_attn.weight"));
    candle_core::safetensors::save(&bare, dir.join("model.safetensors")).unwrap();
    let corpus = tiny_corpus(home.path());
    let eval = |d: &Path| {
        let o = difflab(home.path())
            .args([
                "eval",
                "--checkpoint",
                &d.display().to_string(),
                "--dataset",
                &corpus.display().to_string(),
                "--tokenizer",
                "byte",
                "--block_size",
                "32",
            ])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
        json_lines(&String::from_utf8_lossy(&o.stdout))[0]["eval_loss"].as_f64().unwrap()
    };
    assert_eq!(eval(&dir), eval(&golden), "the same weights under either naming give the same loss");
}
