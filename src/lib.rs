//! difflab: a terminal lab bench that trains GPT-style language models with differential
//! input embeddings against standard baselines. See README.md for the map of modules.

pub mod app;
pub mod atomic_file;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod events;
pub mod golden;
pub mod model;
pub mod optim;
pub mod remote;
pub mod series;
pub mod sweep;
pub mod sinks;
pub mod train;
pub mod tui;
pub mod ui;
