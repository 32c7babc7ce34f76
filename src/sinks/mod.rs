//! Sinks: consumers of the trainer's events, each writing one output. The
//! headless runner and the TUI feed every event to the same `Sinks`.

pub mod figures;
pub mod human;
pub mod metrics;
pub mod tensorboard;

use std::io::Write;
use std::path::Path;

use crate::events::Event;

pub trait Sink: Send {
    fn handle(&mut self, event: &Event) -> std::io::Result<()>;
    /// Called once after the last event.
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The research code's console markers: one JSON object per line on stdout.
pub struct StdoutMarkers;

impl Sink for StdoutMarkers {
    fn handle(&mut self, event: &Event) -> std::io::Result<()> {
        if event.is_marker() {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", event.to_json_line())?;
            out.flush()?;
        }
        Ok(())
    }
}

/// Every sink of a run. A sink that fails (a full disk) is reported once and dropped; the
/// run goes on.
#[derive(Default)]
pub struct Sinks {
    sinks: Vec<(String, Box<dyn Sink>)>,
    pub errors: Vec<String>,
}

impl Sinks {
    pub fn push(&mut self, name: &str, sink: Box<dyn Sink>) {
        self.sinks.push((name.into(), sink));
    }

    pub fn handle(&mut self, event: &Event) {
        let mut failed = vec![];
        for (i, (name, sink)) in self.sinks.iter_mut().enumerate() {
            if let Err(e) = sink.handle(event) {
                self.errors.push(format!("{name}: {e}; no more output to it"));
                failed.push(i);
            }
        }
        for i in failed.into_iter().rev() {
            self.sinks.remove(i);
        }
    }

    pub fn finish(&mut self) {
        for (name, sink) in self.sinks.iter_mut() {
            if let Err(e) = sink.finish() {
                self.errors.push(format!("{name}: {e}"));
            }
        }
    }
}

/// The file sinks of a run directory (metrics.jsonl; TensorBoard and figures when enabled).
pub fn file_sinks(output_dir: &Path, config: &crate::config::RunConfig) -> std::io::Result<Sinks> {
    let mut sinks = Sinks::default();
    sinks.push("metrics.jsonl", Box::new(metrics::MetricsLog::open(&output_dir.join(metrics::METRICS_FILE))?));
    if config.log_tensorboard {
        sinks.push("tensorboard", Box::new(tensorboard::TensorBoard::open(output_dir, config.log_figures)?));
    }
    if config.log_figures {
        sinks.push("figures", Box::new(figures::Figures::new(output_dir)));
    }
    Ok(sinks)
}
