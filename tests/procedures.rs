//! The tutor's procedure as presets: the shipped sweep and study presets expand to what the
//! README says, run end to end from a preset file, refuse bad values by file, key and position,
//! and resume with finished trials reused.

mod common;

use common::*;
use difflab::config::{describe, resolve, PresetLibrary, Seeds};

/// The README's table of procedure presets: `(name, kind, what)` per row.
fn readme_rows() -> Vec<(String, String, String)> {
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("### Procedure presets").nth(1).expect("README has a `### Procedure presets` section");
    let table = section.split("\n\n").find(|p| p.trim_start().starts_with('|')).expect("a table");
    table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<String> = l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect();
            (cells[0].trim_matches('`').to_string(), cells[1].clone(), cells[2].clone())
        })
        .collect()
}

fn numbers(text: &str) -> Vec<f64> {
    text.split([',', ' ', ':']).filter_map(|w| w.parse::<f64>().ok()).collect()
}

#[test]
fn every_shipped_procedure_preset_expands_to_what_the_readme_states() {
    let lib = PresetLibrary::builtin();
    let rows = readme_rows();
    let procedures: Vec<String> = lib
        .names()
        .into_iter()
        .filter(|n| {
            let r = resolve(&lib.chain(n).unwrap(), &vec![]).unwrap();
            r.sweep.is_some() || r.study.is_some()
        })
        .collect();
    let mut listed: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    listed.sort();
    let mut shipped = procedures.clone();
    shipped.sort();
    assert_eq!(listed, shipped, "the README lists every procedure preset, and only those");
    for (name, kind, what) in &rows {
        let r = resolve(&lib.chain(name).unwrap(), &vec![]).unwrap();
        match kind.as_str() {
            "sweep" => {
                let sweep = r.sweep.as_ref().unwrap_or_else(|| panic!("{name} is a sweep"));
                let (key, values) = &sweep.axes[0];
                assert!(what.starts_with(key.as_str()), "{name}: {what} sweeps {key}");
                let got: Vec<f64> = values.iter().map(|v| v.as_f64().unwrap()).collect();
                assert_eq!(numbers(what), got, "{name}: the README's grid");
            }
            "study" => {
                let study = r.study.as_ref().unwrap_or_else(|| panic!("{name} is a study"));
                for (label, values) in &study.arms {
                    let settings: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let stated = format!("{label} ({})", settings.join(", "));
                    assert!(what.contains(&stated), "{name}: the README says {what:?}, the preset {stated:?}");
                }
                let Seeds::Count(n) = study.seeds else { panic!("{name}: a seed count") };
                assert!(what.ends_with(&format!("{n} seeds")), "{name}: {what}");
            }
            other => panic!("{name}: kind {other}"),
        }
        // `difflab presets NAME` shows the same expansion
        let lines = describe(&r).join("\n");
        assert!(lines.contains(&format!("{kind} ")), "{name}: {lines}");
    }
}

#[test]
fn every_preset_evaluates_at_least_five_times() {
    let lib = PresetLibrary::builtin();
    for name in lib.names() {
        let c = resolve(&lib.chain(&name).unwrap(), &vec![]).unwrap().config;
        let (steps, _) = c.estimated_steps().unwrap_or_else(|| panic!("{name}: steps known"));
        let evals = difflab::config::evaluations(&c, steps);
        assert!(evals >= 5, "{name}: {evals} evaluations in {steps} steps (eval_steps {})", c.eval_steps);
        assert!(c.save_steps == 0 || c.save_steps <= steps, "{name}: a checkpoint before the end");
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const SMALL: &str = "extends: demo\ntokenizer: byte\nmax_steps: 8\neval_steps: 4\nsave_steps: 4\nlogging_steps: 1\nlog_tensorboard: false\neval_max_blocks: 8\n";

#[test]
fn a_sweep_preset_runs_resumes_and_a_grid_expands() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("sweep");
    let preset = write(
        home.path(),
        "my-sweep.yaml",
        &format!("{SMALL}output_dir: {}\nsweep:\n  learning_rate: [3.0e-3, 1.0e-3]\n", out.display()),
    );
    let o = difflab(home.path()).args(["sweep", "--preset", &preset]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let values: Vec<f64> = summary["trials"].as_array().unwrap().iter().map(|t| t["value"].as_f64().unwrap()).collect();
    assert_eq!(values, [3e-3, 1e-3]);
    assert!(summary["trials"].as_array().unwrap().iter().all(|t| t["status"] == "completed" && t["steps"] == 8));

    // again: both trials reused, their logs untouched
    let log = out.join("learning_rate-0.003/metrics.jsonl");
    let before = std::fs::read_to_string(&log).unwrap();
    let o = difflab(home.path()).args(["sweep", "--preset", &preset]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.matches("reused from an earlier session").count(), 2, "{stdout}");
    // stderr's progress says so too, never "completed after" for a trial not run now
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.matches("reused").count(), 2, "{stderr}");
    assert!(!stderr.contains("completed after"), "{stderr}");
    // both values at an end of a two-value grid: the best one's edge is named
    assert!(
        stdout.contains("best at the top of the grid: try") || stdout.contains("best at the bottom of the grid: try"),
        "{stdout}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), before);
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(again["recommended"], summary["recommended"]);

    // an interrupted trial (no summary yet, its last checkpoint and end gone) resumes
    std::fs::remove_file(out.join("summary.json")).unwrap();
    let trial = out.join("learning_rate-0.001");
    std::fs::remove_dir_all(trial.join("checkpoint-8")).unwrap();
    let text = std::fs::read_to_string(trial.join("metrics.jsonl")).unwrap();
    let kept: Vec<&str> =
        text.lines().take_while(|l| !(l.contains("\"progress\"") && l.contains("\"step\":5,"))).collect();
    std::fs::write(trial.join("metrics.jsonl"), kept.join("\n") + "\n").unwrap();
    let o = difflab(home.path()).args(["sweep", "--preset", &preset]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("reused from its finished log"), "the finished trial: {stdout}");
    assert!(stderr.contains("from step 4"), "the interrupted one resumes at its checkpoint: {stderr}");

    // a grid of two keys: four trials, each folder named by both values
    let grid = write(
        home.path(),
        "grid.yaml",
        "extends: demo\nsweep:\n  learning_rate: [1.0e-3, 3.0e-4]\n  warmup_steps: [0, 10]\n",
    );
    let o = difflab(home.path()).args(["presets", &grid]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("= 4 trials"), "{text}");
    assert!(text.contains("learning_rate=0.0003, warmup_steps=10"), "{text}");
}

#[test]
fn a_study_preset_runs_from_its_file() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("study");
    let preset = write(
        home.path(),
        "my-study.yaml",
        &format!(
            "{SMALL}output_dir: {}\nstudy:\n  seeds: [1, 2]\n  arms:\n    - {{name: base, research: false}}\n    - {{name: diff, research: true}}\n",
            out.display()
        ),
    );
    let o = difflab(home.path()).args(["study", "--preset", &preset]).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    for dir in ["base/seed-1", "base/seed-2", "diff/seed-1", "diff/seed-2"] {
        assert!(out.join(dir).join("metrics.jsonl").is_file(), "{dir}");
    }
    assert!(stdout.contains("diff - base (final eval loss, paired by seed)"), "{stdout}");
    // `difflab train` with a procedure preset says how to run it
    let o = difflab(home.path()).args(["train", "--preset", &preset]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("difflab study --preset"));
}

#[test]
fn bad_values_inside_a_sweep_list_or_an_arm_name_file_key_and_position() {
    let home = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid_presets");
    for (file, command, place) in [
        ("sweep-bad-value.yaml", "sweep", "sweep.learning_rate[1]: key `learning_rate` must be a number, got \"fast\""),
        ("study-bad-arm.yaml", "study", "study.arms[1]: key `n_layer` must be a whole number >= 0, got \"two\""),
    ] {
        let path = fixtures.join(file).display().to_string();
        let o = difflab(home.path()).args([command, "--preset", &path]).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(file) && stderr.contains(place), "{file}: {stderr}");
    }
}
