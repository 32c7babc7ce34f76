//! The picker's run list: runs found under an outputs folder with their status, steps, final
//! eval and checkpoint; resume from the list continues an interrupted run from its checkpoint.

mod common;

use common::{difflab, tiny_corpus, tiny_flags};
use difflab::app::picker::{Outcome, Tab};
use difflab::app::{Key, Picker};
use difflab::research::runs::list_runs;

fn train(home: &std::path::Path, out: &std::path::Path, extra: &[&str]) {
    let corpus = tiny_corpus(home);
    let mut flags = tiny_flags(&corpus, out);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let o = difflab(home).arg("train").args(&flags).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Cuts a run back to what a kill after `step` leaves: the log up to it, no end, no later
/// checkpoint, no final model.
fn interrupt(run: &std::path::Path, step: u64, drop_checkpoint: &str) {
    std::fs::remove_dir_all(run.join(drop_checkpoint)).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.json",
        "difflab_config.json",
        "checksums.json",
    ] {
        std::fs::remove_file(run.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let marker = format!("\"step\":{},", step + 1);
    let kept: Vec<&str> = text.lines().take_while(|l| !(l.contains(&marker) && l.contains("\"progress\""))).collect();
    std::fs::write(run.join("metrics.jsonl"), kept.join("\n") + "\n").unwrap();
}

#[test]
fn the_run_list_finds_runs_and_resume_watch_and_compare_act_on_them() {
    let home = tempfile::tempdir().unwrap();
    let outputs = home.path().join("outputs");
    let done = outputs.join("done");
    let cut = outputs.join("sweep/lr-1e-3");
    train(home.path(), &done, &["--max_steps", "8", "--save_steps", "4", "--eval_steps", "4"]);
    train(
        home.path(),
        &cut,
        &["--max_steps", "8", "--save_steps", "4", "--eval_steps", "4", "--learning_rate", "1e-3"],
    );
    interrupt(&cut, 4, "checkpoint-8");
    // an unrelated folder and a study-deep run
    std::fs::create_dir_all(outputs.join("notes")).unwrap();
    let deep = outputs.join("study/arm/seed-1");
    train(home.path(), &deep, &["--max_steps", "2", "--save_steps", "0"]);

    let runs = list_runs(&outputs, 200);
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["study/arm/seed-1", "sweep/lr-1e-3", "done"], "newest first, three folders deep");
    let by = |n: &str| runs.iter().find(|r| r.name == n).unwrap();
    let d = by("done");
    assert_eq!((d.status.as_str(), d.steps, d.max_steps, d.checkpoint), ("completed", 8, Some(8), Some(8)));
    assert!(d.final_eval_loss.is_some_and(|l| l.is_finite()) && !d.resumable());
    let c = by("sweep/lr-1e-3");
    assert_eq!((c.status.as_str(), c.steps, c.checkpoint), ("interrupted", 4, Some(4)));
    assert!(c.resumable());
    assert!(!by("study/arm/seed-1").resumable(), "no checkpoint");
    // a limit reads the newest only
    assert_eq!(list_runs(&outputs, 1).len(), 1);

    let mut p = Picker::new(vec![], vec![]).with_runs(outputs.clone(), runs.clone());
    p.on_key(Key::Tab);
    assert_eq!(p.tab, Tab::Runs);
    // Enter opens the selected run as watch does
    let Outcome::Watch(dir) = p.on_key(Key::Enter) else { panic!("watch") };
    assert_eq!(dir, deep);
    // a completed run has nothing to resume: said, not done
    p.on_key(Key::Down);
    p.on_key(Key::Down);
    assert!(matches!(p.on_key(Key::Char('r')), Outcome::Stay));
    assert!(p.error.as_deref().is_some_and(|e| e.contains("done has completed")), "{:?}", p.error);
    // compare needs two marked runs
    p.on_key(Key::Char(' '));
    assert!(matches!(p.on_key(Key::Char('c')), Outcome::Stay));
    assert!(p.error.as_deref().is_some_and(|e| e.contains("1 marked")), "{:?}", p.error);
    p.on_key(Key::Up);
    p.on_key(Key::Char(' '));
    let Outcome::Compare(dirs) = p.on_key(Key::Char('c')) else { panic!("compare") };
    assert_eq!(dirs, vec![cut.clone(), done.clone()]);

    // r on the interrupted run gives the arguments that resume it: run them as the lab would
    let Outcome::Start(args) = p.on_key(Key::Char('r')) else { panic!("resume: {:?}", p.error) };
    assert!(args.preset.is_none());
    // the folder and its latest checkpoint: every setting comes from the checkpoint
    assert_eq!(args.flags.len(), 2, "{:?}", args.flags);
    assert!(args.flags.contains(&("resume_from_checkpoint".into(), "latest".into())));
    let flags: Vec<String> = args.flags.iter().flat_map(|(k, v)| [format!("--{k}"), v.clone()]).collect();
    let o = difflab(home.path()).arg("train").args(&flags).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    let after = list_runs(&outputs, 200);
    let c = after.iter().find(|r| r.name == "sweep/lr-1e-3").unwrap();
    assert_eq!((c.status.as_str(), c.steps, c.checkpoint), ("completed", 8, Some(8)), "{stderr}");
    let text = std::fs::read_to_string(cut.join("metrics.jsonl")).unwrap();
    assert!(text.contains("\"start_step\":4"), "resumed from checkpoint-4, not from scratch");
    // with the run's own learning rate, not the default
    let resumed = text.lines().rfind(|l| l.contains("\"train_begin\"")).unwrap();
    let begin: serde_json::Value = serde_json::from_str(resumed).unwrap();
    assert_eq!(begin["config"]["learning_rate"], 0.001, "{resumed}");
}
