//! Train short, test long: the loss by position adds up to the eval loss for every variant,
//! `eval --context_lengths` scores the same tokens at every length and writes its figures, a
//! model with learned positions refuses lengths past them, a length that would not fit in memory
//! is refused before any work, and evaluations during training
//! carry the curve and the extra lengths.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use difflab::data::TokenStream;
use difflab::model::params::init_weights;
use difflab::model::{GptConfig, Trainable};
use difflab::train::evaluate::evaluate;

fn config(rope: bool, differential: bool) -> GptConfig {
    tiny_config(97, rope, differential)
}

/// The mean of `position_loss`, weighted by each bucket's predictions, equals the ordinary eval
/// loss (each window's mean next-token loss through the model's loss, averaged) on the same
/// windows, within 1e-6, for all four variants, on the fused CPU kernels (f32) and the composed
/// ones (f64).
#[test]
fn the_loss_by_position_adds_up_to_the_eval_loss_for_every_variant() {
    let tokens: Vec<u32> = (0..12 * 16 + 5).map(|i| ((i * 37 + i / 3) % 97) as u32).collect();
    let stream = TokenStream::from_vec(tokens);
    for (rope, differential) in [(false, false), (false, true), (true, false), (true, true)] {
        for dtype in [DType::F32, DType::F64] {
            let cfg = config(rope, differential);
            let weights = init_weights(&cfg, 3, &Device::Cpu).unwrap();
            let weights = weights.into_iter().map(|(k, t)| (k, t.to_dtype(dtype).unwrap())).collect();
            let gpt = Trainable::on_weights(&cfg, weights).unwrap().detached().unwrap();
            let part = evaluate(&gpt, &stream, 16, 5, None, &Device::Cpu).unwrap();
            assert_eq!(part.windows, 12);
            let buckets = part.buckets();
            assert_eq!(buckets.iter().map(|b| b.to - b.from).sum::<usize>(), 15, "every position once");
            let weighted: f64 = buckets.iter().map(|b| b.loss * b.predictions as f64).sum::<f64>()
                / buckets.iter().map(|b| b.predictions as f64).sum::<f64>();
            // the ordinary evaluation, window by window through the training loss
            let mut sum = 0.0;
            for w in 0..12 {
                let mut window = vec![];
                stream.extend_into(w * 16, 16, &mut window);
                let ids = Tensor::new(window.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                let (hidden, _) = gpt.forward_hidden(&ids, None).unwrap();
                let loss = gpt.next_token_loss(&hidden, &ids).unwrap();
                sum += loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            }
            let ordinary = sum / 12.0;
            let what = format!("rope {rope} differential {differential} {dtype:?}");
            assert!(
                ((weighted - ordinary) / ordinary).abs() < 1e-6,
                "{what}: by position {weighted}, ordinary {ordinary}"
            );
            assert!(((part.mean() - ordinary) / ordinary).abs() < 1e-6, "{what}: mean {}", part.mean());
        }
    }
}

fn trained(home: &std::path::Path, name: &str, rope: bool, research: bool) -> std::path::PathBuf {
    let corpus = tiny_corpus(home);
    let out = home.join(name);
    let mut flags = tiny_flags(&corpus, &out);
    flags.extend(
        [
            "--max_steps",
            "6",
            "--eval_steps",
            "3",
            "--save_steps",
            "0",
            "--rope",
            &rope.to_string(),
            "--research",
            &research.to_string(),
        ]
        .map(String::from),
    );
    let o = difflab(home).arg("train").args(&flags).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A model with learned positions (the baseline and the differential variant without RoPE)
/// evaluated at twice its block size exits 2 naming its block size; up to it, it runs. A run
/// asking for such lengths during training is refused before it starts.
#[test]
fn learned_positions_refuse_lengths_past_their_block_size() {
    let home = tempfile::tempdir().unwrap();
    for research in [false, true] {
        let out = trained(home.path(), &format!("learned-{research}"), false, research);
        let dir = out.display().to_string();
        let o =
            difflab(home.path()).args(["eval", "--checkpoint", &dir, "--context_lengths", "32,64"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("learned positions") && stderr.contains("32 tokens") && stderr.contains("64"),
            "{stderr}"
        );
        let o =
            difflab(home.path()).args(["eval", "--checkpoint", &dir, "--context_lengths", "16,32"]).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let corpus = tiny_corpus(home.path());
    let mut flags = tiny_flags(&corpus, &home.path().join("refused"));
    flags.extend(["--rope", "false", "--context_lengths", "64"].map(String::from));
    let o = difflab(home.path()).arg("train").args(&flags).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("context_lengths") && stderr.contains("block_size 32"), "{stderr}");
}

/// A RoPE run evaluated at 1x, 2x, 4x and 8x its block: one line per length, the same tokens at
/// every length in non-overlapping windows, a curve of at least 16 buckets covering each
/// window, and `extrapolation.json` with its two figures in the run's folder (or `--out`).
#[test]
fn eval_at_several_lengths_scores_the_same_tokens_and_writes_its_figures() {
    let home = tempfile::tempdir().unwrap();
    let out = trained(home.path(), "rope", true, true);
    let figures = home.path().join("fig");
    let o = difflab(home.path())
        .args(["eval", "--checkpoint", &out.display().to_string(), "--context_lengths", "32,64,128,256"])
        .args(["--eval_max_blocks", "none", "--out", &figures.display().to_string()])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("non-overlapping windows"), "{stderr}");
    let lines = json_lines(&stdout);
    assert_eq!(lines.len(), 4);
    let tokens: Vec<u64> = lines.iter().map(|l| l["eval_tokens"].as_u64().unwrap()).collect();
    assert!(tokens.windows(2).all(|w| w[0] == w[1]) && tokens[0] > 0, "{tokens:?}");
    for (l, length) in lines.iter().zip([32, 64, 128, 256]) {
        assert_eq!(l["context_length"], length);
        let buckets = l["position_loss"].as_array().unwrap();
        assert!(buckets.len() >= 16, "{length}: {} buckets", buckets.len());
        assert_eq!(buckets.last().unwrap()["to"], length - 1);
        assert!(l["eval_loss"].as_f64().unwrap().is_finite());
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(figures.join("extrapolation.json")).unwrap()).unwrap();
    assert_eq!(json["lengths"].as_array().unwrap().len(), 4);
    assert!(json["layout"].as_str().unwrap().contains("non-overlapping"));
    assert!(figures.join("extrapolation.png").is_file() && figures.join("position_loss.png").is_file());

    // a length whose windows could not be held is refused before any work, naming it and the
    // estimate (a window of 2^20 tokens needs its attention rows: terabytes, on any machine)
    let o = difflab(home.path())
        .args(["eval", "--checkpoint", &out.display().to_string(), "--context_lengths", "32,1048576"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("1048576 tokens") && stderr.contains("GiB") && stderr.contains("shorter"), "{stderr}");
    assert!(stdout.trim().is_empty(), "nothing was evaluated: {stdout}");
}

/// Evaluations during training carry the loss by position at the training length, and a run
/// with `context_lengths` logs the longer windows as their own events, which the run's eval
/// curve leaves out.
#[test]
fn evaluations_during_training_carry_the_curve_and_the_extra_lengths() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let mut flags = tiny_flags(&corpus, &out);
    flags.extend(["--max_steps", "6", "--eval_steps", "3", "--context_lengths", "64,128"].map(String::from));
    let o = difflab(home.path()).arg("train").args(&flags).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let events = json_lines(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap());
    let evals: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "evaluate").collect();
    let at_training: Vec<_> = evals.iter().filter(|e| e["context_length"].is_null()).collect();
    assert_eq!(at_training.len(), 2, "steps 3 and 6");
    assert!(at_training.iter().all(|e| e["position_loss"].as_array().is_some_and(|b| b.len() >= 16)));
    for length in [64, 128] {
        assert_eq!(evals.iter().filter(|e| e["context_length"] == length).count(), 2, "{length}");
    }
    let run = difflab::research::compare::load(&out).unwrap();
    assert_eq!(run.eval.len(), 2, "the run's curve is its training length's");
    assert!(out.join("figures").join("position_loss.png").is_file());
}
