//! Where the GPU backends keep what they compile and tune, across processes.
//!
//! burn's GPU backends (cubecl) compile every kernel at run time, on its first use in a process
//! (CUDA through NVRTC, wgpu through the driver), and a `gpu-tuned` build autotunes
//! convolutions, matrix products and reductions per shape by running every candidate kernel.
//! On an H200 that cold start kept one 32x32 training of a tuned build from finishing in 90 s
//! (BENCHMARKS.md, "The GPU path"). Every `camflow run`, and every Slurm job, is a new process.
//!
//! cubecl can keep its autotune results (`gpu-tuned` builds, `ml::backend::GpuKernels`) and
//! (CUDA) the PTX it compiled on disk. By default it
//! keeps no PTX, and puts autotune results in the `target/` folder of whatever Cargo project the
//! working directory is in (else `~/.cache/cubecl`). camflow points both at one folder instead:
//! `CAMFLOW_KERNEL_CACHE`, else `$XDG_CACHE_HOME/camflow/kernels/<host>/burn-0.21` for a
//! `gpu-tuned` build and `.../burn-0.21-fixed` for a fixed-kernel one (else `~/.cache/...`).
//! Per host, because a home folder is often shared between the nodes of a cluster while tuned
//! and compiled kernels belong to a GPU model (cubecl keys them by kernel type and device
//! index, neither by GPU model nor by kernel source: a host with two GPU models should set
//! `CAMFLOW_KERNEL_CACHE` per model). Per burn line and kernel choice, because a burn release or
//! the other build may compile other code under the same kernel type name (a folder set with
//! `CAMFLOW_KERNEL_CACHE` is used as given, by either build: set one per build). Never in the
//! project's content cache: these files are cubecl's, written by it (not atomically), and no
//! key depends on them. A fixed-kernel build autotunes nothing: only (CUDA) its PTX is kept.
//!
//! A `cubecl.toml` or `CubeCL.toml`, or a `burn.toml`/`Burn.toml` with a `[cubecl]` section, in
//! the working directory or above is the user's own cubecl configuration: camflow then leaves
//! cubecl to read it. `CAMFLOW_KERNEL_CACHE=off` leaves cubecl at its defaults.

use std::path::{Path, PathBuf};

/// The environment variable that sets (or, with `off`, turns off) the kernel cache folder.
pub const ENV: &str = "CAMFLOW_KERNEL_CACHE";
/// A file to which cubecl appends a line per kernel it compiles (`[Compiling kernel] name`) and
/// per shape it autotunes (`Fastest result ...`), flushed line by line. A slow first use is
/// either many compilations or slow ones, and only such a log on the GPU machine tells which
/// (`scripts/gpu-check.sh` counts its lines as a process runs). Applies with camflow's kernel
/// cache on; a kernel found in the compiled-kernel cache is not compiled, so not logged.
pub const LOG_ENV: &str = "CAMFLOW_KERNEL_LOG";

/// cubecl's own configuration files, searched for in the working directory and its ancestors.
const CUBECL_FILES: &[&str] = &["cubecl.toml", "CubeCL.toml"];
/// burn's, which configure cubecl only through a `[cubecl]` section.
const BURN_FILES: &[&str] = &["burn.toml", "Burn.toml"];
/// The folder under the default root, for kernels of this burn line and this build's GPU
/// kernels (see the module docs): a fixed-kernel build and a tuned one compile kernels of the
/// same type names from other code (fused or not), so they keep apart.
const BURN_LINE: &str = match super::backend::GpuKernels::BUILT {
    super::backend::GpuKernels::Tuned => "burn-0.21",
    super::backend::GpuKernels::Fixed => "burn-0.21-fixed",
};

/// What camflow does with cubecl's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// Autotune results and compiled kernels go under this folder.
    Folder(PathBuf),
    /// The user's own cubecl configuration file (found here) is used as it is.
    UserFile(PathBuf),
    /// `CAMFLOW_KERNEL_CACHE=off`, no home folder to put a cache in, a folder that cannot be
    /// made, or cubecl configured already: cubecl's defaults.
    Off,
}

/// The setting for this process, from the environment, the working directory and the host.
pub fn setting() -> Setting {
    let cwd = std::env::current_dir().ok();
    resolve(
        std::env::var_os(ENV).as_deref().map(Path::new),
        cwd.as_deref(),
        std::env::var_os("XDG_CACHE_HOME").as_deref().map(Path::new),
        std::env::var_os("HOME").as_deref().map(Path::new),
        &hostname(),
    )
}

/// [`setting`] from its inputs (what the tests drive).
fn resolve(env: Option<&Path>, cwd: Option<&Path>, xdg_cache: Option<&Path>, home: Option<&Path>, host: &str) -> Setting {
    if let Some(p) = env.filter(|p| !p.as_os_str().is_empty()) {
        // `off` and its usual spellings; anything else is a folder (a relative one from the
        // working directory it was given in: a Slurm job's may differ).
        let word = p.to_string_lossy().trim().trim_end_matches('/').to_ascii_lowercase();
        if matches!(word.as_str(), "off" | "0" | "false" | "no" | "none") {
            return Setting::Off;
        }
        return Setting::Folder(cwd.map(|c| c.join(p)).unwrap_or_else(|| p.to_path_buf()));
    }
    if let Some(file) = cwd.and_then(user_config_file) {
        return Setting::UserFile(file);
    }
    // An empty or relative XDG_CACHE_HOME is to be ignored (XDG base directory spec).
    let base = match (xdg_cache.filter(|p| p.is_absolute()), home.filter(|p| p.is_absolute())) {
        (Some(x), _) => x.to_path_buf(),
        (None, Some(h)) => h.join(".cache"),
        (None, None) => return Setting::Off,
    };
    Setting::Folder(base.join("camflow").join("kernels").join(host).join(BURN_LINE))
}

/// The first cubecl configuration in `dir` or above, as cubecl itself would find it: a cubecl
/// file, or a burn file with a `[cubecl]` section (cubecl reads nothing else of it).
fn user_config_file(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().find_map(|d| {
        let own = CUBECL_FILES.iter().map(|f| d.join(f)).find(|p| p.is_file());
        own.or_else(|| BURN_FILES.iter().map(|f| d.join(f)).find(|p| has_cubecl_section(p)))
    })
}

fn has_cubecl_section(file: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    text.lines().map(str::trim_start).any(|l| l.starts_with("[cubecl]") || l.starts_with("[cubecl."))
}

/// Whether a file can be made in `dir` (cubecl's compiled-kernel cache panics when it cannot
/// write; its autotune cache does not).
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
fn writable(dir: &Path) -> bool {
    tempfile::tempfile_in(dir).is_ok()
}

/// This machine's host name, made safe as one path segment ("unknown-host" if it has none).
fn hostname() -> String {
    // Dots kept (`node17.cluster`): the folder name of earlier camflows, whose kernels it holds.
    let name: String = crate::host::name()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' { c } else { '_' })
        .collect();
    if !name.is_empty() && name != "." && name != ".." { name } else { "unknown-host".into() }
}

/// Points cubecl's autotune and compilation caches at the [`setting`]'s folder, once per
/// process, before the first GPU device is made. Returns the setting it applied (the first
/// call's, every time), for the caller to report.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn configure() -> &'static Setting {
    static APPLIED: std::sync::OnceLock<Setting> = std::sync::OnceLock::new();
    APPLIED.get_or_init(|| {
        use burn::cubecl::config::cache::CacheConfig;
        use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
        let s = setting();
        let Setting::Folder(dir) = &s else {
            return s;
        };
        // A folder that cannot be made or written (a read-only home, one left by another user)
        // costs speed, never the run.
        if std::fs::create_dir_all(dir).is_err() || !writable(dir) {
            return Setting::Off;
        }
        let mut config = CubeClRuntimeConfig::default();
        config.autotune.cache = CacheConfig::File(dir.clone());
        config.compilation.cache = Some(CacheConfig::File(dir.clone()));
        if let Some(log) = std::env::var_os(LOG_ENV).filter(|v| !v.is_empty()) {
            use burn::cubecl::config::autotune::AutotuneLogLevel;
            use burn::cubecl::config::compilation::CompilationLogLevel;
            let log = PathBuf::from(log);
            // cubecl panics on a log it cannot write: a log that cannot be opened is no log.
            if std::fs::OpenOptions::new().create(true).append(true).open(&log).is_ok() {
                config.compilation.logger.file = Some(log.clone());
                config.compilation.logger.level = CompilationLogLevel::Basic;
                config.autotune.logger.file = Some(log);
                config.autotune.logger.level = AutotuneLogLevel::Minimal;
            }
        }
        // CUBECL_AUTOTUNE_LEVEL and CUBECL_DEBUG_* still apply, as without this file.
        let config = config.override_from_env();
        // Set only if nothing read cubecl's configuration yet (it cannot be replaced then).
        let mut slot = CubeClRuntimeConfig::storage().lock();
        if slot.is_some() {
            return Setting::Off;
        }
        *slot = Some(std::sync::Arc::new(config));
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_wins_then_a_user_file_then_the_per_host_default() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let work = tmp.path().join("project/sub");
        std::fs::create_dir_all(&work).expect("mkdir");
        let home = Path::new("/home/ada");
        let folder = |p: &str| Setting::Folder(p.into());
        // Default: per user, host and burn line, under XDG_CACHE_HOME when it is absolute,
        // else ~/.cache.
        // A fixed-kernel build and a tuned one keep apart.
        let line = if cfg!(feature = "gpu-tuned") { "burn-0.21" } else { "burn-0.21-fixed" };
        let folder_line = |p: &str| Setting::Folder(format!("{p}/{line}").into());
        assert_eq!(resolve(None, Some(&work), None, Some(home), "node1"), folder_line("/home/ada/.cache/camflow/kernels/node1"));
        assert_eq!(resolve(None, Some(&work), Some(Path::new("/scratch/c")), Some(home), "node1"), folder_line("/scratch/c/camflow/kernels/node1"));
        assert_eq!(resolve(None, Some(&work), Some(Path::new("rel")), Some(home), "n"), folder_line("/home/ada/.cache/camflow/kernels/n"));
        assert_eq!(resolve(None, Some(&work), None, None, "n"), Setting::Off);
        // A burn.toml configures cubecl only with a [cubecl] section.
        let burn = tmp.path().join("project/sub/burn.toml");
        std::fs::write(&burn, "[fusion]\nx = 1\n").expect("write");
        assert!(matches!(resolve(None, Some(&work), None, Some(home), "n"), Setting::Folder(_)));
        std::fs::write(&burn, "[fusion]\nx = 1\n  [cubecl.autotune]\nlevel = \"minimal\"\n").expect("write");
        assert_eq!(resolve(None, Some(&work), None, Some(home), "n"), Setting::UserFile(burn.clone()));
        std::fs::remove_file(&burn).expect("rm");
        // A cubecl configuration above the working directory is the user's: left alone.
        let file = tmp.path().join("project/cubecl.toml");
        std::fs::write(&file, "").expect("write");
        assert_eq!(resolve(None, Some(&work), None, Some(home), "n"), Setting::UserFile(file.clone()));
        // The environment variable overrides both (a relative folder from the working
        // directory); `off` and its usual spellings turn camflow's setting off.
        assert_eq!(resolve(Some(Path::new("/k")), Some(&work), None, Some(home), "n"), folder("/k"));
        assert_eq!(resolve(Some(Path::new("k")), Some(&work), None, Some(home), "n"), Setting::Folder(work.join("k")));
        for off in ["off", "OFF", " off ", "off/", "0", "false", "none", "No"] {
            assert_eq!(resolve(Some(Path::new(off)), Some(&work), None, Some(home), "n"), Setting::Off, "{off:?}");
        }
        assert_eq!(resolve(Some(Path::new("")), Some(&work), None, Some(home), "n"), Setting::UserFile(file));
    }

    #[test]
    fn a_folder_that_cannot_be_written_is_not_writable() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("temp dir");
        assert!(writable(tmp.path()));
        assert!(!writable(&tmp.path().join("missing")));
        // Read-only: checked where permissions bind (root ignores them).
        let ro = tmp.path().join("ro");
        std::fs::create_dir(&ro).expect("mkdir");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        if std::fs::write(ro.join("probe"), b"").is_err() {
            assert!(!writable(&ro));
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn the_host_name_is_one_safe_path_segment() {
        let h = hostname();
        assert!(!h.is_empty() && !h.contains('/') && h != "." && h != "..", "{h}");
    }
}
