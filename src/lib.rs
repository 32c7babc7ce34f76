//! difflab: a terminal lab bench that trains GPT-style language models with differential
//! input embeddings against standard baselines. See README.md and DESIGN.md.

pub mod atomic_file;
pub mod data;
pub mod config;
pub mod model;
pub mod optim;
