//! Data parallelism on the field's collective libraries, never a protocol of our own: MPI for
//! CPU processes on one machine or many (feature `mpi`, the `mpi` crate over Open MPI or
//! MPICH), NCCL for CUDA devices (feature `cuda`, cudarc's bindings as candle uses them). A
//! build with neither, or a process started without a launcher, is a world of one.
//!
//! The trainer uses five operations: rank, world size, an in-place sum of host floats (the
//! gradients, the loss, the evaluation sums), a broadcast from rank 0 (the controls), and a
//! barrier (data preparation: rank 0 fills the cache, then the others read it).

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;

use std::sync::Arc;

use candle_core::{DType, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("this process was started as rank {rank} of {world} ({launcher}), but this difflab was built without MPI; rebuild with `cargo build --release --features mpi` (README: Several processes), or run one process")]
    NoMpiBuild { rank: usize, world: usize, launcher: &'static str },
    #[error("{backend}: {reason}")]
    Backend { backend: &'static str, reason: String },
}

/// The collective operations a data-parallel trainer needs.
pub trait Collective: Send + Sync {
    /// `single`, `mpi` or `nccl`.
    fn backend(&self) -> &'static str;
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums `buf` over all ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Sums `buf` over all ranks, in place (loss and evaluation sums, in f64).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError>;
    /// Rank 0's `buf` on every rank.
    fn broadcast_f64(&self, buf: &mut [f64]) -> Result<(), DistError>;
    fn barrier(&self) -> Result<(), DistError>;

    /// The sum over ranks of an f32 tensor, on its device. By default through the host (the
    /// CPU's MPI path); NCCL sums CUDA tensors on the GPU.
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor, DistError> {
        let fail = |e: candle_core::Error| DistError::Backend { backend: self.backend(), reason: e.to_string() };
        let mut host: Vec<f32> = t.to_dtype(DType::F32).and_then(|h| h.flatten_all()?.to_vec1()).map_err(fail)?;
        self.all_reduce_sum(&mut host)?;
        Tensor::from_vec(host, t.shape(), t.device()).and_then(|s| s.to_dtype(t.dtype())).map_err(fail)
    }
}

/// The world a run belongs to, shared by the edge and the trainer thread.
#[derive(Clone)]
pub struct World(pub Arc<dyn Collective>);

impl World {
    pub fn single() -> Self {
        World(Arc::new(Single))
    }

    pub fn is_root(&self) -> bool {
        self.0.rank() == 0
    }

    /// `mpi, rank 1 of 4`, for logs.
    pub fn describe(&self) -> String {
        format!("{}, rank {} of {}", self.0.backend(), self.0.rank(), self.0.world_size())
    }
}

impl Default for World {
    fn default() -> Self {
        World::single()
    }
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl std::ops::Deref for World {
    type Target = dyn Collective;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// One process: every operation leaves its input as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn backend(&self) -> &'static str {
        "single"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast_f64(&self, _: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
}

/// Rank and world size as a launcher set them: Open MPI's `mpirun`, MPICH / Hydra (PMI), or
/// torchrun-style `RANK` / `WORLD_SIZE`. `None` for a plain process.
pub fn launched_as() -> Option<(usize, usize, &'static str)> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let pairs = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI"),
        ("PMI_RANK", "PMI_SIZE", "MPICH"),
        ("RANK", "WORLD_SIZE", "RANK/WORLD_SIZE"),
    ];
    pairs.iter().find_map(|(r, w, name)| Some((var(r)?, var(w)?, *name)))
}

/// The world this process belongs to, for CPU training: MPI when launched by an MPI launcher
/// with more than one process (an MPI-less build refuses that rather than running copies that
/// know nothing of each other), else a world of one.
pub fn cpu_world() -> Result<World, DistError> {
    match launched_as() {
        Some((rank, world, launcher)) if world > 1 => {
            #[cfg(feature = "mpi")]
            {
                let _ = (rank, launcher);
                Ok(World(Arc::new(mpi::MpiWorld::initialize()?)))
            }
            #[cfg(not(feature = "mpi"))]
            Err(DistError::NoMpiBuild { rank, world, launcher })
        }
        _ => Ok(World::single()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_of_one_changes_nothing() {
        let w = Single;
        let mut v = vec![1.0f32, 2.0];
        w.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, vec![1.0, 2.0]);
        assert_eq!((w.rank(), w.world_size(), w.backend()), (0, 1, "single"));
    }
}
