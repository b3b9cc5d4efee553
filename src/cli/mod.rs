//! The command line: one file per group of subcommands; each turns arguments into a library
//! call and prints the result. Only `cli` writes to the terminal.

mod bench;
mod diff;
mod maint;
mod noop;
mod report;
mod run;
mod schema;
mod show;
mod worker;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cache::file_digests::FileDigests;
use crate::cache::{Lookup, Sidecar, Store};
use crate::error::{Error, Result};
use crate::ml::backend::BackendKind;
use crate::plan::{self, CacheView, Decision, KeyContext};
use crate::spec::{self, Override, Pipeline};
use crate::stage_kind::{Catalog, Resources};
use crate::sweep::{self, Instance};

#[derive(Parser)]
#[command(
    name = "camflow",
    version,
    long_version = long_version(),
    about = "Declarative, cached pipelines for Grad-CAM segmentation studies"
)]
pub struct Cli {
    /// Cache folder (default: $CAMFLOW_CACHE, else ./cache).
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--version`: which backends this binary runs, and (with a GPU backend) which GPU kernels,
/// since results of the two kernel builds are keyed apart (`BackendKind::class`).
fn long_version() -> &'static str {
    use crate::ml::backend::{BackendKind, GpuKernels};
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let backends = BackendKind::compiled();
        let kernels = if backends.len() > 1 { format!("; GPU kernels: {}", GpuKernels::BUILT.name()) } else { String::new() };
        format!("{} (burn 0.21; backends: {}{kernels})", env!("CARGO_PKG_VERSION"), backends.join(", "))
    })
}

#[derive(Clone, Copy, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run what is stale, reuse what is cached, write the lock file.
    Run(run::RunArgs),
    /// Show what would run and why.
    Plan(run::PlanArgs),
    /// Print the instance graph as Graphviz dot or Mermaid.
    Dag(maint::DagArgs),
    /// One row per sweep point: params and metrics of what has run so far.
    Show(show::ShowArgs),
    /// Write a static HTML report (tables, plots, gallery, provenance).
    Report(report::ReportArgs),
    /// Counts of cached and stale instances per stage.
    Status(PipelineArgs),
    /// Remove cache entries the named pipelines do not reference.
    Gc(maint::GcArgs),
    /// Hash every object and check every record.
    Verify,
    /// List stage kinds with their inputs and params.
    Kinds,
    /// Benchmarks: orchestration overhead and ML throughput.
    Bench(bench::BenchArgs),
    /// Compare the metrics of two lock files (or a lock and a pipeline's cache), per instance.
    Diff(diff::DiffArgs),
    /// Print a JSON Schema of the pipeline format (for YAML language servers).
    Schema,
    /// Run a Slurm job's instances (started by `run --executor slurm`, not by hand).
    Worker(worker::WorkerArgs),
    /// Print a shell completion script: camflow completions bash > ~/.local/share/bash-completion/completions/camflow
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

/// Arguments shared by every command that reads a pipeline.
#[derive(Args, Clone)]
pub struct PipelineArgs {
    /// The pipeline YAML file.
    pipeline: PathBuf,
    /// Override a field for this run: stages.masks.params.value=0.6 (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    sets: Vec<String>,
    /// Numeric backend, overriding the spec's `backend`.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::ml::backend::NAMES))]
    backend: Option<String>,
    /// Re-hash data files instead of trusting (path, size, mtime).
    #[arg(long)]
    rehash: bool,
    /// Refuse pipelines whose sweeps expand to more instances than this (default:
    /// $CAMFLOW_MAX_INSTANCES, else 1,000,000).
    #[arg(long, value_name = "N")]
    max_instances: Option<u64>,
}

/// `--max-instances`, else `CAMFLOW_MAX_INSTANCES`, else the default.
fn max_instances(args: &PipelineArgs) -> Result<u64> {
    let (n, setting) = if let Some(n) = args.max_instances {
        (n, format!("--max-instances {n}"))
    } else {
        match std::env::var("CAMFLOW_MAX_INSTANCES") {
            Ok(v) => (
                v.trim().parse().map_err(|_| Error::Usage(format!("CAMFLOW_MAX_INSTANCES={v}: expected a whole number")))?,
                format!("CAMFLOW_MAX_INSTANCES={v}"),
            ),
            Err(_) => return Ok(sweep::DEFAULT_MAX_INSTANCES),
        }
    };
    // Planning needs about 2 KB per instance: a limit above this could only end in an
    // allocation failure (an abort), so it is refused up front.
    if n > MAX_SETTABLE_INSTANCES {
        return Err(Error::Usage(format!(
            "{setting}: at most {MAX_SETTABLE_INSTANCES} instances can be planned (about 2 KB of memory each)"
        )));
    }
    Ok(n)
}

/// The highest instance limit that may be set (`--max-instances`, `CAMFLOW_MAX_INSTANCES`).
pub const MAX_SETTABLE_INSTANCES: u64 = 100_000_000;

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    init_tracing(cli.verbose, cli.log_format);
    crate::panics::install();
    // A panic that no stage or task caught is a bug: told as one, with its place, never as
    // Rust's raw panic output.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(cli)))
        .unwrap_or_else(|panic| Err(Error::Internal(format!("camflow panicked: {}", crate::panics::message(panic.as_ref())))));
    match result {
        Ok(()) => 0,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("{}", render_error(&e));
            e.exit_code()
        }
    }
}

fn render_error(e: &Error) -> String {
    match e {
        Error::Spec(s) => s.to_string(),
        other => format!("error: {other}"),
    }
}

/// Whether log lines are JSON (`--log-format json`): then progress inside stages is logged as
/// one JSON object per event (target `camflow::progress`), and no progress bar is drawn.
static JSON_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn json_log() -> bool {
    JSON_LOG.load(std::sync::atomic::Ordering::Relaxed)
}

fn init_tracing(verbose: u8, format: LogFormat) {
    let json = matches!(format, LogFormat::Json);
    JSON_LOG.store(json, std::sync::atomic::Ordering::Relaxed);
    let default = match (verbose, json) {
        (0, false) => "warn",
        (0, true) => "warn,camflow::progress=info",
        (1, _) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

fn dispatch(cli: Cli) -> Result<()> {
    let cache = cache_root(cli.cache_dir);
    match cli.command {
        Command::Run(a) => run::run(&cache, a),
        Command::Plan(a) => run::plan(&cache, a),
        Command::Dag(a) => maint::dag(a),
        Command::Show(a) => show::show(&cache, a),
        Command::Report(a) => report::run(&cache, a),
        Command::Status(a) => maint::status(&cache, a),
        Command::Gc(a) => maint::gc(&cache, a),
        Command::Verify => maint::verify(&cache),
        Command::Bench(a) => bench::bench(a),
        Command::Diff(a) => diff::diff(&cache, a),
        Command::Worker(a) => worker::worker(a),
        Command::Schema => {
            let s = schema::schema(&crate::stages::catalog());
            print_out(&(serde_json::to_string_pretty(&s).unwrap_or_default() + "\n"));
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "camflow", &mut buf);
            print_out(&String::from_utf8_lossy(&buf));
            Ok(())
        }
        Command::Kinds => {
            print_out(&maint::kinds_text(&crate::stages::catalog()));
            Ok(())
        }
    }
}

/// `--cache-dir`, else `CAMFLOW_CACHE`, else `./cache`. An empty `CAMFLOW_CACHE=` counts as
/// unset: as a path it would make the current folder the cache.
fn cache_root(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("CAMFLOW_CACHE").filter(|v| !v.is_empty()).map(PathBuf::from)).unwrap_or_else(|| PathBuf::from("cache"))
}

/// Prints to stdout; a closed pipe (`| head`) ends the program quietly with 0.
pub fn print_out(s: &str) {
    let mut out = std::io::stdout().lock();
    if out.write_all(s.as_bytes()).and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// A pipeline loaded, expanded and checked, with its data digested.
pub struct Prepared {
    pub pipeline: Pipeline,
    pub instances: Vec<Instance>,
    pub resources: Vec<Resources>,
    pub files: Vec<BTreeMap<String, String>>,
    pub catalog: Arc<Catalog>,
    pub backend: BackendKind,
}

/// Loads the spec, expands sweeps and checks every instance's params.
pub fn load(args: &PipelineArgs) -> Result<(Pipeline, Vec<Instance>, Arc<Catalog>)> {
    let catalog = Arc::new(crate::stages::catalog());
    let mut overrides = Vec::new();
    for s in &args.sets {
        overrides.push(s.parse::<Override>().map_err(|m| Error::Usage(format!("--set {m}")))?);
    }
    let p = spec::load(&args.pipeline, &overrides, &catalog)?;
    let order = crate::dag::stage_order(&p.stages);
    // Counted before anything is expanded; then each kind's cross-param checks.
    let instances = sweep::expand_checked(&p, &order, &catalog, max_instances(args)?)?;
    Ok((p, instances, catalog))
}

/// Whether a run given these `--set`s still produces the spec's results, and so may write its
/// lock: no `--set`, or only location params (`stages.data.params.root=...`), which no key
/// holds: the data's contents are in the key, wherever the data lives. Any other `--set`
/// makes results the spec file does not describe, so its lock is left as it is.
pub fn sets_keep_the_lock(args: &PipelineArgs, p: &Prepared) -> bool {
    args.sets.iter().all(|s| {
        let Ok(o) = s.parse::<Override>() else { return false };
        let segs: Vec<&str> = o.path.split('.').collect();
        let ["stages", stage, "params", param] = segs.as_slice() else { return false };
        p.pipeline.stages.get(*stage).and_then(|st| p.catalog.get(&st.kind)).is_some_and(|k| k.location_params().contains(param))
    })
}

pub fn prepare(args: &PipelineArgs, store: &Store) -> Result<Prepared> {
    let (pipeline, instances, catalog) = load(args)?;
    let backend_name = args.backend.clone().unwrap_or_else(|| pipeline.backend.clone());
    let backend = BackendKind::parse(&backend_name).ok_or_else(|| Error::Usage(format!("unknown backend `{backend_name}`")))?;
    if !backend.is_compiled() {
        return Err(Error::Usage(format!(
            "backend `{}` is not compiled into this camflow (it has: {}); rebuild with `cargo build --release --features {}`",
            backend.name(),
            BackendKind::compiled().join(", "),
            backend.feature().unwrap_or_default()
        )));
    }
    if backend == BackendKind::Cpu {
        crate::ml::backend::check_cpu_kernels_setting().map_err(Error::Usage)?;
    }
    let mut digests = FileDigests::load(store, args.rehash);
    let mut files = Vec::with_capacity(instances.len());
    let mut memo: BTreeMap<crate::stage_kind::DataFiles, String> = BTreeMap::new();
    for inst in &instances {
        let kind = catalog.get(&inst.kind).expect("validated");
        let mut m = BTreeMap::new();
        let listed = kind
            .external_files(&inst.params, &pipeline.base_dir)
            .map_err(|e| Error::Spec(spec::data_error(&pipeline, &inst.stage, &e.to_string())))?;
        for (name, list) in listed {
            let d = match memo.get(&list) {
                Some(d) => d.clone(),
                None => {
                    let d = digests.digest_files(&list);
                    memo.insert(list, d.clone());
                    d
                }
            };
            m.insert(name, d);
        }
        files.push(m);
    }
    digests.save(store);
    let resources = instances.iter().map(|i| pipeline.stages[&i.stage].resources).collect();
    Ok(Prepared { pipeline, instances, resources, files, catalog, backend })
}

pub fn open_store(root: &Path) -> Result<Store> {
    // What is at the path, said plainly: `create_dir_all` over a file or a dangling link
    // answers only "File exists".
    match (std::fs::symlink_metadata(root), std::fs::metadata(root)) {
        (Ok(l), Err(_)) if l.file_type().is_symlink() => {
            return Err(Error::Io(format!("cache {}: a link to nothing (expected a folder, or no file there)", root.display())));
        }
        (_, Ok(m)) if !m.is_dir() => {
            return Err(Error::Io(format!("cache {}: not a folder (expected a folder, or no file there)", root.display())));
        }
        _ => {}
    }
    Store::open(root).map_err(|e| Error::Io(format!("cache {}: {e}", root.display())))
}

/// The cache of a command that only looks at it (`plan`, `status`, `show`, `report`, `diff`,
/// `verify`, `gc`). Where there is no cache yet, it is not created: such a command typed in
/// the wrong folder must not leave an empty `cache/` behind. It sees an empty cache instead
/// (a temporary one, gone when the command ends) and says so.
pub struct ReadStore {
    store: Store,
    _empty: Option<tempfile::TempDir>,
    /// The cache folder asked for, where it does not exist.
    missing: Option<PathBuf>,
}

impl std::ops::Deref for ReadStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

pub fn open_store_to_read(root: &Path) -> Result<ReadStore> {
    // No cache there: nothing at the path, or a folder (an existing one given by mistake)
    // with none of a cache's folders (records, objects, locks, names), whose layout a reader
    // must not plant. A run's locks alone make a cache: `gc` must see its leases.
    let absent = match std::fs::metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::symlink_metadata(root).is_err(),
        Ok(m) if m.is_dir() => !["actions", "objects", "locks", "names"].iter().any(|d| root.join(d).exists()),
        _ => false,
    };
    if !absent {
        return Ok(ReadStore { store: open_store(root)?, _empty: None, missing: None });
    }
    let empty = tempfile::Builder::new()
        .prefix("camflow-empty-cache-")
        .tempdir()
        .map_err(|e| Error::Io(format!("a temporary empty cache: {e}")))?;
    let store = open_store(empty.path())?;
    Ok(ReadStore { store, _empty: Some(empty), missing: Some(root.to_path_buf()) })
}

impl ReadStore {
    /// Says, where there was no cache, that the answer is about an empty one. Called once the
    /// pipeline is read, so that a spec error is not preceded by a note about the cache.
    pub fn note_if_absent(&self) {
        // Once per process: `diff` of two pipelines reads the cache twice.
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if let Some(root) = &self.missing
            && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!("note: no cache at {} yet: nothing has been computed there (it is created by `camflow run`)", root.display());
        }
    }
}

struct StoreView<'a> {
    store: &'a Store,
    pipeline: &'a str,
    full: bool,
    /// The first entry that could not be read (not "not found"): planning stops with it, as
    /// `run` does, instead of showing the instance as stale.
    io_error: std::cell::RefCell<Option<String>>,
}

impl CacheView for StoreView<'_> {
    fn lookup(&self, key: &str) -> Lookup {
        match self.store.try_lookup_once(key, self.full) {
            Ok(l) => l,
            Err(e) => {
                let msg = e.to_string();
                self.io_error.borrow_mut().get_or_insert(msg.clone());
                Lookup::Corrupt(msg)
            }
        }
    }
    fn sidecar(&self, label: &str) -> Option<Sidecar> {
        self.store.read_sidecar(self.pipeline, label)
    }
    fn known_fresh(&self, key: &str) -> Option<String> {
        if self.full { None } else { self.store.fresh_output_digest(key) }
    }
}

/// Plans against the store. A cache entry that cannot be read (permissions, I/O) is an error
/// (exit 5, naming the file), never shown as stale: a second user would otherwise recompute.
pub fn make_plan(p: &Prepared, store: &Store, full: bool, forced: &dyn Fn(&Instance) -> bool) -> Result<Vec<Decision>> {
    let view = StoreView { store, pipeline: &p.pipeline.name, full, io_error: Default::default() };
    let kcx = KeyContext { catalog: &p.catalog, seed: p.pipeline.seed, backend_class: p.backend.class(), files: &p.files };
    let d = plan::plan(&p.instances, &kcx, &view, forced);
    match view.io_error.into_inner() {
        Some(e) => Err(Error::Io(format!("reading the cache: {e}"))),
        None => Ok(d),
    }
}
