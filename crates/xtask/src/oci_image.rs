//! An OCI image archive for `ctr image import`, with no registry: one layer (a tar of
//! a root filesystem) and an image per name, each with its own config — the busybox
//! image the shim's tests run and the pause image CRI's pods start with.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::arch::GuestArch;
use crate::run::{output, step};

/// An image of the archive: its name, and its entrypoint (`None`: `/bin/sh` as the
/// command).
pub(crate) struct Image<'a> {
    pub(crate) name: &'a str,
    pub(crate) entrypoint: Option<&'a [&'a str]>,
}

/// Writes `archive`: an OCI image layout holding `rootfs` as the one layer of each of
/// `images`, for `arch`.
pub(crate) fn write(
    rootfs: &Path,
    images: &[Image<'_>],
    arch: GuestArch,
    archive: &Path,
) -> Result<(), String> {
    let work = archive.with_extension("layout");
    let _ = fs::remove_dir_all(&work);
    let blobs = work.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(|e| format!("create {}: {e}", blobs.display()))?;
    let layer = work.join("layer.tar");
    step(
        "tar the image layer",
        Command::new("tar")
            .args([
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--sort=name",
                "-C",
            ])
            .arg(rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
    )?;
    let (layer_digest, layer_size) = add_blob_file(&blobs, &layer)?;
    let mut manifests = Vec::new();
    for image in images {
        let process = match image.entrypoint {
            Some(argv) => format!("\"Entrypoint\": {}", json_strings(argv)),
            None => "\"Cmd\": [\"/bin/sh\"]".to_owned(),
        };
        let config = format!(
            "{{\"architecture\": \"{arch}\", \"os\": \"linux\", \"config\": {{\"Env\": \
             [\"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"], \
             {process}}}, \"rootfs\": {{\"type\": \"layers\", \"diff_ids\": [\"{layer_digest}\"]}}}}",
            arch = arch.debian(),
        );
        let (config_digest, config_size) = add_blob(&blobs, config.as_bytes())?;
        let manifest = format!(
            "{{\"schemaVersion\": 2, \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\", \
             \"config\": {{\"mediaType\": \"application/vnd.oci.image.config.v1+json\", \
             \"digest\": \"{config_digest}\", \"size\": {config_size}}}, \
             \"layers\": [{{\"mediaType\": \"application/vnd.oci.image.layer.v1.tar\", \
             \"digest\": \"{layer_digest}\", \"size\": {layer_size}}}]}}"
        );
        let (digest, size) = add_blob(&blobs, manifest.as_bytes())?;
        manifests.push(format!(
            "{{\"mediaType\": \"application/vnd.oci.image.manifest.v1+json\", \"digest\": \
             \"{digest}\", \"size\": {size}, \"platform\": {{\"architecture\": \"{arch}\", \
             \"os\": \"linux\"}}, \"annotations\": {{\"io.containerd.image.name\": \"{name}\"}}}}",
            arch = arch.debian(),
            name = image.name,
        ));
    }
    let index = format!(
        "{{\"schemaVersion\": 2, \"mediaType\": \"application/vnd.oci.image.index.v1+json\", \
         \"manifests\": [{}]}}",
        manifests.join(", ")
    );
    write_file(&work.join("index.json"), index.as_bytes())?;
    write_file(
        &work.join("oci-layout"),
        b"{\"imageLayoutVersion\": \"1.0.0\"}",
    )?;
    step(
        "tar the OCI image archive",
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&work)
            .arg("-cf")
            .arg(archive)
            .args(["oci-layout", "index.json", "blobs"]),
    )?;
    fs::remove_dir_all(&work).map_err(|e| format!("remove {}: {e}", work.display()))
}

/// `["a", "b"]` as a JSON array (the strings hold no quote or backslash).
fn json_strings(items: &[&str]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Stores `bytes` as a blob; returns its digest and size.
fn add_blob(blobs: &Path, bytes: &[u8]) -> Result<(String, u64), String> {
    let tmp = blobs.join("incoming");
    write_file(&tmp, bytes)?;
    add_blob_file(blobs, &tmp)
}

/// Moves the file `path` into the blobs as `sha256:<its hash>`.
fn add_blob_file(blobs: &Path, path: &Path) -> Result<(String, u64), String> {
    let sum = output(Command::new("sha256sum").arg(path))
        .ok_or_else(|| format!("sha256sum {} failed", path.display()))?;
    let hex = sum
        .split_whitespace()
        .next()
        .filter(|h| h.len() == 64)
        .ok_or_else(|| format!("sha256sum {}: {sum:?}", path.display()))?
        .to_owned();
    let size = fs::metadata(path)
        .map_err(|e| format!("stat {}: {e}", path.display()))?
        .len();
    let to = blobs.join(&hex);
    fs::copy(path, &to).map_err(|e| format!("copy {} to {}: {e}", path.display(), to.display()))?;
    fs::remove_file(path).map_err(|e| format!("remove {}: {e}", path.display()))?;
    Ok((format!("sha256:{hex}"), size))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    fs::write(path, bytes).map_err(|e| format!("write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_becomes_a_json_array() {
        assert_eq!(
            json_strings(&["/bin/sh", "-c", "a \"b\""]),
            r#"["/bin/sh", "-c", "a \"b\""]"#
        );
    }
}
