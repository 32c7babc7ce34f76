//! The terminal: owns it, runs the one event loop, and restores it on every way out.
//!
//! One channel carries everything the UI reacts to: terminal input (from a small input
//! thread), trainer events (live, or tailed from a run's `metrics.jsonl` when watching) and the
//! trainer's end. The loop drains it, updates the `App`, feeds the sinks, and draws: at once
//! after a key, a click or a resize, and at most every `FRAME` for the trainer's events (a run
//! sends many a second; charts read well at four frames a second, and the trainer keeps the CPU).

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use crossterm::event::{self as term, DisableMouseCapture, EnableMouseCapture, KeyCode, KeyEventKind, KeyModifiers, MouseButton, MouseEventKind};
use crossterm::execute;

use crate::app::overlay::{Kind, Overlay};
use crate::app::{App, Command, Dashboard, Key, Mode, Msg, Picker};
use crate::config::RunConfig;
use crate::sweep::compare::Run;
use crate::sweep::lr_find::LrFindEvent;
use crate::sweep::{SweepEvent, SweepHandle};
use crate::cli::{RunArgs, UiOptions};
use crate::commands::{headless, resolve_run};
use crate::config::PresetLibrary;
use crate::events::{ControlMsg, Event};
use crate::remote::{self, Inbox};
use crate::sinks::{self, metrics::METRICS_FILE, Sinks};
use crate::train::{self, StopSignal, TrainHandle};

/// The shortest time between two frames drawn for trainer events.
const FRAME: Duration = Duration::from_millis(250);

enum Input {
    Term(term::Event),
    Train(Event),
    TrainerDone(Result<(), String>),
    Sweep(SweepEvent),
    LrFind(LrFindEvent),
}

/// A run this process trains, with its sinks and inbox.
struct OwnedRun {
    handle_controls: Sender<ControlMsg>,
    sinks: Sinks,
    _inbox: Inbox,
    output_dir: PathBuf,
}

/// Where the dashboard's events come from and its controls go.
enum Backend {
    None,
    Owned(OwnedRun),
    Watching(PathBuf),
    Sweep(StopSignal),
}

fn key_of(k: term::KeyEvent) -> Option<Key> {
    if k.kind != KeyEventKind::Press {
        return None;
    }
    Some(match k.code {
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::CtrlC,
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Left => Key::Left,
        KeyCode::Right => Key::Right,
        KeyCode::Tab => Key::Tab,
        _ => return None,
    })
}

fn spawn_input(tx: Sender<Input>) {
    let _ = std::thread::Builder::new().name("difflab-input".into()).spawn(move || loop {
        match term::read() {
            Ok(e) => {
                if tx.send(Input::Term(e)).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
}

/// Forwards a trainer's events into the loop, then its end.
fn forward(handle: TrainHandle, tx: Sender<Input>) {
    let _ = std::thread::Builder::new().name("difflab-forward".into()).spawn(move || {
        for e in handle.events.iter() {
            if tx.send(Input::Train(e)).is_err() {
                return;
            }
        }
        let result = handle.join().map(|_| ()).map_err(|e| e.to_string());
        let _ = tx.send(Input::TrainerDone(result));
    });
}

/// Starts the run `args` names, with its file sinks and control inbox.
fn start_run(args: &RunArgs, tx: &Sender<Input>, stop: &StopSignal) -> anyhow::Result<(OwnedRun, String)> {
    let resolved = resolve_run(args)?;
    let out = PathBuf::from(&resolved.config.output_dir);
    std::fs::create_dir_all(&out).with_context(|| format!("creating output_dir {}", out.display()))?;
    let sinks = sinks::file_sinks(&out, &resolved.config).with_context(|| format!("opening the outputs in {}", out.display()))?;
    let handle = train::spawn_with(headless::spec(&resolved), stop.clone());
    let inbox = Inbox::start(&out, handle.controls.clone())?;
    let controls = handle.controls.clone();
    forward(handle, tx.clone());
    let title = resolved.preset.clone().unwrap_or_else(|| "run".into());
    Ok((OwnedRun { handle_controls: controls, sinks, _inbox: inbox, output_dir: out }, title))
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
                                if tx.send(Input::Train(e)).is_err() {
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

/// Counts SIGINT/SIGTERM: the first stops the run with a checkpoint, the second leaves.
fn signal_counter() -> anyhow::Result<Arc<AtomicUsize>> {
    let count = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let c = count.clone();
        // Safety: the handler only touches an atomic, which is async-signal-safe.
        unsafe { signal_hook::low_level::register(sig, move || { c.fetch_add(1, Ordering::SeqCst); }) }.context("installing signal handlers")?;
    }
    Ok(count)
}

pub fn lab(run: RunArgs, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let (tx, rx) = unbounded();
    let stop = StopSignal::default();
    let (app, backend) = if run.preset.is_some() {
        let (owned, title) = start_run(&run, &tx, &stop)?;
        (App::dashboard(Dashboard::new(&title), Mode::Owned, !ui.no_mouse, ui.ascii), Backend::Owned(owned))
    } else {
        let library = PresetLibrary::load();
        let presets = library.names().iter().map(|n| library.chain(n).map(|c| (c.clone(), c.last().cloned().unwrap_or_else(|| c[0].clone())))).collect();
        (App::picker(Picker::new(presets, run.flags.clone()), !ui.no_mouse, ui.ascii), Backend::None)
    };
    event_loop(app, backend, tx, rx, stop)
}

pub fn watch(dir: &Path, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let metrics = dir.join(METRICS_FILE);
    if !metrics.is_file() {
        return Err(crate::commands::BadInput(format!("{} has no {METRICS_FILE}: give the output_dir of a difflab run", dir.display())).into());
    }
    let (tx, rx) = unbounded();
    spawn_tail(metrics, tx.clone());
    let title = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let mut dash = Dashboard::new(&title);
    if !remote::is_live(dir) {
        dash.log_warning(format!("no trainer is attached to {} now: showing its history; controls will wait for the next session", dir.display()));
    }
    let app = App::dashboard(dash, Mode::Watching, !ui.no_mouse, ui.ascii);
    event_loop(app, Backend::Watching(dir.to_path_buf()), tx, rx, StopSignal::default())
}

fn set_mouse(on: bool) {
    let mut out = std::io::stdout();
    let _ = if on { execute!(out, EnableMouseCapture) } else { execute!(out, DisableMouseCapture) };
}

fn event_loop(mut app: App, mut backend: Backend, tx: Sender<Input>, rx: Receiver<Input>, stop: StopSignal) -> anyhow::Result<ExitCode> {
    let signals = signal_counter()?;
    let mut terminal = ratatui::init(); // raw mode, alternate screen, and a panic hook that restores both
    set_mouse(app.mouse);
    spawn_input(tx.clone());
    let result = run_loop(&mut app, &mut backend, &mut terminal, &tx, &rx, &stop, &signals);
    set_mouse(false);
    ratatui::restore();
    let outcome = result?;
    // after the alternate screen is gone: one line on what happened
    if let (Some(d), Backend::Owned(run)) = (app.dash(), &mut backend) {
        run.sinks.finish();
        for e in &run.sinks.errors {
            eprintln!("[warning] {e}");
        }
        let status = match &d.status {
            crate::app::dashboard::Status::Finished { status } => status.clone(),
            crate::app::dashboard::Status::Failed(e) => format!("failed ({e})"),
            _ => "left while running".into(),
        };
        eprintln!("difflab: {status} at step {} after {} of training -> {}", d.step, crate::ui::dashboard::duration(d.elapsed), run.output_dir.display());
    }
    Ok(outcome)
}

#[allow(clippy::too_many_arguments)]
fn run_loop(
    app: &mut App,
    backend: &mut Backend,
    terminal: &mut ratatui::DefaultTerminal,
    tx: &Sender<Input>,
    rx: &Receiver<Input>,
    stop: &StopSignal,
    signals: &AtomicUsize,
) -> anyhow::Result<ExitCode> {
    let mut dirty = true;
    // a user action: drawn without waiting for the next frame
    let mut urgent = true;
    let mut last_draw = Instant::now() - FRAME;
    let mut seen_signals = 0;
    let mut failed = false;
    loop {
        // one message (or a timeout), then everything else already waiting
        let wait = if dirty { FRAME.saturating_sub(last_draw.elapsed()) } else { FRAME };
        let first = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Ok(ExitCode::SUCCESS),
        };
        let mut commands = vec![];
        for input in first.into_iter().chain(rx.try_iter()) {
            // keys, clicks and resizes draw at once; mouse motion and the trainer wait a frame
            let from_user = matches!(input, Input::Term(_));
            let msg = match input {
                Input::Term(term::Event::Key(k)) => key_of(k).map(Msg::Key),
                Input::Term(term::Event::Mouse(m)) if app.mouse && m.kind == MouseEventKind::Down(MouseButton::Left) => {
                    let size = terminal.size()?;
                    crate::ui::hit(app, ratatui::layout::Rect::new(0, 0, size.width, size.height), m.column, m.row).map(Msg::Click)
                }
                Input::Term(term::Event::Resize(..)) => {
                    dirty = true;
                    urgent = true;
                    None
                }
                Input::Term(_) => None,
                Input::Train(e) => {
                    if let Backend::Owned(run) = backend {
                        run.sinks.handle(&e);
                        for w in run.sinks.errors.drain(..) {
                            commands.extend(app.update(Msg::Warning(w)));
                        }
                    }
                    Some(Msg::Event(e))
                }
                Input::TrainerDone(r) => {
                    failed = r.is_err();
                    Some(Msg::TrainerDone(r))
                }
                Input::Sweep(e) => Some(Msg::Sweep(e)),
                Input::LrFind(e) => Some(Msg::LrFind(e)),
            };
            if let Some(msg) = msg {
                commands.extend(app.update(msg));
                dirty = true;
                urgent |= from_user;
            }
        }
        let n = signals.load(Ordering::SeqCst);
        if n > seen_signals {
            seen_signals = n;
            commands.extend(app.update(Msg::Key(Key::CtrlC)));
            dirty = true;
            urgent = true;
        }
        for command in commands {
            match command {
                Command::Exit => return Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }),
                Command::SetMouse(on) => set_mouse(on),
                Command::StopSweep => {
                    if let Backend::Sweep(stop) = backend {
                        stop.request();
                    }
                }
                Command::Control(control) => {
                    let msg = ControlMsg { control, origin: if matches!(backend, Backend::Watching(_)) { "watch".into() } else { "ui".into() } };
                    match backend {
                        Backend::Owned(run) => {
                            let _ = run.handle_controls.send(msg);
                        }
                        Backend::Watching(dir) => {
                            let note = match remote::send(dir, &msg) {
                                Ok(_) if remote::is_live(dir) => format!("sent {}: the trainer applies it at its next step", control.action()),
                                Ok(_) => format!("queued {}: no trainer is attached to this run now", control.action()),
                                Err(e) => format!("cannot send {} (is the run directory writable?): {e}", control.action()),
                            };
                            app.update(Msg::Warning(note));
                            if app.exiting {
                                return Ok(ExitCode::SUCCESS);
                            }
                        }
                        Backend::None | Backend::Sweep(_) => {}
                    }
                }
                Command::Start(args) => match start_run(&args, tx, stop) {
                    Ok((run, title)) => {
                        app.show_dashboard(Dashboard::new(&title));
                        *backend = Backend::Owned(run);
                    }
                    Err(e) => {
                        if let crate::app::Screen::Picker(p) = &mut app.screen {
                            p.error = Some(format!("{e:#}"));
                        }
                    }
                },
            }
            dirty = true;
        }
        if dirty && (urgent || last_draw.elapsed() >= FRAME) {
            terminal.draw(|f| crate::ui::render(app, f))?;
            last_draw = Instant::now();
            dirty = false;
            urgent = false;
        }
    }
}

/// A sweep's trials, live, overlaid.
pub fn sweep(handle: SweepHandle, base: &RunConfig, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let (tx, rx) = unbounded();
    let stop = handle.stop.clone();
    let forward_tx = tx.clone();
    let _ = std::thread::Builder::new().name("difflab-sweep-forward".into()).spawn(move || {
        for e in handle.events.iter() {
            if forward_tx.send(Input::Sweep(e)).is_err() {
                return;
            }
        }
        handle.join();
    });
    let app = App::overlay(Overlay::new(Kind::Sweep, &format!("sweep -> {}", base.output_dir)), !ui.no_mouse, ui.ascii);
    event_loop(app, Backend::Sweep(stop), tx, rx, StopSignal::default())
}

/// The LR range test, live.
pub fn lr_find(
    events: crossbeam_channel::Receiver<LrFindEvent>,
    worker: std::thread::JoinHandle<Result<(crate::sweep::lr_find::Curve, crate::sweep::lr_find::Suggestions), crate::train::TrainError>>,
    cfg: &RunConfig,
    ui: UiOptions,
) -> anyhow::Result<ExitCode> {
    let (tx, rx) = unbounded();
    let forward_tx = tx.clone();
    let _ = std::thread::Builder::new().name("difflab-lr-forward".into()).spawn(move || {
        for e in events.iter() {
            if forward_tx.send(Input::LrFind(e)).is_err() {
                return;
            }
        }
        if let Ok(Err(e)) = worker.join() {
            let _ = forward_tx.send(Input::Train(Event::Message { level: crate::events::Level::Error, text: e.to_string() }));
        }
    });
    let app = App::overlay(Overlay::new(Kind::LrFind, &format!("LR range test -> {}/lr_find", cfg.output_dir)), !ui.no_mouse, ui.ascii);
    event_loop(app, Backend::None, tx, rx, StopSignal::default())
}

/// Finished runs, overlaid.
pub fn compare(runs: Vec<Run>, ui: UiOptions) -> anyhow::Result<ExitCode> {
    let (tx, rx) = unbounded();
    let app = App::overlay(Overlay::from_runs(&runs), !ui.no_mouse, ui.ascii);
    event_loop(app, Backend::None, tx, rx, StopSignal::default())
}
