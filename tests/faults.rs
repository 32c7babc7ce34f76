//! The second fault campaign's findings, one test for each numbered item (item 4, the progress
//! window carried across a stop, is `train.rs`'s SIGTERM resume test). Each failed on the code
//! before the fix.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

fn run(home: &Path, args: &[String]) -> Output {
    difflab(home).args(args).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn with(base: &[String], extra: &[&str]) -> Vec<String> {
    base.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect()
}

/// Tiny runs: 12 steps, evaluations at 6 and 12, checkpoints at 6 and 12.
fn short(corpus: &Path, out: &Path) -> Vec<String> {
    with(
        &tiny_flags(corpus, out),
        &["--max_steps", "12", "--eval_steps", "6", "--save_steps", "6", "--logging_steps", "3"],
    )
}

/// Cuts `metrics.jsonl` in the middle of its last `evaluate` line, as a kill during that write
/// leaves it (nothing after it was written either).
fn tear_last_eval(run_dir: &Path) {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let at = text.rfind("{\"event\":\"evaluate\"").unwrap();
    std::fs::write(&path, &text[..at + 30]).unwrap();
}

/// The last evaluation a run's saved state records: `(step, eval_loss)`.
fn saved_eval(run_dir: &Path) -> (u64, f64) {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("trainer_state.json")).unwrap()).unwrap();
    let last = state["log_history"].as_array().unwrap().last().unwrap().clone();
    (last["step"].as_u64().unwrap(), last["eval_loss"].as_f64().unwrap())
}

// ---------------------------------------------------------------- silently wrong numbers

/// 1. A finished study run whose log lost the tail of its last `evaluate` line: the rerun
///    reports the run's true final eval loss (from its saved state, said so), not the one
///    before it; `compare` agrees; and the resume that finds nothing left to train ends with
///    the state's eval loss, not null.
#[test]
fn a_study_rerun_after_a_torn_log_reports_the_runs_true_final_eval() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let root = home.path().join("st");
    let study = |h: &Path| {
        let mut a = args(&["study", "--arm", "research=false", "--arm", "research=true", "--seeds", "1"]);
        a.extend(short(&corpus, &root));
        run(h, &a)
    };
    let o = study(home.path());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let arm = root.join("research=true").join("seed-42");
    let (step, truth) = saved_eval(&arm);
    assert_eq!(step, 12);
    tear_last_eval(&arm);
    let o = study(home.path());
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("study.json")).unwrap()).unwrap();
    let got = summary["runs"].as_array().unwrap().iter().find(|r| r["arm"] == "research=true").unwrap();
    assert_eq!(got["final_eval_loss"].as_f64(), Some(truth), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("{truth:.4}")), "{stdout}");
    // the resume that ran nothing ends with the state's figures
    let log = std::fs::read_to_string(arm.join("metrics.jsonl")).unwrap();
    let end: serde_json::Value = serde_json::from_str(log.lines().rfind(|l| l.contains("train_end")).unwrap()).unwrap();
    assert_eq!(end["eval_loss"].as_f64(), Some(truth), "{end}");
    // compare reads the same record, and says where a log disagreed
    tear_last_eval(&arm);
    let png = home.path().join("c1.png").display().to_string();
    let o = run(home.path(), &args(&["compare", &arm.display().to_string(), "--png", &png]));
    let (stdout, _) = text(&o);
    assert!(stdout.contains(&format!("{truth:.4}")) && stdout.contains("taken from"), "{stdout}");
}

/// 2. A sweep rerun with other settings is refused before anything runs (exit 2), the folder
///    byte for byte as it was; a summary that cannot be written is said, with exit 1.
#[test]
fn a_sweep_rerun_with_other_settings_is_refused_and_a_failed_summary_is_said() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let root = home.path().join("sw");
    let sweep = |extra: &[&str]| {
        // the list last: a later --learning_rate would win over it
        let mut a = args(&["sweep"]);
        a.extend(with(&short(&corpus, &root), extra));
        a.extend(args(&["--learning_rate", "3e-3,1e-3"]));
        run(home.path(), &a)
    };
    let o = sweep(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let before = snapshot(&root);
    let o = sweep(&["--max_steps", "8"]);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("other settings") && stderr.contains("max_steps"), "{stderr}");
    assert_eq!(snapshot(&root), before, "the folder as it was");
    // a summary.json that cannot be replaced (a folder in its place): said, exit 1
    let fresh = home.path().join("sw2");
    std::fs::create_dir_all(fresh.join("summary.json")).unwrap();
    let mut a = args(&["sweep"]);
    a.extend(with(&short(&corpus, &fresh), &["--max_steps", "2", "--learning_rate", "3e-3,1e-3"]));
    let o = run(home.path(), &a);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write") && stderr.contains("summary.json"), "{stderr}");
    assert!(!stdout.contains("summary: "), "no path printed for a summary not written: {stdout}");
}

/// 3. A sweep trial whose final `evaluate` line is torn keeps its steps and its eval (from its
///    saved state), instead of "completed after 0 steps" with none.
#[test]
fn a_sweep_trial_with_a_torn_final_eval_keeps_its_numbers() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let root = home.path().join("sw");
    let mut a = args(&["sweep"]);
    a.extend(with(&short(&corpus, &root), &["--learning_rate", "3e-3,1e-3"]));
    let o = run(home.path(), &a);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let trial = root.join("learning_rate-0.003");
    let (_, truth) = saved_eval(&trial);
    tear_last_eval(&trial);
    let o = run(home.path(), &a);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("after 0 steps"), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("summary.json")).unwrap()).unwrap();
    let t = summary["trials"].as_array().unwrap().iter().find(|t| t["label"] == "learning_rate-0.003").unwrap();
    assert_eq!((t["steps"].as_u64(), t["eval_loss"].as_f64()), (Some(12), Some(truth)), "{t}");
}

// ---------------------------------------------------------------- outside the run, and hangs

/// 5. and 6. A run folder whose `control/` or `metrics.jsonl` is a link is refused (exit 2,
///    naming the link), and what the link points at is left alone.
#[test]
fn links_in_a_run_folder_are_refused_and_their_targets_left_alone() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let outside = home.path().join("precious");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("notes.json"), b"{\"mine\": true}").unwrap();
    let out = home.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("control")).unwrap();
    let o = run(
        home.path(),
        &with(&args(&["train"]), &short(&corpus, &out).iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("symbolic link") && stderr.contains("control"), "{stderr}");
    assert!(outside.join("notes.json").is_file(), "the link's target is untouched");
    // a finished run whose metrics.jsonl was replaced by a link: its resume is refused
    let done = home.path().join("done");
    let o = run(
        home.path(),
        &with(&args(&["train"]), &short(&corpus, &done).iter().map(String::as_str).collect::<Vec<_>>()),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let log = outside.join("log.jsonl");
    std::fs::write(&log, b"outside\n").unwrap();
    std::fs::remove_file(done.join("metrics.jsonl")).unwrap();
    std::os::unix::fs::symlink(&log, done.join("metrics.jsonl")).unwrap();
    let ckpt = done.join("checkpoint-6").display().to_string();
    let o = run(home.path(), &args(&["train", "--resume_from_checkpoint", &ckpt]));
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("symbolic link") && stderr.contains("metrics.jsonl"), "{stderr}");
    assert_eq!(std::fs::read(&log).unwrap(), b"outside\n");
}

/// 7. and 8. A FIFO and a 100 MB file in `control/` neither hang nor get read whole, and a
///    control scaling the LR by -1 or 1e300 is refused; each refusal is in the run's log.
#[test]
fn the_control_inbox_reads_only_small_regular_files_and_documented_factors() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let flags = with(&tiny_flags(&corpus, &out), &["--max_steps", "400", "--n_embd", "128", "--save_steps", "0"]);
    let mut child = Reaped(
        difflab(home.path())
            .arg("train")
            .args(&flags)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    use std::io::{BufRead, BufReader};
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    while !lines.next().unwrap().unwrap().contains("\"progress\"") {}
    let control = out.join("control");
    let fifo = control.join("a-fifo.json");
    let made = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // Safety: mkfifo(3) on a path this test owns.
    assert_eq!(unsafe { libc::mkfifo(made.as_ptr(), 0o644) }, 0);
    std::fs::File::create(control.join("b-big.json")).unwrap().set_len(100 << 20).unwrap();
    std::fs::write(control.join("c-neg.json"), br#"{"control":"scale_lr","factor":-1.0,"origin":"api"}"#).unwrap();
    std::fs::write(control.join("d-huge.json"), br#"{"control":"scale_lr","factor":1e300,"origin":"api"}"#).unwrap();
    std::fs::write(control.join("e-what.json"), br#"{"control":"explode","origin":"api"}"#).unwrap();
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).count());
    assert_eq!(child.wait_within(Duration::from_secs(90)).code(), Some(0), "the run ended: no read blocked it");
    drain.join().unwrap();
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    for (name, why) in [
        ("a-fifo.json", "not a regular file"),
        ("b-big.json", "more than a control's"),
        ("e-what.json", "not a control"),
    ] {
        assert!(log.lines().any(|l| l.contains("refused") && l.contains(name) && l.contains(why)), "{name}: {log}");
    }
    assert_eq!(log.matches("scale_lr by").count(), 2, "both factors refused in the log");
    let events = json_lines(&log);
    assert!(events.iter().all(|e| e["event"] != "control"), "no control was applied");
    assert!(events.iter().filter(|e| e["event"] == "progress").all(|e| e["learning_rate"].as_f64().unwrap() >= 0.0));
    assert_eq!(std::fs::read_dir(&control).map(|d| d.count()).unwrap_or(0), 0, "every file removed");
}

/// 9. `extends:` loops by path are refused at once (they used to spin at 100% CPU).
#[test]
fn extends_cycles_by_path_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("p");
    std::fs::create_dir_all(&dir).unwrap();
    let me = dir.join("self.yaml");
    std::fs::write(&me, format!("extends: {}\nmax_steps: 3\n", me.display())).unwrap();
    let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
    std::fs::write(&a, format!("extends: {}\nmax_steps: 3\n", b.display())).unwrap();
    // the same file by another spelling of its path
    std::fs::write(&b, format!("extends: {}/../p/a.yaml\nseed: 1\n", dir.display())).unwrap();
    for preset in [&me, &a] {
        let mut child = Reaped(
            difflab(home.path())
                .args(["presets", &preset.display().to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        assert_eq!(child.wait_within(Duration::from_secs(20)).code(), Some(2));
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(stderr.contains("cycle"), "{stderr}");
    }
}

// ---------------------------------------------------------------- inputs and messages

/// 10. A run refused after its folder was claimed (too big, no such dataset) leaves no run
///     behind: the rerun with the input fixed starts instead of "already holds a run".
#[test]
fn a_refused_run_leaves_no_folder_to_refuse_the_fixed_one() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let too_big = with(&short(&corpus, &out), &["--n_embd", "16384", "--n_layer", "64", "--n_head", "16"]);
    let o = run(home.path(), &with(&args(&["train"]), &too_big.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o).1);
    let missing = with(&short(&corpus, &out), &["--dataset", "no-such-corpus.txt"]);
    let o = run(home.path(), &with(&args(&["train"]), &missing.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o).1);
    assert!(!out.join("metrics.jsonl").exists(), "nothing written");
    let o = run(
        home.path(),
        &with(&args(&["train"]), &short(&corpus, &out).iter().map(String::as_str).collect::<Vec<_>>()),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
}

/// 11. Each bad input gets one message that names what was given and the fix, exit 2.
#[test]
fn bad_inputs_are_named_as_given() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run").display().to_string();
    let data = corpus.display().to_string();
    let refused = |a: &[&str], wants: &[&str], never: &[&str]| {
        let o = run(home.path(), &args(a));
        let (_, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{a:?}: {stderr}");
        for w in wants {
            assert!(stderr.contains(w), "{a:?}: wanted {w:?} in {stderr}");
        }
        for n in never {
            assert!(!stderr.contains(n), "{a:?}: {n:?} should not be in {stderr}");
        }
        stderr
    };
    let sweep = ["sweep", "--preset", "demo", "--output_dir", &out];
    refused(&[&sweep[..], &["--learning_rate", "1e-3,,3e-4"]].concat(), &["\"1e-3,,3e-4\"", "empty"], &[]);
    refused(&[&sweep[..], &["--learning_rate", "1e-3,1e-3"]].concat(), &["given twice"], &[]);
    refused(&["study", "--preset", "demo", "--arm", "", "--arm", "research=true"], &["--arm \"\"", "empty"], &[]);
    refused(&["train", "--preset", "demo", "--n_head", "5"], &["command line", "n_head = 5"], &[]);
    refused(&["train", "--preset", "demo", "--micro_batch_size", "5"], &["command line", "micro_batch_size = 5"], &[]);
    let stderr = refused(&["train", "--preset", "/etc/passwd"], &["/etc/passwd", "not a mapping"], &["root:"]);
    assert!(stderr.len() < 400, "{stderr}");
    refused(&["train", "--preset", "dmeo"], &["did you mean `demo`"], &[]);
    let yaml = home.path().join("typos.yaml");
    std::fs::write(&yaml, "extends: demo\nlearning_rte: 1e-3\nmax_stepz: 3\n").unwrap();
    refused(&["train", "--preset", &yaml.display().to_string()], &["learning_rte", "max_stepz"], &[]);
    std::fs::write(&yaml, "extends: demo\n: :\n").unwrap();
    refused(&["train", "--preset", &yaml.display().to_string()], &["typos.yaml"], &["Option<"]);
    refused(&["train", "--preset", "demo", "--output_dir", "/sys/difflab-test-run"], &["cannot be written"], &[]);
    // a finished run, its files then spoiled one at a time
    let o = run(
        home.path(),
        &with(&args(&["train"]), &short(&corpus, Path::new(&out)).iter().map(String::as_str).collect::<Vec<_>>()),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let ckpt = Path::new(&out).join("checkpoint-12");
    refused(
        &["generate", "--checkpoint", &out, "--temperature", "-1"],
        &["--temperature -1"],
        &["unexpected argument"],
    );
    refused(&["generate", "--checkpoint", &out, "--seed", "-5"], &["--seed", "\"-5\""], &["unexpected argument"]);
    refused(&["generate", "--checkpoint", &out, "--max_new_tokens", "1000000"], &["at most 100000"], &[]);
    refused(&["eval", "--checkpoint", &format!("{out}/nope")], &["no such file or folder"], &[]);
    let killed = home.path().join("killed");
    std::fs::create_dir_all(&killed).unwrap();
    copy_dir(&ckpt, &killed.join("checkpoint-12"));
    refused(&["eval", "--checkpoint", &killed.display().to_string()], &["did not finish", "checkpoint-12"], &[]);
    std::fs::write(ckpt.join("checksums.json"), b"{not json").unwrap();
    refused(&["eval", "--checkpoint", &ckpt.display().to_string()], &["checksums.json"], &["safetensors"]);
    std::fs::remove_file(ckpt.join("checksums.json")).unwrap();
    refused(&["eval", "--checkpoint", &ckpt.display().to_string()], &["checksums.json is missing"], &[]);
    // a damaged tokenizer.json in the Hugging Face cache is named
    let hub = home.path().join("hf").join("hub");
    fake_hub_repo(
        &hub,
        "models--openai-community--gpt2",
        "607a30d783dfa663caf39e06633721c8d4cfcd7e",
        &[("tokenizer.json", b"{broken".to_vec())],
    );
    refused(
        &[
            "train",
            "--dataset",
            &data,
            "--tokenizer",
            "gpt2",
            "--output_dir",
            &format!("{out}-gpt2"),
            "--max_steps",
            "1",
        ],
        &["tokenizer.json", "delete that file"],
        &[],
    );
    // offline by a hub that cannot be reached (no HF_HUB_OFFLINE): every missing file, one message
    let o = difflab(home.path())
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", home.path().join("empty-hf"))
        .args(["train", "--preset", "sanity-baseline", "--output_dir", &format!("{out}-sanity")])
        .output()
        .unwrap();
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot be reached") && stderr.contains("tokenizer.json") && stderr.contains("validation"),
        "{stderr}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// 12. A second study into a folder in use is refused at once; `compare` calls a killed run
///     interrupted; leftovers of killed writes are removed when a run next takes its folder.
#[test]
fn a_study_in_use_compare_of_a_killed_run_and_leftover_temporaries() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let root = home.path().join("st");
    let study_args = |steps: &str| {
        let mut a = args(&["study", "--arm", "research=false", "--arm", "research=true", "--seeds", "1"]);
        a.extend(with(&short(&corpus, &root), &["--max_steps", steps, "--n_embd", "128"]));
        a
    };
    let first = Reaped(
        difflab(home.path())
            .args(study_args("120"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !root.join("research=false").join("seed-42").join("metrics.jsonl").exists() {
        assert!(Instant::now() < deadline, "the first study started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = run(home.path(), &study_args("120"));
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("in use") && stderr.contains(&first.0.id().to_string()), "{stderr}");
    // kill the first: its running run is interrupted, as compare says
    let mut first = first;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    // the run that was training when the study died: the one whose log has no end
    let killed = ["research=false", "research=true"]
        .iter()
        .map(|a| root.join(a).join("seed-42"))
        .find(|d| std::fs::read_to_string(d.join("metrics.jsonl")).is_ok_and(|l| !l.contains("train_end")))
        .expect("a run was cut short");
    let png = home.path().join("c2.png").display().to_string();
    let o = run(home.path(), &args(&["compare", &killed.display().to_string(), "--png", &png]));
    let (stdout, _) = text(&o);
    assert!(stdout.contains("interrupted") && !stdout.contains("running"), "{stdout}");
    // temporary files of killed writes, in the run folder and the cache, are cleared
    let dead = format!(".model.safetensors.tmp-{}", 4_000_000);
    std::fs::write(killed.join(&dead), b"half").unwrap();
    let cache = home.path().join("cache");
    std::fs::write(cache.join(".throughput.json.tmp-4000000"), b"half").unwrap();
    let o = run(home.path(), &study_args("120"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    assert!(!killed.join(&dead).exists() && !cache.join(".throughput.json.tmp-4000000").exists());
}
