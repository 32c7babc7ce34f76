//! The TUI's state and its transitions (the Model/update half of the Elm architecture): a pure
//! function of messages, testable without a terminal. No ratatui, no crossterm, no candle.

pub mod dashboard;
pub mod overlay;
pub mod picker;

pub use dashboard::Dashboard;
pub use overlay::Overlay;
pub use picker::Picker;

use crate::config::RunArgs;
use crate::events::{Control, Event};

/// A key, already decoded from the terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Enter,
    Esc,
    Backspace,
    Up,
    Down,
    Left,
    Right,
    Tab,
    CtrlC,
    /// Page up / down, and the mouse wheel (a few lines), on the event log.
    PageUp,
    PageDown,
    WheelUp,
    WheelDown,
}

/// How far a key moves the event log: up (positive) into older lines, or down.
fn scroll_lines(key: Key) -> Option<isize> {
    match key {
        Key::PageUp => Some(dashboard::LOG_PAGE),
        Key::PageDown => Some(-dashboard::LOG_PAGE),
        Key::WheelUp => Some(3),
        Key::WheelDown => Some(-3),
        _ => None,
    }
}

/// The clickable buttons (the same actions as keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Button {
    Pause,
    Checkpoint,
    LowerLr,
    Quit,
    LogY,
    Smoothing,
    Panel,
    Mouse,
    DialogSave,
    DialogStop,
    DialogCancel,
    Start,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Key(Key),
    Click(Button),
    /// A trainer event (live, or read from a run's metrics.jsonl when watching).
    Event(Event),
    /// The trainer thread ended; `Err` carries its error for display.
    TrainerDone(Result<(), String>),
    /// A sink or the inbox reported a problem.
    Warning(String),
    Sweep(crate::research::sweep::SweepEvent),
    LrFind(crate::research::lr_find::LrFindEvent),
    Study(crate::research::study::StudyEvent),
    /// A preset that is a sweep or a study started: its view, with the study's arm labels.
    ProcedureStarted {
        kind: overlay::OverlayKind,
        title: String,
        arms: Vec<String>,
    },
    /// The run the picker asked for started; the dashboard shows it under this title.
    RunStarted {
        title: String,
    },
    /// The run the picker asked for could not start: shown in the picker.
    StartFailed(String),
    /// A run from the picker's list is being watched: its dashboard, fed from its metrics.
    Watching {
        title: String,
        live: bool,
        dir: String,
    },
    /// The runs marked in the picker, loaded for comparison.
    Compared(Vec<crate::research::compare::RunLog>),
    /// A control was written to a watched run's directory: what happened to it.
    ControlSent(String),
}

/// What the update asks the loop to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Start(RunArgs),
    /// Open a run's dashboard from its metrics file (the picker's run list).
    Watch(std::path::PathBuf),
    /// Load these runs and overlay them.
    Compare(Vec<std::path::PathBuf>),
    Control(Control),
    SetMouse(bool),
    /// Stop the sweep: the running trial stops with a checkpoint, the rest are skipped.
    StopSweep,
    Exit,
}

/// Whether the dashboard drives a trainer of this process or watches a run elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Owned,
    Watching,
}

#[derive(Debug)]
pub enum Screen {
    Picker(Box<Picker>),
    Dashboard(Box<Dashboard>),
    Overlay(Box<Overlay>),
}

/// The quit dialog's question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialog {
    /// Owned run: stop and save / stop without saving / cancel.
    Quit,
    /// Watching: detach (the run continues) / stop the run and save / cancel.
    Detach,
}

#[derive(Debug)]
pub struct App {
    pub screen: Screen,
    pub mode: Mode,
    pub dialog: Option<Dialog>,
    pub mouse: bool,
    pub ascii: bool,
    /// Set once the user asked to leave; the loop exits when the trainer has stopped.
    pub exiting: bool,
}

impl App {
    pub fn picker(picker: Picker, mouse: bool, ascii: bool) -> Self {
        Self { screen: Screen::Picker(Box::new(picker)), mode: Mode::Owned, dialog: None, mouse, ascii, exiting: false }
    }

    pub fn dashboard(dashboard: Dashboard, mode: Mode, mouse: bool, ascii: bool) -> Self {
        Self { screen: Screen::Dashboard(Box::new(dashboard)), mode, dialog: None, mouse, ascii, exiting: false }
    }

    pub fn overlay(overlay: Overlay, mouse: bool, ascii: bool) -> Self {
        Self {
            screen: Screen::Overlay(Box::new(overlay)),
            mode: Mode::Owned,
            dialog: None,
            mouse,
            ascii,
            exiting: false,
        }
    }

    pub fn dash(&self) -> Option<&Dashboard> {
        match &self.screen {
            Screen::Dashboard(d) => Some(d),
            _ => None,
        }
    }

    fn dash_mut(&mut self) -> Option<&mut Dashboard> {
        match &mut self.screen {
            Screen::Dashboard(d) => Some(d),
            _ => None,
        }
    }

    fn run_is_live(&self) -> bool {
        self.dash().is_some_and(|d| !d.finished())
    }

    /// The one place state changes. Returns what the loop should do.
    pub fn update(&mut self, msg: Msg) -> Vec<Command> {
        match msg {
            Msg::Event(e) => {
                match &mut self.screen {
                    Screen::Dashboard(d) => d.apply(&e),
                    Screen::Overlay(o) => {
                        if let Event::Message { text, .. } = &e {
                            o.note(text.clone());
                        }
                    }
                    Screen::Picker(_) => {}
                }
                vec![]
            }
            Msg::TrainerDone(result) => {
                if let Some(d) = self.dash_mut() {
                    d.trainer_done(result);
                }
                if self.exiting {
                    vec![Command::Exit]
                } else {
                    vec![]
                }
            }
            Msg::Warning(w) => {
                if let Some(d) = self.dash_mut() {
                    d.log_warning(w);
                }
                vec![]
            }
            Msg::Sweep(_) | Msg::LrFind(_) | Msg::Study(_) => self.on_procedure(msg),
            Msg::ProcedureStarted { kind, title, arms } => {
                let mut o = Overlay::new(kind, &title);
                o.arms = arms;
                self.screen = Screen::Overlay(Box::new(o));
                vec![]
            }
            Msg::RunStarted { title } => {
                self.screen = Screen::Dashboard(Box::new(Dashboard::new(&title)));
                self.mode = Mode::Owned;
                vec![]
            }
            Msg::Watching { title, live, dir } => {
                let mut dash = Dashboard::new(&title);
                if !live {
                    dash.log_warning(format!(
                        "no trainer is attached to {dir} now: showing its history; controls will wait for the next session"
                    ));
                }
                self.screen = Screen::Dashboard(Box::new(dash));
                self.mode = Mode::Watching;
                vec![]
            }
            Msg::Compared(runs) => {
                self.screen = Screen::Overlay(Box::new(Overlay::from_runs(&runs)));
                vec![]
            }
            Msg::StartFailed(e) => {
                if let Screen::Picker(p) = &mut self.screen {
                    p.error = Some(e);
                }
                vec![]
            }
            Msg::ControlSent(note) => {
                if let Some(d) = self.dash_mut() {
                    d.log_warning(note);
                }
                // a watcher that asked to stop the run has nothing to wait for
                if self.exiting && self.mode == Mode::Watching {
                    vec![Command::Exit]
                } else {
                    vec![]
                }
            }
            Msg::Key(key) => self.on_key(key),
            Msg::Click(button) => self.on_button(button),
        }
    }

    /// A procedure's event on its overlay; once one asked to exit, its end ends the session.
    fn on_procedure(&mut self, msg: Msg) -> Vec<Command> {
        let Screen::Overlay(o) = &mut self.screen else { return vec![] };
        let done = match &msg {
            Msg::Sweep(e) => {
                o.apply_sweep(e);
                matches!(e, crate::research::sweep::SweepEvent::Done { .. })
            }
            Msg::Study(e) => {
                o.apply_study(e);
                matches!(e, crate::research::study::StudyEvent::Done { .. })
            }
            Msg::LrFind(e) => {
                o.apply_lr_find(e);
                false
            }
            _ => false,
        };
        if self.exiting && done {
            vec![Command::Exit]
        } else {
            vec![]
        }
    }

    /// Keys on the overlay view: `q` leaves (a running sweep is stopped first), `y` log-y.
    fn on_overlay_key(&mut self, key: Key) -> Vec<Command> {
        let Screen::Overlay(o) = &mut self.screen else { return vec![] };
        match key {
            Key::Char('y') => {
                o.log_y = !o.log_y;
                vec![]
            }
            Key::Char('q') | Key::Esc
                if o.finished
                    || !matches!(o.kind, overlay::OverlayKind::Sweep | overlay::OverlayKind::Study)
                    || self.exiting =>
            {
                vec![Command::Exit]
            }
            Key::Char('q') | Key::Esc => {
                self.exiting = true;
                o.status = if o.kind == overlay::OverlayKind::Study {
                    "stopping the study after this run's checkpoint (resume it by running it again)".into()
                } else {
                    "stopping the sweep after this trial's checkpoint".into()
                };
                vec![Command::StopSweep]
            }
            _ => vec![],
        }
    }

    fn on_key(&mut self, key: Key) -> Vec<Command> {
        if key == Key::CtrlC {
            return self.ctrl_c();
        }
        if self.dialog.is_some() {
            let button = match key {
                Key::Char('s') => Button::DialogSave,
                Key::Char('d') => Button::DialogStop,
                Key::Char('c') | Key::Char('q') | Key::Esc => Button::DialogCancel,
                _ => return vec![],
            };
            return self.on_button(button);
        }
        if matches!(self.screen, Screen::Overlay(_)) {
            return self.on_overlay_key(key);
        }
        if let Screen::Picker(p) = &mut self.screen {
            return match p.on_key(key) {
                picker::Outcome::Start(args) => self.start(args),
                picker::Outcome::Watch(dir) => vec![Command::Watch(dir)],
                picker::Outcome::Compare(dirs) => vec![Command::Compare(dirs)],
                picker::Outcome::Quit => vec![Command::Exit],
                picker::Outcome::Stay => vec![],
            };
        }
        if let (Screen::Dashboard(d), Some(lines)) = (&mut self.screen, scroll_lines(key)) {
            d.scroll_log(lines);
            return vec![];
        }
        let button = match key {
            Key::Char('p') | Key::Char(' ') => Button::Pause,
            Key::Char('c') => Button::Checkpoint,
            Key::Char('l') => Button::LowerLr,
            Key::Char('q') | Key::Esc => Button::Quit,
            Key::Char('y') => Button::LogY,
            Key::Char('s') => Button::Smoothing,
            Key::Char('v') => Button::Panel,
            Key::Char('m') => Button::Mouse,
            _ => return vec![],
        };
        self.on_button(button)
    }

    fn start(&mut self, args: RunArgs) -> Vec<Command> {
        vec![Command::Start(args)]
    }

    /// Ctrl-C: stop and save, as in a headless run; a second one leaves at once.
    fn ctrl_c(&mut self) -> Vec<Command> {
        if matches!(self.screen, Screen::Overlay(_)) {
            return self.on_overlay_key(Key::Char('q'));
        }
        if self.exiting || !self.run_is_live() {
            return vec![Command::Exit];
        }
        self.exiting = true;
        self.dialog = None;
        match self.mode {
            Mode::Owned => vec![Command::Control(Control::Stop { save: true })],
            Mode::Watching => vec![Command::Exit],
        }
    }

    fn on_button(&mut self, button: Button) -> Vec<Command> {
        match button {
            Button::Mouse => {
                self.mouse = !self.mouse;
                return vec![Command::SetMouse(self.mouse)];
            }
            Button::Start => {
                if let Screen::Picker(p) = &self.screen {
                    let args = p.run_args();
                    return self.start(args);
                }
                return vec![];
            }
            Button::DialogCancel => {
                self.dialog = None;
                return vec![];
            }
            Button::DialogSave | Button::DialogStop => {
                let Some(dialog) = self.dialog.take() else { return vec![] };
                return match (dialog, button) {
                    (_, Button::DialogSave) => {
                        self.exiting = true;
                        vec![Command::Control(Control::Stop { save: true })]
                    }
                    (Dialog::Quit, _) => {
                        self.exiting = true;
                        vec![Command::Control(Control::Stop { save: false })]
                    }
                    // `d` while watching: detach, the run goes on without us
                    (Dialog::Detach, _) => vec![Command::Exit],
                };
            }
            Button::Quit => {
                if !self.run_is_live() {
                    return vec![Command::Exit];
                }
                self.dialog = Some(match self.mode {
                    Mode::Owned => Dialog::Quit,
                    Mode::Watching => Dialog::Detach,
                });
                return vec![];
            }
            _ => {}
        }
        let live = self.run_is_live();
        let Some(d) = self.dash_mut() else { return vec![] };
        match button {
            Button::LogY => d.view.log_y = !d.view.log_y,
            Button::Smoothing => d.view.cycle_smoothing(),
            Button::Panel => d.view.panel = d.view.panel.next(),
            Button::Pause if live => {
                let control = if d.paused { Control::Resume } else { Control::Pause };
                return vec![Command::Control(control)];
            }
            Button::Checkpoint if live => return vec![Command::Control(Control::CheckpointNow)],
            Button::LowerLr if live => return vec![Command::Control(Control::ScaleLr { factor: 0.1 })],
            _ => {}
        }
        vec![]
    }
}

#[cfg(test)]
mod tests {
    use super::dashboard::Status;
    use super::*;
    use crate::events::*;

    fn begin(research: bool) -> Event {
        Event::TrainBegin(TrainBegin {
            config: serde_json::json!({"research": research, "max_grad_norm": 1.0}),
            preset: Some("demo".into()),
            num_parameters: 1000,
            device: "cpu".into(),
            engine: "cpu-step".into(),
            world_size: 1,
            backend: "single".into(),
            variant: "differential + rope".into(),
            vocab_size: 100,
            train_blocks: 100,
            validation_blocks: 10,
            steps_per_epoch: 10,
            total_steps: 100,
            start_step: 0,
            tokens_per_step: 1000,
            warmup_steps: 0,
            output_dir: "out".into(),
            timestamp: 0.0,
        })
    }

    fn progress(step: u64) -> Event {
        Event::Progress(StepRecord {
            step,
            epoch: step as f64 / 10.0,
            loss: 5.0 - step as f64 * 0.01,
            learning_rate: 1e-3,
            grad_norm: 0.5,
            tokens_per_second: 2000.0,
            diff_norm_mean: Some(1.0),
            diff_norm_std: Some(0.1),
            diff_norm_min: Some(0.5),
            diff_norm_max: Some(1.5),
            elapsed: step as f64 * 0.5,
            ..Default::default()
        })
    }

    fn control(step: u64, action: ControlAction, scale: f64) -> Event {
        Event::Control(ControlRecord { step, action, lr_scale: scale, origin: ControlOrigin::Ui })
    }

    fn owned() -> App {
        let mut app = App::dashboard(Dashboard::new("demo"), Mode::Owned, true, false);
        app.update(Msg::Event(begin(true)));
        app
    }

    #[test]
    fn events_drive_the_dashboard() {
        let mut app = owned();
        for s in 1..=40 {
            app.update(Msg::Event(progress(s)));
        }
        let d = app.dash().unwrap();
        assert_eq!(d.step, 40);
        assert_eq!(d.status, Status::Training);
        assert_eq!(d.eta_seconds(), Some(60.0 * 1000.0 / 2000.0), "60 steps left at 2000 tok/s");
        app.update(Msg::Event(control(40, ControlAction::Pause, 1.0)));
        assert_eq!(app.dash().unwrap().status, Status::Paused);
        app.update(Msg::Event(control(40, ControlAction::ScaleLr, 0.1)));
        app.update(Msg::Event(control(40, ControlAction::Resume, 0.1)));
        let d = app.dash().unwrap();
        assert_eq!((d.status.clone(), d.lr_scale), (Status::Training, 0.1));
        assert!(
            d.marks.contains(&(40, dashboard::MarkKind::LrChange))
                && d.marks.contains(&(40, dashboard::MarkKind::Pause))
        );
        assert!(d.log.iter().any(|l| l.text.contains("scale lr")));
    }

    #[test]
    fn keys_become_controls_and_quit_asks_first() {
        let mut app = owned();
        app.update(Msg::Event(progress(1)));
        assert_eq!(app.update(Msg::Key(Key::Char('p'))), vec![Command::Control(Control::Pause)]);
        app.update(Msg::Event(control(1, ControlAction::Pause, 1.0)));
        assert_eq!(app.update(Msg::Key(Key::Char('p'))), vec![Command::Control(Control::Resume)], "p toggles");
        assert_eq!(app.update(Msg::Key(Key::Char('c'))), vec![Command::Control(Control::CheckpointNow)]);
        assert_eq!(app.update(Msg::Key(Key::Char('l'))), vec![Command::Control(Control::ScaleLr { factor: 0.1 })]);
        assert_eq!(
            app.update(Msg::Click(Button::LowerLr)),
            vec![Command::Control(Control::ScaleLr { factor: 0.1 })],
            "buttons act as keys"
        );
        // q opens the dialog; c cancels; q then s stops with a save and waits for the trainer
        assert!(app.update(Msg::Key(Key::Char('q'))).is_empty());
        assert_eq!(app.dialog, Some(Dialog::Quit));
        assert!(app.update(Msg::Key(Key::Char('c'))).is_empty());
        assert_eq!(app.dialog, None);
        app.update(Msg::Key(Key::Char('q')));
        assert_eq!(app.update(Msg::Key(Key::Char('s'))), vec![Command::Control(Control::Stop { save: true })]);
        assert!(app.exiting);
        assert_eq!(app.update(Msg::TrainerDone(Ok(()))), vec![Command::Exit]);
    }

    #[test]
    fn toggles_and_mouse() {
        let mut app = owned();
        app.update(Msg::Key(Key::Char('y')));
        assert!(app.dash().unwrap().view.log_y);
        app.update(Msg::Key(Key::Char('s')));
        assert_eq!(app.dash().unwrap().view.smoothing, dashboard::SMOOTHING[1]);
        assert_eq!(app.update(Msg::Key(Key::Char('m'))), vec![Command::SetMouse(false)]);
    }

    #[test]
    fn a_trainer_error_is_shown_not_crashed_and_q_leaves() {
        let mut app = owned();
        app.update(Msg::TrainerDone(Err("dataset missing".into())));
        let d = app.dash().unwrap();
        assert_eq!(d.status, Status::Failed("dataset missing".into()));
        assert!(d.log.back().unwrap().text.contains("dataset missing"));
        assert_eq!(app.update(Msg::Key(Key::Char('p'))), vec![], "no controls to a finished run");
        assert_eq!(app.update(Msg::Key(Key::Char('q'))), vec![Command::Exit], "no dialog once finished");
    }

    #[test]
    fn ctrl_c_stops_with_a_save_and_a_second_leaves() {
        let mut app = owned();
        assert_eq!(app.update(Msg::Key(Key::CtrlC)), vec![Command::Control(Control::Stop { save: true })]);
        assert_eq!(app.update(Msg::Key(Key::CtrlC)), vec![Command::Exit]);
    }

    #[test]
    fn watching_detaches_or_stops_the_remote_run() {
        let mut app = App::dashboard(Dashboard::new("run"), Mode::Watching, true, false);
        app.update(Msg::Event(begin(false)));
        app.update(Msg::Key(Key::Char('q')));
        assert_eq!(app.dialog, Some(Dialog::Detach));
        assert_eq!(app.update(Msg::Key(Key::Char('d'))), vec![Command::Exit], "detach leaves the run going");
        app.update(Msg::Key(Key::Char('q')));
        assert_eq!(app.update(Msg::Key(Key::Char('s'))), vec![Command::Control(Control::Stop { save: true })]);
    }

    #[test]
    fn the_run_list_opens_a_run_as_watch_and_compares_marked_ones() {
        use crate::research::runs::PastRun;
        let run = |name: &str| PastRun {
            dir: std::path::PathBuf::from("outputs").join(name),
            name: name.into(),
            status: RunStatus::Completed,
            steps: 10,
            max_steps: Some(10),
            final_eval_loss: Some(2.0),
            modified: 0.0,
            checkpoint: Some(10),
            config: Default::default(),
        };
        let picker = Picker::new(vec![], vec![]).with_runs("outputs".into(), vec![run("a"), run("b")]);
        let mut app = App::picker(picker.clone(), true, false);
        app.update(Msg::Key(Key::Tab));
        assert_eq!(app.update(Msg::Key(Key::Enter)), vec![Command::Watch("outputs/a".into())]);
        // the lab answers with the run's dashboard, fed from its metrics, controls as files
        app.update(Msg::Watching { title: "a".into(), live: false, dir: "outputs/a".into() });
        assert_eq!(app.mode, Mode::Watching);
        let log = &app.dash().unwrap().log;
        assert!(log.iter().any(|l| l.text.contains("no trainer is attached to outputs/a")), "{log:?}");

        let mut app = App::picker(picker, true, false);
        for k in [Key::Tab, Key::Char(' '), Key::Down, Key::Char(' ')] {
            app.update(Msg::Key(k));
        }
        assert_eq!(
            app.update(Msg::Key(Key::Char('c'))),
            vec![Command::Compare(vec!["outputs/a".into(), "outputs/b".into()])]
        );
        app.update(Msg::Compared(vec![]));
        assert!(matches!(app.screen, Screen::Overlay(_)));
    }
}
