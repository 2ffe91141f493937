//! `sidemesh-config`: the Sidemesh routing language.
//!
//! Operators write `kind: Mesh` YAML documents, possibly split over several files of one
//! folder. This crate reads them, validates them, and reports *every* problem with its file,
//! line, column and field path. The proxy and the control plane both validate through it, so
//! they accept and refuse exactly the same configs.
//!
//! - `units`: durations (`250ms`), rates (`100/s`), sizes (`64KiB`).
//! - `spec`: raw serde shapes of the YAML (`RouteSpec`, ...); their docs feed the JSON Schema.
//! - `model`: validated values (`Route`, `Service`, ...) that the data plane acts on.
//! - `validate`: text -> `Mesh`, collecting all diagnostics.
//! - `positions`: field path -> line:column, for errors found after deserialising.
//! - `error`: `Diagnostic`, `Diagnostics`, `LoadError`.
//! - `schema`: the generated JSON Schema (`config/mesh.schema.json`) and its field reference.

#![forbid(unsafe_code)]

pub mod error;
pub mod model;
mod positions;
pub mod schema;
pub mod spec;
pub mod units;
mod validate;

use std::fs;
use std::path::{Path, PathBuf};

pub use error::{Diagnostic, Diagnostics, LoadError};
pub use model::*;
pub use validate::{DEFAULT_NAMESPACE, DEFAULT_TRUST_DOMAIN, Source, validate, validate_with_spec};

/// Reads the YAML sources of a mesh: `path` is one file, or a folder whose `*.yaml` / `*.yml`
/// files (not recursing, hidden entries skipped) are read in name order.
///
/// Hidden entries are skipped because a Kubernetes ConfigMap volume holds `..data` and
/// timestamped folders beside the symlinks to the real files.
pub fn read_sources(path: &Path) -> Result<Vec<Source>, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let files = if fs::metadata(path).map_err(io)?.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(path)
            .map_err(io)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_config_file(p))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(LoadError::NoFiles {
                path: path.to_path_buf(),
            });
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|file| match fs::read_to_string(&file) {
            Ok(text) => Ok(Source { file, text }),
            Err(source) => Err(LoadError::Io { path: file, source }),
        })
        .collect()
}

fn is_config_file(path: &Path) -> bool {
    let visible = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.starts_with('.'));
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    visible && yaml && path.is_file()
}

/// Reads and validates the mesh at `path` (a file or a folder).
pub fn load(path: &Path) -> Result<Mesh, LoadError> {
    Ok(validate(&read_sources(path)?)?)
}

/// Validates one in-memory document; `name` is used in error messages.
pub fn parse_str(name: &str, text: &str) -> Result<Mesh, Diagnostics> {
    validate(&[Source {
        file: PathBuf::from(name),
        text: text.to_string(),
    }])
}
