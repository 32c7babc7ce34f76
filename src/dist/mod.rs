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
    /// Sums `send` over all ranks into `recv` (the same length). By default through
    /// `all_reduce_sum`; MPI passes both buffers to one `MPI_Allreduce`, without a copy.
    fn all_reduce_sum_into(&self, send: &[f32], recv: &mut [f32]) -> Result<(), DistError> {
        recv.copy_from_slice(send);
        self.all_reduce_sum(recv)
    }
    /// Sums bf16 values (their bits) over all ranks, in place, each addition in f32 rounded
    /// back to bf16 (`grad_reduce_dtype bf16`). A backend without it says so.
    fn all_reduce_sum_bf16(&self, _buf: &mut [u16]) -> Result<(), DistError> {
        Err(DistError::Backend {
            backend: self.backend(),
            reason: "gradients in bf16 are summed over MPI only; set --grad_reduce_dtype f32".into(),
        })
    }
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

/// Gradients travel in buckets of about this many bytes (`ddp_bucket_cap_mb`'s default), as PyTorch DDP's `bucket_cap_mb`
/// default: a few large messages instead of one per parameter, whose latency dominates across
/// machines, while a bucket stays small enough to pack and unpack in cache-friendly pieces.
pub const BUCKET_BYTES: usize = 25 << 20;

/// The first bucket of a backward that overlaps its all-reduce, as DDP's
/// (`_DEFAULT_FIRST_BUCKET_BYTES`): small, so the network starts while most of the backward is
/// still to run.
pub const FIRST_BUCKET_BYTES: usize = 1 << 20;

/// How gradients travel between processes: f32, or bf16 (half the bytes; each process's sum
/// rounded to bf16 once, and each addition on the way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    F32,
    Bf16,
}

/// Sums `buffers` over the ranks of `world`, in place: packed in order into flat buckets of up
/// to `bucket_bytes` on the wire (a larger buffer is a bucket of its own), each summed in one
/// collective call. Returns the number of calls. Every rank must pass buffers of the same sizes
/// in the same order.
pub fn all_reduce_buckets(
    world: &dyn Collective,
    buffers: &mut [&mut [f32]],
    bucket_bytes: usize,
    wire: Wire,
) -> Result<usize, DistError> {
    let mut buckets = Buckets::new(world, (bucket_bytes, bucket_bytes), wire);
    let lens: Vec<usize> = buffers.iter().map(|b| b.len()).collect();
    for (i, b) in buffers.iter_mut().enumerate() {
        buckets.push(&mut **b, lens.get(i + 1).copied())?;
    }
    Ok(buckets.finish()?.calls)
}

/// What `Buckets::finish` gives back.
pub struct Summed<B> {
    /// Every buffer pushed, summed, in the order pushed.
    pub buffers: Vec<B>,
    /// Collective calls made (one a bucket).
    pub calls: usize,
    /// Seconds inside them.
    pub busy_seconds: f64,
}

/// Buffers summed over the ranks in flat buckets as they come (`push`), in the order they come:
/// the open bucket is summed as soon as the buffer to come next would not fit in it.
/// The first bucket holds up to `caps.0` bytes on the wire, the others `caps.1` (DDP makes its
/// first bucket small, 1 MB, so that communication starts early in the backward). A buffer
/// larger than a bucket is one of its own. Every rank must push buffers of the same sizes in
/// the same order: the buckets, and so the collective calls, are then the same on all.
pub struct Buckets<'w, B> {
    world: &'w dyn Collective,
    wire: Wire,
    /// Floats per bucket: the first, the rest.
    caps: (usize, usize),
    open: Vec<B>,
    open_len: usize,
    summed: Vec<B>,
    calls: usize,
    /// Seconds inside the collective calls.
    busy: f64,
    send: Vec<f32>,
    recv: Vec<f32>,
    bits: Vec<u16>,
}

impl<'w, B: AsMut<[f32]>> Buckets<'w, B> {
    pub fn new(world: &'w dyn Collective, caps: (usize, usize), wire: Wire) -> Self {
        let width = match wire {
            Wire::F32 => std::mem::size_of::<f32>(),
            Wire::Bf16 => std::mem::size_of::<u16>(),
        };
        let floats = |bytes: usize| (bytes / width).max(1);
        Self {
            world,
            wire,
            caps: (floats(caps.0), floats(caps.1)),
            open: Vec::new(),
            open_len: 0,
            summed: Vec::new(),
            calls: 0,
            busy: 0.0,
            send: Vec::new(),
            recv: Vec::new(),
            bits: Vec::new(),
        }
    }

    /// Adds `buf` to the open bucket, and sums the bucket now if the buffer to come after it
    /// (`next`, its length; none: `buf` is the last) would not fit: a bucket goes as soon as
    /// its last buffer is there, as DDP's, not when the next one turns up.
    pub fn push(&mut self, mut buf: B, next: Option<usize>) -> Result<(), DistError> {
        self.open_len += buf.as_mut().len();
        self.open.push(buf);
        let cap = if self.calls == 0 { self.caps.0 } else { self.caps.1 };
        if next.is_none_or(|n| self.open_len + n > cap) {
            self.sum_open()?;
        }
        Ok(())
    }

    /// Sums the open bucket; gives back every buffer pushed, summed.
    pub fn finish(mut self) -> Result<Summed<B>, DistError> {
        if !self.open.is_empty() {
            self.sum_open()?;
        }
        Ok(Summed { buffers: self.summed, calls: self.calls, busy_seconds: self.busy })
    }

    fn sum_open(&mut self) -> Result<(), DistError> {
        let started = std::time::Instant::now();
        let group = &mut self.open;
        if let ([single], Wire::F32) = (&mut group[..], self.wire) {
            self.world.all_reduce_sum(single.as_mut())?;
        } else {
            self.send.clear();
            group.iter_mut().for_each(|b| self.send.extend_from_slice(b.as_mut()));
            self.recv.resize(self.open_len, 0.0);
            match self.wire {
                Wire::F32 => self.world.all_reduce_sum_into(&self.send, &mut self.recv)?,
                Wire::Bf16 => {
                    self.bits.clear();
                    self.bits.extend(self.send.iter().map(|&x| half::bf16::from_f32(x).to_bits()));
                    self.world.all_reduce_sum_bf16(&mut self.bits)?;
                    let back = self.recv.iter_mut().zip(&self.bits);
                    back.for_each(|(r, &b)| *r = half::bf16::from_bits(b).to_f32());
                }
            }
            let mut at = 0;
            for b in group.iter_mut() {
                let b = b.as_mut();
                b.copy_from_slice(&self.recv[at..at + b.len()]);
                at += b.len();
            }
        }
        self.busy += started.elapsed().as_secs_f64();
        self.calls += 1;
        self.open_len = 0;
        self.summed.append(&mut self.open);
        Ok(())
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
    fn all_reduce_sum_bf16(&self, _: &mut [u16]) -> Result<(), DistError> {
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

    /// Two ranks holding the same values: every sum doubles its input. Counts the calls.
    #[derive(Default)]
    struct Twins(std::sync::atomic::AtomicUsize);

    impl Collective for Twins {
        fn backend(&self) -> &'static str {
            "twins"
        }
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), DistError> {
            unreachable!()
        }
        fn all_reduce_sum_bf16(&self, buf: &mut [u16]) -> Result<(), DistError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            for b in buf.iter_mut() {
                let x = half::bf16::from_bits(*b).to_f32();
                *b = half::bf16::from_f32(x + x).to_bits();
            }
            Ok(())
        }
        fn broadcast_f64(&self, _: &mut [f64]) -> Result<(), DistError> {
            unreachable!()
        }
        fn barrier(&self) -> Result<(), DistError> {
            Ok(())
        }
    }

    #[test]
    fn buffers_travel_in_few_buckets_and_come_back_in_place() {
        let sizes = [3usize, 5, 2, 9, 1, 1, 4];
        let fresh = || -> Vec<Vec<f32>> {
            sizes
                .iter()
                .scan(0.0f32, |n, &s| {
                    Some(
                        (0..s)
                            .map(|_| {
                                *n += 1.0;
                                *n
                            })
                            .collect(),
                    )
                })
                .collect()
        };
        for (bucket_floats, calls) in [(1000, 1), (10, 3), (1, 7)] {
            let mut bufs = fresh();
            let twins = Twins::default();
            let mut views: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
            let n = all_reduce_buckets(&twins, &mut views, bucket_floats * 4, Wire::F32).unwrap();
            // 10 floats: [3 5 2] [9 1] [1 4]; the 9 fits with the 1 after it
            assert_eq!((n, twins.0.load(std::sync::atomic::Ordering::SeqCst)), (calls, calls));
            let want: Vec<Vec<f32>> = fresh().into_iter().map(|b| b.iter().map(|x| 2.0 * x).collect()).collect();
            assert_eq!(bufs, want, "bucket of {bucket_floats} floats");
        }
    }

    /// Pushed one at a time, buffers fill a small first bucket, then full-size ones, each summed
    /// as soon as its last buffer is pushed (the next would not fit): here 4 floats, then 10.
    #[test]
    fn streamed_buffers_fill_a_small_first_bucket_then_full_ones() {
        let twins = Twins::default();
        let mut buckets = Buckets::new(&twins, (16, 40), Wire::F32);
        let sizes = [3usize, 5, 2, 9, 1, 1, 4];
        let mut calls_after_each = vec![];
        for (i, &n) in sizes.iter().enumerate() {
            buckets.push(vec![i as f32; n], sizes.get(i + 1).copied()).unwrap();
            calls_after_each.push(twins.0.load(std::sync::atomic::Ordering::SeqCst));
        }
        // each bucket goes with its last buffer: [3] (5 would not fit), [5 2], [9 1], [1 4]
        assert_eq!(calls_after_each, [1, 1, 2, 2, 3, 3, 4]);
        let summed = buckets.finish().unwrap();
        assert_eq!(summed.calls, 4);
        let want: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| vec![2.0 * i as f32; n]).collect();
        assert_eq!(summed.buffers, want);
    }

    /// In bf16 a bucket holds twice the values, and what comes back is the sum of the values
    /// rounded to bf16 (8 bits of mantissa): 1 + 2^-10 does not survive, 1.5 does.
    #[test]
    fn bf16_buckets_hold_twice_the_values_and_round_to_bf16() {
        let mut bufs = [vec![1.0f32 + 1.0 / 1024.0, 1.5, -3.0], vec![0.1; 5]];
        let twins = Twins::default();
        let mut views: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        // 8 values: 32 bytes in f32 (two buckets of 16 bytes), 16 in bf16 (one)
        assert_eq!(all_reduce_buckets(&twins, &mut views, 16, Wire::Bf16).unwrap(), 1);
        assert_eq!(bufs[0], vec![2.0, 3.0, -6.0]);
        let tenth = half::bf16::from_f32(0.1).to_f32();
        assert!(bufs[1].iter().all(|&x| x == 2.0 * tenth) && tenth != 0.1, "{:?}", bufs[1]);
    }
}
