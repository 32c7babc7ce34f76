//! Optimisation, PyTorch / Hugging Face semantics: AdamW with decoupled weight decay on 2-D
//! parameters only, global-norm clipping, gradient accumulation and the LR schedules.

pub mod adamw;
pub mod cpu;
pub mod grads;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::{LrSchedule, ScheduleKind};
