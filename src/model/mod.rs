//! The model: GPT-2 with learned positions or RoPE, and the differential
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

use crate::engine::Placement;
pub use config::GptConfig;
pub use gpt::Gpt;

/// A model whose parameters are trainable `Var`s, keyed by checkpoint name (sorted, so every
/// walk over them is deterministic).
pub struct Trainable {
    pub vars: BTreeMap<String, Var>,
    pub gpt: Gpt,
    /// Where and how it computes (activations in its dtype; parameters keep theirs).
    placement: Placement,
}

impl Trainable {
    pub fn new(cfg: &GptConfig, weights: BTreeMap<String, Tensor>, placement: &Placement) -> Result<Self> {
        let vars = weights
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        // A Var's tensor keeps the Var's id, so gradients of the model's ops reach the Vars.
        let gpt = build(cfg, vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())), placement)?;
        Ok(Self { vars, gpt, placement: placement.clone() })
    }

    /// Placed where its weights are, computing in their dtype (`Placement::of`): inference, and
    /// gradient checks in f64.
    pub fn on_weights(cfg: &GptConfig, weights: BTreeMap<String, Tensor>) -> Result<Self> {
        let first = weights.values().next();
        let device = first.map(|t| t.device().clone()).unwrap_or(Device::Cpu);
        let dtype = first.map(|t| t.dtype()).unwrap_or(DType::F32);
        Self::new(cfg, weights, &Placement::of(&device, dtype))
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// A model over the same storage that records no graph: for evaluation (candle has no
    /// `no_grad`, and a graph built during eval would hold every activation).
    pub fn detached(&self) -> Result<Gpt> {
        build(self.gpt.config(), self.vars.iter().map(|(k, v)| (k.clone(), v.as_detached_tensor())), &self.placement)
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

fn build(cfg: &GptConfig, tensors: impl Iterator<Item = (String, Tensor)>, placement: &Placement) -> Result<Gpt> {
    let map: HashMap<String, Tensor> = tensors.collect();
    // parameters keep their dtype (f32 for training; f64 for gradient checks)
    let dtype = map.values().next().map_or(DType::F32, |t| t.dtype());
    Gpt::load(VarBuilder::from_tensors(map, dtype, &placement.device), cfg, placement)
}
