//! Presets: every shipped preset parses and resolves; invalid ones fail with one message naming
//! the file, the key and the fix, and exit code 2; the tutor's commands resolve to its values.

mod common;

use common::*;
use difflab::commands::cli::{parse, Invocation};
use difflab::config::preset::BUILTIN;
use difflab::config::{resolve, PresetLibrary};

#[test]
fn every_preset_file_is_embedded_parses_and_resolves() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("presets");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut embedded: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
    embedded.sort();
    assert_eq!(files, embedded, "presets/ and the embedded list agree");
    let lib = PresetLibrary::builtin();
    for name in &files {
        let chain = lib.chain(name).unwrap();
        let r = resolve(&chain, &vec![]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!chain.last().unwrap().description.is_empty(), "{name} has a description");
        assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
    }
}

#[test]
fn diff_presets_equal_their_baselines_but_research_and_one_lr_notch() {
    let lib = PresetLibrary::builtin();
    for stage in ["sanity", "mid", "full"] {
        let base = resolve(&lib.chain(&format!("{stage}-baseline")).unwrap(), &vec![]).unwrap().config;
        let diff = resolve(&lib.chain(&format!("{stage}-diff")).unwrap(), &vec![]).unwrap().config;
        assert!(!base.research && diff.research, "{stage}");
        assert!((diff.learning_rate - base.learning_rate / 2.0).abs() < 1e-12, "{stage}: one notch lower");
        let strip = |c: &difflab::config::RunConfig| {
            let mut v = serde_json::to_value(c).unwrap();
            for k in ["research", "learning_rate", "output_dir"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        };
        assert_eq!(strip(&base), strip(&diff), "{stage}: everything else equal");
    }
}

#[test]
fn invalid_presets_fail_with_file_key_and_fix_and_exit_code_2() {
    let home = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid_presets");
    let cases = [
        ("unknown-key.yaml", "learning_rte", "did you mean `learning_rate`"),
        ("wrong-type.yaml", "line 2: key `n_layer`", "must be a whole number"),
        ("bad-yaml.yaml", "line 3 column 9", "not valid YAML"),
        ("batch-not-divisible.yaml", "batch_size", "fix: use a multiple of micro_batch_size"),
        ("embd-not-divisible.yaml", "n_embd", "fix: choose n_embd a multiple of n_head"),
        ("rope-odd-head.yaml", "n_embd", "fix: change n_embd or n_head so the head size is even"),
    ];
    for (file, key, fix) in cases {
        let path = fixtures.join(file);
        let out = difflab(home.path()).args(["train", "--preset", &path.display().to_string()]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{file}: one message: {stderr}");
        assert!(stderr.contains(file) && stderr.contains(key) && stderr.contains(fix), "{file}: {stderr}");
        assert!(out.stdout.is_empty(), "{file}: nothing on stdout");
    }
    // an unknown preset name lists the real ones
    let out = difflab(home.path()).args(["train", "--preset", "demo2"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("demo2") && stderr.contains("sanity-baseline"), "{stderr}");
    // and a flag of the wrong type
    let out = difflab(home.path()).args(["train", "--preset", "demo", "--rope", "yes"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rope"));
}

/// The tutor's three commands, as printed (with `difflab train` for `python -m research.train`).
const TUTOR: [&str; 3] = [
    "--dataset wikitext --dataset_config wikitext-103-v1 --output_dir /root/autodl-tmp/research/outputs/sanity --subset_ratio 0.001 --num_train_epochs 10 --n_later 2 --n_head 2 --n_embd 128 --block_size 128 --batch_size 16 --micro_batch_size 2 --learning_rate 1e-3 --lr_scheduler_type consine --warmup_steps 50 --weight_decay 0.1 --adam_beta2 0.95 --max_grad_norm 1.0 --rope true --research false",
    "--dataset wikitext --dataset_config wikitext-103-v1 --output_dir /root/autodl-tmp/research/outputs/baseline_mid --subset_ratio 0.2 --num_train_epochs 1 --n_later 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 64 --micro_batch_size 4 --learning_rate 1e-4 --lr_scheduler_type consine --warmup_ratio 0.03 --weight_decay 0.1 --adam_beta2 0.95 --max_grad_norm 1.0 --gradient_checkpointing true --rope true --research false",
    "--dataset wikitext --dataset_config wikitext-103-v1 --output_dir /root/autodl-tmp/research/outputs/baseline --subset_ratio 1.0 --num_train_epochs 1 --n_later 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 128 --micro_batch_size 4 --learning_rate 1e-4 --lr_scheduler_type consine --warmup_ratio 0.03 --weight_decay 0.1 --adam_beta2 0.95 --max_grad_norm 1.0 --gradient_checkpointing true --rope true --research false",
];

#[test]
fn the_tutors_commands_resolve_to_the_tutors_values_and_match_the_presets() {
    let lib = PresetLibrary::builtin();
    for (cmd, preset) in TUTOR.iter().zip(["sanity-baseline", "mid-baseline", "full-baseline"]) {
        let args: Vec<&str> = ["difflab", "train"].into_iter().chain(cmd.split(' ')).collect();
        let Invocation::Train(run) = parse(args).unwrap() else { panic!("train") };
        let r = run.resolve().unwrap();
        assert_eq!(r.warnings.len(), 2, "n_later and consine each warn once: {:?}", r.warnings);
        assert!(r.warnings.iter().all(|w| w.lines().count() == 1));
        let c = &r.config;
        assert_eq!(c.lr_scheduler_type.as_str(), "cosine");
        let from_preset = resolve(&lib.chain(preset).unwrap(), &vec![]).unwrap().config;
        let mut a = serde_json::to_value(c).unwrap();
        let mut b = serde_json::to_value(&from_preset).unwrap();
        // the presets add eval/save cadence and their own output_dir; the model and recipe are the tutor's
        for k in ["output_dir", "eval_steps", "save_steps"] {
            a.as_object_mut().unwrap().remove(k);
            b.as_object_mut().unwrap().remove(k);
        }
        assert_eq!(a, b, "{preset} equals the tutor's command");
    }
}

#[test]
fn wikitext_defaults_to_a_tenth_and_every_wikitext_preset_says_its_subset() {
    let run = |flags: &[(&str, &str)]| {
        difflab::config::RunArgs {
            preset: None,
            flags: flags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
        .resolve()
        .unwrap()
    };
    let r = run(&[("dataset", "wikitext")]);
    assert_eq!(r.config.subset_ratio, difflab::config::resolve::WIKITEXT_DEFAULT_SUBSET);
    assert!(r.warnings.iter().any(|w| w.contains("first 10% of the training rows")), "{:?}", r.warnings);
    assert_eq!(run(&[("dataset", "wikitext"), ("subset_ratio", "1.0")]).config.subset_ratio, 1.0);
    assert_eq!(run(&[("dataset", "builtin")]).config.subset_ratio, 1.0, "other data: all of it");
    let lib = PresetLibrary::builtin();
    for name in lib.names() {
        let chain = lib.chain(&name).unwrap();
        let r = resolve(&chain, &vec![]).unwrap();
        if r.config.dataset == "wikitext" {
            assert!(chain.iter().any(|p| p.values.contains_key("subset_ratio")), "{name} sets subset_ratio itself");
        }
    }
}

/// `difflab presets`: one line a preset, every description starting in the same column however
/// long the names (a user preset with a long name included).
#[test]
fn the_preset_list_keeps_its_columns_aligned() {
    let home = tempfile::tempdir().unwrap();
    let user = home.path().join(".config/difflab/presets");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("a-very-long-user-preset-name.yaml"), "description: mine\nextends: demo\nmax_steps: 10\n")
        .unwrap();
    let o = difflab(home.path()).arg("presets").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("a-very-long-user-preset-name  mine")), "{text}");
    let columns: std::collections::BTreeSet<usize> = lines
        .iter()
        .map(|l| {
            let name_end = l.find(' ').unwrap();
            name_end + l[name_end..].find(|c: char| c != ' ').unwrap()
        })
        .collect();
    assert_eq!(columns.len(), 1, "descriptions start in one column: {text}");
}

/// A warmup longer than the run means the set learning rate is never reached: said, with the
/// fraction it ends at and where each number came from; a constant schedule has no warmup.
#[test]
fn a_warmup_longer_than_the_run_warns() {
    let lib = PresetLibrary::builtin();
    let chain = lib.chain("demo").unwrap();
    let flags = |pairs: &[(&str, serde_json::Value)]| pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let r = resolve(&chain, &flags(&[("max_steps", 10.into())])).unwrap();
    let w = r.warnings.join("\n");
    assert!(
        w.contains("warmup_steps 20 (presets/demo.yaml) is more than max_steps 10 (command line)") && w.contains("50%"),
        "{w}"
    );
    assert!(resolve(&chain, &flags(&[("max_steps", 20.into())])).unwrap().warnings.is_empty());
    let constant = flags(&[("max_steps", 10.into()), ("lr_scheduler_type", "constant".into())]);
    assert!(resolve(&chain, &constant).unwrap().warnings.is_empty());
}
