//! `difflab sweep`, `difflab lr-find` and `difflab compare`, headless or in the TUI.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::{resolve_run, BadInput};
use crate::config::keys::parse_flag_value;
use crate::config::RunArgs;
use crate::config::RunConfig;
use crate::data::prepare::default_cache_dir;
use crate::sinks::human::describe;
use crate::sweep::lr_find::{self, LrFindEvent, Range};
use crate::sweep::{self, compare, SweepEvent};
use crate::tui::UiOptions;

/// The swept key and its values: a flag given a comma list, else the preset's `sweep:`.
/// Each value is checked by resolving the run with it.
pub fn plan(args: &RunArgs) -> anyhow::Result<(RunConfig, Option<String>, String, Vec<serde_json::Value>)> {
    let lists: Vec<&(String, String)> = args.flags.iter().filter(|(_, v)| v.contains(',')).collect();
    if lists.len() > 1 {
        return Err(BadInput(format!(
            "sweep one key at a time; got lists for {}",
            lists.iter().map(|(k, _)| format!("--{k}")).collect::<Vec<_>>().join(" and ")
        ))
        .into());
    }
    let fixed = RunArgs {
        preset: args.preset.clone(),
        flags: args.flags.iter().filter(|(_, v)| !v.contains(',')).cloned().collect(),
    };
    let resolved = resolve_run(&fixed)?;
    let (key, values) = match lists.first() {
        Some((key, list)) => {
            let values = list.split(',').map(str::trim).filter(|v| !v.is_empty()).map(|v| parse_flag_value(key, v)).collect::<Result<Vec<_>, _>>()?;
            (key.clone(), values)
        }
        None => resolved.sweep.clone().ok_or_else(|| {
            BadInput("nothing to sweep: give one flag a list (e.g. --learning_rate 1e-3,3e-4,1e-4) or use a preset with `sweep:`".into())
        })?,
    };
    if values.len() < 2 {
        return Err(BadInput(format!("--{key}: a sweep needs at least two values")).into());
    }
    for v in &values {
        let mut flags = fixed.flags.clone();
        flags.push((key.clone(), v.to_string().trim_matches('"').to_string()));
        resolve_run(&RunArgs { preset: fixed.preset.clone(), flags })
            .with_context(|| format!("the trial with {key} = {v}"))?;
    }
    Ok((resolved.config, resolved.preset, key, values))
}

pub fn sweep(args: &RunArgs, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let (base, preset, key, values) = plan(args)?;
    let handle = sweep::spawn(base.clone(), preset, key, values, default_cache_dir());
    if ui.draws() {
        return super::lab::sweep(handle, &base, ui);
    }
    let mut current = String::new();
    for e in handle.events.iter() {
        match e {
            SweepEvent::TrialStart { index, of, label } => {
                current = label.clone();
                eprintln!("[sweep] trial {}/{of}: {label}", index + 1);
            }
            SweepEvent::Train { event, .. } => {
                if let Some(line) = describe(&event).filter(|_| !matches!(event, crate::events::Event::Prepare(_))) {
                    eprintln!("[{current}] {line}");
                }
            }
            SweepEvent::TrialEnd(t) => eprintln!("[sweep] {}: {} after {} steps", t.label, t.status, t.steps),
            SweepEvent::Done(summary) => {
                print!("{}", sweep::table(&summary));
                println!("summary: {}", PathBuf::from(&base.output_dir).join("summary.json").display());
            }
        }
    }
    handle.join();
    Ok(ExitCode::SUCCESS)
}

pub fn lr_find(args: &RunArgs, range: Range, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let cfg = resolve_run(args)?.config;
    let (tx, rx) = crossbeam_channel::unbounded();
    let cache = default_cache_dir();
    let worker_cfg = cfg.clone();
    let worker = std::thread::Builder::new()
        .name("difflab-lr-find".into())
        .spawn(move || lr_find::run(&worker_cfg, &cache, range, &tx))?;
    if ui.draws() {
        return super::lab::lr_find(rx, worker, &cfg, ui);
    }
    for e in rx.iter() {
        match e {
            LrFindEvent::Train(ev) => {
                if let Some(line) = describe(&ev) {
                    eprintln!("{line}");
                }
            }
            LrFindEvent::Point { lr, loss, smoothed } => {
                eprintln!("[lr-find] lr {lr:.2e} loss {loss:.4} smoothed {smoothed:.4}")
            }
            LrFindEvent::Done { curve, suggestions, dir } => {
                for line in lr_find::summary(&curve, &suggestions) {
                    eprintln!("[lr-find] {line}");
                }
                println!(
                    "{}",
                    serde_json::json!({ "valley": suggestions.valley, "steepest": suggestions.steepest, "minimum": suggestions.minimum, "points": curve.lrs.len(), "stopped": curve.stopped, "plot": dir.join("lr_find.png") })
                );
            }
        }
    }
    worker.join().map_err(|_| anyhow::anyhow!("the lr-find thread panicked"))??;
    Ok(ExitCode::SUCCESS)
}

/// Where the comparison's PNG goes: `--png`, else `<folder>/figures/compare.png` for one
/// sweep or study folder, else `compare.png` here.
fn png_path(dirs: &[PathBuf], png: Option<PathBuf>) -> PathBuf {
    png.unwrap_or_else(|| match dirs {
        [one] if !one.join(crate::sinks::metrics::METRICS_FILE).is_file() => one.join("figures").join("compare.png"),
        _ => PathBuf::from("compare.png"),
    })
}

pub fn compare(dirs: &[PathBuf], png: Option<PathBuf>, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let mut runs = vec![];
    for d in dirs {
        runs.extend(compare::load_all(d).map_err(|e| BadInput(e.to_string()))?);
    }
    let path = png_path(dirs, png);
    let figure = compare::figure(&runs).with_context(|| format!("drawing {}", path.display()))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    crate::atomic_file::write(&path, &figure.bytes).with_context(|| format!("writing {}", path.display()))?;
    if ui.draws() {
        return super::lab::compare(runs, ui);
    }
    print!("{}", compare::table(&runs));
    print!("{}", compare::differences_text(&runs));
    println!("figure: {}", path.display());
    Ok(ExitCode::SUCCESS)
}
