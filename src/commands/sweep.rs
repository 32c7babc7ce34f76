//! `difflab sweep`, `difflab lr-find` and `difflab compare`, headless or in the TUI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use super::procedure::plan;
use super::BadInput;
use crate::config::RunArgs;
use crate::data::prepare::default_cache_dir;
use crate::events::RunStatus;
use crate::research::compare;
use crate::research::lr_find::{self, LrFindEvent, Range};
use crate::research::sweep::{self, SweepEvent};
use crate::sinks::human::describe;
use crate::tui::UiOptions;

pub fn sweep(args: &RunArgs, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let super::procedure::Planned { lock, base, preset, plan, warnings } = plan(args)?;
    super::print_warnings(&warnings);
    let handle = sweep::spawn(base.clone(), preset, plan, default_cache_dir(), lock);
    if ui.draws() {
        return super::lab::sweep(handle, &base, ui);
    }
    let mut current = String::new();
    let mut ended_well = false;
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
            SweepEvent::TrialEnd(t) if t.reused => eprintln!(
                "[sweep] {}: reused, not run again (it ended {} at step {} in an earlier session)",
                t.label, t.status, t.steps
            ),
            SweepEvent::TrialEnd(t) => eprintln!("[sweep] {}: {} after {} steps", t.label, t.status, t.steps),
            SweepEvent::Done { summary, written } => {
                print!("{}", sweep::table(&summary));
                // a sweep none of whose trials ended with a verdict, or whose summary could not be
                // written, failed: said, and exit 1
                let judged = summary.trials.iter().any(|t| !matches!(t.status, RunStatus::Failed | RunStatus::Skipped));
                if !judged {
                    eprintln!("[sweep] no trial ended with a verdict: each one's line above says why");
                }
                ended_well = judged && written.is_ok();
                match written {
                    Ok(path) => println!("summary: {}", path.display()),
                    Err(e) => eprintln!("[sweep] {e}: the table above is all there is of this sweep"),
                }
            }
        }
    }
    handle.join();
    Ok(if ended_well { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub fn lr_find(args: &RunArgs, range: Range, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let resolved = args.resolve()?;
    super::print_warnings(&resolved.warnings);
    let cfg = resolved.config;
    let folder = lr_find::folder(&cfg);
    if folder.join("lr_find.json").exists() {
        eprintln!("[lr-find] replacing the earlier range test in {}", folder.display());
    }
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
                let plot = dir.join("lr_find.png");
                eprintln!("[lr-find] plot: {}", plot.display());
                println!(
                    "{}",
                    serde_json::json!({
                        "recommended": suggestions.recommended, "recommended_by": suggestions.recommended_by,
                        "steepest": suggestions.steepest, "bottom": suggestions.bottom,
                        "minimum": suggestions.minimum, "valley": suggestions.valley,
                        "points": curve.lrs.len(), "stopped": curve.stopped, "plot": plot,
                    })
                );
            }
        }
    }
    worker.join().map_err(|_| anyhow::anyhow!("the lr-find thread panicked"))??;
    Ok(ExitCode::SUCCESS)
}

/// Where the comparison's PNG goes: `--png` (said when it replaces a file), else
/// `figures/compare-<names>.png` in the runs' common folder, with `-2`, `-3`, .. rather than over
/// an earlier one.
fn png_path(runs: &[compare::RunLog], png: Option<PathBuf>) -> PathBuf {
    if let Some(path) = png {
        if path.exists() {
            eprintln!("[compare] replacing {} (given with --png)", path.display());
        }
        return path;
    }
    let dirs: Vec<&Path> = runs.iter().map(|r| r.dir.as_path()).collect();
    let common = dirs.iter().skip(1).fold(dirs.first().map(|d| d.to_path_buf()).unwrap_or_default(), |acc, d| {
        acc.ancestors().find(|a| d.starts_with(a)).map(Path::to_path_buf).unwrap_or_default()
    });
    // a single run's own folder is not a folder of runs: its parent holds the figure
    let folder = if runs.len() == 1 { common.parent().map(Path::to_path_buf).unwrap_or_default() } else { common };
    let names: Vec<String> = runs.iter().map(|r| r.name.replace(['/', ' ', ','], "_")).collect();
    let mut stem: String = format!("compare-{}", names.join("-vs-"));
    if stem.len() > 80 {
        stem = format!("compare-{}-runs", runs.len());
    }
    let figures = folder.join("figures");
    (1..)
        .map(|k| figures.join(if k == 1 { format!("{stem}.png") } else { format!("{stem}-{k}.png") }))
        .find(|p| !p.exists())
        .unwrap_or_else(|| figures.join(format!("{stem}.png")))
}

pub fn compare(
    dirs: &[PathBuf],
    png: Option<PathBuf>,
    view: compare::CompareView,
    ui: UiOptions,
) -> anyhow::Result<ExitCode> {
    let mut runs = vec![];
    for d in dirs {
        runs.extend(compare::load_all(d).map_err(|e| BadInput(e.to_string()))?);
    }
    // names that tell the runs apart: the shortest distinguishing path suffixes
    let names = compare::distinguishing_names(&runs.iter().map(|r| r.dir.clone()).collect::<Vec<_>>());
    for (r, name) in runs.iter_mut().zip(names) {
        r.name = name;
    }
    let path = png_path(&runs, png);
    let figure = compare::figure(&runs, view).with_context(|| format!("drawing {}", path.display()))?;
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
