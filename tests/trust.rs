//! Numbers you can trust: evaluation on the run's own data, one run per output_dir, checksums,
//! resume that agrees with its checkpoint, memory estimates, and the input gaps that used to
//! slip through. Each test fails on the code before these guarantees.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

fn train(home: &Path, flags: &[String]) -> Output {
    difflab(home).arg("train").args(flags).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn with(base: &[String], extra: &[&str]) -> Vec<String> {
    base.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect()
}

/// A finished tiny run in `home/name`: its folder and flags.
fn finished_run(home: &Path, name: &str) -> (PathBuf, Vec<String>) {
    let corpus = tiny_corpus(home);
    let out = home.join(name);
    let flags = tiny_flags(&corpus, &out);
    let o = train(home, &flags);
    assert!(o.status.success(), "{}", text(&o).1);
    (out, flags)
}

fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() - 17; // inside the tensor data, past the header
    bytes[i] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn eval_of_a_run_scores_its_own_data_at_its_own_step() {
    let home = tempfile::tempdir().unwrap();
    let (out, _) = finished_run(home.path(), "run");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last_eval = json_lines(&metrics).into_iter().rfind(|m| m["event"] == "evaluate").unwrap();
    // no data flags: the run's own corpus, tokenizer and block size (the defaults would be the
    // built-in corpus and blocks of 1024); the same 8 blocks its training-time eval scored
    let o = difflab(home.path())
        .args(["eval", "--checkpoint", &out.display().to_string(), "--eval_max_blocks", "8"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let got = json_lines(&stdout).into_iter().find(|m| m["event"] == "evaluate").unwrap();
    assert_eq!(got["step"], 20, "a finished output_dir is at its last step: {got}");
    let (a, b) = (got["eval_loss"].as_f64().unwrap(), last_eval["eval_loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-5, "eval {a} vs the run's own final eval {b}");
    assert!(stderr.contains("corpus.txt") && stderr.contains("8 of ") && stderr.contains("blocks of 32"), "{stderr}");
    // the training-time eval with eval_max_blocks says it is partial
    assert!(last_eval["eval_blocks"] == 8 && last_eval["validation_blocks"].as_u64().unwrap() > 8, "{last_eval}");
}

#[test]
fn a_rerun_into_a_finished_runs_folder_is_refused_and_changes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let (out, flags) = finished_run(home.path(), "run");
    let before = snapshot(&out);
    let o = train(home.path(), &with(&flags, &["--seed", "7"]));
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already holds a run") && stderr.contains("--overwrite_output_dir"), "{stderr}");
    assert_eq!(snapshot(&out), before, "every file byte-identical");
    // HF's flag clears it: the old checkpoints are gone, one train_begin in the log
    let o =
        train(home.path(), &with(&flags, &["--overwrite_output_dir", "true", "--max_steps", "5", "--save_steps", "0"]));
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(!out.join("checkpoint-10").exists() && !out.join("checkpoint-20").exists());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(json_lines(&metrics).iter().filter(|m| m["event"] == "train_begin").count(), 1);
}

#[test]
fn a_second_process_training_into_the_same_folder_exits_2_naming_the_first() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let flags =
        with(&tiny_flags(&corpus, &out), &["--max_steps", "100000", "--save_steps", "0", "--eval_steps", "100000"]);
    let mut first = Reaped(
        difflab(home.path())
            .arg("train")
            .args(&flags)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while !out.join("metrics.jsonl").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "the first run did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = train(home.path(), &flags);
    let (_, stderr) = text(&o);
    let pid = first.0.id().to_string();
    let _ = first.0.kill();
    let _ = first.0.wait();
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("in use") && stderr.contains(&pid), "names the holder's PID: {stderr}");
}

#[test]
fn bit_flips_in_model_and_optimizer_files_are_refused_by_name() {
    let home = tempfile::tempdir().unwrap();
    let (out, flags) = finished_run(home.path(), "run");
    let ckpt = out.join("checkpoint-10");
    assert!(ckpt.join("checksums.json").is_file() && out.join("checksums.json").is_file());
    // the model: eval refuses it
    let model = out.join("model.safetensors");
    flip_a_byte(&model);
    let o = difflab(home.path()).args(["eval", "--checkpoint", &out.display().to_string()]).output().unwrap();
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("checksum") && stderr.contains("previous checkpoint"),
        "{stderr}"
    );
    // the optimizer: resume refuses it
    flip_a_byte(&ckpt.join("optimizer.safetensors"));
    let o = train(
        home.path(),
        &with(&flags, &["--resume_from_checkpoint", &ckpt.display().to_string(), "--max_steps", "30"]),
    );
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("optimizer.safetensors") && stderr.contains("checksum"), "{stderr}");
}

#[test]
fn resume_with_a_contradicting_setting_exits_2_naming_each_key() {
    let home = tempfile::tempdir().unwrap();
    let (out, flags) = finished_run(home.path(), "run");
    let ckpt = out.join("checkpoint-10").display().to_string();
    let o = train(
        home.path(),
        &with(&flags, &["--resume_from_checkpoint", &ckpt, "--n_embd", "64", "--research", "false"]),
    );
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("n_embd = 64") && stderr.contains("research = false"), "{stderr}");
    // settings left at their defaults take the checkpoint's: only the output folder and the
    // checkpoint given, and train_begin records the checkpoint's model
    let o = difflab(home.path())
        .args([
            "train",
            "--output_dir",
            &out.display().to_string(),
            "--resume_from_checkpoint",
            &ckpt,
            "--max_steps",
            "12",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let begin = json_lines(&stdout).into_iter().find(|m| m["event"] == "train_begin").unwrap();
    assert_eq!(begin["config"]["n_embd"], 32);
    assert_eq!(begin["config"]["tokenizer"], "byte");
    assert_eq!(begin["start_step"], 10);
}

#[test]
fn a_model_too_big_for_the_machine_is_refused_before_anything_is_prepared() {
    let home = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let o = train(
        home.path(),
        &with(
            &[],
            &["--preset", "demo", "--n_embd", "8192", "--output_dir", &home.path().join("big").display().to_string()],
        ),
    );
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("GiB") && stderr.contains("n_embd"), "{stderr}");
    assert!(!stdout.contains("\"prepare\"") && !stderr.contains("tokeniz"), "refused before the data: {stderr}");
    // a generous bound for a loaded CI machine; it takes well under a second here
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[test]
fn a_skipped_step_on_an_eval_and_save_boundary_still_evaluates_and_saves() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let o = difflab(home.path())
        .arg("train")
        .args(tiny_flags(&corpus, &out))
        .env("DIFFLAB_INJECT_NONFINITE", "grad@9") // step 9 is the 10th: eval and save fall on it
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let lines = json_lines(&stdout);
    assert!(lines.iter().any(|m| m["event"] == "evaluate" && m["step"] == 10), "{stdout}");
    assert!(out.join("checkpoint-10").is_dir());
}

#[test]
fn a_failed_save_ends_the_run_with_train_end_failed() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let o = difflab(home.path())
        .arg("train")
        .args(tiny_flags(&corpus, &out))
        .env("DIFFLAB_FAULT", "enospc_during_save:1")
        .output()
        .unwrap();
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let end = json_lines(&metrics).into_iter().rfind(|m| m["event"] == "train_end").expect("a train_end");
    assert_eq!(end["status"], "failed");
    assert!(end["error"].as_str().unwrap().contains("No space left"), "{end}");
    // the OS's text once, not twice
    assert_eq!(stderr.matches("No space left on device").count(), 1, "{stderr}");
}

/// Bad input the checks used to let through: each is refused with exit 2 and a message naming it.
#[test]
fn input_gaps_are_refused_with_exit_2() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let corpus = tiny_corpus(h);
    let base = tiny_flags(&corpus, &h.join("run"));
    let file = h.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let preset = |name: &str, body: &str| {
        let p = h.join(format!("{name}.yaml"));
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(&base, &["--output_dir", ""]), "output_dir"),
        (with(&base, &["--output_dir", &file.display().to_string()]), "is a file"),
        (with(&base, &["--n_layer", "-1"]), "n_layer"),
        (with(&base, &["--eval_max_blocks", "0"]), "eval_max_blocks"),
        (with(&base, &["--ddp_bucket_cap_mb", "0"]), "set ddp_bucket_cap_mb to 1 or more"),
        (
            vec!["--preset".into(), preset("dup", "n_layer: 2\nn_embd: 64\nn_layer: 3\n")],
            "line 3 column 1: duplicate mapping key: n_layer; keep one",
        ),
        (vec!["--preset".into(), preset("empty", "")], "sets no run settings"),
        (vec!["--preset".into(), preset("nan", "learning_rate: .nan\n")], "finite"),
        (vec!["--preset".into(), preset("orphan", "extends: no-such-preset\n")], "orphan.yaml"),
    ];
    for (args, needle) in cases {
        let o = train(h, &args);
        let (_, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?} should name {needle:?}: {stderr}");
    }
}

#[test]
fn a_damaged_trainer_state_is_named_as_such() {
    let home = tempfile::tempdir().unwrap();
    let (out, flags) = finished_run(home.path(), "run");
    let ckpt = out.join("checkpoint-20");
    // neither manifest nor run settings, as in a checkpoint of an early version (a difflab
    // folder without its manifest is refused first): the state file's own check speaks
    std::fs::remove_file(ckpt.join("checksums.json")).unwrap();
    std::fs::remove_file(ckpt.join("difflab_config.json")).unwrap();
    std::fs::write(ckpt.join("trainer_state.json"), b"{ not json").unwrap();
    let o = train(
        home.path(),
        &with(&flags, &["--resume_from_checkpoint", &ckpt.display().to_string(), "--max_steps", "30"]),
    );
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a valid trainer_state.json"), "{stderr}");
}

#[test]
fn watch_without_a_terminal_says_so_with_exit_2() {
    let home = tempfile::tempdir().unwrap();
    let (out, _) = finished_run(home.path(), "run");
    let o = difflab(home.path()).args(["watch", &out.display().to_string()]).output().unwrap();
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not one"), "{stderr}");
}
