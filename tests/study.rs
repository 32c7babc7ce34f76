//! `difflab study` end to end on the built-in corpus: its table, interval and JSON against
//! numbers worked out here from the runs' own logs, and resuming.

mod common;

use common::*;

fn study_cmd(home: &std::path::Path, out: &std::path::Path, arms: &[&str]) -> std::process::Command {
    let mut cmd = difflab(home);
    cmd.args(["study", "--preset", "demo", "--tokenizer", "byte", "--max_steps", "10", "--eval_steps", "5"])
        .args(["--save_steps", "5", "--logging_steps", "1", "--eval_max_blocks", "8", "--log_tensorboard", "false"])
        .args(["--seeds", "2", "--output_dir", &out.display().to_string()]);
    for arm in arms {
        cmd.args(["--arm", arm]);
    }
    cmd
}

/// The last eval loss in a run's metrics.jsonl.
fn final_eval(dir: &std::path::Path) -> f64 {
    let lines = json_lines(&std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap());
    lines.iter().rev().find(|e| e["event"] == "evaluate").unwrap()["eval_loss"].as_f64().unwrap()
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    (m, (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt())
}

#[test]
fn a_study_reports_means_and_a_paired_interval_and_resumes() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("study");
    let arms = ["research=false", "research=true,learning_rate=1e-3"];
    let o = study_cmd(home.path(), &out, &arms).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{stderr}");

    // the numbers, from each run's own log
    let dirs = ["research=false", "research=true+learning_rate=1e-3"];
    let losses: Vec<Vec<f64>> = dirs
        .iter()
        .map(|d| [42, 43].iter().map(|s| final_eval(&out.join(d).join(format!("seed-{s}")))).collect())
        .collect();
    let (base_mean, base_sd) = mean_sd(&losses[0]);
    let diffs: Vec<f64> = (0..2).map(|i| losses[1][i] - losses[0][i]).collect();
    let (d_mean, d_sd) = mean_sd(&diffs);
    let half = 12.706 * d_sd / 2f64.sqrt();

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("study.json")).unwrap()).unwrap();
    let arm0 = &json["arms"][0]["final_eval_loss"];
    assert!((arm0["mean"].as_f64().unwrap() - base_mean).abs() < 1e-12, "{arm0}");
    assert!((arm0["sd"].as_f64().unwrap() - base_sd).abs() < 1e-12, "{arm0}");
    let ppl = json["arms"][1]["final_perplexity"]["mean"].as_f64().unwrap();
    assert!((ppl - (losses[1][0].exp() + losses[1][1].exp()) / 2.0).abs() < 1e-9);
    let diff = &json["differences"][0];
    assert!((diff["mean"].as_f64().unwrap() - d_mean).abs() < 1e-12, "{diff}");
    let interval = diff["interval"].as_array().unwrap();
    assert!((interval[0].as_f64().unwrap() - (d_mean - half)).abs() < 1e-9, "{diff}");
    assert!((interval[1].as_f64().unwrap() - (d_mean + half)).abs() < 1e-9, "{diff}");
    assert!(diff["note"].as_str().unwrap().contains("too wide"), "two seeds are said to be too few: {diff}");
    assert_eq!(json["runs"].as_array().unwrap().len(), 4);
    assert_eq!(json["complete"], true);
    // every run saw the same tokens: 10 steps x 16 x 128
    assert_eq!(json["arms"][1]["tokens_seen"], serde_json::json!([20480, 20480]));
    let keys: Vec<&String> = json["differing_keys"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["learning_rate", "research"]);
    // the step-0 evaluation is on by default in a study
    let first = json_lines(&std::fs::read_to_string(out.join("research=false/seed-42/metrics.jsonl")).unwrap());
    assert_eq!(first.iter().find(|e| e["event"] == "evaluate").unwrap()["step"], 0);

    // the table says the same, rounded
    assert!(stdout.contains(&format!("{base_mean:.4} ± {base_sd:.4}")), "{stdout}");
    assert!(
        stdout.contains(&format!("{d_mean:+.4}, 95% CI [{:+.4}, {:+.4}]", d_mean - half, d_mean + half)),
        "{stdout}"
    );
    assert!(stdout.contains("the arms differ in: learning_rate (0.002 | 0.001), research (false | true)"), "{stdout}");
    assert!(stdout.contains("validation split (the first 8 blocks"), "the table says what it was computed on");
    for figure in ["study_eval_loss.png", "study_final_loss.png"] {
        assert!(std::fs::metadata(out.join("figures").join(figure)).unwrap().len() > 1000, "{figure}");
    }

    // run again: every run is reused, nothing retrained
    let log = out.join("research=false/seed-42/metrics.jsonl");
    let before = std::fs::read_to_string(&log).unwrap();
    let o = study_cmd(home.path(), &out, &arms).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("4 finished earlier: reused"));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), before, "a reused run is not touched");
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("study.json")).unwrap()).unwrap();
    assert_eq!(again["differences"], json["differences"]);

    // an interrupted run (its last checkpoint and its end gone) resumes from checkpoint-5
    let run = out.join("research=true+learning_rate=1e-3/seed-43");
    std::fs::remove_dir_all(run.join("checkpoint-10")).unwrap();
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let kept: Vec<&str> =
        text.lines().take_while(|l| !(l.contains("\"step\":6,") && l.contains("\"progress\""))).collect();
    std::fs::write(run.join("metrics.jsonl"), kept.join("\n") + "\n").unwrap();
    let o = study_cmd(home.path(), &out, &arms).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("3 finished earlier: reused") && stderr.contains("resumed from its last checkpoint"),
        "{stderr}"
    );
    let resumed = final_eval(&run);
    assert!((resumed - losses[1][1]).abs() < 1e-4, "resumed {resumed} vs uninterrupted {}", losses[1][1]);

    // a folder holding a run with other settings (the study's steps changed) stops the study
    // before anything runs: a stale result is never reused
    let o = study_cmd(home.path(), &out, &arms).args(["--max_steps", "20"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("other settings (max_steps 10 there, 20 here)"), "{err}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), before);
    // arms must share their data
    let o = study_cmd(home.path(), &home.path().join("s2"), &["research=false", "tokenizer=bpe:512"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("same data"), "{}", String::from_utf8_lossy(&o.stderr));
}
