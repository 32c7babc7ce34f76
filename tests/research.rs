//! The research answer's pieces from the command line: a step-0 evaluation, samples in the
//! log, `generate` from a trained checkpoint, and the WikiText zip's folder with its test split.

mod common;

use common::{difflab, json_lines, tiny_corpus, tiny_flags};

fn events<'a>(lines: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|e| e["event"] == kind).collect()
}

#[test]
fn eval_on_start_scores_the_untrained_model_and_samples_are_logged_and_generation_is_deterministic() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let mut flags = tiny_flags(&corpus, &out);
    // long enough for the tiny model to learn the corpus's words (a second on 2 cores)
    flags.extend(["--eval_on_start", "true", "--sample_prompt", "the cat", "--max_steps", "300"].map(String::from));
    flags.extend(["--eval_steps", "100", "--save_steps", "100"].map(String::from));
    let run = difflab(home.path()).arg("train").args(&flags).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let metrics = json_lines(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap());
    let evals = events(&metrics, "evaluate");
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 100, 200, 300], "an evaluation at step 0, then every eval_steps");
    // the untrained byte model sits near ln(vocab); training takes it well below
    let (first, last) = (evals[0]["eval_loss"].as_f64().unwrap(), evals[3]["eval_loss"].as_f64().unwrap());
    assert!(first > 4.0 && last < first - 1.0, "eval loss {first} -> {last}");
    // the diff-norm statistics cover every token of the step's batch: 4 sequences of 32 in two
    // micro-batches of 2, not the last micro-batch's 64 tokens
    let progress = events(&metrics, "progress");
    for p in &progress {
        let counted: u64 = p["diff_norm_hist"]["counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum();
        assert_eq!(counted, 4 * 32, "step {}", p["step"]);
    }
    // per-layer gradient norms make up the global one; every layer was updated by a sane ratio
    for p in &progress {
        let layers = p["layers"].as_array().unwrap();
        let names: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["wte", "h.0", "ln_f"], "model order (RoPE: no wpe)");
        let squares: f64 = layers.iter().map(|l| l["grad_norm"].as_f64().unwrap().powi(2)).sum();
        let global = p["grad_norm"].as_f64().unwrap();
        assert!((squares.sqrt() - global).abs() <= 1e-6 * global, "step {}: {} vs {global}", p["step"], squares.sqrt());
        // warm-up starts at a learning rate of 0: that step moves nothing
        let lr = p["learning_rate"].as_f64().unwrap();
        for l in layers {
            let r = l["update_ratio"].as_f64().unwrap();
            let sane = if lr > 0.0 { r > 1e-2 * lr && r < 0.5 } else { r == 0.0 };
            assert!(sane, "step {} (lr {lr}): {} update ratio {r}", p["step"], l["name"]);
        }
    }
    let samples = events(&metrics, "sample");
    assert_eq!(samples.len(), 4, "a sample at each evaluation");
    assert!(samples.iter().all(|s| s["prompt"] == "the cat" && !s["text"].as_str().unwrap().is_empty()));

    let generate = |extra: &[&str]| {
        let out = difflab(home.path())
            .args(["generate", "--checkpoint", &out.display().to_string(), "--prompt", "the cat"])
            .args(["--max_new_tokens", "40"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (greedy, stderr) = generate(&["--temperature", "0"]);
    assert!(greedy.starts_with("the cat") && greedy.len() > "the cat".len() + 20, "{greedy:?}");
    assert_eq!(generate(&["--temperature", "0"]).0, greedy, "greedy decoding is deterministic");
    assert!(stderr.contains("tokens/s") && stderr.contains("differential + RoPE"), "{stderr}");
    // a trained model continues the corpus's words: most of what it writes is from them
    let words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "."];
    let written: Vec<&str> = greedy["the cat".len()..].split_whitespace().collect();
    let known = written.iter().filter(|w| words.contains(w)).count();
    assert!(known * 10 >= written.len() * 8, "{known} of {} words from the corpus: {greedy:?}", written.len());
    // sampling follows its seed
    let (a, b) = (generate(&["--seed", "3"]).0, generate(&["--seed", "3"]).0);
    assert_eq!(a, b);

    let bad =
        difflab(home.path()).args(["generate", "--checkpoint", &home.path().display().to_string()]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no config.json"));
}

#[test]
fn the_wikitext_zip_layout_trains_and_reports_its_test_split() {
    let home = tempfile::tempdir().unwrap();
    let corpus = std::fs::read_to_string(tiny_corpus(home.path())).unwrap();
    let lines: Vec<&str> = corpus.lines().collect();
    let folder = home.path().join("wikitext-2-raw");
    std::fs::create_dir(&folder).unwrap();
    // as the zip unpacks: wiki.train.raw, wiki.valid.raw, wiki.test.raw; the test text differs
    std::fs::write(folder.join("wiki.train.raw"), lines[..2400].join("\n")).unwrap();
    std::fs::write(folder.join("wiki.valid.raw"), lines[2400..2700].join("\n")).unwrap();
    let test: String = lines[2700..].iter().map(|l| format!("{}\n", l.to_uppercase())).collect();
    std::fs::write(folder.join("wiki.test.raw"), test).unwrap();
    let run = |split: &str, out: &str| {
        let mut flags = tiny_flags(&folder, &home.path().join(out));
        flags.extend(["--eval_split", split, "--max_steps", "10"].map(String::from));
        let o = difflab(home.path()).arg("train").args(&flags).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let lines = json_lines(&String::from_utf8(o.stdout).unwrap());
        let last = events(&lines, "evaluate").last().copied().cloned().unwrap();
        (last, String::from_utf8(o.stderr).unwrap())
    };
    let (valid, _) = run("validation", "v");
    let (test, stderr) = run("test", "t");
    assert_eq!(valid["split"], "validation");
    assert_eq!(test["split"], "test");
    assert!(stderr.contains("on the test split"), "the human line names the split: {stderr}");
    // upper-case bytes were never trained on: the test split scores far worse
    assert!(test["eval_loss"].as_f64().unwrap() > valid["eval_loss"].as_f64().unwrap() + 0.5);

    // a single file has no test split: refused, naming the fix
    let mut flags = tiny_flags(&folder.join("wiki.train.raw"), &home.path().join("f"));
    flags.extend(["--eval_split", "test"].map(String::from));
    let o = difflab(home.path()).arg("train").args(&flags).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no test split") && err.contains("--eval_split validation"), "{err}");
    let o = difflab(home.path()).args(["train", "--eval_split", "train"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("eval_split"));
}

#[test]
fn progress_events_carry_memory_and_an_eta_that_counts_down() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let out = home.path().join("run");
    let o = difflab(home.path()).arg("train").args(tiny_flags(&corpus, &out)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = json_lines(&String::from_utf8(o.stdout).unwrap());
    let progress = events(&lines, "progress");
    let etas: Vec<f64> = progress.iter().map(|p| p["eta_seconds"].as_f64().unwrap()).collect();
    // 20 steps: it falls to 0 at the last one
    assert_eq!(*etas.last().unwrap(), 0.0);
    assert!(etas.first().unwrap() > etas.last().unwrap());
    for p in &progress {
        let rss = p["rss_mib"].as_f64().unwrap();
        assert!(rss > 5.0 && rss < 24_000.0, "resident MiB {rss}");
    }
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("| ETA ") && stderr.contains(" MiB"), "the headless line shows both: {stderr}");
}

#[test]
fn a_folder_of_runs_names_each_run_and_run_name_picks_the_folder() {
    let home = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(home.path());
    let parent = home.path().join("outputs");
    let mut flags = tiny_flags(&corpus, &parent);
    let dir = flags.iter().position(|f| f == "--output_dir").unwrap() + 1;
    flags[dir] = format!("{}/", parent.display()); // a folder of runs
    for _ in 0..2 {
        let o = difflab(home.path()).arg("train").args(&flags).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut runs: Vec<String> =
        std::fs::read_dir(&parent).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    runs.sort();
    assert_eq!(runs.len(), 2, "two runs, two folders: {runs:?}");
    for r in &runs {
        // <UTC date-time>_<variant>: 2026-12-03_14-05-09_differential-RoPE (-2 after the time
        // for a second run in the same second)
        assert!(r.starts_with("20") && r.ends_with("_differential-RoPE") && r.len() <= 19 + 2 + 18, "{r}");
        assert!(parent.join(r).join("metrics.jsonl").is_file() && parent.join(r).join("model.safetensors").is_file());
    }
    flags.extend(["--run_name", "trial-a"].map(String::from));
    let o = difflab(home.path()).arg("train").args(&flags).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(parent.join("trial-a/metrics.jsonl").is_file());
}

#[test]
fn greedy_decoding_of_a_trained_demo_model_is_deterministic() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("demo");
    let o = difflab(home.path())
        .args(["train", "--preset", "demo", "--tokenizer", "byte", "--max_steps", "40", "--eval_steps", "20"])
        .args(["--eval_max_blocks", "8", "--log_tensorboard", "false", "--log_figures", "false"])
        .args(["--output_dir", &out.display().to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let greedy = || {
        let o = difflab(home.path())
            .args(["generate", "--checkpoint", &out.display().to_string(), "--prompt", "In the early spring,"])
            .args(["--temperature", "0", "--max_new_tokens", "80"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let first = greedy();
    assert!(first.len() > "In the early spring,".len() + 40, "{first:?}");
    assert_eq!(greedy(), first);
}
