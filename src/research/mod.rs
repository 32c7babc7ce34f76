//! The research procedures around single runs: learning-rate sweeps (stopping trials that
//! diverge or stall, and recommending from the evidence), the LR range test, studies (arms x
//! seeds with paired intervals), comparing finished runs, and the list of past runs.
//!
//! Each procedure runs on its own thread and talks to the headless printer or the TUI through
//! typed events, as a single run does through `Event`s; every run it starts is a
//! `session::RunSession`.

pub mod compare;
pub mod divergence;
pub mod lengths;
pub mod lr_find;
pub mod runs;
pub mod study;
pub mod sweep;
