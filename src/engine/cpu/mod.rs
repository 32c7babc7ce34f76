//! The CPU engine's kernels: plain slice functions (`kernels`, `simd`, the attention and head
//! kernels) and the candle `CustomOp`s built on them (`ops`, `attention::CausalAttention`), each
//! with a hand-written backward. Nothing here knows the model; `model` and `optim` call in.

pub mod attention;
pub mod bf16;
pub mod head;
pub mod kernels;
pub mod ops;
pub mod simd;
