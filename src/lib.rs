//! difflab: a terminal lab bench that trains GPT-style language models with differential
//! input embeddings against standard baselines. See README.md for the map of modules.
//!
//! Modules import only modules below them in this list (`tests/architecture.rs` checks it):
//! commands, tui, ui, app, research, session, sinks, train, config, data, optim, model, engine,
//! dist, and at the bottom events, series, atomic_file, fingerprint, signals.

pub mod app;
pub mod atomic_file;
pub mod commands;
pub mod config;
pub mod data;
pub mod dist;
pub mod engine;
pub mod events;
pub mod fingerprint;
pub mod model;
pub mod optim;
pub mod research;
pub mod series;
pub mod session;
pub mod signals;
pub mod sinks;
pub mod train;
pub mod tui;
pub mod ui;
