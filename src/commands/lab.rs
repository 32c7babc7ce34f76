//! The lab session behind the TUI: starts runs (from the picker or `--preset`), feeds their
//! events through the file sinks to the dashboard, tails a watched run's `metrics.jsonl`,
//! sends controls (to a run of this process, or as files to a watched one), and forwards a
//! sweep's or an LR range test's events. The terminal itself is `tui`'s.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::Sender;

use super::{headless, BadInput};
use crate::app::dashboard::Status;
use crate::app::overlay::{Overlay, OverlayKind};
use crate::app::{App, Command, Dashboard, Mode, Msg, Picker};
use crate::config::{PresetLibrary, RunArgs, RunConfig};
use crate::data::prepare::default_cache_dir;
use crate::events::{ControlMsg, ControlOrigin, Event, Level};
use crate::research::compare::RunLog;
use crate::research::lr_find::{Curve, LrFindEvent, Suggestions};
use crate::research::study::StudyHandle;
use crate::research::sweep::SweepHandle;
use crate::session::{Console, Observed, RunSession};
use crate::sinks::metrics::METRICS_FILE;
use crate::train::remote;
use crate::train::{StopSignal, TrainError};
use crate::tui::{self, Host, Input, UiOptions};

/// A run this process trains: its controls, and the thread that runs its session, passing
/// each event to the UI.
struct OwnedRun {
    controls: Sender<ControlMsg>,
    output_dir: PathBuf,
    forwarder: JoinHandle<()>,
}

/// Where the dashboard's events come from and its controls go.
enum Backend {
    None,
    Owned(OwnedRun),
    Watching(PathBuf),
    Sweep(StopSignal),
}

struct Lab {
    backend: Backend,
    stop: StopSignal,
}

impl Host for Lab {
    fn perform(&mut self, command: Command, inputs: &Sender<Input>) -> Vec<Msg> {
        match command {
            Command::StopSweep => {
                if let Backend::Sweep(stop) = &self.backend {
                    stop.request();
                }
                vec![]
            }
            Command::Control(control) => match &self.backend {
                Backend::Owned(run) => {
                    let _ = run.controls.send(ControlMsg { control, origin: ControlOrigin::Ui });
                    vec![]
                }
                Backend::Watching(dir) => {
                    let msg = ControlMsg { control, origin: ControlOrigin::Watch };
                    let action = control.action();
                    let note = match remote::send(dir, &msg) {
                        Ok(_) if remote::is_live(dir) => {
                            format!("sent {action}: the trainer applies it at its next step")
                        }
                        Ok(_) => format!("queued {action}: no trainer is attached to this run now"),
                        Err(e) => format!("cannot send {action} (is the run directory writable?): {e}"),
                    };
                    vec![Msg::ControlSent(note)]
                }
                Backend::None | Backend::Sweep(_) => vec![],
            },
            Command::Start(args) => match start_procedure(&args, inputs) {
                Ok(Some((stop, started))) => {
                    self.backend = Backend::Sweep(stop);
                    vec![started]
                }
                Ok(None) => match start_run(&args, inputs, &self.stop) {
                    Ok((run, title)) => {
                        self.backend = Backend::Owned(run);
                        vec![Msg::RunStarted { title }]
                    }
                    Err(e) => vec![Msg::StartFailed(format!("{e:#}"))],
                },
                Err(e) => vec![Msg::StartFailed(format!("{e:#}"))],
            },
            Command::Watch(dir) => {
                let metrics = dir.join(METRICS_FILE);
                if !metrics.is_file() {
                    return vec![Msg::StartFailed(format!("{} has no {METRICS_FILE}", dir.display()))];
                }
                spawn_tail(metrics, inputs.clone());
                let title = dir.file_name().map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
                let live = remote::is_live(&dir);
                let shown = dir.display().to_string();
                self.backend = Backend::Watching(dir);
                vec![Msg::Watching { title, live, dir: shown }]
            }
            Command::Compare(dirs) => {
                match dirs.iter().map(|d| crate::research::compare::load(d)).collect::<Result<Vec<_>, _>>() {
                    Ok(mut runs) => {
                        let names = crate::research::compare::distinguishing_names(&dirs);
                        runs.iter_mut().zip(names).for_each(|(r, n)| r.name = n);
                        vec![Msg::Compared(runs)]
                    }
                    Err(e) => vec![Msg::StartFailed(e.to_string())],
                }
            }
            Command::Exit | Command::SetMouse(_) => vec![],
        }
    }
}

/// A preset that is a procedure (`sweep:` or `study:`) starts it; its events go to `tx`.
/// Returns its stop signal and the message that shows its view, or `None` for a plain run.
fn start_procedure(args: &RunArgs, tx: &Sender<Input>) -> anyhow::Result<Option<(StopSignal, Msg)>> {
    if args.preset.is_none() {
        return Ok(None);
    }
    let resolved = args.resolve()?;
    if resolved.sweep.is_some() {
        let super::procedure::Planned { lock, base, preset, plan, warnings } = super::procedure::plan(args)?;
        warn(tx, &warnings);
        let handle = crate::research::sweep::spawn(base.clone(), preset, plan, default_cache_dir(), lock);
        let stop = handle.stop.clone();
        forward(handle.events.clone(), tx.clone(), Msg::Sweep);
        let title = format!("sweep -> {}", base.output_dir);
        return Ok(Some((stop, Msg::ProcedureStarted { kind: OverlayKind::Sweep, title, arms: vec![] })));
    }
    if resolved.study.is_some() {
        let study_args =
            super::procedure::StudyArgs { run: args.clone(), arms: vec![], seeds: None, ui: UiOptions::default() };
        let prepared = super::procedure::prepare(&study_args)?;
        warn(tx, &prepared.warnings);
        let (title, arms) = (format!("study -> {}", prepared.root.display()), prepared.labels());
        let handle = prepared.spawn();
        let stop = handle.stop.clone();
        forward(handle.events.clone(), tx.clone(), Msg::Study);
        return Ok(Some((stop, Msg::ProcedureStarted { kind: OverlayKind::Study, title, arms })));
    }
    Ok(None)
}

/// Shows warnings in the UI's log (the terminal is the TUI's: nothing is printed).
fn warn(tx: &Sender<Input>, warnings: &[String]) {
    for w in warnings {
        let _ = tx.send(Input::app(Msg::Warning(w.clone())));
    }
}

/// Passes a procedure's events to the UI until it ends or the UI is gone.
fn forward<E: Send + 'static>(events: crossbeam_channel::Receiver<E>, tx: Sender<Input>, wrap: fn(E) -> Msg) {
    let _ = std::thread::Builder::new().name("difflab-procedure-forward".into()).spawn(move || {
        for e in events.iter() {
            if tx.send(Input::app(wrap(e))).is_err() {
                return;
            }
        }
    });
}

/// Starts the run `args` names (its session: folder, sinks, control inbox), its events passed
/// to the UI, with the resolution's warnings.
fn start_run(args: &RunArgs, tx: &Sender<Input>, stop: &StopSignal) -> anyhow::Result<(OwnedRun, String)> {
    let resolved = headless::prepare(&args.resolve()?)?;
    warn(tx, &resolved.warnings);
    let output_dir = PathBuf::from(&resolved.config.output_dir);
    let session = RunSession::start(headless::spec(&resolved, crate::dist::World::single()), stop.clone(), Console::Quiet)
        .map_err(|e| match e.taken() {
            // the flags the message names are not at hand here: say what the picker can do
            Some(dir) => anyhow::anyhow!(
                "output_dir {} already holds a run; nothing was changed. Press o to give this run another folder, or Tab to the runs list, where Enter resumes that run",
                dir.display()
            ),
            None => e.into(),
        })?;
    let controls = session.controls();
    let tx = tx.clone();
    let forwarder = std::thread::Builder::new()
        .name("difflab-forward".into())
        .spawn(move || {
            let outcome = session.run(&mut |seen| {
                let msg = match seen {
                    Observed::Event(e) => Msg::Event(e.clone()),
                    Observed::SinkFailed(e) => Msg::Warning(e.to_string()),
                };
                let _ = tx.send(Input::app(msg));
            });
            let _ = tx.send(Input::app(Msg::TrainerDone(outcome.error.map_or(Ok(()), |e| Err(e.to_string())))));
        })
        .context("starting the event thread")?;
    let title = resolved.preset.clone().unwrap_or_else(|| "run".into());
    Ok((OwnedRun { controls, output_dir, forwarder }, title))
}

/// Tails a run's metrics.jsonl: its history first, then each new complete line.
fn spawn_tail(path: PathBuf, tx: Sender<Input>) {
    let _ = std::thread::Builder::new().name("difflab-tail".into()).spawn(move || {
        let mut offset = 0u64;
        let mut pending = String::new();
        loop {
            if let Ok(mut f) = std::fs::File::open(&path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < offset {
                    offset = 0; // replaced or truncated: read it again
                    pending.clear();
                }
                if f.seek(SeekFrom::Start(offset)).is_ok() {
                    let mut reader = BufReader::new(f);
                    let mut line = String::new();
                    while let Ok(n) = reader.read_line(&mut line) {
                        if n == 0 {
                            break;
                        }
                        offset += n as u64;
                        pending.push_str(&line);
                        line.clear();
                        if pending.ends_with('\n') {
                            if let Ok(e) = serde_json::from_str::<Event>(pending.trim_end()) {
                                if tx.send(Input::app(Msg::Event(e))).is_err() {
                                    return;
                                }
                            }
                            pending.clear();
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
}

/// The newest runs the picker's list reads (each one's metrics file is read in full).
const RUN_LIST_LIMIT: usize = 200;

/// Where the picker looks for past runs: the command line's `--output_dir` when it names a
/// folder of runs (ends in `/`), else the folder above it; `outputs` by default (every
/// built-in preset writes under it).
fn runs_root(flags: &[(String, String)]) -> PathBuf {
    match flags.iter().rev().find(|(k, _)| k == "output_dir") {
        Some((_, dir)) if dir.ends_with('/') => PathBuf::from(dir),
        Some((_, dir)) => Path::new(dir)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        None => PathBuf::from("outputs"),
    }
}

/// `difflab [--preset P]`: the picker, or the dashboard of that run at once.
pub fn lab(run: RunArgs, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let (tx, rx) = tui::channel();
    let mut lab = Lab { backend: Backend::None, stop: StopSignal::default() };
    let procedure = start_procedure(&run, &tx)?;
    let app = if let Some((stop, started)) = procedure {
        lab.backend = Backend::Sweep(stop);
        let mut app = App::overlay(Overlay::new(OverlayKind::Sweep, "starting"), !ui.no_mouse, ui.ascii);
        app.update(started);
        app
    } else if run.preset.is_some() {
        let (owned, title) = start_run(&run, &tx, &lab.stop)?;
        lab.backend = Backend::Owned(owned);
        App::dashboard(Dashboard::new(&title), Mode::Owned, !ui.no_mouse, ui.ascii)
    } else {
        let library = PresetLibrary::load();
        let presets = library
            .names()
            .iter()
            .map(|n| library.chain(n).map(|c| (c.clone(), c.last().cloned().unwrap_or_else(|| c[0].clone()))))
            .collect();
        let measured = crate::train::throughput::load(&default_cache_dir());
        let root = runs_root(&run.flags);
        let runs = crate::research::runs::list_runs(&root, RUN_LIST_LIMIT);
        let picker = Picker::new(presets, run.flags.clone()).with_measured(&measured).with_runs(root, runs);
        App::picker(picker, !ui.no_mouse, ui.ascii)
    };
    let (app, code) = tui::run(app, &mut lab, tx, rx)?;
    // after the alternate screen is gone: one line on what happened
    if let (Some(d), Backend::Owned(run)) = (app.dash(), lab.backend) {
        if d.finished() {
            let _ = run.forwarder.join();
        }
        let status = match &d.status {
            Status::Finished { status } => status.to_string(),
            Status::Failed(e) => format!("failed ({e})"),
            _ => "left while running".into(),
        };
        eprintln!(
            "difflab: {status} at step {} after {} of training -> {}",
            d.step,
            crate::ui::dashboard::duration(d.elapsed),
            run.output_dir.display()
        );
    }
    Ok(code)
}

/// `difflab watch RUN_DIR`: a run started elsewhere, from its metrics.jsonl, with controls as files.
pub fn watch(dir: &Path, ui: UiOptions) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let metrics = dir.join(METRICS_FILE);
    if !metrics.is_file() {
        return Err(
            BadInput(format!("{} has no {METRICS_FILE}: give the output_dir of a difflab run", dir.display())).into()
        );
    }
    if !std::io::stdout().is_terminal() {
        return Err(BadInput(format!(
            "watch draws the run in a terminal, and stdout is not one; read {} instead, or run watch in a terminal",
            metrics.display()
        ))
        .into());
    }
    let (tx, rx) = tui::channel();
    let mut lab = Lab { backend: Backend::None, stop: StopSignal::default() };
    let mut app = App::dashboard(Dashboard::new("run"), Mode::Watching, !ui.no_mouse, ui.ascii);
    for msg in lab.perform(Command::Watch(dir.to_path_buf()), &tx) {
        app.update(msg);
    }
    Ok(tui::run(app, &mut lab, tx, rx)?.1)
}

/// A study's runs, live: curves coloured by arm with their bands, then the table.
pub fn study(handle: StudyHandle, root: &Path, arms: Vec<String>, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let (tx, rx) = tui::channel();
    forward(handle.events.clone(), tx.clone(), Msg::Study);
    let mut overlay = Overlay::new(OverlayKind::Study, &format!("study -> {}", root.display()));
    overlay.arms = arms;
    let app = App::overlay(overlay, !ui.no_mouse, ui.ascii);
    let mut lab = Lab { backend: Backend::Sweep(handle.stop.clone()), stop: StopSignal::default() };
    Ok(tui::run(app, &mut lab, tx, rx)?.1)
}

/// A sweep's trials, live, overlaid.
pub fn sweep(handle: SweepHandle, base: &RunConfig, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let (tx, rx) = tui::channel();
    forward(handle.events.clone(), tx.clone(), Msg::Sweep);
    let app = App::overlay(
        Overlay::new(OverlayKind::Sweep, &format!("sweep -> {}", base.output_dir)),
        !ui.no_mouse,
        ui.ascii,
    );
    let mut lab = Lab { backend: Backend::Sweep(handle.stop.clone()), stop: StopSignal::default() };
    Ok(tui::run(app, &mut lab, tx, rx)?.1)
}

/// The LR range test, live.
pub fn lr_find(
    events: crossbeam_channel::Receiver<LrFindEvent>,
    worker: JoinHandle<Result<(Curve, Suggestions), TrainError>>,
    cfg: &RunConfig,
    ui: UiOptions,
) -> anyhow::Result<ExitCode> {
    let (tx, rx) = tui::channel();
    let forward_tx = tx.clone();
    let _ = std::thread::Builder::new().name("difflab-lr-forward".into()).spawn(move || {
        for e in events.iter() {
            if forward_tx.send(Input::app(Msg::LrFind(e))).is_err() {
                return;
            }
        }
        if let Ok(Err(e)) = worker.join() {
            let _ =
                forward_tx.send(Input::app(Msg::Event(Event::Message { level: Level::Error, text: e.to_string() })));
        }
    });
    let app = App::overlay(
        Overlay::new(
            OverlayKind::LrFind,
            &format!("LR range test -> {}", crate::research::lr_find::folder(cfg).display()),
        ),
        !ui.no_mouse,
        ui.ascii,
    );
    let mut lab = Lab { backend: Backend::None, stop: StopSignal::default() };
    Ok(tui::run(app, &mut lab, tx, rx)?.1)
}

/// Finished runs, overlaid.
pub fn compare(runs: Vec<RunLog>, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let (tx, rx) = tui::channel();
    let app = App::overlay(Overlay::from_runs(&runs), !ui.no_mouse, ui.ascii);
    let mut lab = Lab { backend: Backend::None, stop: StopSignal::default() };
    Ok(tui::run(app, &mut lab, tx, rx)?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Started from the picker, a folder that holds an earlier run is refused with what the
    /// picker can do (the CLI's message names flags the picker does not have).
    #[test]
    fn a_folder_that_holds_a_run_is_refused_with_what_the_picker_can_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(METRICS_FILE), "").unwrap();
        let out = dir.path().display().to_string();
        let args = RunArgs { preset: Some("demo".into()), flags: vec![("output_dir".into(), out.clone())] };
        let mut lab = Lab { backend: Backend::None, stop: StopSignal::default() };
        let (tx, _rx) = tui::channel();
        let msgs = lab.perform(Command::Start(args), &tx);
        let [Msg::StartFailed(message)] = msgs.as_slice() else { panic!("expected one refusal, got {msgs:?}") };
        assert!(message.contains(&out) && message.contains("already holds a run"), "{message}");
        assert!(message.contains("Press o") && message.contains("Enter resumes"), "{message}");
        assert!(!message.contains("--overwrite_output_dir"), "{message}");
        assert!(matches!(lab.backend, Backend::None));
        assert_eq!(std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap(), "", "nothing was changed");
    }
}
