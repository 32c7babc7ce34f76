//! The trainer end to end: markers and metrics, evaluation of saved models, exact resume,
//! controls through the channel API, non-finite steps, crash and signal safety.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use difflab::commands::cli::{parse, Invocation};
use difflab::events::{Control, ControlMsg, ControlOrigin, Event};
use difflab::model::hf::load_pretrained;
use difflab::train::{self, checkpoint, Injection, RunSpec, TrainError};

fn run_cli(home: &Path, args: &[String]) -> (i32, String, String) {
    let out = difflab(home).arg("train").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn spec_from(flags: &[String], cache: &Path) -> RunSpec {
    let args: Vec<String> = ["difflab".to_string(), "train".into()].into_iter().chain(flags.iter().cloned()).collect();
    let Invocation::Train(run) = parse(args).unwrap() else { panic!("train") };
    let resolved = run.resolve().unwrap();
    RunSpec {
        config: resolved.config,
        preset: None,
        cache_dir: cache.to_path_buf(),
        inject_nonfinite: vec![],
        world: Default::default(),
    }
}

fn flags_with(base: &[String], extra: &[&str]) -> Vec<String> {
    base.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect()
}

#[test]
fn markers_and_metrics_are_json_lines_as_designed() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let (code, stdout, stderr) = run_cli(home.path(), &tiny_flags(&corpus, &out));
    assert_eq!(code, 0, "{stderr}");
    let markers = json_lines(&stdout);
    let kinds: Vec<&str> = markers.iter().map(|m| m["event"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"train_begin"));
    assert_eq!(kinds.last(), Some(&"train_end"));
    assert!(kinds.iter().all(|k| ["train_begin", "progress", "evaluate", "train_end"].contains(k)), "{kinds:?}");
    let progress: Vec<_> = markers.iter().filter(|m| m["event"] == "progress").collect();
    assert_eq!(progress.len(), 20, "logging_steps 1");
    for p in &progress {
        for key in [
            "step",
            "epoch",
            "loss",
            "learning_rate",
            "grad_norm",
            "tokens_per_second",
            "diff_norm_mean",
            "diff_norm_std",
            "diff_norm_min",
            "diff_norm_max",
        ] {
            assert!(p[key].is_number(), "progress.{key}: {p}");
        }
    }
    let evals: Vec<_> = markers.iter().filter(|m| m["event"] == "evaluate").collect();
    assert_eq!(
        evals.iter().map(|e| e["step"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![10, 20],
        "every eval_steps and at the end"
    );
    for e in &evals {
        let (loss, ppl) = (e["eval_loss"].as_f64().unwrap(), e["perplexity"].as_f64().unwrap());
        assert!((ppl - loss.exp()).abs() < 1e-9 * ppl);
    }
    let begin = &markers[0];
    assert_eq!(begin["config"]["n_embd"], 32);
    assert!(begin["num_parameters"].as_u64().unwrap() > 0);
    let end = markers.last().unwrap();
    assert_eq!(end["status"], "completed");
    // metrics.jsonl: every line parses; markers plus checkpoints, in order
    let metrics = json_lines(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap());
    let logged: Vec<&str> = metrics.iter().map(|m| m["event"].as_str().unwrap()).collect();
    assert_eq!(logged.iter().filter(|k| **k == "progress").count(), 20);
    assert_eq!(logged.iter().filter(|k| **k == "checkpoint").count(), 2, "{logged:?}");
    // the loss falls on this tiny corpus
    let first = progress[0]["loss"].as_f64().unwrap();
    let last = progress[19]["loss"].as_f64().unwrap();
    assert!(last < first - 1.0, "loss {first} -> {last}");
    // the final model is in output_dir, HF layout, with its tokenizer
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // baselines carry no diff-norm keys
    let base_out = home.path().join("base");
    let flags = flags_with(&tiny_flags(&corpus, &base_out), &["--research", "false", "--max_steps", "2"]);
    let (code, stdout, _) = run_cli(home.path(), &flags);
    assert_eq!(code, 0);
    assert!(json_lines(&stdout).iter().filter(|m| m["event"] == "progress").all(|p| p.get("diff_norm_mean").is_none()));
}

#[test]
fn eval_only_reads_checkpoints_final_dirs_and_hf_gpt2_dirs() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let (code, stdout, stderr) = run_cli(home.path(), &tiny_flags(&corpus, &out));
    assert_eq!(code, 0, "{stderr}");
    let final_eval = json_lines(&stdout).into_iter().rfind(|m| m["event"] == "evaluate").unwrap();
    for dir in [out.join("checkpoint-20"), out.clone()] {
        let flags = flags_with(
            &tiny_flags(&corpus, &out),
            &["--eval_only", "true", "--checkpoint", &dir.display().to_string()],
        );
        let (code, stdout, stderr) = run_cli(home.path(), &flags);
        assert_eq!(code, 0, "{stderr}");
        let e = &json_lines(&stdout)[0];
        assert_eq!(e["event"], "evaluate");
        let diff = (e["eval_loss"].as_f64().unwrap() - final_eval["eval_loss"].as_f64().unwrap()).abs();
        assert!(diff < 1e-6, "{}: the same model, the same loss", dir.display());
    }
    // the golden GPT-2 directory (vocab 512, 32 positions) with the byte tokenizer
    let gpt2 = golden_dir("rope0_diff0").join("model");
    let out = difflab(home.path())
        .args([
            "eval",
            "--checkpoint",
            &gpt2.display().to_string(),
            "--dataset",
            &corpus.display().to_string(),
            "--tokenizer",
            "byte",
            "--block_size",
            "32",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let e = &json_lines(&String::from_utf8_lossy(&out.stdout))[0];
    let loss = e["eval_loss"].as_f64().unwrap();
    assert!((loss - 512f64.ln()).abs() < 0.5, "an untrained 512-vocab model is near ln(512): {loss}");
    // a directory without a model is bad input
    let out = difflab(home.path()).args(["eval", "--checkpoint", &home.path().display().to_string()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn losses(events: &[Event]) -> Vec<(u64, f64)> {
    events.iter().filter_map(|e| if let Event::Progress(p) = e { Some((p.step, p.loss)) } else { None }).collect()
}

#[test]
fn resuming_gives_the_losses_of_an_uninterrupted_run() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let cache = home.path().join("cache");
    let out = home.path().join("full");
    let full = train::spawn(spec_from(&tiny_flags(&corpus, &out), &cache));
    let full_events: Vec<Event> = full.events.iter().collect();
    full.join().unwrap();
    let resumed_out = home.path().join("resumed");
    std::fs::create_dir_all(&resumed_out).unwrap();
    let from = out.join("checkpoint-10").display().to_string();
    let flags = flags_with(&tiny_flags(&corpus, &resumed_out), &["--resume_from_checkpoint", &from]);
    let resumed = train::spawn(spec_from(&flags, &cache));
    let resumed_events: Vec<Event> = resumed.events.iter().collect();
    resumed.join().unwrap();
    let a: Vec<_> = losses(&full_events).into_iter().filter(|(s, _)| *s > 10).collect();
    let b = losses(&resumed_events);
    assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), b.iter().map(|x| x.0).collect::<Vec<_>>());
    assert_eq!(b.len(), 10);
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!(((x - y) / x).abs() < 1e-5, "step {s}: {x} uninterrupted vs {y} resumed");
    }
}

#[test]
fn controls_pause_checkpoint_scale_the_lr_and_stop() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let cache = home.path().join("cache");
    let out = home.path().join("run");
    let flags = flags_with(
        &tiny_flags(&corpus, &out),
        &["--max_steps", "200", "--lr_scheduler_type", "constant", "--save_steps", "0"],
    );
    let h = train::spawn(spec_from(&flags, &cache));
    let send = |c: Control| h.controls.send(ControlMsg { control: c, origin: ControlOrigin::Api }).unwrap();
    // queued before the first step: applied at step 0
    send(Control::Pause);
    let mut events = vec![];
    let wait_for = |events: &mut Vec<Event>, pred: &dyn Fn(&Event) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let e = h.events.recv_timeout(deadline - Instant::now()).expect("event in time");
            let hit = pred(&e);
            events.push(e);
            if hit {
                return;
            }
        }
    };
    wait_for(&mut events, &|e| matches!(e, Event::Control(c) if c.action == "pause"));
    let paused_at = Instant::now();
    // while paused: no progress for a while
    std::thread::sleep(Duration::from_millis(1500));
    while let Ok(e) = h.events.try_recv() {
        assert!(!matches!(e, Event::Progress(_)), "no progress while paused");
        events.push(e);
    }
    // a checkpoint while paused, then a lower LR, then resume
    send(Control::CheckpointNow);
    wait_for(&mut events, &|e| matches!(e, Event::Checkpoint(c) if c.reason == "control"));
    send(Control::ScaleLr { factor: 0.1 });
    send(Control::Resume);
    wait_for(&mut events, &|e| matches!(e, Event::Progress(p) if p.step >= 3));
    let paused_for = paused_at.elapsed();
    let lrs: Vec<f64> =
        events.iter().filter_map(|e| if let Event::Progress(p) = e { Some(p.learning_rate) } else { None }).collect();
    assert!(lrs.iter().all(|lr| (lr - 3e-4).abs() < 1e-12), "LR = 0.1 x schedule (3e-3): {lrs:?}");
    send(Control::CheckpointNow);
    wait_for(&mut events, &|e| matches!(e, Event::Checkpoint(c) if c.reason == "control" && c.step > 0));
    send(Control::Stop { save: true });
    wait_for(&mut events, &|e| matches!(e, Event::TrainEnd(_)));
    let end = match events.last() {
        Some(Event::TrainEnd(e)) => e.clone(),
        _ => unreachable!(),
    };
    h.join().unwrap();
    assert_eq!(end.status, "stopped");
    assert!(
        end.train_runtime < paused_for.as_secs_f64() - 1.0,
        "paused time excluded: runtime {} vs paused {:?}",
        end.train_runtime,
        paused_for
    );
    let actions: Vec<String> = events
        .iter()
        .filter_map(|e| if let Event::Control(c) = e { Some(c.action.to_string()) } else { None })
        .collect();
    assert_eq!(actions, vec!["pause", "checkpoint", "scale_lr", "resume", "checkpoint", "stop_and_save"]);
    assert!(
        events.iter().any(|e| matches!(e, Event::Checkpoint(c) if c.reason == "stop")),
        "stop and save wrote a checkpoint"
    );
    // the LR scale persists in the checkpoint and through resume
    let last = checkpoint::list(&out).pop().unwrap().1;
    let state = checkpoint::load(&last, &candle_core::Device::Cpu).unwrap().state;
    assert!((state.lr_scale - 0.1).abs() < 1e-12);
    let flags = flags_with(
        &flags,
        &["--resume_from_checkpoint", &last.display().to_string(), "--max_steps", &(state.global_step + 2).to_string()],
    );
    let h = train::spawn(spec_from(&flags, &cache));
    let resumed: Vec<Event> = h.events.iter().collect();
    h.join().unwrap();
    let lrs: Vec<f64> =
        resumed.iter().filter_map(|e| if let Event::Progress(p) = e { Some(p.learning_rate) } else { None }).collect();
    assert_eq!(lrs.len(), 2);
    assert!(lrs.iter().all(|lr| (lr - 3e-4).abs() < 1e-12), "{lrs:?}");

    // stop without saving: no final checkpoint, no final model
    let out2 = home.path().join("nosave");
    let h = train::spawn(spec_from(&flags_with(&tiny_flags(&corpus, &out2), &["--save_steps", "0"]), &cache));
    h.controls.send(ControlMsg { control: Control::Stop { save: false }, origin: ControlOrigin::Api }).unwrap();
    let events: Vec<Event> = h.events.iter().collect();
    h.join().unwrap();
    assert!(!events.iter().any(|e| matches!(e, Event::Checkpoint(_))));
    assert!(!out2.join("model.safetensors").exists());
    assert!(matches!(events.last(), Some(Event::TrainEnd(e)) if e.status == "stopped"));
}

#[test]
fn non_finite_steps_are_skipped_and_a_run_of_them_stops_training() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let cache = home.path().join("cache");
    let out = home.path().join("run");
    let mut spec = spec_from(&tiny_flags(&corpus, &out), &cache);
    spec.inject_nonfinite = vec![(3, Injection::Loss), (7, Injection::Grad)];
    let h = train::spawn(spec);
    let events: Vec<Event> = h.events.iter().collect();
    let end = h.join().unwrap();
    let skipped: Vec<u64> =
        events.iter().filter_map(|e| if let Event::Skipped(s) = e { Some(s.step) } else { None }).collect();
    assert_eq!(skipped, vec![4, 8]);
    assert_eq!(end.skipped_steps, 2);
    assert_eq!(end.status, "completed");

    let out = home.path().join("diverged");
    let mut spec = spec_from(&tiny_flags(&corpus, &out), &cache);
    spec.inject_nonfinite = (5..12).map(|s| (s, Injection::Grad)).collect();
    let h = train::spawn(spec);
    let events: Vec<Event> = h.events.iter().collect();
    let err = h.join().unwrap_err();
    assert!(matches!(err, TrainError::Diverged { steps: 5, .. }), "{err}");
    assert!(err.to_string().contains("Lower the learning rate"), "{err}");
    assert!(matches!(events.last(), Some(Event::TrainEnd(e)) if e.status == "failed"));
    for (_, dir) in checkpoint::list(&out) {
        let (_, w) = load_pretrained(&dir, &candle_core::Device::Cpu).unwrap();
        assert!(w.values().all(|t| difflab::model::hf::all_finite(t).unwrap()), "{} holds NaN", dir.display());
    }
}

fn assert_run_dir_consistent(out: &Path) {
    for (_, dir) in checkpoint::list(out) {
        checkpoint::load(&dir, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{} does not load: {e}", dir.display()));
    }
    if let Ok(text) = std::fs::read_to_string(out.join("metrics.jsonl")) {
        json_lines(&text);
    }
}

#[test]
fn a_crash_during_a_save_leaves_the_previous_checkpoint_and_a_parseable_log() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let flags = flags_with(&tiny_flags(&corpus, &out), &["--save_steps", "5"]);
    // the second save aborts half-way
    let status = difflab(home.path())
        .arg("train")
        .args(&flags)
        .env("DIFFLAB_FAULT", "abort_during_save:2")
        .output()
        .unwrap()
        .status;
    assert!(!status.success());
    let saved: Vec<u64> = checkpoint::list(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(saved, vec![5], "the interrupted checkpoint-10 is not there under its real name");
    assert_run_dir_consistent(&out);
    // resuming from the latest continues to the end
    let (code, _, stderr) = run_cli(home.path(), &flags_with(&flags, &["--resume_from_checkpoint", "latest"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resuming from") && stderr.contains("checkpoint-5"), "{stderr}");

    // SIGKILL at random moments, repeatedly, while checkpoints are written every step
    let out = home.path().join("killed");
    let flags =
        flags_with(&tiny_flags(&corpus, &out), &["--save_steps", "1", "--save_total_limit", "2", "--max_steps", "60"]);
    let mut rng = 12345u64;
    for round in 0..6 {
        let mut args = flags.clone();
        if !checkpoint::list(&out).is_empty() {
            args.extend(["--resume_from_checkpoint".to_string(), "latest".to_string()]);
        }
        let mut child = difflab(home.path())
            .arg("train")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
        let delay = 300 + (rng >> 33) % 1500;
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        assert_run_dir_consistent(&out);
        let _ = round;
    }
    assert!(!checkpoint::list(&out).is_empty(), "some checkpoint survived the kills");
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_a_second_exits_at_once() {
    use std::io::{BufRead, BufReader};
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    for (signal, twice) in [("INT", false), ("TERM", false), ("INT", true)] {
        let out = home.path().join(format!("run-{signal}-{twice}"));
        let mut flags = flags_with(&tiny_flags(&corpus, &out), &["--max_steps", "100000", "--save_steps", "0"]);
        if twice {
            // slower steps, so the second signal lands while the first is still being honoured
            flags = flags_with(
                &flags,
                &["--n_embd", "256", "--n_layer", "3", "--batch_size", "32", "--micro_batch_size", "8"],
            );
        }
        let mut child = difflab(home.path())
            .arg("train")
            .args(&flags)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // wait until it is training
        loop {
            let line = lines.next().unwrap().unwrap();
            if line.contains("\"progress\"") {
                break;
            }
        }
        let kill = |sig: &str| {
            std::process::Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap()
        };
        kill(signal);
        if twice {
            // standard signals do not queue: two sent at once may arrive as one
            std::thread::sleep(Duration::from_millis(30));
            kill(signal);
        }
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().unwrap();
        if twice {
            assert_eq!(status.code(), Some(130), "a second Ctrl-C exits at once");
        } else {
            assert_eq!(status.code(), Some(0), "SIG{signal}: a clean stop");
            let end = json_lines(rest.last().unwrap()).pop().unwrap();
            assert_eq!(end["event"], "train_end");
            assert_eq!(end["status"], "stopped");
            let saved = checkpoint::list(&out);
            assert_eq!(saved.len(), 1, "a final checkpoint");
            assert!(out.join("model.safetensors").exists());
        }
        assert_run_dir_consistent(&out);
    }
}

/// The per-step losses a run's `metrics.jsonl` records, the last value per step (a resumed run
/// logs some steps twice), and its last `train_end`.
/// `(step, value)` pairs.
type Curve = Vec<(u64, f64)>;

fn logged(out: &Path) -> (Curve, Curve, serde_json::Value) {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let (mut loss, mut eval, mut end) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new(), None);
    for e in json_lines(&text) {
        let step = e["step"].as_u64().unwrap_or(0);
        match e["event"].as_str() {
            Some("progress") => drop(loss.insert(step, e["loss"].as_f64().unwrap())),
            Some("evaluate") => drop(eval.insert(step, e["eval_loss"].as_f64().unwrap())),
            Some("train_end") => end = Some(e),
            _ => {}
        }
    }
    (loss.into_iter().collect(), eval.into_iter().collect(), end.unwrap())
}

/// A run stopped by SIGTERM after its first checkpoint, resumed with `--resume_from_checkpoint
/// <the checkpoint the stop wrote>` and nothing else, continues the run as it was set up: its
/// learning rate, schedule, step limit and folder, and the losses of the unbroken run at every
/// step (the first marker after the stop averages the same steps), and the same end figures.
#[cfg(unix)]
#[test]
fn a_run_stopped_by_sigterm_resumes_from_its_checkpoint_alone_as_if_unbroken() {
    use std::io::{BufRead, BufReader};
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    // none of these is a default: a resume that fell back to defaults would show
    let settings = [
        "--max_steps",
        "60",
        "--logging_steps",
        "7",
        "--save_steps",
        "10",
        "--eval_steps",
        "20",
        "--learning_rate",
        "2e-3",
        "--lr_scheduler_type",
        "linear",
        "--warmup_steps",
        "5",
        // steps of some milliseconds, so the signal lands a step or two after it is sent
        "--n_embd",
        "128",
        "--n_layer",
        "2",
        "--block_size",
        "64",
        "--batch_size",
        "8",
    ];
    let (unbroken, broken) = (home.path().join("unbroken"), home.path().join("broken"));
    let o = difflab(home.path())
        .arg("train")
        .args(flags_with(&tiny_flags(&corpus, &unbroken), &settings))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let mut child = Reaped(
        difflab(home.path())
            .arg("train")
            .args(flags_with(&tiny_flags(&corpus, &broken), &settings))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // past the first checkpoint (step 10), then SIGTERM: a stop at the next step boundary
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    while !lines.next().unwrap().unwrap().contains("\"step\":14,") {}
    std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    let stopped = json_lines(rest.last().unwrap()).pop().unwrap();
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    let at = stopped["step"].as_u64().unwrap();
    assert!((12..60).contains(&at), "stopped at {at}");
    let ckpt = broken.join(format!("checkpoint-{at}"));
    assert!(ckpt.is_dir(), "the stop saved {}", ckpt.display());
    // the steps since the last marker travel in the checkpoint, so the next marker averages them
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["progress_window"]["steps"].as_u64(), Some(at % 7), "at {at}: {}", state["progress_window"]);

    // resumed with the checkpoint alone, from another working directory's point of view
    let o =
        difflab(home.path()).args(["train", "--resume_from_checkpoint", &ckpt.display().to_string()]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(&format!("resuming the run in {}", broken.display())), "{stderr}");
    let begin = json_lines(&stdout).into_iter().find(|m| m["event"] == "train_begin").unwrap();
    assert_eq!(begin["output_dir"], broken.display().to_string());
    assert_eq!((begin["start_step"].as_u64(), begin["total_steps"].as_u64()), (Some(at), Some(60)));
    assert_eq!(
        (begin["config"]["learning_rate"].as_f64(), begin["config"]["lr_scheduler_type"].as_str()),
        (Some(2e-3), Some("linear"))
    );

    let (want_loss, want_eval, want_end) = logged(&unbroken);
    let (got_loss, got_eval, got_end) = logged(&broken);
    assert_eq!(want_loss.iter().map(|p| p.0).collect::<Vec<_>>(), got_loss.iter().map(|p| p.0).collect::<Vec<_>>());
    assert_eq!(got_loss.len(), 9, "a marker every 7 steps, and at the end");
    for ((step, want), (_, got)) in want_loss.iter().zip(&got_loss) {
        assert!(((want - got) / want).abs() < 1e-5, "step {step}: {want} unbroken, {got} stopped and resumed");
    }
    // every evaluation of the unbroken run, and one more: the stop's own, at its step
    let got_eval: std::collections::BTreeMap<u64, f64> = got_eval.into_iter().collect();
    assert_eq!(got_eval.len(), want_eval.len() + 1, "{got_eval:?}");
    assert!(got_eval.contains_key(&at));
    for (step, want) in &want_eval {
        let got = got_eval[step];
        assert!(((want - got) / want).abs() < 1e-5, "eval at {step}: {want} unbroken, {got} resumed");
    }
    assert_eq!((got_end["step"].as_u64(), got_end["status"].as_str()), (Some(60), Some("completed")));
    // the end's train loss is the mean over all 60 steps in both
    let (want, got) = (want_end["train_loss"].as_f64().unwrap(), got_end["train_loss"].as_f64().unwrap());
    assert_eq!((want_end["train_loss_steps"].as_u64(), got_end["train_loss_steps"].as_u64()), (Some(60), Some(60)));
    assert!(((want - got) / want).abs() < 1e-5, "train loss {want} unbroken, {got} resumed");
    eprintln!(
        "stopped at step {at}; 9 markers and {} evaluations equal; train loss {want:.6} / {got:.6}",
        got_eval.len()
    );
}

/// The engine is chosen once and named in `train_begin` and the headless start line: the
/// written-out step by default on the CPU, autograd over the fused ops with dropout.
#[test]
fn the_run_names_its_engine() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    // two threads, two micro-batches a step: the written-out step runs them side by side
    for (dropout, engine) in [("0.0", "cpu-step, 2 micro-batches side by side"), ("0.1", "cpu-autograd")] {
        let out = home.path().join(format!("run-{dropout}"));
        let flags = flags_with(&tiny_flags(&corpus, &out), &["--max_steps", "2", "--dropout", dropout]);
        let o = difflab(home.path()).env("RAYON_NUM_THREADS", "2").arg("train").args(&flags).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.status.code(), Some(0), "{stderr}");
        let begin = json_lines(&stdout).into_iter().find(|m| m["event"] == "train_begin").unwrap();
        assert_eq!(begin["engine"], engine, "dropout {dropout}");
        assert!(stderr.contains(&format!("engine {engine}")), "the start line names the engine: {stderr}");
    }
}

/// A panic on the trainer thread is a failure (exit 1) with its message, not bad input (2).
#[test]
fn a_trainer_panic_exits_1() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let flags = flags_with(&tiny_flags(&corpus, &home.path().join("run")), &["--max_steps", "4"]);
    let out =
        difflab(home.path()).arg("train").args(&flags).env("DIFFLAB_INJECT_NONFINITE", "panic@1").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the trainer panicked") && stderr.contains("injected at step 1"), "{stderr}");
}

/// Micro-batches run side by side (a single-threaded worker each, their gradient sums added
/// at the end) train as one after another does: the same losses and weights within float
/// rounding, and `bench` says which path it took.
#[test]
fn micro_batches_side_by_side_train_as_one_after_another() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let run = |threads: &str, out: &std::path::Path| {
        let mut flags = tiny_flags(&corpus, out);
        flags.extend(
            ["--max_steps", "12", "--eval_steps", "6", "--save_steps", "0", "--batch_size", "8"].map(String::from),
        );
        let o = difflab(home.path()).env("RAYON_NUM_THREADS", threads).arg("train").args(&flags).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        json_lines(&text)
            .into_iter()
            .filter_map(|m| m["loss"].as_f64().or(m["eval_loss"].as_f64()).map(|l| (m["step"].as_u64().unwrap(), l)))
            .collect::<Vec<_>>()
    };
    let (one, two) = (run("1", &home.path().join("one")), run("2", &home.path().join("two")));
    assert_eq!(one.len(), two.len());
    assert!(one.len() >= 14, "{one:?}");
    for ((sa, la), (sb, lb)) in one.iter().zip(&two) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() <= 1e-5 * la.abs(), "step {sa}: {la} one at a time vs {lb} side by side");
    }
    let a =
        candle_core::safetensors::load(home.path().join("one/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let b =
        candle_core::safetensors::load(home.path().join("two/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    for (name, x) in &a {
        let diff = (x - &b[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5, "{name}: max |diff| {diff}");
    }
    let bench = |threads: &str| {
        let o = difflab(home.path())
            .env("RAYON_NUM_THREADS", threads)
            .args(["bench", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32"])
            .args(["--vocab_size", "64", "--micro_batch_size", "2", "--batch_size", "8", "--steps", "4"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["micro_batches_side_by_side"].as_u64()
    };
    assert_eq!((bench("1"), bench("2")), (Some(1), Some(2)));
}

/// HF's EarlyStoppingCallback: a run whose eval loss stops improving by more than the
/// threshold for `patience` evaluations in a row stops there, with a checkpoint, and says so;
/// the same run without patience trains to the end.
#[test]
fn a_plateau_stops_the_run_after_its_patience_with_a_checkpoint() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    // a learning rate too small to move the loss: every evaluation after the first is a plateau
    let flat = [
        "--learning_rate",
        "1e-9",
        "--lr_scheduler_type",
        "constant",
        "--max_steps",
        "20",
        "--eval_steps",
        "2",
        "--save_steps",
        "0",
    ];
    let out = home.path().join("patient");
    let (code, stdout, stderr) = run_cli(
        home.path(),
        &flags_with(
            &tiny_flags(&corpus, &out),
            &[&flat[..], &["--early_stopping_patience", "2", "--early_stopping_threshold", "0.01"]].concat(),
        ),
    );
    assert_eq!(code, 0, "{stderr}");
    let lines = json_lines(&stdout);
    let end = lines.iter().find(|m| m["event"] == "train_end").unwrap();
    // evaluations at 2 (the best), 4 and 6 (no improvement twice)
    assert_eq!(end["status"], "early_stopped", "{end}");
    assert_eq!(end["step"], 6, "{end}");
    assert!(out.join("checkpoint-6/model.safetensors").exists(), "a checkpoint at the stop");
    assert!(stderr.contains("early stopping") && stderr.contains("stopping at step 6"), "{stderr}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("checkpoint-6/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["evals_without_improvement"], 2, "{state}");

    let out = home.path().join("without");
    let (code, stdout, stderr) = run_cli(home.path(), &flags_with(&tiny_flags(&corpus, &out), &flat));
    assert_eq!(code, 0, "{stderr}");
    let end = json_lines(&stdout).into_iter().find(|m| m["event"] == "train_end").unwrap();
    assert_eq!((end["status"].as_str(), end["step"].as_u64()), (Some("completed"), Some(20)), "{end}");
}

/// `--dtype bf16` on the CPU (bf16 matmuls on AVX512-BF16, the rest f32): the start line and
/// `train_begin` name the path, the run learns as the f32 run does (eval loss within 0.02 nats
/// after the same 40 steps) while its losses do differ (the matmuls really round), `eval` of
/// the run computes in bf16 too (from its saved settings) and gets the run's loss, and with
/// dropout it is refused, naming the fix. Without the instructions, bf16 is refused, naming them.
#[test]
fn bf16_on_the_cpu_trains_like_f32_and_names_its_path() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let flags = |dtype: &str, extra: &[&str]| {
        let out = home.path().join(format!("{dtype}{}", extra.join("")));
        flags_with(
            &tiny_flags(&corpus, &out),
            &[&["--dtype", dtype, "--max_steps", "40", "--eval_steps", "20"], extra].concat(),
        )
    };
    if !difflab::engine::cpu::bf16::available() {
        let (code, _, stderr) = run_cli(home.path(), &flags("bf16", &[]));
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("AVX512-BF16"), "{stderr}");
        return;
    }
    let mut runs = vec![];
    for dtype in ["f32", "bf16"] {
        let (code, stdout, stderr) = run_cli(home.path(), &flags(dtype, &[]));
        assert_eq!(code, 0, "{stderr}");
        let markers = json_lines(&stdout);
        let begin = markers.iter().find(|m| m["event"] == "train_begin").unwrap();
        let named = begin["engine"].as_str().unwrap().contains("bf16 matmuls (AVX512-BF16)");
        assert_eq!(named, dtype == "bf16", "{}", begin["engine"]);
        assert_eq!(stderr.contains("bf16 matmuls (AVX512-BF16)"), dtype == "bf16", "{stderr}");
        let losses: Vec<f64> =
            markers.iter().filter(|m| m["event"] == "progress").map(|m| m["loss"].as_f64().unwrap()).collect();
        let eval = markers.iter().rfind(|m| m["event"] == "evaluate").unwrap()["eval_loss"].as_f64().unwrap();
        runs.push((losses, eval));
    }
    let ((f32_losses, f32_eval), (bf16_losses, bf16_eval)) = (&runs[0], &runs[1]);
    eprintln!("eval loss after 40 steps: f32 {f32_eval:.4}, bf16 {bf16_eval:.4}");
    assert!(f32_eval.is_finite() && bf16_eval.is_finite());
    assert!((f32_eval - bf16_eval).abs() < 0.02, "f32 {f32_eval} vs bf16 {bf16_eval}");
    assert_eq!(f32_losses.len(), bf16_losses.len());
    assert!(f32_losses.iter().zip(bf16_losses).any(|(a, b)| a != b), "bf16 changed no loss: {bf16_losses:?}");
    // eval takes the run's dtype from its saved settings, says so, and scores as the run did
    let o = difflab(home.path())
        .args(["eval", "--checkpoint", &home.path().join("bf16").display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && stderr.contains("bf16 matmuls (AVX512-BF16)"), "{stderr}");
    let again = json_lines(&String::from_utf8_lossy(&o.stdout))[0]["eval_loss"].as_f64().unwrap();
    assert!((again - bf16_eval).abs() < 1e-6, "eval {again} vs the run's last {bf16_eval}");
    let (code, _, stderr) = run_cli(home.path(), &flags("bf16", &["--dropout", "0.1"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--dropout 0.0"), "{stderr}");
}
