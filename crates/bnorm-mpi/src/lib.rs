//! # bnorm-mpi — synchronized batch normalization over MPI
//!
//! [`MpiComm`] implements [`bnorm::sync::Communicator`] over an MPI communicator (the
//! [`mpi`] crate, rsmpi), so that [`bnorm::expert::forward_into`] and
//! [`bnorm::expert::backward_into`] with options
//! [`synchronized`](bnorm::expert::Options::synchronized) over it normalize with the
//! statistics of the global batch
//! spread over processes and machines. Statistics are exchanged as plain f64 buffers by
//! `MPI_Allgather` (no user-defined reduction, no reliance on MPI's reduction order) and
//! merged in rank order on every rank, so every rank gets bit-identical statistics.
//!
//! Launch with `mpirun -np 4 ./your_program` on one machine, or with a hostfile across
//! machines (see the README). A program started without `mpirun` is a world of one rank.
//!
//! ```
//! use bnorm::sync::Communicator;
//! use bnorm::{Config, Layout, Mode, Params, RunningState};
//! use bnorm::expert::{forward_into, Options, Parallelism, Saved, Workspace};
//! let universe = mpi::initialize().ok_or("MPI was already initialized")?;
//! let comm = bnorm_mpi::MpiComm::world(&universe);
//! let cfg = Config::torch(2);
//! // Each rank holds 2 samples of its own.
//! let x: Vec<f32> = (0..4).map(|i| (i + 4 * comm.rank()) as f32).collect();
//! let g = Layout::NC.geometry(&[2, 2])?;
//! let (p, mut st) = (Params::init(&cfg), RunningState::init(&cfg));
//! let (mut y, mut saved, mut ws) = (vec![0.0f32; 4], Saved::default(), Workspace::default());
//! let opts = Options::from(Parallelism::Rayon).synchronized(&comm);
//! forward_into(&cfg, g, &x, &p, st.as_mut(), Mode::Train, &mut y, &mut saved, &mut ws, opts)?;
//! assert_eq!(saved.mean().len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub use mpi;

use bnorm::sync::Communicator;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as MpiCommunicator, CommunicatorCollectives};

/// An MPI communicator seen as a [`bnorm::sync::Communicator`]. Wraps any rsmpi
/// communicator (the world, or a split of it, e.g. one per data-parallel group).
///
/// Like the communicator it wraps, it is neither `Send` nor `Sync`: use it from the thread
/// that initialized MPI (rayon threads inside each rank are fine; only the collectives
/// run on the calling thread).
///
/// ```
/// use bnorm::sync::Communicator;
/// let universe = mpi::initialize().ok_or("MPI was already initialized")?;
/// let comm = bnorm_mpi::MpiComm::world(&universe);
/// let mut out = Vec::new();
/// comm.all_gather_f64(&[comm.rank() as f64], &mut out)?;
/// assert_eq!(out.len(), comm.size());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct MpiComm<C = SimpleCommunicator> {
    comm: C,
}

impl MpiComm<SimpleCommunicator> {
    /// The world communicator of an initialized MPI universe.
    ///
    /// ```
    /// let universe = mpi::initialize().ok_or("MPI was already initialized")?;
    /// let comm = bnorm_mpi::MpiComm::world(&universe);
    /// # let _ = comm;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn world(universe: &mpi::environment::Universe) -> Self {
        MpiComm {
            comm: universe.world(),
        }
    }
}

impl<C: MpiCommunicator> MpiComm<C> {
    /// Wraps an rsmpi communicator.
    ///
    /// ```
    /// let universe = mpi::initialize().ok_or("MPI was already initialized")?;
    /// let comm = bnorm_mpi::MpiComm::new(universe.world());
    /// # let _ = comm;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(comm: C) -> Self {
        MpiComm { comm }
    }

    /// The wrapped communicator.
    ///
    /// ```
    /// use mpi::traits::Communicator;
    /// let universe = mpi::initialize().ok_or("MPI was already initialized")?;
    /// let comm = bnorm_mpi::MpiComm::world(&universe);
    /// assert!(comm.inner().size() >= 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn inner(&self) -> &C {
        &self.comm
    }
}

impl<C: MpiCommunicator> Communicator for MpiComm<C> {
    fn rank(&self) -> usize {
        // MPI ranks are non-negative by definition.
        self.comm.rank().max(0) as usize
    }

    fn size(&self) -> usize {
        self.comm.size().max(0) as usize
    }

    /// `MPI_Allgather` of f64. The synchronized steps always pass equal lengths on every
    /// rank (they agree on a fixed-size header first); MPI's default error handler aborts
    /// the job on a transport error, so this does not return one.
    fn all_gather_f64(&self, local: &[f64], out: &mut Vec<f64>) -> bnorm::Result<()> {
        out.clear();
        out.resize(local.len() * self.size(), 0.0);
        self.comm.all_gather_into(local, &mut out[..]);
        Ok(())
    }
}
