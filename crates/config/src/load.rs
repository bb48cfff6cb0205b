//! Reading `cluster.toml`: parsed, validated, its folders made absolute.
use std::path::{Path, PathBuf};

use super::{ClusterConfig, ConfigError, MODELS_ENV};

impl ClusterConfig {
    /// Reads, parses and validates a file; relative dirs are resolved against its folder and
    /// `RAGFLEET_MODELS` overrides the models dir.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        // absolute, so that the config means the same written elsewhere (chaos run writes one
        // per node) or read from another folder
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &Path| {
            let p = base.join(p);
            std::path::absolute(&p).unwrap_or(p)
        };
        cfg.data_dir = resolve(&cfg.data_dir);
        cfg.models_dir = match std::env::var_os(MODELS_ENV) {
            Some(dir) => resolve_env(PathBuf::from(dir)),
            None => resolve(&cfg.models_dir),
        };
        if let Some(t) = &mut cfg.tls {
            for p in [&mut t.ca, &mut t.cert, &mut t.key] {
                *p = resolve(p);
            }
        }
        Ok(cfg)
    }

    /// Parses and validates TOML text (paths left as written).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("cluster.toml"),
            message: e.to_string().trim().replace('\n', " | "),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// A path from the environment, absolute (against the process's folder).
fn resolve_env(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}
