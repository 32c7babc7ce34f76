//! The application edge: turns an `Invocation` into work, errors into messages and exit codes
//! (0 done, 2 bad input, 1 failure). The only place that uses `anyhow`.

pub mod bench;
pub mod cli;
pub mod eval;
pub mod generate;
pub mod golden;
pub mod headless;
pub mod lab;
pub mod logits;
pub mod procedure;
pub mod study;
pub mod sweep;

use std::process::ExitCode;

use anyhow::Context;

use crate::config::{ConfigError, PresetLibrary, Resolved, RunArgs};
use cli::Invocation;

pub const EXIT_BAD_INPUT: u8 = 2;

/// Bad input, as opposed to a failure: the exit code 2 class. The first error of the chain
/// that knows which it is decides (each library error type classifies its own variants).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    use crate::data::DataError;
    use crate::model::hf::CheckpointError;
    use crate::research::lengths::LengthsError;
    use crate::session::SessionError;
    use crate::train::{device::DeviceError, TrainError};
    let bad_input = |cause: &(dyn std::error::Error + 'static)| -> Option<bool> {
        if cause.is::<ConfigError>() || cause.is::<DeviceError>() || cause.is::<BadInput>() {
            return Some(true);
        }
        (cause.downcast_ref::<bench::BenchError>().map(bench::BenchError::is_bad_input))
            .or_else(|| cause.downcast_ref::<DataError>().map(DataError::is_bad_input))
            .or_else(|| cause.downcast_ref::<TrainError>().map(TrainError::is_bad_input))
            .or_else(|| cause.downcast_ref::<CheckpointError>().map(CheckpointError::is_bad_input))
            .or_else(|| cause.downcast_ref::<SessionError>().map(SessionError::is_bad_input))
            .or_else(|| cause.downcast_ref::<LengthsError>().map(LengthsError::is_bad_input))
    };
    match err.chain().find_map(bad_input) {
        Some(true) => EXIT_BAD_INPUT,
        _ => 1,
    }
}

/// The error and its causes in one line, each cause once: many errors quote their source in
/// their own text (`cannot write X: No space left on device`), so `{:#}` would repeat it.
pub fn describe_error(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// The run's own folder, named once as it starts (`RunConfig::named`): the preset, or the
/// variant, after the UTC time.
pub fn name_run(resolved: &mut Resolved) -> Result<(), BadInput> {
    let auto = resolved.config.run_name.is_none() && resolved.config.output_dir.ends_with('/');
    if auto && crate::dist::launched_as().is_some_and(|(_, size, _)| size > 1) {
        return Err(BadInput(format!(
            "output_dir {:?} asks for a folder named at start, but the ranks of a multi-process run must agree on it: give --run_name",
            resolved.config.output_dir
        )));
    }
    let label = resolved.preset.clone().unwrap_or_else(|| resolved.config.model_config(0).variant_name());
    let stamp = crate::events::utc_stamp(crate::events::now());
    resolved.config = match auto {
        // two runs started in the same second still get their own folders
        true => (1..)
            .map(|k| if k == 1 { stamp.clone() } else { format!("{stamp}-{k}") })
            .map(|s| resolved.config.clone().named(&s, &label))
            .find(|c| !std::path::Path::new(&c.output_dir).exists())
            .unwrap_or_else(|| resolved.config.clone()),
        false => resolved.config.clone().named(&stamp, &label),
    };
    Ok(())
}

/// Checks that `dir` holds a saved model (`config.json`), else says what it is instead: a path
/// that does not exist, or a run that never finished (naming its newest checkpoint, which holds
/// one), or a folder without a model.
pub fn model_dir(dir: &std::path::Path) -> Result<(), BadInput> {
    if dir.join("config.json").is_file() {
        return Ok(());
    }
    if !dir.exists() {
        return Err(BadInput(format!("--checkpoint {}: no such file or folder", dir.display())));
    }
    Err(BadInput(match crate::train::checkpoint::list(dir).pop() {
        Some((step, newest)) => format!(
            "{} holds no final model (the run did not finish: no config.json); its newest checkpoint, at step {step}, does: --checkpoint {}",
            dir.display(),
            newest.display()
        ),
        None => format!(
            "{} holds no model (no config.json): give --checkpoint a checkpoint-N folder, a finished output_dir or an HF GPT-2 folder",
            dir.display()
        ),
    }))
}

/// A bad-input error raised at the edge (a missing run directory, say).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Warnings of a resolution (accepted misspellings, notes) on stderr, for commands without a
/// TUI; the lab shows them in its log instead.
pub fn print_warnings(warnings: &[String]) {
    for w in warnings {
        eprintln!("{w}");
    }
}

/// "sweep" or "study" when the resolved preset is one of those procedures.
fn procedure(resolved: &Resolved) -> Option<&'static str> {
    match (&resolved.sweep, &resolved.study) {
        (Some(_), _) => Some("sweep"),
        (None, Some(_)) => Some("study"),
        _ => None,
    }
}

pub fn run(invocation: Invocation) -> anyhow::Result<ExitCode> {
    match invocation {
        Invocation::Train(args) => {
            let resolved = args.resolve()?;
            if resolved.config.eval_only {
                return eval::run(&resolved, None);
            }
            if let Some(kind) = procedure(&resolved) {
                let name = resolved.preset.clone().unwrap_or_default();
                return Err(BadInput(format!(
                    "preset `{name}` is a {kind}, not one run: run it with `difflab {kind} --preset {name}` (or `difflab --preset {name}` in the TUI)"
                ))
                .into());
            }
            headless::train(&resolved)
        }
        Invocation::Eval { run, out } => eval::run(&run.resolve()?, out.as_deref()),
        Invocation::Lab { run, ui } => {
            use std::io::IsTerminal;
            if run.preset.is_none() && run.flags.is_empty() && !std::io::stdout().is_terminal() {
                return Err(BadInput("no preset given and stdout is not a terminal (the picker needs one); run `difflab --preset demo` or `difflab train --preset demo`".into()).into());
            }
            if !ui.draws() {
                let resolved = run.resolve()?;
                return match procedure(&resolved) {
                    Some("sweep") => sweep::sweep(&run, ui),
                    Some(_) => study::run(&procedure::StudyArgs { run, arms: vec![], seeds: None, ui }),
                    None if resolved.config.eval_only => eval::run(&resolved, None),
                    None => headless::train(&resolved),
                };
            }
            lab::lab(run, ui)
        }
        Invocation::Bench(flags) => {
            let result = bench::run(&flags).context("bench")?;
            println!("{result}");
            Ok(ExitCode::SUCCESS)
        }
        Invocation::Generate(args) => generate::run(&args),
        Invocation::Logits { checkpoint, ids, text } => logits::run(&checkpoint, ids.as_deref(), text.as_deref()),
        Invocation::GoldenCheck { golden, device, dtype } => {
            let device = crate::train::device::select(
                device.parse().map_err(|e| BadInput(format!("--device {device:?}: {e}; use cpu, cuda or cuda:N")))?,
            )?;
            let dtype = match dtype.as_str() {
                "f32" => candle_core::DType::F32,
                "bf16" => candle_core::DType::BF16,
                other => return Err(BadInput(format!("--dtype {other:?}: use f32 or bf16")).into()),
            };
            let placement = golden::placement(&device, dtype)?;
            let (reports, tolerances) = golden::check(&golden, &placement)?;
            let pass = reports.iter().all(|r| r.pass);
            println!(
                "{}",
                serde_json::json!({ "device": crate::train::device::describe(&device), "dtype": placement.compute_dtype(), "engine": placement.path(), "tolerances": tolerances, "variants": reports, "pass": pass })
            );
            Ok(if pass { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Invocation::Presets(Some(name)) => {
            let resolved = RunArgs { preset: Some(name.clone()), flags: vec![] }.resolve()?;
            print_warnings(&resolved.warnings);
            let library = PresetLibrary::load();
            let preset = library.get(&name)?;
            println!("{} ({})", preset.name, preset.origin);
            if !preset.description.is_empty() {
                println!("{}", preset.description);
            }
            for line in crate::config::describe(&resolved) {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Invocation::Presets(None) => {
            let presets = PresetLibrary::load().all();
            // one column for the names, as wide as the longest
            let w = presets.iter().flatten().map(|p| p.name.chars().count()).max().unwrap_or(0);
            for preset in presets {
                match preset {
                    Ok(p) => println!("{:<w$}  {}", p.name, p.description),
                    Err(e) => println!("(broken) {e}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Invocation::Watch { dir, ui } => lab::watch(&dir, ui),
        Invocation::Sweep { run, ui } => sweep::sweep(&run, ui),
        Invocation::Study(args) => study::run(&args),
        Invocation::LrFind { run, start_lr, end_lr, num_steps, ui } => sweep::lr_find(
            &run,
            crate::research::lr_find::Range { start: start_lr, end: end_lr, steps: num_steps as usize },
            ui,
        ),
        Invocation::Compare { dirs, png, view, ui } => sweep::compare(&dirs, png, view, ui),
    }
}
