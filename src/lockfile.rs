//! `<pipeline>.lock.yaml`: what a run produced, per instance, so a colleague holding the
//! spec and its lock can check they get the same result (`run --locked`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::cache::ActionRecord;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockFile {
    pub pipeline: String,
    pub camflow_version: String,
    pub backend: String,
    /// Whether the backend gives the same bytes run after run (CPU: yes; CUDA: not promised).
    pub bitwise_deterministic: bool,
    pub instances: BTreeMap<String, LockedInstance>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockedInstance {
    pub key: String,
    pub kind: String,
    pub params: BTreeMap<String, Json>,
    pub inputs: BTreeMap<String, String>,
    pub outputs: BTreeMap<String, String>,
    pub metrics: Json,
    pub camflow_version: String,
    pub backend: String,
}

/// The lock file beside `pipeline`: `paper.yaml` -> `paper.lock.yaml`.
pub fn path_for(pipeline: &Path) -> PathBuf {
    let stem = pipeline.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into());
    pipeline.with_file_name(format!("{stem}.lock.yaml"))
}

impl LockFile {
    pub fn from_records(pipeline: &str, backend: &str, deterministic: bool, records: &[&ActionRecord]) -> LockFile {
        let instances = records
            .iter()
            .map(|r| {
                (
                    r.label.clone(),
                    LockedInstance {
                        key: r.key.clone(),
                        kind: r.kind.clone(),
                        params: r.key_inputs.params.clone(),
                        inputs: r.key_inputs.inputs.clone(),
                        outputs: r.outputs.iter().map(|(k, v)| (k.clone(), v.digest.clone())).collect(),
                        metrics: r.metrics.clone(),
                        camflow_version: r.camflow_version.clone(),
                        backend: r.backend.clone(),
                    },
                )
            })
            .collect();
        LockFile {
            pipeline: pipeline.into(),
            camflow_version: env!("CARGO_PKG_VERSION").into(),
            backend: backend.into(),
            bitwise_deterministic: deterministic,
            instances,
        }
    }

    pub fn read(path: &Path) -> Result<LockFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_yaml::from_str(&text).map_err(|e| format!("{}: not a camflow lock file: {e}", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<(), String> {
        let text = serde_yaml::to_string(self).map_err(|e| e.to_string())?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
        // A lock file is shared like the spec: readable by all, as a normal file would be.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        tmp.persist(path).map_err(|e| format!("{}: {}", path.display(), e.error))?;
        Ok(())
    }

    /// Whether `label` may run with `key` under this lock.
    pub fn check(&self, label: &str, key: &str) -> Result<(), String> {
        match self.instances.get(label) {
            None => Err(format!("{label}: not in the lock file (the spec has changed since it was locked)")),
            Some(l) if l.key != key => Err(format!(
                "{label}: cache key {} differs from the locked {} (params, inputs, data or backend changed)",
                &key[..12],
                &l.key[..12.min(l.key.len())]
            )),
            Some(_) => Ok(()),
        }
    }
}
