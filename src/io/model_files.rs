//! What a model directory may make `sani` read. A model can come from anywhere, so every path it
//! names itself (a `weight_map` entry of the index) must be a plain file name in the directory,
//! and every symlink in it must resolve inside it: an absolute path, `..`, a subdirectory or a
//! link that leaves the directory is an error naming the file and the entry. Since outputs are
//! written under the same names into a staged directory, this also keeps every write inside it.
//!
//! One exception: a snapshot of the Hugging Face cache (`models--org--name/snapshots/<hash>/`)
//! links its files to `../../blobs/<sha>`, so there the links may resolve anywhere inside the
//! repository's cache directory `models--org--name`.

use anyhow::{bail, Context, Result};
use std::path::{Component, Path, PathBuf};

/// The directory that links in `dir` must stay inside: `dir` itself (canonical), or the hub-cache
/// repository directory when `dir` is one of its snapshots.
pub fn containment_root(dir: &Path) -> Result<PathBuf> {
    let canon = dir
        .canonicalize()
        .with_context(|| format!("{}: cannot resolve the model directory", dir.display()))?;
    let repo = canon
        .parent()
        .filter(|p| p.ends_with("snapshots"))
        .and_then(Path::parent);
    match repo {
        Some(repo)
            if repo
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("models--")) =>
        {
            Ok(repo.to_path_buf())
        }
        _ => Ok(canon),
    }
}

/// Fails when a symlink in `dir` (not followed into subdirectories) resolves outside the
/// containment root, or dangles.
pub fn check_links_stay_inside(dir: &Path) -> Result<()> {
    let root = containment_root(dir)?;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let path = entry.path();
        let is_link = entry.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        if !is_link {
            continue;
        }
        let target = std::fs::read_link(&path).unwrap_or_default();
        let Ok(resolved) = path.canonicalize() else {
            bail!(
                "{}: a symlink to {} that does not exist",
                path.display(),
                target.display()
            );
        };
        if !resolved.starts_with(&root) {
            bail!(
                "{}: a symlink to {}, outside the model directory {} (refused: a model may only \
                 make sani read its own files)",
                path.display(),
                resolved.display(),
                root.display()
            );
        }
    }
    Ok(())
}

/// Checks that `value`, read from field `field` of `source`, is a plain file name (one normal
/// path component: no absolute path, no `..`, no subdirectory).
pub fn check_file_name(source: &Path, field: &str, value: &str) -> Result<()> {
    let mut parts = Path::new(value).components();
    let plain = matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    ) && !value.contains('\\')
        && !value.ends_with('/');
    if !plain {
        bail!(
            "{}: field `{field}` is {value:?}, not a file name inside the model directory \
             (absolute paths, `..` and subdirectories are refused)",
            source.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        let src = Path::new("m/model.safetensors.index.json");
        for ok in ["model-00001-of-00002.safetensors", "a.b", "x..safetensors"] {
            check_file_name(src, "weight_map.w", ok).unwrap();
        }
        for bad in [
            "../x.safetensors",
            "/etc/passwd",
            "sub/x.safetensors",
            "..",
            ".",
            "",
            "a\\..\\b",
            "x/",
            "./x",
        ] {
            let msg = format!(
                "{:#}",
                check_file_name(src, "weight_map.w", bad).unwrap_err()
            );
            assert!(
                msg.contains("weight_map.w") && msg.contains("index.json"),
                "{msg}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn links() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.json"), "{}").unwrap();
        std::fs::write(tmp.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(dir.join("a.json"), dir.join("b.json")).unwrap();
        check_links_stay_inside(&dir).unwrap();
        std::os::unix::fs::symlink("../secret", dir.join("c.json")).unwrap();
        let msg = format!("{:#}", check_links_stay_inside(&dir).unwrap_err());
        assert!(msg.contains("c.json") && msg.contains("outside"), "{msg}");
        std::fs::remove_file(dir.join("c.json")).unwrap();
        std::os::unix::fs::symlink("nowhere", dir.join("d.json")).unwrap();
        let msg = format!("{:#}", check_links_stay_inside(&dir).unwrap_err());
        assert!(
            msg.contains("d.json") && msg.contains("does not exist"),
            "{msg}"
        );

        // A hub snapshot may link into its repository's blobs.
        let repo = tmp.path().join("models--org--m");
        let snap = repo.join("snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs/123"), "{}").unwrap();
        std::os::unix::fs::symlink("../../blobs/123", snap.join("config.json")).unwrap();
        check_links_stay_inside(&snap).unwrap();
        std::os::unix::fs::symlink("../../../secret", snap.join("x.json")).unwrap();
        assert!(check_links_stay_inside(&snap).is_err());
    }
}
