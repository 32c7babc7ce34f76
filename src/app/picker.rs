//! The picker: every preset with its description and key values (learning rate, steps,
//! output folder and seed can be edited before Enter starts the run), and, on its second tab,
//! the runs under the outputs folder (open one as `watch` does, resume it, or compare several).

use crate::config::keys::parse_flag_value;
use crate::config::RunArgs;
use crate::events::RunStatus;
use crate::research::runs::PastRun;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::config::{describe, resolve, runs_of, ConfigError, Overrides, Preset, RunConfig};
use crate::train::throughput::{self, Measured};

use super::Key;

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub origin: String,
    pub description: String,
    /// The resolved settings, or why the preset is broken.
    pub config: Result<RunConfig, String>,
    /// For a sweep or study preset, what it runs: "sweep learning_rate in [..] = 4 trials x 150 steps".
    pub procedure: Option<String>,
    /// Full runs it makes (trials, arms x seeds, or 1).
    pub runs: usize,
    /// For a study whose arms train different models, each arm's: "baseline: baseline (RoPE) |
    /// differential: differential + RoPE".
    pub variants: Option<String>,
    /// How long it would take here, from what runs of its shape measured on this machine.
    pub estimate: Option<String>,
    /// That speed, kept so that the estimate follows a step count typed in the picker.
    pub measured: Option<Measured>,
}

impl Entry {
    /// How long it would take here at the measured speed `m` of its shape, if there is one.
    fn with_estimate(mut self, m: Option<&Measured>) -> Self {
        self.measured = m.cloned();
        self.estimate = match (&self.config, self.config.as_ref().ok().and_then(RunConfig::estimated_steps)) {
            (Ok(c), Some((steps, exact))) => Some(match m {
                Some(m) => {
                    let tokens = (self.runs as u64 * steps * (c.batch_size * c.block_size) as u64) as f64;
                    format!(
                        "{}{} here ({} runs x {steps} steps at {:.1}k tokens/s, measured by an earlier run of this shape)",
                        throughput::rough_duration(tokens / m.tokens_per_second.max(1e-9)),
                        if exact { "" } else { " (steps estimated)" },
                        self.runs,
                        m.tokens_per_second / 1e3
                    )
                }
                None => "unknown here until a run of this shape has finished on this machine".into(),
            }),
            _ => None,
        };
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Field {
    LearningRate,
    MaxSteps,
    OutputDir,
    Seed,
}

impl Field {
    /// The run setting the field edits.
    pub fn key(self) -> &'static str {
        match self {
            Field::LearningRate => "learning_rate",
            Field::MaxSteps => "max_steps",
            Field::OutputDir => "output_dir",
            Field::Seed => "seed",
        }
    }

    /// The key that starts editing it.
    pub fn hotkey(self) -> char {
        match self {
            Field::LearningRate => 'l',
            Field::MaxSteps => 's',
            Field::OutputDir => 'o',
            Field::Seed => 'r',
        }
    }

    const ALL: [Field; 4] = [Field::LearningRate, Field::MaxSteps, Field::OutputDir, Field::Seed];

    /// Why `text` is not a value for the field, quoting it; `None` when it is.
    fn refuse(self, text: &str) -> Option<String> {
        let ok = match self {
            Field::LearningRate => text.parse::<f64>().is_ok_and(|x| x > 0.0 && x.is_finite()),
            Field::MaxSteps => text.parse::<u64>().is_ok_and(|x| x > 0),
            Field::OutputDir => !text.trim().is_empty(),
            Field::Seed => text.parse::<u64>().is_ok(),
        };
        let example = match self {
            Field::LearningRate => "a learning rate above 0 (e.g. 3e-4)",
            Field::MaxSteps => "a step count of 1 or more (e.g. 500)",
            Field::OutputDir => "a folder (e.g. outputs/try-2)",
            Field::Seed => "a whole number (e.g. 7)",
        };
        (!ok).then(|| format!("{}: {text:?} is not {example}; kept the old value", self.key()))
    }
}

/// Which list the picker shows; Tab switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Presets,
    Runs,
}

#[derive(Debug, Clone)]
pub struct Picker {
    pub tab: Tab,
    pub entries: Vec<Entry>,
    pub selected: usize,
    /// The runs under `runs_root`, newest first.
    pub runs: Vec<PastRun>,
    pub runs_root: PathBuf,
    pub run_selected: usize,
    /// Runs marked (space) for comparison, by index into `runs`.
    pub marked: BTreeSet<usize>,
    /// The field being typed into, and its text so far.
    pub editing: Option<(Field, String)>,
    /// Edited values per entry, as typed.
    pub overrides: Vec<BTreeMap<Field, String>>,
    /// The flags given on the command line, applied to every preset.
    pub base_flags: Vec<(String, String)>,
    pub error: Option<String>,
}

pub enum Outcome {
    Stay,
    Start(RunArgs),
    /// Open a run's dashboard from its metrics, as `difflab watch` does.
    Watch(PathBuf),
    /// Overlay these runs, as `difflab compare` does.
    Compare(Vec<PathBuf>),
    Quit,
}

impl Picker {
    /// From the presets of the library (each resolved with `base_flags`).
    pub fn new(presets: Vec<Result<(Vec<Preset>, Preset), ConfigError>>, base_flags: Vec<(String, String)>) -> Self {
        // what Enter will run: each preset under the command line's flags
        let typed: Result<Overrides, String> = base_flags
            .iter()
            .map(|(k, v)| Ok((k.clone(), parse_flag_value(k, v).map_err(|e| e.to_string())?)))
            .collect();
        let entries: Vec<Entry> = presets
            .into_iter()
            .map(|p| match p {
                Ok((chain, preset)) => {
                    let resolved = typed.clone().and_then(|flags| resolve(&chain, &flags).map_err(|e| e.to_string()));
                    let runs = resolved.as_ref().map_or(1, runs_of);
                    let variants = resolved.as_ref().ok().and_then(crate::config::variants_by_arm);
                    let procedure = resolved.as_ref().ok().and_then(|r| {
                        describe(r).into_iter().find(|l| l.starts_with("sweep") || l.starts_with("study"))
                    });
                    Entry {
                        name: preset.name.clone(),
                        origin: preset.origin.clone(),
                        description: preset.description.clone(),
                        config: resolved.map(|r| r.config),
                        procedure: procedure.map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")),
                        runs,
                        variants,
                        estimate: None,
                        measured: None,
                    }
                    .with_estimate(None)
                }
                Err(e) => Entry {
                    name: "(broken)".into(),
                    origin: String::new(),
                    description: String::new(),
                    config: Err(e.to_string()),
                    procedure: None,
                    runs: 1,
                    variants: None,
                    estimate: None,
                    measured: None,
                },
            })
            .collect();
        let selected = entries.iter().position(|e| e.name == "demo").unwrap_or(0);
        let overrides = vec![BTreeMap::new(); entries.len()];
        Self {
            tab: Tab::Presets,
            entries,
            selected,
            runs: vec![],
            runs_root: PathBuf::from("outputs"),
            run_selected: 0,
            marked: BTreeSet::new(),
            editing: None,
            overrides,
            base_flags,
            error: None,
        }
    }

    /// The runs found under `root` (`compare::list_runs`), for the second tab.
    pub fn with_runs(mut self, root: PathBuf, runs: Vec<PastRun>) -> Self {
        self.runs_root = root;
        self.runs = runs;
        self
    }

    pub fn current_run(&self) -> Option<&PastRun> {
        self.runs.get(self.run_selected)
    }

    fn on_runs_key(&mut self, key: Key) -> Outcome {
        self.error = None;
        match key {
            Key::Up | Key::Char('k') => self.run_selected = self.run_selected.saturating_sub(1),
            Key::Down | Key::Char('j') => {
                self.run_selected = (self.run_selected + 1).min(self.runs.len().saturating_sub(1))
            }
            // space toggles the mark
            Key::Char(' ') if !self.runs.is_empty() && !self.marked.remove(&self.run_selected) => {
                self.marked.insert(self.run_selected);
            }
            Key::Enter => {
                if let Some(r) = self.current_run() {
                    return Outcome::Watch(r.dir.clone());
                }
            }
            Key::Char('r') => match self.current_run() {
                Some(r) if r.resumable() => return Outcome::Start(RunArgs::resuming(&r.dir)),
                Some(r) => {
                    self.error = Some(match (&r.checkpoint, r.status) {
                        (_, RunStatus::Running) => format!("{} is running now: Enter opens it", r.name),
                        (_, RunStatus::Completed) => format!("{} has completed: nothing to resume", r.name),
                        _ => format!("{} has no checkpoint to resume from", r.name),
                    })
                }
                None => {}
            },
            Key::Char('c') => {
                if self.marked.len() < 2 {
                    self.error = Some(format!(
                        "mark two or more runs with space to compare them ({} marked)",
                        self.marked.len()
                    ));
                } else {
                    return Outcome::Compare(
                        self.marked.iter().filter_map(|i| self.runs.get(*i)).map(|r| r.dir.clone()).collect(),
                    );
                }
            }
            Key::Tab => self.tab = Tab::Presets,
            Key::Char('q') | Key::Esc => return Outcome::Quit,
            _ => {}
        }
        Outcome::Stay
    }

    /// Time estimates from the speeds runs of the same shape measured on this machine
    /// (`train::throughput`), for the presets whose steps are known.
    pub fn with_measured(mut self, measured: &BTreeMap<String, Measured>) -> Self {
        self.entries = self
            .entries
            .into_iter()
            .map(|e| {
                let m = e.config.as_ref().ok().and_then(|c| measured.get(&throughput::key(c, 1)));
                e.with_estimate(m)
            })
            .collect();
        self
    }

    pub fn current(&self) -> Option<&Entry> {
        self.entries.get(self.selected)
    }

    /// The selected entry's time estimate at a typed step count.
    fn re_estimate(&mut self, max_steps: Option<u64>) {
        let Some(entry) = self.entries.get_mut(self.selected) else { return };
        if let (Ok(c), Some(steps)) = (&mut entry.config, max_steps) {
            c.max_steps = Some(steps);
            let measured = entry.measured.take();
            *entry = entry.clone().with_estimate(measured.as_ref());
        }
    }

    /// A field's value as shown: edited, or the preset's.
    pub fn shown(&self, field: Field) -> String {
        if let Some(text) = self.overrides.get(self.selected).and_then(|o| o.get(&field)) {
            return text.clone();
        }
        let Some(c) = self.current().and_then(|e| e.config.as_ref().ok()) else { return "-".into() };
        match field {
            Field::LearningRate => format!("{:e}", c.learning_rate),
            Field::MaxSteps => c.max_steps.map_or("epochs".into(), |s| s.to_string()),
            Field::OutputDir => c.output_dir.clone(),
            Field::Seed => c.seed.to_string(),
        }
    }

    pub fn run_args(&self) -> RunArgs {
        let mut flags = self.base_flags.clone();
        if let Some(edits) = self.overrides.get(self.selected) {
            flags.extend(edits.iter().map(|(f, v)| (f.key().to_string(), v.clone())));
        }
        RunArgs {
            preset: self
                .current()
                .map(|e| e.origin.clone())
                .filter(|o| !o.is_empty())
                .map(|o| preset_ref(&o, self.current())),
            flags,
        }
    }

    pub fn on_key(&mut self, key: Key) -> Outcome {
        if let Some((field, mut text)) = self.editing.take() {
            match key {
                Key::Enter | Key::Tab => match field.refuse(&text) {
                    None => {
                        self.overrides[self.selected].insert(field, text.trim().to_string());
                        self.error = None;
                        if field == Field::MaxSteps {
                            self.re_estimate(text.trim().parse().ok());
                        }
                    }
                    Some(why) => self.error = Some(why),
                },
                Key::Esc => self.error = None,
                Key::Backspace => {
                    text.pop();
                    self.editing = Some((field, text));
                }
                // every printable character is kept, so a refusal quotes what was typed
                Key::Char(c) if !c.is_control() => {
                    text.push(c);
                    self.editing = Some((field, text));
                }
                _ => self.editing = Some((field, text)),
            }
            return Outcome::Stay;
        }
        if self.tab == Tab::Runs {
            return self.on_runs_key(key);
        }
        match key {
            Key::Tab => {
                self.tab = Tab::Runs;
                self.error = None;
            }
            Key::Up | Key::Char('k') => self.selected = self.selected.saturating_sub(1),
            Key::Down | Key::Char('j') => self.selected = (self.selected + 1).min(self.entries.len().saturating_sub(1)),
            Key::Char(c) if Field::ALL.iter().any(|f| f.hotkey() == c) => {
                let field = Field::ALL.into_iter().find(|f| f.hotkey() == c).unwrap_or(Field::LearningRate);
                self.editing = Some((field, String::new()));
            }
            Key::Enter => {
                return match self.current().map(|e| &e.config) {
                    Some(Ok(_)) => Outcome::Start(self.run_args()),
                    Some(Err(e)) => {
                        self.error = Some(e.clone());
                        Outcome::Stay
                    }
                    None => Outcome::Stay,
                }
            }
            Key::Char('q') | Key::Esc => return Outcome::Quit,
            _ => {}
        }
        Outcome::Stay
    }
}

/// Built-in presets are named, user presets are given by path.
fn preset_ref(origin: &str, entry: Option<&Entry>) -> String {
    match entry {
        Some(e) if origin == format!("presets/{}.yaml", e.name) => e.name.clone(),
        _ => origin.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PresetLibrary;

    fn picker() -> Picker {
        let lib = PresetLibrary::builtin();
        let presets =
            lib.names().iter().map(|n| lib.chain(n).map(|c| (c.clone(), c.last().cloned().unwrap()))).collect();
        Picker::new(presets, vec![])
    }

    #[test]
    fn a_procedure_is_estimated_from_a_measured_speed_of_its_shape() {
        let p = picker();
        let study = p.entries.iter().find(|e| e.name == "demo-study").unwrap();
        assert_eq!(study.runs, 6, "2 arms x 3 seeds");
        let c = study.config.clone().unwrap();
        let measured: BTreeMap<String, Measured> =
            [(throughput::key(&c, 1), Measured { tokens_per_second: 16_000.0, when: 0.0, steps: 400 })].into();
        let p = p.with_measured(&measured);
        let study = p.entries.iter().find(|e| e.name == "demo-study").unwrap();
        // 6 runs x 200 steps x 2048 tokens / 16k tokens/s = 154 s
        let estimate = study.estimate.as_deref().unwrap();
        assert!(estimate.starts_with("~3 min here (6 runs x 200 steps at 16.0k tokens/s"), "{estimate}");
        // another shape has no measurement
        let sanity = p.entries.iter().find(|e| e.name == "sanity-baseline").unwrap();
        assert!(sanity.estimate.as_deref().unwrap().starts_with("unknown here"), "{:?}", sanity.estimate);
        assert!(study.procedure.as_deref().unwrap().contains("= 6 runs x 200 steps"));

        // the estimate follows a step count typed in the picker: twice the steps, twice the time
        let mut p = p;
        p.selected = p.entries.iter().position(|e| e.name == "demo-study").unwrap();
        for k in [Key::Char('s'), Key::Char('4'), Key::Char('0'), Key::Char('0'), Key::Enter] {
            p.on_key(k);
        }
        let estimate = p.current().unwrap().estimate.as_deref().unwrap();
        assert!(estimate.starts_with("~5 min here (6 runs x 400 steps at 16.0k tokens/s"), "{estimate}");
        // a refused value quotes what was typed, letters included, and keeps the estimate
        for k in "stwo hundred".chars().map(Key::Char).chain([Key::Enter]) {
            p.on_key(k);
        }
        let error = p.error.clone().unwrap();
        assert!(error.contains("max_steps: \"two hundred\" is not a step count"), "{error}");
        assert!(p.current().unwrap().estimate.as_deref().unwrap().contains("x 400 steps"));
    }

    #[test]
    fn starts_on_demo_and_enter_starts_it() {
        let mut p = picker();
        assert_eq!(p.current().unwrap().name, "demo");
        let Outcome::Start(args) = p.on_key(Key::Enter) else { panic!("start") };
        assert_eq!(args.preset.as_deref(), Some("demo"));
        assert!(args.flags.is_empty());
    }

    #[test]
    fn the_learning_rate_and_steps_can_be_edited_before_starting() {
        let mut p = picker();
        p.on_key(Key::Down);
        let name = p.current().unwrap().name.clone();
        for k in [Key::Char('l'), Key::Char('3'), Key::Char('e'), Key::Char('-'), Key::Char('4'), Key::Enter] {
            p.on_key(k);
        }
        for k in [Key::Char('s'), Key::Char('2'), Key::Char('5'), Key::Enter] {
            p.on_key(k);
        }
        assert_eq!(p.shown(Field::LearningRate), "3e-4");
        let Outcome::Start(args) = p.on_key(Key::Enter) else { panic!("start") };
        assert_eq!(args.preset, Some(name));
        assert_eq!(
            args.flags,
            vec![("learning_rate".to_string(), "3e-4".to_string()), ("max_steps".to_string(), "25".to_string())]
        );
        // a bad value is refused, quoting what was typed, and the old value is kept
        for k in [Key::Char('l'), Key::Char('-'), Key::Enter] {
            p.on_key(k);
        }
        let error = p.error.clone().unwrap();
        assert!(error.contains("learning_rate: \"-\" is not a learning rate above 0"), "{error}");
        assert_eq!(p.shown(Field::LearningRate), "3e-4");
    }

    #[test]
    fn the_output_folder_and_seed_can_be_set_before_starting() {
        let mut p = picker();
        p.on_key(Key::Char('o'));
        for c in "outputs/try 2".chars() {
            p.on_key(Key::Char(c));
        }
        p.on_key(Key::Enter);
        // a seed of "x7" is refused as typed, then 7 is taken
        for k in [Key::Char('r'), Key::Char('x'), Key::Char('7'), Key::Enter] {
            p.on_key(k);
        }
        assert!(p.error.as_deref().is_some_and(|e| e.contains("seed: \"x7\" is not a whole number")), "{:?}", p.error);
        for k in [Key::Char('r'), Key::Char('7'), Key::Enter] {
            p.on_key(k);
        }
        assert_eq!((p.shown(Field::OutputDir), p.shown(Field::Seed)), ("outputs/try 2".into(), "7".into()));
        let Outcome::Start(args) = p.on_key(Key::Enter) else { panic!("start") };
        assert_eq!(
            args.flags,
            vec![("output_dir".to_string(), "outputs/try 2".to_string()), ("seed".to_string(), "7".to_string())]
        );
        // an empty folder name is refused
        for k in [Key::Char('o'), Key::Char(' '), Key::Enter] {
            p.on_key(k);
        }
        assert!(p.error.as_deref().is_some_and(|e| e.contains("output_dir: \" \" is not a folder")), "{:?}", p.error);
    }
}
