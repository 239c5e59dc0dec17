//! The test server's image, built from this workspace on demand.
//!
//! No registry is reachable from the tests, so the image every Docker test
//! runs is built here: `keel-testserver` as a static binary (glibc with
//! `+crt-static`; the musl target is not needed) copied into a
//! `FROM scratch` image tagged [`IMAGE`].
//!
//! [`ensure_image`] is idempotent and safe when test processes call it at
//! once: cargo serializes builds of one target directory with its own lock,
//! and the image carries the binary's SHA-256 as a label, so it is rebuilt
//! only when the binary changed. Two processes that both find it stale
//! build identical images from their own temporary contexts; whichever
//! tags last, the tag names the same binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// The tag of the test server's image.
pub const IMAGE: &str = "keel-testserver:dev";

/// The label holding the SHA-256 of the binary inside the image.
const HASH_LABEL: &str = "keel.testserver.sha256";

/// Builds the static `keel-testserver` binary (release) and the image
/// [`IMAGE`] when it is missing or stale, and returns the image's name.
/// Blocking (it runs cargo and docker): call it from `spawn_blocking` in
/// async code. Later calls in the same process return at once.
pub fn ensure_image() -> anyhow::Result<String> {
    static BUILT: Mutex<Option<String>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(image) = built.as_ref() {
        return Ok(image.clone());
    }
    let binary = build_binary()?;
    let hash = hex::encode(Sha256::digest(
        std::fs::read(&binary).with_context(|| format!("cannot read {}", binary.display()))?,
    ));
    if image_hash()?.as_deref() != Some(hash.as_str()) {
        build_image(&binary, &hash)?;
    }
    *built = Some(IMAGE.to_owned());
    Ok(IMAGE.to_owned())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Builds the static binary in a target directory of its own: its
/// `RUSTFLAGS` differ from the workspace's, and a `cargo test` running this
/// holds the lock of the workspace's target directory.
fn build_binary() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("testserver-image");
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "keel-testserver",
            "--target",
        ])
        .arg(&triple)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .output()
        .context("cannot run cargo to build keel-testserver")?;
    if !output.status.success() {
        bail!(
            "building keel-testserver failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(target_dir
        .join(triple)
        .join("release")
        .join("keel-testserver"))
}

/// The binary hash the current image was built from, if there is one.
fn image_hash() -> anyhow::Result<Option<String>> {
    let output = Command::new(crate::tool("docker"))
        .args(["image", "inspect", "--format"])
        .arg(format!("{{{{index .Config.Labels \"{HASH_LABEL}\"}}}}"))
        .arg(IMAGE)
        .output()
        .context("cannot run docker")?;
    if !output.status.success() {
        return Ok(None);
    }
    let hash = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Ok(Some(hash).filter(|h| !h.is_empty()))
}

fn build_image(binary: &Path, hash: &str) -> anyhow::Result<()> {
    let context = tempfile::tempdir()?;
    std::fs::copy(binary, context.path().join("keel-testserver"))
        .context("cannot copy keel-testserver into the build context")?;
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM scratch\nCOPY keel-testserver /keel-testserver\nENV PORT=8080\nEXPOSE 8080\nENTRYPOINT [\"/keel-testserver\"]\n",
    )?;
    let output = Command::new(crate::tool("docker"))
        .args(["build", "--quiet", "--label"])
        .arg(format!("{HASH_LABEL}={hash}"))
        .args(["--tag", IMAGE])
        .arg(context.path())
        .output()
        .context("cannot run docker build")?;
    if !output.status.success() {
        bail!(
            "docker build of {IMAGE} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
