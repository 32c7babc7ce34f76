//! The model of DESIGN §1: GPT-2 with learned positions or RoPE, and the differential
//! variant with either; its parameters, initialisation, diagnostics and the HF checkpoint.

pub mod config;
pub mod cpu_step;
pub mod diagnostics;
pub mod dropout;
pub mod generate;
pub mod gpt;
pub mod hf;
pub mod ops;
pub mod params;
pub mod rope;

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;

use crate::engine::{Engine, Kernels};
pub use config::GptConfig;
pub use gpt::Gpt;

/// A model whose parameters are trainable `Var`s, keyed by checkpoint name (sorted, so every
/// walk over them is deterministic).
pub struct Trainable {
    pub vars: BTreeMap<String, Var>,
    pub gpt: Gpt,
    /// Activation dtype (f32; bf16 on CUDA). Parameters keep theirs.
    compute: Option<DType>,
}

impl Trainable {
    pub fn new(cfg: &GptConfig, weights: BTreeMap<String, Tensor>) -> Result<Self> {
        let vars = weights
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        // A Var's tensor keeps the Var's id, so gradients of the model's ops reach the Vars.
        let gpt = build(cfg, vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())))?;
        Ok(Self { vars, gpt, compute: None })
    }

    /// Computes activations in `dtype` (bf16 on CUDA) over the same (f32) parameters, on the
    /// kernels for that dtype (the engine's `with_engine` may set them explicitly).
    pub fn with_dtype(mut self, dtype: DType) -> Result<Self> {
        if dtype != self.gpt.dtype() {
            let kernels = Kernels::for_device(self.gpt.device(), dtype);
            self.gpt = self.gpt.with_dtype(dtype).with_kernels(kernels);
            self.compute = Some(dtype);
        }
        Ok(self)
    }

    /// Runs the model's ops on the kernels of `engine`.
    pub fn with_engine(mut self, engine: Engine) -> Self {
        self.gpt = self.gpt.with_kernels(engine.kernels());
        self
    }

    /// A model over the same storage that records no graph: for evaluation (candle has no
    /// `no_grad`, and a graph built during eval would hold every activation).
    pub fn detached(&self) -> Result<Gpt> {
        let gpt = build(self.gpt.config(), self.vars.iter().map(|(k, v)| (k.clone(), v.as_detached_tensor())))?;
        let gpt = match self.compute {
            Some(dtype) => gpt.with_dtype(dtype),
            None => gpt,
        };
        Ok(gpt.with_kernels(self.gpt.kernels()))
    }

    /// The current weights (detached; shares storage with the Vars until the next update).
    pub fn weights(&self) -> BTreeMap<String, Tensor> {
        self.vars.iter().map(|(k, v)| (k.clone(), v.as_detached_tensor())).collect()
    }

    /// Picks the parameters' gradients out of a `GradStore`, dropping the gradients candle
    /// also keeps for constants (masks, tables). Each is detached: candle detaches a node's
    /// gradient only when it visits the node, never a leaf's, so a parameter's gradient still
    /// links to the whole forward graph, and an optimizer state built from it would chain
    /// every step's activations together (a leak of one graph per step).
    pub fn named_grads(&self, mut store: GradStore) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .filter_map(|(name, var)| store.remove(var.as_tensor()).map(|g| (name.clone(), g.detach())))
            .collect()
    }
}

fn build(cfg: &GptConfig, tensors: impl Iterator<Item = (String, Tensor)>) -> Result<Gpt> {
    let map: HashMap<String, Tensor> = tensors.collect();
    let first = map.values().next();
    let device = first.map(|t| t.device().clone()).unwrap_or(Device::Cpu);
    let dtype = first.map(|t| t.dtype()).unwrap_or(DType::F32);
    // Parameters keep their dtype (f32 for training; f64 for gradient checks), and the ops run
    // on the kernels for it: fused for f32 on the CPU, composed elsewhere.
    let gpt = Gpt::load(VarBuilder::from_tensors(map, dtype, &device), cfg)?.with_dtype(dtype);
    Ok(gpt.with_kernels(Kernels::for_device(&device, dtype)))
}
