//! The terminal: owns it, reads its input, runs the one event loop with its throttled draw,
//! and restores it on every way out. What the app asks for beyond the screen (start a run,
//! send a control, stop a sweep) is carried out by a `Host` the caller supplies.
//!
//! One channel carries everything the UI reacts to: terminal input (from a small input
//! thread) and the app's messages from the session's threads (trainer events, a sweep's
//! trials). The loop drains it, updates the `App`, and draws: at once after a key, a click or a
//! resize, and at most every `FRAME` otherwise (a run sends many events a second; charts read
//! well at four frames a second, and the trainer keeps the CPU).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use crossterm::event::{
    self as term, DisableMouseCapture, EnableMouseCapture, KeyCode, KeyEventKind, KeyModifiers, MouseButton,
    MouseEventKind,
};
use crossterm::execute;

use crate::app::{App, Command, Key, Msg};
use crate::signals::Interrupts;

/// The shortest time between two frames drawn for messages that are not the user's.
const FRAME: Duration = Duration::from_millis(250);

/// How the terminal is used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UiOptions {
    pub no_mouse: bool,
    pub ascii: bool,
    /// Draw no TUI even on a terminal.
    pub headless: bool,
}

impl UiOptions {
    /// Whether to draw: not asked to be headless, and stdout is a terminal.
    pub fn draws(&self) -> bool {
        use std::io::IsTerminal;
        !self.headless && std::io::stdout().is_terminal()
    }
}

/// What the loop reads.
pub enum Input {
    Term(term::Event),
    /// A message for the app from one of the session's threads (boxed: a message is far
    /// larger than a terminal event).
    App(Box<Msg>),
}

impl Input {
    pub fn app(msg: Msg) -> Self {
        Input::App(Box::new(msg))
    }
}

/// The application side of the loop.
pub trait Host {
    /// Carries out a command of the app's other than `Exit` and `SetMouse` (the terminal's
    /// own); what comes of it returns as messages, now or later through `inputs`.
    fn perform(&mut self, command: Command, inputs: &Sender<Input>) -> Vec<Msg>;
}

/// A channel for the loop: the session's threads send on the sender.
pub fn channel() -> (Sender<Input>, Receiver<Input>) {
    unbounded()
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
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
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

fn set_mouse(on: bool) {
    let mut out = std::io::stdout();
    let _ = if on { execute!(out, EnableMouseCapture) } else { execute!(out, DisableMouseCapture) };
}

/// Takes the terminal, runs the loop until the app exits, and gives the terminal back (also on
/// an error; on a panic the hook set here turns mouse capture off and ratatui's restores the rest). Returns the app as it ended.
pub fn run(
    mut app: App,
    session: &mut dyn Host,
    tx: Sender<Input>,
    rx: Receiver<Input>,
) -> anyhow::Result<(App, ExitCode)> {
    let interrupts = Interrupts::install().context("installing signal handlers")?;
    let mut terminal = ratatui::init(); // raw mode, alternate screen, and a panic hook that restores both
                                        // ratatui's hook does not know about mouse capture: turn it off first, or the shell is left
                                        // receiving mouse reports after a panic
    let restore_screen = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        set_mouse(false);
        restore_screen(info);
    }));
    set_mouse(app.mouse);
    spawn_input(tx.clone());
    let result = event_loop(&mut app, session, &mut terminal, &tx, &rx, &interrupts);
    set_mouse(false);
    ratatui::restore();
    Ok((app, result?))
}

fn event_loop(
    app: &mut App,
    session: &mut dyn Host,
    terminal: &mut ratatui::DefaultTerminal,
    tx: &Sender<Input>,
    rx: &Receiver<Input>,
    interrupts: &Interrupts,
) -> anyhow::Result<ExitCode> {
    let mut dirty = true;
    // a user action: drawn without waiting for the next frame
    let mut urgent = true;
    let mut last_draw = Instant::now() - FRAME;
    let mut failed = false;
    loop {
        // one input (or a timeout), then everything else already waiting
        let wait = if dirty { FRAME.saturating_sub(last_draw.elapsed()) } else { FRAME };
        let first = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Ok(ExitCode::SUCCESS),
        };
        let mut messages = vec![];
        for input in first.into_iter().chain(rx.try_iter()) {
            match input {
                Input::Term(term::Event::Key(k)) => messages.extend(key_of(k).map(|k| (Msg::Key(k), true))),
                Input::Term(term::Event::Mouse(m)) if app.mouse && m.kind == MouseEventKind::ScrollUp => {
                    messages.push((Msg::Key(Key::WheelUp), true))
                }
                Input::Term(term::Event::Mouse(m)) if app.mouse && m.kind == MouseEventKind::ScrollDown => {
                    messages.push((Msg::Key(Key::WheelDown), true))
                }
                Input::Term(term::Event::Mouse(m))
                    if app.mouse && m.kind == MouseEventKind::Down(MouseButton::Left) =>
                {
                    let size = terminal.size()?;
                    let area = ratatui::layout::Rect::new(0, 0, size.width, size.height);
                    messages.extend(crate::ui::hit(app, area, m.column, m.row).map(|b| (Msg::Click(b), true)));
                }
                Input::Term(term::Event::Resize(..)) => {
                    dirty = true;
                    urgent = true;
                }
                Input::Term(_) => {}
                Input::App(msg) => messages.push((*msg, false)),
            }
        }
        if interrupts.take() {
            messages.push((Msg::Key(Key::CtrlC), true));
        }
        // keys, clicks and resizes draw at once; the session's messages wait for a frame
        let mut commands = vec![];
        while !messages.is_empty() {
            for (msg, from_user) in std::mem::take(&mut messages) {
                failed |= matches!(msg, Msg::TrainerDone(Err(_)));
                commands.extend(app.update(msg));
                dirty = true;
                urgent |= from_user;
            }
            for command in std::mem::take(&mut commands) {
                match command {
                    Command::Exit => return Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }),
                    Command::SetMouse(on) => set_mouse(on),
                    other => messages.extend(session.perform(other, tx).into_iter().map(|m| (m, true))),
                }
                dirty = true;
            }
        }
        if dirty && (urgent || last_draw.elapsed() >= FRAME) {
            terminal.draw(|f| crate::ui::render(app, f))?;
            last_draw = Instant::now();
            dirty = false;
            urgent = false;
        }
    }
}
