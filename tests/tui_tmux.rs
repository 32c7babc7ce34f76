//! The TUI in a real terminal: difflab on the `demo` preset under tmux, driven with
//! send-keys and read with capture-pane. Needs tmux (.ci/run installs it).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is installed (.ci/run installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-t", "t"])
    }

    fn keys(&self, keys: &str) {
        self.cmd(&["send-keys", "-t", "t", keys]);
    }

    /// Polls the screen until `pred` holds (or panics after `secs`).
    fn wait_for(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; screen:\n{s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.cmd(&["kill-server"]);
    }
}

/// The `N/M` step counter of the progress pane.
fn step(screen: &str) -> Option<u64> {
    screen.lines().find_map(|l| {
        let i = l.find("/10000")?;
        l[..i].rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    })
}

#[test]
fn the_dashboard_runs_pauses_lowers_the_lr_checkpoints_and_quits_under_tmux() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("demo");
    let bin = env!("CARGO_BIN_EXE_difflab");
    let h = home.path().display();
    let command = format!(
        "env HOME={h} DIFFLAB_CACHE={h}/cache HF_HUB_OFFLINE=1 RAYON_NUM_THREADS=2 {bin} --preset demo --output_dir {} --max_steps 10000 --save_steps 0; echo EXITED $?; sleep 60",
        out.display()
    );
    let tmux = Tmux { socket: format!("difflab-test-{}", std::process::id()) };
    tmux.cmd(&["new-session", "-d", "-s", "t", "-x", "100", "-y", "30", &command]);

    // training: the step counter advances
    let s = tmux.wait_for("training", 180, |s| s.contains("training") && step(s).is_some_and(|n| n > 0));
    let first = step(&s).unwrap();
    tmux.wait_for("the step counter to advance", 60, |s| step(s).is_some_and(|n| n > first));

    // p: PAUSED, and the step stops
    tmux.keys("p");
    let s = tmux.wait_for("PAUSED", 30, |s| s.contains("PAUSED"));
    let paused_at = step(&s).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(step(&tmux.screen()), Some(paused_at), "no progress while paused");

    // l: the LR pane and the event log show x0.1
    tmux.keys("l");
    tmux.wait_for("LR x0.1 in the LR pane and the log", 30, |s| {
        s.contains("(x0.1 by control)") && s.contains("scale lr")
    });

    // c: a checkpoint on disk
    tmux.keys("c");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !has_checkpoint(&out) {
        assert!(Instant::now() < deadline, "no checkpoint written; screen:\n{}", tmux.screen());
        std::thread::sleep(Duration::from_millis(200));
    }

    // q, then stop + save: it exits and the terminal is restored
    tmux.keys("q");
    tmux.wait_for("the quit dialog", 30, |s| s.contains("Stop the run?"));
    tmux.keys("s");
    let s = tmux.wait_for("exit", 60, |s| s.contains("EXITED"));
    assert!(s.contains("EXITED 0"), "{s}");
    assert_eq!(tmux.cmd(&["display", "-p", "-t", "t", "#{alternate_on}"]).trim(), "0", "alternate screen left");
    assert!(s.contains("difflab: stopped at step"), "the summary prints after the UI is gone: {s}");
    assert!(!s.contains("│"), "no UI remnants on the restored screen: {s}");
    assert!(out.join("model.safetensors").exists(), "stop + save wrote the final model");
}

fn has_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")))
        .unwrap_or(false)
}

/// The last step of a run's metrics.jsonl, and whether an action was logged.
fn metrics(out: &Path) -> (u64, String) {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let last = common::json_lines(&text)
        .iter()
        .filter(|m| m["event"] == "progress")
        .filter_map(|m| m["step"].as_u64())
        .next_back()
        .unwrap_or(0);
    (last, text)
}

#[test]
fn watch_attaches_to_a_headless_run_steers_it_and_detaches() {
    let home = tempfile::tempdir().unwrap();
    let corpus = common::tiny_corpus(home.path());
    let out = home.path().join("run");
    let mut flags = common::tiny_flags(&corpus, &out);
    flags.extend(["--max_steps", "100000", "--save_steps", "0", "--logging_steps", "5"].map(String::from));
    // ended when the test ends, also when it fails on the way
    let mut trainer = common::Reaped(
        common::difflab(home.path())
            .arg("train")
            .args(&flags)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while metrics(&out).0 < 10 {
        assert!(Instant::now() < deadline, "the headless run did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let bin = env!("CARGO_BIN_EXE_difflab");
    let tmux = Tmux { socket: format!("difflab-watch-{}", std::process::id()) };
    let command = format!("env HOME={} {bin} watch {}; echo EXITED $?; sleep 60", home.path().display(), out.display());
    tmux.cmd(&["new-session", "-d", "-s", "t", "-x", "100", "-y", "30", &command]);
    tmux.wait_for("the run's history", 60, |s| s.contains("(watching)") && s.contains("training"));

    // p reaches the trainer, which pauses and logs it; the watcher shows PAUSED
    tmux.keys("p");
    tmux.wait_for("PAUSED", 30, |s| s.contains("PAUSED"));
    assert!(metrics(&out).1.contains("\"action\":\"pause\",\"lr_scale\":1.0,\"origin\":\"watch\""));
    let paused_at = metrics(&out).0;
    tmux.keys("l");
    tmux.wait_for("the LR cut acknowledged", 30, |s| s.contains("(x0.1 by control)"));
    tmux.keys("p");
    tmux.wait_for("resumed", 30, |s| !s.contains("PAUSED") && s.contains("training"));

    // q, d: detach; the watcher leaves and the run goes on
    tmux.keys("q");
    tmux.wait_for("the detach dialog", 30, |s| s.contains("Detach"));
    tmux.keys("d");
    let s = tmux.wait_for("the watcher to exit", 30, |s| s.contains("EXITED"));
    assert!(s.contains("EXITED 0"), "{s}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics(&out).0 <= paused_at + 10 {
        assert!(Instant::now() < deadline, "the run kept going after the detach");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(trainer.0.try_wait().unwrap().is_none(), "the trainer still runs");

    // a control dropped into the run directory stops it, with a final checkpoint
    let stop = difflab::events::ControlMsg {
        control: difflab::events::Control::Stop { save: true },
        origin: difflab::events::ControlOrigin::Api,
    };
    difflab::train::remote::send(&out, &stop).unwrap();
    let status = trainer.0.wait().unwrap();
    assert!(status.success());
    let text = metrics(&out).1;
    assert!(text.contains("\"status\":\"stopped\""), "train_end stopped");
    assert!(text.contains("\"reason\":\"stop\""), "a final checkpoint");
}

#[test]
fn a_sweep_preset_starts_from_the_picker_in_the_sweep_view() {
    let home = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_difflab");
    let h = home.path().display();
    // the picker with flags for every preset: short trials of the byte-level demo
    let command = format!(
        "cd {h} && env HOME={h} DIFFLAB_CACHE={h}/cache HF_HUB_OFFLINE=1 RAYON_NUM_THREADS=2 {bin} --max_steps 30 --tokenizer byte --log_tensorboard false; echo EXITED $?; sleep 60"
    );
    let tmux = Tmux { socket: format!("difflab-sweep-test-{}", std::process::id()) };
    tmux.cmd(&["new-session", "-d", "-s", "t", "-x", "120", "-y", "36", &command]);
    tmux.wait_for("the picker", 60, |s| s.contains("runs (") && s.contains("demo-lr-sweep"));
    // demo is selected first; demo-lr-sweep is seven rows below it
    for _ in 0..7 {
        tmux.keys("Down");
    }
    tmux.wait_for("the sweep's line in the details", 30, |s| s.contains("= 4 trials x 30 steps"));
    tmux.keys("Enter");
    let s = tmux
        .wait_for("the sweep view", 120, |s| s.contains("sweep -> outputs/demo-lr-sweep") && s.contains("trial 1/4"));
    assert!(s.contains("learning_rate-0.01"), "{s}");
    tmux.wait_for("the second trial", 180, |s| s.contains("trial 2/4"));
    // q stops the sweep after this trial; the rest are skipped and the table is written
    tmux.keys("q");
    let s = tmux.wait_for("exit", 180, |s| s.contains("EXITED"));
    assert!(s.contains("EXITED 0"), "{s}");
    let summary = std::fs::read_to_string(home.path().join("outputs/demo-lr-sweep/summary.json")).unwrap();
    assert!(summary.contains("the sweep was stopped"), "{summary}");
}
