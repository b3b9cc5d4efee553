//! The one trait through which stage kinds plug into the orchestration core.
//!
//! The core (spec, sweep, dag, cache, plan, exec) sees a stage kind only through
//! [`StageKind`]: its name and version, the artifact types it consumes and produces, its
//! parameters with types and defaults, and a `run` that turns input files into output files.
//! It knows nothing of neural networks; `stages` implements the kinds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

/// Resolved parameters of one instance: defaults filled in, sweep values applied.
pub type Params = BTreeMap<String, Json>;

/// What flows along an edge of the DAG; wiring is checked against it before anything runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArtifactType {
    Dataset,
    Model,
    Heatmaps,
    Masks,
    Metrics,
}

impl ArtifactType {
    pub fn name(self) -> &'static str {
        match self {
            ArtifactType::Dataset => "dataset",
            ArtifactType::Model => "model",
            ArtifactType::Heatmaps => "heatmaps",
            ArtifactType::Masks => "masks",
            ArtifactType::Metrics => "metrics",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct InputSlot {
    pub name: &'static str,
    pub artifact: ArtifactType,
    pub required: bool,
    pub doc: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamType {
    Int {
        min: i64,
        max: i64,
    },
    Float {
        min: f64,
        max: f64,
    },
    Bool,
    Str,
    Choice(&'static [&'static str]),
    /// An integer or a string (e.g. a layer index or name).
    IntOrStr,
    FloatList,
    IntList,
    StrList,
}

impl ParamType {
    pub fn describe(&self) -> String {
        match self {
            ParamType::Int { min, max } => match (*min, *max) {
                (i64::MIN, i64::MAX) => "an integer".into(),
                (lo, i64::MAX) => format!("an integer >= {lo}"),
                (lo, hi) => format!("an integer in {lo}..={hi}"),
            },
            ParamType::Float { min, max } => {
                if max.is_infinite() {
                    format!("a number >= {min}")
                } else {
                    format!("a number in [{min}, {max}]")
                }
            }
            ParamType::Bool => "true or false".into(),
            ParamType::Str => "a string".into(),
            ParamType::Choice(c) => format!("one of {}", c.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")),
            ParamType::IntOrStr => "an integer or a string".into(),
            ParamType::FloatList => "a list of numbers".into(),
            ParamType::IntList => "a list of integers".into(),
            ParamType::StrList => "a list of strings".into(),
        }
    }

    /// Checks `v` and returns it in canonical form (floats always as floats), or what was
    /// expected.
    pub fn check(&self, v: &Json) -> Result<Json, String> {
        let bad = || Err(format!("expected {}, found {}", self.describe(), show(v)));
        match self {
            ParamType::Int { min, max } => match v.as_i64() {
                Some(i) if i >= *min && i <= *max => Ok(Json::from(i)),
                _ => bad(),
            },
            ParamType::Float { min, max } => match v.as_f64() {
                Some(f) if f >= *min && f <= *max && f.is_finite() => Ok(Json::from(f)),
                _ => bad(),
            },
            ParamType::Bool => {
                if v.is_boolean() {
                    Ok(v.clone())
                } else {
                    bad()
                }
            }
            ParamType::Str => {
                if v.is_string() {
                    Ok(v.clone())
                } else {
                    bad()
                }
            }
            ParamType::Choice(c) => match v.as_str() {
                Some(s) if c.contains(&s) => Ok(v.clone()),
                Some(s) => match crate::suggest::did_you_mean(s, c.iter().copied()) {
                    Some(m) => Err(format!("expected {}, found `{s}`; did you mean `{m}`?", self.describe())),
                    None => bad(),
                },
                None => bad(),
            },
            ParamType::IntOrStr => {
                if v.is_i64() || v.is_string() {
                    Ok(v.clone())
                } else {
                    bad()
                }
            }
            ParamType::FloatList => match v.as_array() {
                Some(a) if a.iter().all(|x| x.as_f64().is_some()) => {
                    Ok(Json::Array(a.iter().map(|x| Json::from(x.as_f64().unwrap_or(0.0))).collect()))
                }
                _ => bad(),
            },
            ParamType::IntList => match v.as_array() {
                Some(a) if a.iter().all(|x| x.as_i64().is_some()) => Ok(v.clone()),
                _ => bad(),
            },
            ParamType::StrList => match v.as_array() {
                Some(a) if a.iter().all(|x| x.is_string()) => Ok(v.clone()),
                _ => bad(),
            },
        }
    }
}

/// Short rendering of a value for error messages.
pub fn show(v: &Json) -> String {
    match v {
        Json::String(s) => format!("`{s}`"),
        Json::Null => "nothing".into(),
        Json::Array(_) => "a list".into(),
        Json::Object(_) => "a map".into(),
        other => format!("`{other}`"),
    }
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    /// `Json::Null` means "no default: required" unless `optional`.
    pub default: fn() -> Json,
    pub optional: bool,
    pub doc: &'static str,
}

/// The external files of one data name: (name relative to the data, path), in reading order.
pub type DataFiles = Vec<(String, PathBuf)>;

/// CPU threads and GPUs an instance holds while it runs, and what a cluster job is asked for.
/// `mem` and `time` are requests to a cluster scheduler (`--mem`, `--time`); the local executor
/// does not enforce them (a stage runs on a thread of camflow's own process, which cannot be
/// stopped or capped safely mid-way). None of these is in a cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub cpu: u32,
    pub gpu: GpuShare,
    /// MiB.
    pub mem: Option<u64>,
    /// Seconds: the job's time limit.
    pub time: Option<u64>,
}

/// How much GPU an instance holds: none, whole devices (`gpu: 2`), or a fraction of one device
/// (`gpu: 0.25`) that it shares with other instances while the fractions sum to at most 1.
/// Kept in thousandths of a device, so that shares add up exactly (four 0.25 fill a device,
/// which floating point would only almost do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct GpuShare(u32);

impl GpuShare {
    /// One device, in the unit of [`GpuShare::thousandths`].
    pub const WHOLE: u32 = 1000;
    pub const NONE: GpuShare = GpuShare(0);

    pub fn whole(devices: u32) -> GpuShare {
        GpuShare(devices.saturating_mul(Self::WHOLE))
    }

    /// `thousandths` of one device (1..=999 is a fraction; multiples of 1000 are whole devices).
    pub fn from_thousandths(thousandths: u32) -> GpuShare {
        GpuShare(thousandths)
    }

    /// A YAML value: 0, a whole count up to `max_devices`, or a fraction 0 < f < 1 with at most
    /// three decimals. The error says what was expected.
    pub fn from_f64(v: f64, max_devices: u32) -> Result<GpuShare, String> {
        let expected = || format!("expected a whole number of GPUs (0 to {max_devices}) or a fraction of one GPU between 0 and 1 (e.g. 0.25)");
        if !v.is_finite() || v < 0.0 {
            return Err(expected());
        }
        if v.fract() == 0.0 {
            return if v <= max_devices as f64 { Ok(GpuShare::whole(v as u32)) } else { Err(expected()) };
        }
        if v > 1.0 {
            return Err(format!("{}; a share above one GPU must be whole", expected()));
        }
        let t = (v * Self::WHOLE as f64).round();
        if (v * Self::WHOLE as f64 - t).abs() > 1e-6 || t < 1.0 {
            return Err(format!("{}; fractions are counted in thousandths of a GPU (0.001 to 0.999)", expected()));
        }
        Ok(GpuShare(t as u32))
    }

    pub fn thousandths(self) -> u32 {
        self.0
    }

    pub fn is_none(self) -> bool {
        self.0 == 0
    }

    /// A share of one device that others may use too.
    pub fn is_fraction(self) -> bool {
        self.0 > 0 && self.0 < Self::WHOLE
    }

    /// Whole devices held (fractions round up to the one device they are on).
    pub fn devices(self) -> u32 {
        self.0.div_ceil(Self::WHOLE)
    }
}

impl std::fmt::Display for GpuShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 % Self::WHOLE == 0 {
            write!(f, "{}", self.0 / Self::WHOLE)
        } else {
            write!(f, "{}", self.0 as f64 / Self::WHOLE as f64)
        }
    }
}

/// The output of an upstream instance, as a stage sees it: verified files in the store.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    pub files: BTreeMap<String, PathBuf>,
    pub metrics: Json,
    /// The upstream instance's resolved params and stage kind, for stages that report them.
    pub params: Params,
    pub kind: String,
}

pub struct RunContext<'a> {
    pub params: &'a Params,
    pub inputs: &'a BTreeMap<String, InputArtifact>,
    /// Empty folder to write outputs into.
    pub out_dir: &'a Path,
    /// Folder of the pipeline file; relative data paths resolve against it.
    pub base_dir: &'a Path,
    pub seed: u64,
    /// `cpu` or `cuda`.
    pub backend: &'a str,
    /// GPU index handed out by the executor (0 when none).
    pub device: usize,
    /// The content digests of [`StageKind::external_files`] computed when the run was
    /// planned (the ones in the key), by data name: a stage that reads external data checks
    /// that what it read has these digests, so no result is cached under another data's key.
    pub planned_data: &'a BTreeMap<String, String>,
    pub log: &'a mut dyn FnMut(String),
    /// Progress inside a long stage (training steps, heatmap images). The executor throttles
    /// it and turns it into events; calling it never changes what a stage computes.
    pub progress: &'a mut dyn FnMut(Progress),
}

/// How far a running stage has got: `done` of `total` units overall (for an ETA), and for a
/// training the epoch and the running mean loss of the current epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Progress {
    /// What is counted: `step` (a training batch) or `image`.
    pub unit: &'static str,
    pub done: u64,
    pub total: u64,
    pub epoch: Option<u64>,
    pub epochs: Option<u64>,
    pub loss: Option<f64>,
}

pub struct Outcome {
    /// Names of the files written into `out_dir`.
    pub files: Vec<String>,
    pub metrics: Json,
}

/// An error from a stage's own work; the executor adds the instance name.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StageError(pub String);

impl StageError {
    pub fn new(msg: impl std::fmt::Display) -> Self {
        StageError(msg.to_string())
    }
}

/// `params` without `kind`'s [`StageKind::location_params`]: the default of
/// [`StageKind::key_params`], and where a kind's own `key_params` starts.
pub fn without_locations<K: StageKind + ?Sized>(kind: &K, params: &Params) -> Params {
    params.iter().filter(|(k, _)| !kind.location_params().contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Sets each of `names` that `params` holds to its default in `specs`: a param an instance
/// cannot read is keyed as if it were never set, so specs that never set it keep their keys.
pub fn set_to_defaults(params: &mut Params, specs: &[ParamSpec], names: &[&str]) {
    for name in names {
        if let (Some(v), Some(spec)) = (params.get_mut(*name), specs.iter().find(|s| s.name == *name)) {
            *v = (spec.default)();
        }
    }
}

pub trait StageKind: Send + Sync {
    fn name(&self) -> &'static str;
    /// Bumped whenever the implementation changes its outputs; part of every cache key.
    fn version(&self) -> u32;
    fn doc(&self) -> &'static str;
    fn inputs(&self) -> &'static [InputSlot];
    fn output(&self) -> ArtifactType;
    fn params(&self) -> Vec<ParamSpec>;
    /// Checks across params after each was type-checked: (param, message) pairs. `upstream`
    /// gives the value of a param in the nearest instance upstream that has it (as for
    /// [`StageKind::device_memory`]), for checks against the data a stage will read.
    fn check(&self, _params: &Params, _upstream: &dyn Fn(&str) -> Option<Json>) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Checks across inputs after each was type-checked and the required ones are given
    /// (`given`: the input names of the stage): a message about the stage's `inputs`, such as
    /// a kind that needs at least one of two optional inputs. Spec time, so `plan` reports it
    /// at the line instead of a run failing later.
    fn check_inputs(&self, _given: &[&str]) -> Option<String> {
        None
    }
    /// Whether results depend on the numeric backend (then the backend class is in the key).
    fn backend_dependent(&self) -> bool {
        false
    }
    fn default_resources(&self) -> Resources {
        Resources { cpu: 1, gpu: GpuShare::NONE, ..Resources::default() }
    }
    /// Device memory one instance needs at most, in bytes (an estimate with a margin), so that
    /// instances sharing a GPU (`resources: {gpu: 0.25}`) are packed without running it out of
    /// memory. `upstream(name)` is the value of param `name` in the nearest instance upstream
    /// that has it (a training finds its data's `image_size` there). `None`: the kind puts
    /// nothing on a device, or cannot tell; the executor then counts only GPU shares.
    fn device_memory(&self, _params: &Params, _upstream: &dyn Fn(&str) -> Option<Json>) -> Option<u64> {
        None
    }
    /// Exactly the files outside the cache that `run` will read, by data name: each name has a
    /// list of (name relative to the data, path), in the order the stage reads them. Their
    /// contents (never their paths) go into the key, so this must list what is read and
    /// nothing else: a lock file, a cache or a `Thumbs.db` beside the data must not change it.
    /// An error here (a missing data folder) is reported before anything runs.
    fn external_files(&self, _params: &Params, _base_dir: &Path) -> Result<Vec<(String, DataFiles)>, StageError> {
        Ok(Vec::new())
    }
    /// Params that only say *where* data lives (a folder, a CSV path): kept out of the cache
    /// key, since the data's contents are in it (moving a dataset must not change a key), but
    /// still recorded in the lock file for people.
    fn location_params(&self) -> &'static [&'static str] {
        &[]
    }
    /// The params that go into the cache key: every param that can change the result.
    /// By default all but [`StageKind::location_params`]; a kind with params that only
    /// matter in some modes leaves the others out (filter's `threshold` in `multiply` mode),
    /// so changing them reruns nothing. Dropped params are still recorded in the lock file.
    fn key_params(&self, params: &Params) -> Params {
        without_locations(self, params)
    }
    /// Params this kind takes from the nearest upstream instance of another kind unless its
    /// own stage sets them (a `params` entry, a `${stage.param}` reference or a sweep axis).
    /// Why: a comparison is only fair when both sides share their settings (a retrained
    /// classifier and the classifier it is compared with), and forwarding each by hand fails
    /// silently when one is forgotten. Precedence: kind defaults < pipeline `defaults:` <
    /// inherited < stage params < sweep values. Inherited values are resolved params, so they
    /// are in the key like any other. `None`: nothing is inherited.
    fn inherits(&self) -> Option<Inherit> {
        None
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<Outcome, StageError>;
    /// Instances whose keys here are equal may run together as one group
    /// ([`StageKind::run_group`]); `None` (the default): this instance always runs alone.
    /// The key says what the group's work needs to be equal (for a training: model shape,
    /// batch size, epochs, backend; for heatmaps sharing one pass: the same upstream
    /// instances, given in `inputs` as slot -> upstream instance index); it is never part of a
    /// cache key, and a member's result must not depend on whether it ran in a group (on a
    /// bitwise-deterministic backend: the same bytes).
    fn fusion_key(&self, _params: &Params, _backend: &str, _inputs: &BTreeMap<String, usize>) -> Option<Fusion> {
        None
    }
    /// Runs several instances with equal [`StageKind::fusion_key`]s together, one result per
    /// context, in order. The default runs them one by one. The executor falls back to
    /// [`StageKind::run`] for a member whose result here is an error.
    fn run_group(&self, ctxs: &mut [RunContext<'_>]) -> Vec<Result<Outcome, StageError>> {
        ctxs.iter_mut().map(|ctx| self.run(ctx)).collect()
    }
}

/// How instances run together ([`StageKind::fusion_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fusion {
    pub key: String,
    pub how: FusionKind,
}

/// What a group saves, which decides when the executor forms it and what it asks of a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusionKind {
    /// The members' work runs side by side in one model (a stack of trainings): the group
    /// costs what its members cost together and pays only where one member leaves a device
    /// idle, so it is formed only when asked for (`run --fuse N`, at most N members), and on a
    /// GPU it asks for its members' shares and memory together.
    Stacked,
    /// The members need one computation (heatmaps of one model and data set at several layers
    /// by several methods): the group costs about what one member costs, so it is formed unless fusion
    /// is turned off (`run --fuse off`), with no size limit, and asks for what one member asks
    /// (the largest share and memory estimate among them).
    SharedWork,
}

/// Params a kind takes by default from an upstream instance of another kind: see
/// [`StageKind::inherits`].
#[derive(Debug, Clone)]
pub struct Inherit {
    /// The kind of the instance inherited from: the nearest instance of it up the inputs.
    pub from_kind: &'static str,
    /// The params taken from it; each must exist, with the same type, on both kinds.
    pub params: Vec<&'static str>,
}

/// The set of kinds a binary knows.
pub struct Catalog {
    pub kinds: Vec<Box<dyn StageKind>>,
}

impl Catalog {
    pub fn get(&self, name: &str) -> Option<&dyn StageKind> {
        self.kinds.iter().find(|k| k.name() == name).map(|k| k.as_ref())
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.name()).collect()
    }
}
