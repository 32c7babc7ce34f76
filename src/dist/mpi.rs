//! The MPI backend (`--features mpi`): Open MPI or MPICH through the `mpi` crate.
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: the trainer calls it from its own thread,
//! one call at a time (the mutex below makes that so whatever the caller does).

use std::sync::Mutex;

use std::os::raw::{c_int, c_void};

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation, UnsafeUserOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use super::{Collective, DistError};

pub struct MpiWorld {
    rank: usize,
    size: usize,
    comm: Mutex<(Universe, SimpleCommunicator)>,
}

// Safety: MPI was initialised with MPI_THREAD_SERIALIZED (checked in `initialize`), which allows
// calls from any thread as long as no two run at once; every call goes through the mutex.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

fn err(reason: impl Into<String>) -> DistError {
    DistError::Backend { backend: "mpi", reason: reason.into() }
}

impl MpiWorld {
    pub fn initialize() -> Result<Self, DistError> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| err("MPI was already initialised in this process"))?;
        if !matches!(threading, Threading::Serialized | Threading::Multiple) {
            return Err(err(format!("the MPI library offers {threading:?} threading; difflab needs Serialized")));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self { rank, size, comm: Mutex::new((universe, world)) })
    }

    fn with<R>(&self, f: impl FnOnce(&SimpleCommunicator) -> R) -> Result<R, DistError> {
        let guard = self.comm.lock().map_err(|_| err("a thread panicked inside an MPI call"))?;
        Ok(f(&guard.1))
    }
}

impl Collective for MpiWorld {
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let send = buf.to_vec();
        self.with(|c| c.all_reduce_into(&send[..], buf, SystemOperation::sum()))
    }
    fn all_reduce_sum_into(&self, send: &[f32], recv: &mut [f32]) -> Result<(), DistError> {
        self.with(|c| c.all_reduce_into(send, recv, SystemOperation::sum()))
    }
    fn all_reduce_sum_bf16(&self, buf: &mut [u16]) -> Result<(), DistError> {
        let send = buf.to_vec();
        // Safety: `add_bf16` reads and writes `len` u16 values, the datatype of this call.
        let sum = unsafe { UnsafeUserOperation::commutative(add_bf16) };
        self.with(|c| c.all_reduce_into(&send[..], buf, &sum))
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
        let send = buf.to_vec();
        self.with(|c| c.all_reduce_into(&send[..], buf, SystemOperation::sum()))
    }
    fn broadcast_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
        self.with(|c| c.process_at_rank(0).broadcast_into(buf))
    }
    fn barrier(&self) -> Result<(), DistError> {
        self.with(|c| c.barrier())
    }
}

/// MPI's reduction callback for bf16 sums: `inout[i] = bf16(f32(in[i]) + f32(inout[i]))`.
///
/// # Safety
/// MPI passes `len` elements of the call's datatype (u16) at both pointers.
unsafe extern "C" fn add_bf16(input: *mut c_void, inout: *mut c_void, len: *mut c_int, _: *mut mpi::ffi::MPI_Datatype) {
    let n = unsafe { *len } as usize;
    let (a, b) = unsafe {
        (std::slice::from_raw_parts(input as *const u16, n), std::slice::from_raw_parts_mut(inout as *mut u16, n))
    };
    for (x, y) in a.iter().zip(b) {
        let sum = half::bf16::from_bits(*x).to_f32() + half::bf16::from_bits(*y).to_f32();
        *y = half::bf16::from_f32(sum).to_bits();
    }
}
