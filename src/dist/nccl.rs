//! The NCCL backend (`--features cuda`): one process per GPU, started by any launcher that sets
//! the rank and world size (mpirun, or `RANK` / `WORLD_SIZE`). NCCL's unique id goes from rank 0
//! to the others through a file in the output directory (`.nccl-id`): no MPI needed.
//!
//! Gradients stay on the GPU: `all_reduce_tensor` sums a CUDA tensor in place of a copy with
//! `ncclAllReduce`. The few host scalars (loss, evaluation sums, controls) travel through a
//! small device buffer.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CustomOp1, Layout, Shape, Tensor};

use super::{Collective, DistError};

pub struct NcclWorld {
    rank: usize,
    size: usize,
    comm: Mutex<Comm>,
    device: CudaDevice,
}

// Safety: the communicator is used by one thread at a time (the mutex); NCCL communicators may
// be used from any thread as long as calls on one communicator are not concurrent.
unsafe impl Send for NcclWorld {}
unsafe impl Sync for NcclWorld {}

fn err(reason: impl Into<String>) -> DistError {
    DistError::Backend { backend: "nccl", reason: reason.into() }
}

impl NcclWorld {
    /// Joins the world of `world` GPUs as `rank`, on `device`; rank 0 writes the unique id to
    /// `id_dir/.nccl-id`, the others wait up to two minutes for it.
    pub fn initialize(device: &CudaDevice, rank: usize, world: usize, id_dir: &Path) -> Result<Self, DistError> {
        let path = id_dir.join(".nccl-id");
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| err(format!("{e:?}")))?;
            let bytes: Vec<u8> = id.internal().iter().map(|c| *c as u8).collect();
            let tmp = id_dir.join(format!(".nccl-id.tmp-{}", std::process::id()));
            std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| err(e.to_string()))?;
            id
        } else {
            let started = Instant::now();
            let bytes = loop {
                if let Ok(b) = std::fs::read(&path) {
                    if b.len() == 128 {
                        break b;
                    }
                }
                if started.elapsed() > Duration::from_secs(120) {
                    return Err(err(format!("rank 0 wrote no NCCL id to {} within two minutes", path.display())));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, b) in internal.iter_mut().zip(bytes) {
                *d = b as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let stream: Arc<CudaStream> = device.cuda_stream();
        let comm = Comm::from_rank(stream, rank, world, id).map_err(|e| err(format!("{e:?}")))?;
        Ok(Self { rank, size: world, comm: Mutex::new(comm), device: device.clone() })
    }

    /// The sum over ranks of a CUDA f32 tensor, computed on the GPU.
    pub fn all_reduce_tensor(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let comm = self.comm.lock().map_err(|_| candle_core::Error::Msg("nccl: a thread panicked in a call".into()))?;
        t.contiguous()?.apply_op1_no_bwd(&AllReduce { comm: &comm })
    }

    fn host_sum<T: Copy>(
        &self,
        buf: &mut [T],
        to_f32: impl Fn(T) -> f32,
        from_f32: impl Fn(f32) -> T,
    ) -> Result<(), DistError> {
        let host: Vec<f32> = buf.iter().map(|x| to_f32(*x)).collect();
        let t = Tensor::from_vec(host, buf.len(), &candle_core::Device::Cuda(self.device.clone()))
            .map_err(|e| err(e.to_string()))?;
        let summed: Vec<f32> = self.all_reduce_tensor(&t).and_then(|s| s.to_vec1()).map_err(|e| err(e.to_string()))?;
        for (d, s) in buf.iter_mut().zip(summed) {
            *d = from_f32(s);
        }
        Ok(())
    }
}

/// `ncclAllReduce` as a candle op: the input's slice summed over ranks into a new slice.
struct AllReduce<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("nccl all-reduce: the tensor is on the CPU (use the MPI backend there)")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("nccl all-reduce: input must be contiguous".into()))?;
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device.clone();
        // Safety: every element is written by the all-reduce before it is read.
        let mut dst = unsafe { dev.alloc::<f32>(end - start) }?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("nccl all-reduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

impl Collective for NcclWorld {
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.host_sum(buf, |x| x, |x| x)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
        // f32 on the wire: these are losses and counts far inside f32's exact range
        self.host_sum(buf, |x| x as f32, |x| x as f64)
    }
    fn broadcast_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
        // a broadcast is a sum in which only rank 0 contributes
        if self.rank != 0 {
            buf.iter_mut().for_each(|x| *x = 0.0);
        }
        self.all_reduce_sum_f64(buf)
    }
    fn barrier(&self) -> Result<(), DistError> {
        self.all_reduce_sum(&mut [0.0])
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor, DistError> {
        NcclWorld::all_reduce_tensor(self, t).map_err(|e| err(e.to_string()))
    }
}
