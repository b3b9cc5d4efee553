//! Choosing the numeric backend at run time.
//!
//! The CPU backend (burn's flex) is always compiled in; CUDA only with the `cuda` feature, wgpu
//! (Vulkan, Metal, DX12: most laptops' GPUs) only with the `wgpu` feature.
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
    Wgpu,
}

/// Which kernels the GPU backends of this build run: a cargo-feature choice (`gpu-tuned`),
/// since burn compiles autotuning and fusion in or out, never switches them per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuKernels {
    /// One fixed kernel per operation (burn's non-autotuned defaults: direct convolutions, a
    /// plain matrix product), each compiled on its first use in a process. A process starts
    /// in seconds; steps are slower than tuned ones (BENCHMARKS.md, "The GPU path").
    Fixed,
    /// burn's defaults for its GPU backends: each convolution, matrix product and reduction
    /// shape autotuned on first use (every candidate kernel compiled and timed; results kept
    /// in the kernel cache, `gpu_kernel_cache`), and chains of elementwise operations fused
    /// into generated kernels. Faster steps; the first use on a host takes minutes.
    Tuned,
}

impl GpuKernels {
    /// This build's.
    pub const BUILT: GpuKernels = if cfg!(feature = "gpu-tuned") { GpuKernels::Tuned } else { GpuKernels::Fixed };

    pub fn name(self) -> &'static str {
        match self {
            GpuKernels::Fixed => "fixed",
            GpuKernels::Tuned => "tuned",
        }
    }

    /// How a build gets these kernels, for messages that name them.
    pub fn build(self) -> &'static str {
        match self {
            GpuKernels::Fixed => "a build without `gpu-tuned`",
            GpuKernels::Tuned => "a `gpu-tuned` build, autotuned per host",
        }
    }
}

/// Every backend name camflow knows, compiled in or not (`BackendKind::parse` accepts these).
pub const NAMES: &[&str] = &["cpu", "cuda", "wgpu"];

impl BackendKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(BackendKind::Cpu),
            "cuda" => Some(BackendKind::Cuda),
            "wgpu" => Some(BackendKind::Wgpu),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
        }
    }

    /// The numeric class that goes into cache keys and lock files: results differ between
    /// these. The CPU class names its numeric profile ([`CPU_PROFILE`]): the same bytes on
    /// every CPU of the architecture. The GPU classes cannot promise that: wgpu's class says
    /// so in its name, since one wgpu build runs on GPUs of every vendor (and on lavapipe),
    /// each compiling the same shaders its own way. A GPU class also names the build's
    /// [`GpuKernels`] when they are the fixed ones: the two builds run other kernels (other
    /// summation orders), so one build's results are never served as the other's. The tuned
    /// build keeps the names all GPU results had before the choice existed.
    pub fn class(self) -> String {
        let fixed = if GpuKernels::BUILT == GpuKernels::Fixed { "-fixed" } else { "" };
        match self {
            BackendKind::Cpu => format!("flex-{}-{CPU_PROFILE}", std::env::consts::ARCH),
            BackendKind::Cuda => format!("cuda{fixed}"),
            BackendKind::Wgpu => format!("wgpu{fixed}-nondeterministic"),
        }
    }

    /// Whether two runs give the same bytes. GPU kernels (atomics, autotuned reductions, the
    /// driver's shader compiler) may not.
    pub fn bitwise_deterministic(self) -> bool {
        self == BackendKind::Cpu
    }

    /// The backends this binary can run, in [`NAMES`] order.
    pub fn compiled() -> Vec<&'static str> {
        NAMES.iter().copied().filter(|n| Self::parse(n).is_some_and(Self::is_compiled)).collect()
    }

    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Cpu => true,
            BackendKind::Cuda => cfg!(feature = "cuda"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
        }
    }

    /// The cargo feature that compiles this backend in (`None`: always there).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            BackendKind::Cpu => None,
            BackendKind::Cuda => Some("cuda"),
            BackendKind::Wgpu => Some("wgpu"),
        }
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

/// The memory assumed for a GPU whose size the backend cannot report (wgpu has no query for
/// it): small enough for a laptop's GPU, so that packing fractional instances never runs a
/// device out of memory on the strength of a guess.
pub const DEFAULT_GPU_MEMORY: u64 = 4 << 30;

/// Memory of the backend's GPUs in bytes (the smallest, if they differ), where its driver
/// can tell: CUDA through `nvidia-smi`. wgpu has no portable query. `None`: unknown.
pub fn device_memory(kind: BackendKind) -> Option<u64> {
    match kind {
        BackendKind::Cuda => {
            let out = std::process::Command::new("nvidia-smi")
                .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"])
                .output()
                .ok()
                .filter(|o| o.status.success())?;
            smallest_mib(&String::from_utf8_lossy(&out.stdout)).map(|mib| mib << 20)
        }
        BackendKind::Cpu | BackendKind::Wgpu => None,
    }
}

/// The smallest of one MiB figure per line (`nvidia-smi`'s csv, noheader, nounits).
fn smallest_mib(csv: &str) -> Option<u64> {
    let values: Option<Vec<u64>> = csv.lines().filter(|l| !l.trim().is_empty()).map(|l| l.trim().parse::<u64>().ok()).collect();
    values?.into_iter().min()
}

/// A piece of generic ML work, instantiated for one backend by [`dispatch`].
pub trait BackendJob {
    type Output;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output;
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("this camflow was built without the `{0}` backend; rebuild with `cargo build --release --features {0}`")]
    NotCompiled(&'static str),
    #[error("CPU kernels: {0}")]
    CpuKernels(String),
    #[error("{backend} backend failed: {message}")]
    Panicked { backend: &'static str, message: String },
    #[error("{backend} backend unavailable: {why}")]
    Unavailable { backend: &'static str, why: String },
}

/// Whether one of `names` loads as a shared library here (what cudarc will `dlopen`).
pub fn library_loads(names: &[&str]) -> bool {
    names.iter().any(|name| {
        let Ok(c) = std::ffi::CString::new(*name) else {
            return false;
        };
        // SAFETY: a NUL-terminated name; a handle we got is closed again at once.
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if h.is_null() {
                return false;
            }
            libc::dlclose(h);
        }
        true
    })
}

/// The libraries the CUDA backend loads at run time, checked before any device is made: burn
/// would otherwise panic on a thread of its own, and the error that reaches the caller names
/// only a closed channel. The driver's `libcuda`, and the CUDA toolkit's NVRTC, which compiles
/// every kernel at run time. Checked once per process (every CUDA stage dispatches here).
#[cfg(feature = "cuda")]
fn cuda_libraries() -> Result<(), BackendError> {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        if !library_loads(&["libcuda.so.1", "libcuda.so"]) {
            return Err("no NVIDIA driver library (libcuda.so.1) on this machine's library path".into());
        }
        if !library_loads(&["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11", "libnvrtc.so"]) {
            return Err("NVRTC (libnvrtc.so.<CUDA major version>, from the CUDA toolkit) not found: camflow compiles its GPU \
                        kernels at run time; add the toolkit's lib64 folder to LD_LIBRARY_PATH"
                .into());
        }
        Ok(())
    });
    checked.clone().map_err(|why| BackendError::Unavailable { backend: "cuda", why })
}

pub fn dispatch<J: BackendJob>(kind: BackendKind, device_index: usize, job: J) -> Result<J::Output, BackendError> {
    match kind {
        BackendKind::Cpu => {
            let _ = device_index;
            // A bad `CAMFLOW_CPU_KERNELS` is the user's to fix, reported before any work.
            crate::ml::cpu_kernels::portable_gemm::configured_level().map_err(BackendError::CpuKernels)?;
            catch_unwind(AssertUnwindSafe(|| job.run::<burn::backend::Autodiff<burn::backend::Flex>>(Default::default())))
                .map_err(|p| BackendError::Panicked { backend: "cpu", message: crate::panics::message(p.as_ref()) })
        }
        BackendKind::Cuda => dispatch_cuda(device_index, job),
        BackendKind::Wgpu => dispatch_wgpu(device_index, job),
    }
}

#[cfg(feature = "cuda")]
fn dispatch_cuda<J: BackendJob>(device_index: usize, job: J) -> Result<J::Output, BackendError> {
    use burn::backend::cuda::CudaDevice;
    cuda_libraries()?;
    note_kernel_cache(super::gpu_kernel_cache::configure());
    catch_unwind(AssertUnwindSafe(|| job.run::<burn::backend::Autodiff<burn::backend::Cuda>>(CudaDevice::new(device_index))))
        .map_err(|p| BackendError::Panicked { backend: "cuda", message: crate::panics::message(p.as_ref()) })
}

#[cfg(not(feature = "cuda"))]
fn dispatch_cuda<J: BackendJob>(_device_index: usize, _job: J) -> Result<J::Output, BackendError> {
    Err(BackendError::NotCompiled("cuda"))
}

/// Says (at `-v`) which GPU kernels this build runs and where they are cached, once.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn note_kernel_cache(s: &super::gpu_kernel_cache::Setting) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::info!("GPU kernels: {} ({})", GpuKernels::BUILT.name(), GpuKernels::BUILT.build());
        note_kernel_cache_setting(s)
    });
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn note_kernel_cache_setting(s: &super::gpu_kernel_cache::Setting) {
    use super::gpu_kernel_cache::Setting;
    match s {
        Setting::Folder(d) => tracing::info!("GPU kernel cache (cubecl autotune results, compiled kernels): {}", d.display()),
        Setting::UserFile(f) => tracing::info!("GPU kernel cache: cubecl configured by {}", f.display()),
        Setting::Off => tracing::info!(
            "GPU kernel cache: cubecl's defaults ({} off, no HOME, a folder that cannot be made, or cubecl configured already)",
            super::gpu_kernel_cache::ENV
        ),
    }
}

/// The wgpu device for an executor's GPU index: 0 is the adapter wgpu ranks best (a laptop's
/// only GPU, or lavapipe on a machine without one); on a machine with several GPUs, index i > 0
/// is the i-th discrete GPU.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(device_index: usize) -> burn::backend::wgpu::WgpuDevice {
    use burn::backend::wgpu::WgpuDevice;
    if device_index == 0 { WgpuDevice::DefaultDevice } else { WgpuDevice::DiscreteGpu(device_index) }
}

#[cfg(feature = "wgpu")]
fn dispatch_wgpu<J: BackendJob>(device_index: usize, job: J) -> Result<J::Output, BackendError> {
    note_kernel_cache(super::gpu_kernel_cache::configure());
    catch_unwind(AssertUnwindSafe(|| job.run::<burn::backend::Autodiff<burn::backend::Wgpu>>(wgpu_device(device_index))))
        .map_err(|p| BackendError::Panicked { backend: "wgpu", message: crate::panics::message(p.as_ref()) })
}

#[cfg(not(feature = "wgpu"))]
fn dispatch_wgpu<J: BackendJob>(_device_index: usize, _job: J) -> Result<J::Output, BackendError> {
    Err(BackendError::NotCompiled("wgpu"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_check_tells_present_from_absent() {
        assert!(library_loads(&["libc.so.6"]));
        assert!(!library_loads(&["libcamflow-no-such-library.so.1"]));
        assert!(library_loads(&["libcamflow-no-such-library.so.1", "libc.so.6"]));
        assert!(!library_loads(&["bad\0name"]));
    }

    #[test]
    fn every_name_parses_and_round_trips() {
        for &n in NAMES {
            let k = BackendKind::parse(n).expect(n);
            assert_eq!(k.name(), n);
        }
        assert_eq!(BackendKind::parse("vulkan"), None);
        // A pipeline's `backend:` accepts exactly these names.
        assert_eq!(crate::spec::BACKENDS, NAMES);
        assert_eq!(BackendKind::compiled()[0], "cpu");
        assert_eq!(BackendKind::compiled().contains(&"wgpu"), cfg!(feature = "wgpu"));
        assert_eq!(BackendKind::compiled().contains(&"cuda"), cfg!(feature = "cuda"));
    }

    #[test]
    fn only_the_cpu_is_bitwise_deterministic_and_gpu_classes_differ() {
        assert!(BackendKind::Cpu.bitwise_deterministic());
        assert!(!BackendKind::Cuda.bitwise_deterministic());
        assert!(!BackendKind::Wgpu.bitwise_deterministic());
        let classes: std::collections::BTreeSet<String> = NAMES.iter().map(|n| BackendKind::parse(n).unwrap().class()).collect();
        assert_eq!(classes.len(), NAMES.len(), "each backend has its own class: {classes:?}");
        // The key of a wgpu result says it is not bitwise deterministic.
        assert!(BackendKind::Wgpu.class().contains("nondeterministic"));
    }

    #[test]
    fn gpu_classes_name_the_fixed_kernels_and_keep_the_tuned_builds_old_names() {
        // A result of one build's kernels is never keyed as the other's; the tuned build (burn's
        // defaults, the only GPU build before `gpu-tuned` existed) keeps the keys it had.
        let (cuda, wgpu) = (BackendKind::Cuda.class(), BackendKind::Wgpu.class());
        if cfg!(feature = "gpu-tuned") {
            assert_eq!(GpuKernels::BUILT, GpuKernels::Tuned);
            assert_eq!((cuda.as_str(), wgpu.as_str()), ("cuda", "wgpu-nondeterministic"));
        } else {
            assert_eq!(GpuKernels::BUILT, GpuKernels::Fixed);
            assert_eq!((cuda.as_str(), wgpu.as_str()), ("cuda-fixed", "wgpu-fixed-nondeterministic"));
        }
        // The CPU's class does not depend on the GPU build.
        assert!(BackendKind::Cpu.class().starts_with("flex-"));
    }

    #[test]
    fn gpu_memory_reads_nvidia_smi_lines_and_refuses_garbage() {
        assert_eq!(smallest_mib("81559\n40960\n"), Some(40960));
        assert_eq!(smallest_mib("81559\n"), Some(81559));
        assert_eq!(smallest_mib(""), None);
        assert_eq!(smallest_mib("[N/A]\n81559\n"), None);
        assert_eq!(device_memory(BackendKind::Wgpu), None);
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn asking_for_wgpu_without_the_feature_is_an_error_naming_it() {
        struct Nothing;
        impl BackendJob for Nothing {
            type Output = ();
            fn run<B: TrainBackend>(self, _device: B::Device) {}
        }
        let e = dispatch(BackendKind::Wgpu, 0, Nothing).unwrap_err().to_string();
        assert!(e.contains("--features wgpu"), "{e}");
    }
}
