//! `difflab study`: arms x seeds, headless or in the TUI, and the answer with error bars.

use std::process::ExitCode;

use super::procedure::{prepare, StudyArgs};
use crate::events::Event;
use crate::research::study::{self, RunPlan, StudyEvent};
use crate::signals::Interrupts;
use crate::sinks::human::describe;

pub fn run(args: &StudyArgs) -> anyhow::Result<ExitCode> {
    let prepared = prepare(args)?;
    super::print_warnings(&prepared.warnings);
    let reused = prepared.plans.iter().filter(|p| **p == RunPlan::Reuse).count();
    eprintln!(
        "[study] {} arms x {} seeds {:?} = {} runs in {}{}",
        prepared.arms.len(),
        prepared.seeds.len(),
        prepared.seeds,
        prepared.plans.len(),
        prepared.root.display(),
        if reused > 0 { format!(" ({reused} finished earlier: reused)") } else { String::new() }
    );
    let (root, labels) = (prepared.root.clone(), prepared.labels());
    if args.ui.draws() {
        return super::lab::study(prepared.spawn(), &root, labels, args.ui);
    }
    let handle = prepared.spawn();
    // Ctrl-C stops the running run with a checkpoint and skips the rest; a second one exits
    Interrupts::exit_on_second(handle.stop.flag())?;
    Interrupts::set_flag(handle.stop.flag())?;
    let mut current = String::new();
    let mut done = None;
    for e in handle.events.iter() {
        match e {
            StudyEvent::RunStart { index, of, arm, seed, plan } => {
                current = format!("{} s{seed}", labels[arm]);
                eprintln!("[study] run {}/{of}: {current} ({plan})", index + 1);
            }
            StudyEvent::Train { event, .. } => {
                if let Some(line) = describe(&event).filter(|_| !matches!(event, Event::Prepare(_))) {
                    eprintln!("[{current}] {line}");
                }
            }
            StudyEvent::RunEnd { result, .. } => {
                // the run's own name: a skipped run never started, so `current` is another's
                let loss = result.final_eval_loss.map_or("-".into(), |l| format!("{l:.4}"));
                let note = result.note.as_deref().map(|n| format!("; {n}")).unwrap_or_default();
                eprintln!("[study] {} s{}: {} (final eval loss {loss}{note})", result.arm, result.seed, result.status);
            }
            StudyEvent::Done { summary, written } => {
                print!("{}", study::table(&summary));
                match &written {
                    Ok(path) => {
                        println!("study: {}", path.display());
                        println!("figures: {}", root.join("figures").display());
                    }
                    Err(e) => eprintln!("[study] {e}: the table above is all there is of this study"),
                }
                done = Some(summary.complete && written.is_ok());
            }
        }
    }
    handle.join();
    Ok(match done {
        Some(true) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}
