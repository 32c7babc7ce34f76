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
                let loss = result.final_eval_loss.map_or("-".into(), |l| format!("{l:.4}"));
                eprintln!("[study] {current}: {} (final eval loss {loss})", result.status);
            }
            StudyEvent::Done(summary) => {
                print!("{}", study::table(&summary));
                println!("study: {}", root.join("study.json").display());
                println!("figures: {}", root.join("figures").display());
                done = Some(summary.complete);
            }
        }
    }
    handle.join();
    Ok(match done {
        Some(true) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}
