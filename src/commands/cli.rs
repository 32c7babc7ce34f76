//! The command line. Run settings are generated from the key table (`config::keys`), so every
//! preset key is a flag with the same name, type and help, and `--help` shows its default.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::config::keys::{ValueKind, KEYS, KEY_ALIASES};
use crate::config::{RunArgs, RunConfig};
use crate::tui::UiOptions;

#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    /// `difflab [flags]`: the picker, or the dashboard straight away with `--preset`.
    Lab {
        run: RunArgs,
        ui: UiOptions,
    },
    Train(RunArgs),
    /// A saved model's evaluation; `out`: where extrapolation figures go (else the run's folder).
    Eval {
        run: RunArgs,
        out: Option<PathBuf>,
    },
    Watch {
        dir: PathBuf,
        ui: UiOptions,
    },
    Sweep {
        run: RunArgs,
        ui: UiOptions,
    },
    Study(super::procedure::StudyArgs),
    LrFind {
        run: RunArgs,
        start_lr: f64,
        end_lr: f64,
        num_steps: u64,
        ui: UiOptions,
    },
    Compare {
        dirs: Vec<PathBuf>,
        png: Option<PathBuf>,
        view: crate::research::compare::CompareView,
        ui: UiOptions,
    },
    Bench(Vec<(String, String)>),
    Generate(super::generate::GenerateArgs),
    Logits {
        checkpoint: PathBuf,
        ids: Option<String>,
        text: Option<String>,
    },
    GoldenCheck {
        golden: PathBuf,
        device: String,
        dtype: String,
    },
    /// All presets, or one resolved and expanded.
    Presets(Option<String>),
}

fn default_text(defaults: &serde_json::Value, key: &str) -> String {
    match &defaults[key] {
        serde_json::Value::Null => "unset".into(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `--preset` and one flag per key.
fn run_args(cmd: Command) -> Command {
    let defaults = serde_json::to_value(RunConfig::default()).unwrap_or_default();
    // a repeated flag takes its last value, as argparse does
    let mut cmd = cmd.args_override_self(true).arg(
        Arg::new("preset")
            .long("preset")
            .value_name("NAME|FILE")
            .help("a preset from presets/ or ~/.config/difflab/presets, or a YAML file; flags override it"),
    );
    for key in KEYS {
        cmd = cmd.arg(
            Arg::new(key.name)
                .long(key.name)
                .value_name(key.kind.value_name())
                .help(format!("{} [default: {}]", key.help, default_text(&defaults, key.name)))
                .action(ArgAction::Set)
                .num_args(1)
                // negative numbers reach the key's own check (which names the key) instead of clap
                .allow_hyphen_values(matches!(key.kind, ValueKind::Float | ValueKind::Int | ValueKind::OptInt)),
        );
    }
    for (alias, real) in KEY_ALIASES {
        cmd = cmd.arg(Arg::new(*alias).long(*alias).hide(true).num_args(1).help(format!("read as --{real}")));
    }
    cmd
}

fn ui_args(cmd: Command) -> Command {
    cmd.arg(
        Arg::new("no-mouse")
            .long("no-mouse")
            .action(ArgAction::SetTrue)
            .help("leave the mouse to the terminal (copy and paste in tmux); `m` toggles"),
    )
    .arg(
        Arg::new("ascii")
            .long("ascii")
            .action(ArgAction::SetTrue)
            .help("ASCII charts for terminals without Braille glyphs"),
    )
}

fn headless_arg(cmd: Command) -> Command {
    cmd.arg(
        Arg::new("headless")
            .long("headless")
            .action(ArgAction::SetTrue)
            .help("print instead of drawing, even on a terminal"),
    )
}

pub fn command() -> Command {
    let lab = headless_arg(ui_args(run_args(Command::new("difflab"))));
    lab.version(env!("CARGO_PKG_VERSION"))
        .about("A terminal lab bench for GPT-style LMs with differential input embeddings.\nWith no subcommand: the preset picker, or `--preset NAME` to start that run in the dashboard.")
        .args_conflicts_with_subcommands(true)
        .args_override_self(true)
        .subcommand(run_args(Command::new("train").about("Train headless (the research code's `python -m research.train`); JSON markers on stdout")))
        .subcommand(run_args(Command::new("eval").about("Evaluate --checkpoint DIR on the validation split (loss, perplexity; --context_lengths: at several lengths, with the loss by position)"))
            .arg(Arg::new("out").long("out").value_name("DIR").help("where --context_lengths writes extrapolation.json and its figures [default: the run's folder]")))
        .subcommand(ui_args(Command::new("watch").about("Attach to a run started elsewhere: its history, live tail and controls"))
            .arg(Arg::new("run_dir").required(true).value_name("RUN_DIR")))
        .subcommand(headless_arg(ui_args(run_args(Command::new("sweep").about("Run one trial per value of a swept key (e.g. --learning_rate 1e-3,3e-4,1e-4, or the preset's sweep:)")))))
        .subcommand(
            headless_arg(ui_args(run_args(Command::new("study").about("Arms x seeds, each a full run: mean ± sd per arm, paired differences with 95% intervals, figures (study.json)"))))
                .arg(Arg::new("arm").long("arm").action(ArgAction::Append).value_name("K=V,K=V|preset=NAME").help("one arm: overrides of the study's settings, e.g. --arm research=false --arm research=true,learning_rate=5e-4 (the first is the reference) [default: the preset's study: arms]"))
                .arg(Arg::new("seeds").long("seeds").value_name("N|S,S,..").help("N seeds from --seed up, or a list [default: the preset's study: seeds, else 3]")),
        )
        .subcommand(
            headless_arg(ui_args(run_args(Command::new("lr-find").about("The exponential LR range test on a copy of the model"))))
                .arg(Arg::new("start_lr").long("start_lr").value_name("X").default_value("1e-7").help("first learning rate"))
                .arg(Arg::new("end_lr").long("end_lr").value_name("X").default_value("10").help("last learning rate"))
                .arg(Arg::new("num_steps").long("num_steps").value_name("N").default_value("100").help("steps from start_lr to end_lr")),
        )
        .subcommand(headless_arg(ui_args(Command::new("compare").about("Overlay runs: curves, final eval loss and perplexity, config differences")))
            .arg(Arg::new("run_dirs").required(true).num_args(1..).value_name("RUN_DIR").help("run folders, or a sweep's or study's folder (all its runs)"))
            .arg(Arg::new("png").long("png").value_name("FILE").help("where the overlay PNG goes [default: figures/compare-<runs>.png in the runs' common folder; never over an existing one]"))
            .arg(Arg::new("x").long("x").default_value("step").value_name("step|tokens|time").help("the overlay's x axis: optimizer steps, training tokens seen, or training seconds"))
            .arg(Arg::new("log_y").long("log_y").action(ArgAction::SetTrue).help("the loss on a log axis")))
        .subcommand(super::bench::args(Command::new("bench").about("Time training steps on random tokens (same flags as shared/bench/bench_train.py)")))
        .subcommand(Command::new("generate").about("Continue a prompt with a saved model (KV cache), with the tokenizer saved beside it")
            .arg(Arg::new("checkpoint").long("checkpoint").required(true).value_name("DIR").help("a checkpoint-N directory or a finished output_dir"))
            .arg(Arg::new("prompt").long("prompt").default_value("").value_name("TEXT").help("text to continue (empty: start from <|endoftext|>)"))
            // numbers take a leading minus, so that a negative one reaches the check that names it
            .arg(Arg::new("max_new_tokens").long("max_new_tokens").default_value("100").value_name("N").allow_hyphen_values(true).help(format!("at most {}", super::generate::MAX_NEW_TOKENS)))
            .arg(Arg::new("temperature").long("temperature").default_value("0.8").value_name("X").allow_hyphen_values(true).help("0: greedy (deterministic)"))
            .arg(Arg::new("top_k").long("top_k").default_value("40").value_name("K").allow_hyphen_values(true).help("keep the K likeliest tokens (0: all)"))
            .arg(Arg::new("top_p").long("top_p").default_value("1.0").value_name("P").allow_hyphen_values(true).help("nucleus sampling: the smallest set with probability P"))
            .arg(Arg::new("seed").long("seed").default_value("0").value_name("N").allow_hyphen_values(true)))
        .subcommand(Command::new("logits").about("Print a saved model's logits for token ids or text, as JSON (for comparing with other tools)")
            .arg(Arg::new("checkpoint").long("checkpoint").required(true).value_name("DIR"))
            .arg(Arg::new("ids").long("ids").value_name("1,2,3").conflicts_with("text"))
            .arg(Arg::new("text").long("text").value_name("TEXT")))
        .subcommand(Command::new("golden-check").about("Check the model against shared/golden on a device and dtype (the GPU host's check); JSON report")
            .arg(Arg::new("golden").long("golden").default_value("../shared/golden").value_name("DIR"))
            .arg(Arg::new("device").long("device").default_value("cpu").value_name("cpu|cuda|cuda:N"))
            .arg(Arg::new("dtype").long("dtype").default_value("f32").value_name("f32|bf16")))
        .subcommand(Command::new("presets").about("List the presets, or show one resolved (model, data, LR, schedule, steps; a sweep's trials, a study's arms)")
            .arg(Arg::new("name").value_name("NAME|FILE")))
}

fn run_from(m: &ArgMatches) -> RunArgs {
    let mut flags = vec![];
    let names = KEYS.iter().map(|k| k.name).chain(KEY_ALIASES.iter().map(|(a, _)| *a));
    for name in names {
        if let Some(v) = m.get_one::<String>(name) {
            let index = m.index_of(name).unwrap_or(0);
            flags.push((index, name.to_string(), v.clone()));
        }
    }
    flags.sort();
    RunArgs {
        preset: m.get_one::<String>("preset").cloned(),
        flags: flags.into_iter().map(|(_, k, v)| (k, v)).collect(),
    }
}

fn ui_from(m: &ArgMatches) -> UiOptions {
    let flag = |n: &str| m.try_get_one::<bool>(n).ok().flatten().copied().unwrap_or(false);
    UiOptions { no_mouse: flag("no-mouse"), ascii: flag("ascii"), headless: flag("headless") }
}

fn float(m: &ArgMatches, name: &str) -> Result<f64, clap::Error> {
    let raw = m.get_one::<String>(name).cloned().unwrap_or_default();
    raw.parse().map_err(|_| {
        clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("--{name}: {raw:?} is not a number\n"))
    })
}

fn whole(m: &ArgMatches, name: &str) -> Result<u64, clap::Error> {
    let raw = m.get_one::<String>(name).cloned().unwrap_or_default();
    raw.parse().map_err(|_| {
        clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("--{name}: {raw:?} is not a whole number >= 0\n"),
        )
    })
}

pub fn parse<I, T>(args: I) -> Result<Invocation, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let m = command().try_get_matches_from(args)?;
    Ok(match m.subcommand() {
        Some(("train", s)) => Invocation::Train(run_from(s)),
        Some(("eval", s)) => Invocation::Eval { run: run_from(s), out: s.get_one::<String>("out").map(PathBuf::from) },
        Some(("watch", s)) => Invocation::Watch {
            dir: s.get_one::<String>("run_dir").map(PathBuf::from).unwrap_or_default(),
            ui: ui_from(s),
        },
        Some(("sweep", s)) => Invocation::Sweep { run: run_from(s), ui: ui_from(s) },
        Some(("study", s)) => Invocation::Study(super::procedure::StudyArgs {
            run: run_from(s),
            arms: s.get_many::<String>("arm").into_iter().flatten().cloned().collect(),
            seeds: s.get_one::<String>("seeds").cloned(),
            ui: ui_from(s),
        }),
        Some(("lr-find", s)) => Invocation::LrFind {
            run: run_from(s),
            start_lr: float(s, "start_lr")?,
            end_lr: float(s, "end_lr")?,
            num_steps: float(s, "num_steps")? as u64,
            ui: ui_from(s),
        },
        Some(("compare", s)) => Invocation::Compare {
            dirs: s.get_many::<String>("run_dirs").into_iter().flatten().map(PathBuf::from).collect(),
            png: s.get_one::<String>("png").map(PathBuf::from),
            view: crate::research::compare::CompareView {
                x: s.get_one::<String>("x")
                    .map_or("step", String::as_str)
                    .parse()
                    .map_err(|e: String| clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{e}\n")))?,
                log_y: s.get_flag("log_y"),
            },
            ui: ui_from(s),
        },
        Some(("bench", s)) => Invocation::Bench(super::bench::flags_from(s)),
        Some(("generate", s)) => Invocation::Generate(super::generate::GenerateArgs {
            checkpoint: s.get_one::<String>("checkpoint").map(PathBuf::from).unwrap_or_default(),
            prompt: s.get_one::<String>("prompt").cloned().unwrap_or_default(),
            max_new_tokens: whole(s, "max_new_tokens")? as usize,
            sampling: crate::model::generate::Sampling {
                temperature: float(s, "temperature")?,
                top_k: whole(s, "top_k")? as usize,
                top_p: float(s, "top_p")?,
                seed: whole(s, "seed")?,
            },
        }),
        Some(("logits", s)) => Invocation::Logits {
            checkpoint: s.get_one::<String>("checkpoint").map(PathBuf::from).unwrap_or_default(),
            ids: s.get_one::<String>("ids").cloned(),
            text: s.get_one::<String>("text").cloned(),
        },
        Some(("golden-check", s)) => Invocation::GoldenCheck {
            golden: s.get_one::<String>("golden").map(PathBuf::from).unwrap_or_default(),
            device: s.get_one::<String>("device").cloned().unwrap_or_default(),
            dtype: s.get_one::<String>("dtype").cloned().unwrap_or_default(),
        },
        Some(("presets", s)) => Invocation::Presets(s.get_one::<String>("name").cloned()),
        _ => Invocation::Lab { run: run_from(&m), ui: ui_from(&m) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn both_flag_forms_and_true_false_values_parse() {
        let inv =
            parse(["difflab", "train", "--rope", "true", "--n_layer=2", "--learning_rate", "1e-3", "--preset", "demo"])
                .unwrap();
        let Invocation::Train(run) = inv else { panic!("train") };
        assert_eq!(run.preset.as_deref(), Some("demo"));
        assert_eq!(
            run.flags,
            vec![
                ("rope".into(), "true".into()),
                ("n_layer".into(), "2".into()),
                ("learning_rate".into(), "1e-3".into())
            ]
        );
    }

    #[test]
    fn unknown_flags_are_refused_with_a_suggestion() {
        let err = parse(["difflab", "train", "--learning_rte", "1"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--learning_rate"), "{err}");
    }

    #[test]
    fn help_lists_every_key_with_its_default() {
        let mut cmd = command();
        let help = cmd.find_subcommand_mut("train").unwrap().render_long_help().to_string();
        for key in KEYS {
            assert!(help.contains(&format!("--{}", key.name)), "--{} missing from help", key.name);
        }
        assert!(help.contains("[default: 0.999]"), "adam_beta2 default shown");
    }
}
