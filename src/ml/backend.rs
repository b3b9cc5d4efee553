//! Choosing the numeric backend at run time.
//!
//! The CPU backend (burn's flex) is always compiled in; CUDA only with the `cuda` feature.
//! Generic ML code is handed to [`dispatch`] as a [`BackendJob`], which instantiates it for the
//! chosen backend. Any panic inside burn (for example no CUDA driver) becomes an error here, so
//! none reaches the user.

use std::panic::{AssertUnwindSafe, catch_unwind};

use super::fast_ops::TrainBackend;

/// The CPU numeric profile. `portable1`: every reduction and matrix product of training,
/// inference and Grad-CAM runs in camflow's own kernels in a fixed summation order without
/// FMA (`cpu_kernels`), at any SIMD width; transcendental functions come from `libm`. So the
/// bytes are the same on any x86_64 CPU, whatever its caches or vector extensions. Bump it
/// when a change alters CPU numbers for every kind at once.
pub const CPU_PROFILE: &str = "portable1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(BackendKind::Cpu),
            "cuda" => Some(BackendKind::Cuda),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// The numeric class that goes into cache keys and lock files: results differ between
    /// these, and never within one. The CPU class names its numeric profile
    /// ([`CPU_PROFILE`]): the same bytes on every CPU of the architecture.
    pub fn class(self) -> String {
        match self {
            BackendKind::Cpu => format!("flex-{}-{CPU_PROFILE}", std::env::consts::ARCH),
            BackendKind::Cuda => "cuda".into(),
        }
    }

    /// Whether two runs give the same bytes. GPU kernels (atomics, autotuned reductions) may not.
    pub fn bitwise_deterministic(self) -> bool {
        self == BackendKind::Cpu
    }

    pub fn compiled() -> &'static [&'static str] {
        if cfg!(feature = "cuda") { &["cpu", "cuda"] } else { &["cpu"] }
    }
}

/// Checks `CAMFLOW_CPU_KERNELS` before anything runs (the CLI calls it while planning), so a
/// bad value is a usage error naming the variable and what it accepts, never a stage failure
/// after other stages already ran.
pub fn check_cpu_kernels_setting() -> Result<(), String> {
    use crate::ml::cpu_kernels::portable_gemm::{KernelLevel, configured_level};
    configured_level().map(|_| ()).map_err(|e| {
        let here: Vec<&str> = KernelLevel::available().into_iter().map(|l| l.name()).collect();
        format!("{e} (accepted values: auto, baseline, avx2, avx512; this CPU runs: auto, {})", here.join(", "))
    })
}

/// A piece of generic ML work, instantiated for one backend by [`dispatch`].
pub trait BackendJob {
    type Output;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output;
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("this camflow was built without CUDA; rebuild with `cargo build --release --features cuda`")]
    CudaNotCompiled,
    #[error("CPU kernels: {0}")]
    CpuKernels(String),
    #[error("{backend} backend failed: {message}")]
    Panicked { backend: &'static str, message: String },
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

pub fn dispatch<J: BackendJob>(kind: BackendKind, device_index: usize, job: J) -> Result<J::Output, BackendError> {
    match kind {
        BackendKind::Cpu => {
            let _ = device_index;
            // A bad `CAMFLOW_CPU_KERNELS` is the user's to fix, reported before any work.
            crate::ml::cpu_kernels::portable_gemm::configured_level().map_err(BackendError::CpuKernels)?;
            catch_unwind(AssertUnwindSafe(|| job.run::<burn::backend::Autodiff<burn::backend::Flex>>(Default::default())))
                .map_err(|p| BackendError::Panicked { backend: "cpu", message: panic_message(p) })
        }
        BackendKind::Cuda => dispatch_cuda(device_index, job),
    }
}

#[cfg(feature = "cuda")]
fn dispatch_cuda<J: BackendJob>(device_index: usize, job: J) -> Result<J::Output, BackendError> {
    use burn::backend::cuda::CudaDevice;
    catch_unwind(AssertUnwindSafe(|| job.run::<burn::backend::Autodiff<burn::backend::Cuda>>(CudaDevice::new(device_index))))
        .map_err(|p| BackendError::Panicked { backend: "cuda", message: panic_message(p) })
}

#[cfg(not(feature = "cuda"))]
fn dispatch_cuda<J: BackendJob>(_device_index: usize, _job: J) -> Result<J::Output, BackendError> {
    Err(BackendError::CudaNotCompiled)
}
