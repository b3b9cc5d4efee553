//! Cache keys: what an instance's outputs are a function of.
//!
//! A [`CacheKey`] is a plain struct whose fields are exactly the inputs of the hash. It is
//! serialised canonically (serde_json over `BTreeMap`s, so maps are sorted; floats printed by
//! the shortest round-trip algorithm; float params always stored as floats, so `1` and `1.0`
//! are one key) and hashed with SHA-256. The hex digest names the action record.
//!
//! # What goes into the key, and why
//! | field          | why it is in |
//! |----------------|--------------|
//! | `format`       | bumping it invalidates every entry when the key layout changes |
//! | `kind`         | two kinds with equal params do different work |
//! | `kind_version` | a stage implementation that changes its outputs bumps it |
//! | `params`       | fully resolved (defaults filled in), so adding a default explicitly changes nothing |
//! | `inputs`       | the *output digest* of each upstream instance, by input name: early cutoff follows (an upstream rerun that reproduces its bytes leaves downstream keys unchanged) |
//! | `files`        | content digests of data outside the cache (a dataset folder): contents, not paths |
//! | `seed`         | the pipeline seed, which stages use unless a param overrides it |
//! | `backend`      | the numeric backend class (`flex-x86_64-portable1`, `cuda`), only for kinds whose numbers depend on it |
//!
//! # What is kept out, and why
//! - Paths of the pipeline, the cache or data folders: moving a project must not invalidate it.
//! - mtimes, host names, user names, clocks: they change without the inputs changing.
//! - The camflow version: `kind_version` says when outputs change; a release that changes
//!   nothing keeps every entry.
//! - Resources (`cpu`, `gpu` counts) and `--jobs`: they change speed, not results.
//! - The instance label and stage name: two stages doing the same work share one entry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// Bump on any change to the fields below or their encoding.
pub const KEY_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheKey {
    /// Key layout version ([`KEY_FORMAT`]).
    pub format: u32,
    /// Stage kind name, e.g. `threshold`.
    pub kind: String,
    /// The kind's implementation version.
    pub kind_version: u32,
    /// Resolved params, sorted by name.
    pub params: BTreeMap<String, Json>,
    /// Input name -> output digest of the upstream instance.
    pub inputs: BTreeMap<String, String>,
    /// External file or folder name -> content digest.
    pub files: BTreeMap<String, String>,
    /// Pipeline seed.
    pub seed: u64,
    /// Numeric backend class, for backend-dependent kinds only.
    pub backend: Option<String>,
}

impl CacheKey {
    /// Canonical bytes: the exact input of the hash.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("cache key serialises")
    }

    pub fn digest(&self) -> String {
        sha256_hex(&self.canonical())
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> CacheKey {
        CacheKey {
            format: KEY_FORMAT,
            kind: "threshold".into(),
            kind_version: 1,
            params: [("method".to_string(), json!("fixed")), ("value".to_string(), json!(0.5))].into_iter().collect(),
            inputs: [("heatmaps".to_string(), "ab".repeat(32))].into_iter().collect(),
            files: BTreeMap::new(),
            seed: 42,
            backend: None,
        }
    }

    #[test]
    fn golden_key_bytes() {
        // If this breaks, the key encoding changed: bump KEY_FORMAT on purpose.
        assert_eq!(
            String::from_utf8(key().canonical()).unwrap(),
            format!(
                r#"{{"format":1,"kind":"threshold","kind_version":1,"params":{{"method":"fixed","value":0.5}},"inputs":{{"heatmaps":"{}"}},"files":{{}},"seed":42,"backend":null}}"#,
                "ab".repeat(32)
            )
        );
        assert_eq!(key().digest(), "355973fdf0b8fa4da03a89a8b6e5c2fb403d12a1f84518b38ae0ebf35770569d");
    }

    #[test]
    fn insertion_order_does_not_matter_but_values_do() {
        let mut a = key();
        let mut b = key();
        a.params = [("value".to_string(), json!(0.5)), ("method".to_string(), json!("fixed"))].into_iter().collect();
        assert_eq!(a.digest(), key().digest());
        b.params.insert("value".into(), json!(0.6));
        assert_ne!(b.digest(), key().digest());
        let mut c = key();
        c.backend = Some("cuda".into());
        assert_ne!(c.digest(), key().digest());
    }
}
