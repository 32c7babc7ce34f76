//! The model of DESIGN §1: GPT-2 with learned positions or RoPE, and the differential
//! variant with either; its parameters, initialisation, diagnostics and the HF checkpoint.

pub mod attention;
pub mod checkpoint;
pub mod cpu_step;
pub mod config;
pub mod diagnostics;
pub mod dropout;
pub mod fused;
pub mod gpt;
pub mod head;
pub mod kernels;
pub mod ops;
pub mod params;
pub mod rope;
pub mod simd;

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;

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

    /// Computes activations in `dtype` (bf16 on CUDA) over the same (f32) parameters.
    pub fn with_dtype(mut self, dtype: DType) -> Result<Self> {
        if dtype != self.gpt.dtype() {
            self.gpt = self.gpt.with_dtype(dtype);
            self.compute = Some(dtype);
        }
        Ok(self)
    }

    /// Activations in f32 (not a bf16 compute dtype).
    pub fn computes_in_f32(&self) -> bool {
        self.compute.is_none() && self.gpt.dtype() == DType::F32
    }

    /// A model over the same storage that records no graph: for evaluation (candle has no
    /// `no_grad`, and a graph built during eval would hold every activation).
    pub fn detached(&self) -> Result<Gpt> {
        let gpt = build(self.gpt.config(), self.vars.iter().map(|(k, v)| (k.clone(), v.as_detached_tensor())))?;
        Ok(match self.compute {
            Some(dtype) => gpt.with_dtype(dtype),
            None => gpt,
        })
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
    // Parameters keep their dtype (f32 for training; f64 for gradient checks).
    Ok(Gpt::load(VarBuilder::from_tensors(map, dtype, &device), cfg)?.with_dtype(dtype))
}
