//! Atomic output directories: write into a temporary directory beside the target, then rename.
//!
//! A [`StagedDir`] is created beside the final directory (same parent, so the final `rename` stays
//! on one filesystem and is atomic). Nothing appears at the target until [`StagedDir::commit`];
//! dropping an uncommitted `StagedDir` (an error, a panic) removes the temporary directory.

use anyhow::{bail, Context, Result};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Temporary directories and files alive in this process, removed by the signal handler.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Exit code after Ctrl-C (128 + SIGINT, as shells report it).
pub const INTERRUPTED_EXIT_CODE: i32 = 130;
/// Exit code after SIGTERM (what `timeout`, systemd, Docker and Kubernetes send): 128 + 15.
pub const TERMINATED_EXIT_CODE: i32 = 143;
/// Exit code after SIGHUP (the terminal went away): 128 + 1.
pub const HANGUP_EXIT_CODE: i32 = 129;

fn remove_live() {
    for path in LIVE.lock().map(|l| l.clone()).unwrap_or_default() {
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(path);
        } else {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// On SIGINT (Ctrl-C), SIGTERM or SIGHUP: remove every uncommitted temporary output, then exit
/// with 128 + the signal's number, so a stopped run leaves no partial output.
#[cfg(unix)]
pub fn install_interrupt_handler() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use std::io::Write;
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            remove_live();
            let (name, code) = match sig {
                SIGTERM => ("terminated (SIGTERM)", TERMINATED_EXIT_CODE),
                SIGHUP => ("hung up (SIGHUP)", HANGUP_EXIT_CODE),
                _ => ("interrupted", INTERRUPTED_EXIT_CODE),
            };
            // Not eprintln!: it panics when stderr is gone (a closed pipe), and then the
            // process would never exit.
            let _ = writeln!(std::io::stderr(), "{name}: no output written");
            std::process::exit(code);
        }
    });
}

/// On Ctrl-C: remove every uncommitted temporary output, then exit with code 130.
#[cfg(not(unix))]
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        remove_live();
        eprintln!("interrupted: no output written");
        std::process::exit(INTERRUPTED_EXIT_CODE);
    });
}

fn add_live(path: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.push(path.to_path_buf());
    }
}

fn forget_live(dir: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|d| d != dir);
    }
}

/// The pid in a staging name `.{name}.sani-tmp-{pid}-{n}` or `.{name}.sani-old-{pid}`.
fn staging_pid(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let (_, tail) = rest
        .rsplit_once(".sani-tmp-")
        .or_else(|| rest.rsplit_once(".sani-old-"))?;
    let pid = tail.split('-').next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !tail.split('-').skip(1).all(digits) || tail.split('-').count() > 2 {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` is running (Linux: /proc; elsewhere every pid counts as alive, so
/// nothing is removed).
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Removes the staging directories and files that runs no longer alive (killed with SIGKILL, a
/// crash, a power cut) left in `parent`, saying so on stderr; names those of live runs.
/// Returns the removed paths.
pub fn sweep_stale(parent: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return removed;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = staging_pid(&name) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let path = entry.path();
        if process_alive(pid) {
            eprintln!(
                "note: {} belongs to a run still going (pid {pid}); left alone",
                path.display()
            );
            continue;
        }
        let gone = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match gone {
            Ok(()) => {
                eprintln!(
                    "note: removed {}, left by an earlier run (pid {pid}) that did not finish",
                    path.display()
                );
                removed.push(path);
            }
            Err(e) => eprintln!(
                "warning: {}: left by an earlier run (pid {pid}), cannot remove: {e}",
                path.display()
            ),
        }
    }
    removed
}

/// A temporary directory that becomes `target` on [`commit`](StagedDir::commit).
#[derive(Debug)]
pub struct StagedDir {
    tmp: PathBuf,
    target: PathBuf,
    force: bool,
    committed: bool,
}

/// `path` made absolute with symlinks resolved, also when it (or some of its ancestors) does not
/// exist yet: the deepest existing ancestor is canonicalized and the rest appended.
fn resolve(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(path)
    };
    // Drop `.` and resolve `..` lexically only in the part that does not exist.
    let mut existing = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(canon) = existing.canonicalize() {
            let mut out = canon;
            for part in rest.iter().rev() {
                match Path::new(part).components().next() {
                    Some(Component::ParentDir) => {
                        out.pop();
                    }
                    Some(Component::CurDir) | None => {}
                    _ => out.push(part),
                }
            }
            return Ok(out);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            // `..` or `.` as the last component: keep it and go up.
            (Some(parent), None) => {
                rest.push(
                    existing
                        .components()
                        .next_back()
                        .unwrap()
                        .as_os_str()
                        .to_os_string(),
                );
                existing = parent.to_path_buf();
            }
            (None, _) => return Ok(abs),
        }
    }
}

fn file_name_of(target: &Path) -> Result<String> {
    match target.file_name() {
        Some(name) => Ok(name.to_string_lossy().into_owned()),
        None => bail!("{}: not a usable output directory name", target.display()),
    }
}

fn parent_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl StagedDir {
    /// Prepares to write `target`: refuses when it exists (unless `force`) or when it is, contains
    /// or lies inside one of the `inputs`; then creates the temporary directory beside it.
    pub fn create(target: &Path, force: bool, inputs: &[&Path]) -> Result<StagedDir> {
        let name = file_name_of(target)?;
        if std::fs::symlink_metadata(target).is_ok() {
            if !force {
                bail!(
                    "{}: already exists (use --force to replace it)",
                    target.display()
                );
            }
            // A directory, or a link to one (then the link is replaced, not what it points to).
            if !target.is_dir() {
                bail!(
                    "{}: exists and is not a directory; refusing to replace it",
                    target.display()
                );
            }
        }
        let resolved_target = resolve(target)?;
        for input in inputs {
            let resolved_input = resolve(input)?;
            if resolved_target.starts_with(&resolved_input)
                || resolved_input.starts_with(&resolved_target)
            {
                bail!(
                    "{}: refusing to write into the input model {}",
                    target.display(),
                    input.display()
                );
            }
        }
        let parent = parent_of(target);
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("{}: cannot create directory", parent.display()))?;
        sweep_stale(&parent);
        let pid = std::process::id();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = parent.join(format!(".{name}.sani-tmp-{pid}-{n}"));
            match std::fs::create_dir(&tmp) {
                Ok(()) => {
                    add_live(&tmp);
                    return Ok(StagedDir {
                        tmp,
                        target: target.to_path_buf(),
                        force,
                        committed: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("{}: cannot create temporary directory", tmp.display())
                    })
                }
            }
        }
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final directory.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the temporary directory to the target (replacing an existing target when `force`
    /// was given) and returns the target path.
    pub fn commit(mut self) -> Result<PathBuf> {
        let target = self.target.clone();
        forget_live(&self.tmp);
        if std::fs::symlink_metadata(&target).is_ok() {
            if !self.force {
                bail!(
                    "{}: already exists (use --force to replace it)",
                    target.display()
                );
            }
            let name = file_name_of(&target)?;
            let old = parent_of(&target).join(format!(".{name}.sani-old-{}", std::process::id()));
            if std::fs::symlink_metadata(&old).is_ok() {
                std::fs::remove_dir_all(&old)
                    .with_context(|| format!("{}: cannot remove stale directory", old.display()))?;
            }
            std::fs::rename(&target, &old).with_context(|| {
                format!(
                    "{}: cannot move aside to {}",
                    target.display(),
                    old.display()
                )
            })?;
            if let Err(e) = std::fs::rename(&self.tmp, &target) {
                // Put the previous output back before reporting.
                let _ = std::fs::rename(&old, &target);
                return Err(e).with_context(|| {
                    format!(
                        "{}: cannot rename {} to it",
                        target.display(),
                        self.tmp.display()
                    )
                });
            }
            self.committed = true;
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("{}: cannot remove the replaced output", old.display()))?;
        } else {
            std::fs::rename(&self.tmp, &target).with_context(|| {
                format!(
                    "{}: cannot rename {} to it",
                    target.display(),
                    self.tmp.display()
                )
            })?;
            self.committed = true;
        }
        Ok(target)
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
        forget_live(&self.tmp);
    }
}

/// Writes `data` to `path` atomically: into a temporary file beside it, synced, then renamed, so
/// a reader (or a full disk) never sees a partial file at `path`.
pub fn write_file_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = file_name_of(path)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let parent = parent_of(path);
    sweep_stale(&parent);
    let tmp = parent.join(format!(".{name}.sani-tmp-{}-{n}", std::process::id()));
    add_live(&tmp);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    forget_live(&tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".sani-"))
            .collect()
    }

    #[test]
    fn commit_creates_target() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let staged = StagedDir::create(&target, false, &[]).unwrap();
        assert!(staged.path().is_dir());
        assert_eq!(staged.path().parent().unwrap(), root.path());
        let tmp_name = staged
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            tmp_name.starts_with(&format!(".out.sani-tmp-{}-", std::process::id())),
            "{tmp_name}"
        );
        assert!(!target.exists());
        std::fs::write(staged.path().join("a.txt"), "x").unwrap();
        assert_eq!(staged.commit().unwrap(), target);
        assert_eq!(std::fs::read_to_string(target.join("a.txt")).unwrap(), "x");
        assert!(leftovers(root.path()).is_empty());
    }

    #[test]
    fn drop_removes_temp_dir() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let tmp = {
            let staged = StagedDir::create(&target, false, &[]).unwrap();
            std::fs::write(staged.path().join("a.txt"), "x").unwrap();
            staged.path().to_path_buf()
        };
        assert!(!tmp.exists());
        assert!(!target.exists());
        assert!(leftovers(root.path()).is_empty());
    }

    #[test]
    fn existing_target_needs_force() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old.txt"), "old").unwrap();
        let err = StagedDir::create(&target, false, &[]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("already exists (use --force to replace it)"),
            "{msg}"
        );
        assert!(msg.contains(&target.display().to_string()), "{msg}");
        assert!(leftovers(root.path()).is_empty());

        let staged = StagedDir::create(&target, true, &[]).unwrap();
        // The old output stays in place until commit.
        assert!(target.join("old.txt").exists());
        std::fs::write(staged.path().join("new.txt"), "new").unwrap();
        staged.commit().unwrap();
        assert!(!target.join("old.txt").exists());
        assert_eq!(
            std::fs::read_to_string(target.join("new.txt")).unwrap(),
            "new"
        );
        assert!(
            leftovers(root.path()).is_empty(),
            "{:?}",
            leftovers(root.path())
        );
    }

    #[test]
    fn force_refuses_to_replace_a_file() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        std::fs::write(&target, "file").unwrap();
        let msg = format!("{:#}", StagedDir::create(&target, true, &[]).unwrap_err());
        assert!(msg.contains("not a directory"), "{msg}");
    }

    #[test]
    fn target_created_meanwhile_is_not_clobbered_without_force() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let staged = StagedDir::create(&target, false, &[]).unwrap();
        std::fs::create_dir(&target).unwrap();
        let msg = format!("{:#}", staged.commit().unwrap_err());
        assert!(msg.contains("already exists"), "{msg}");
        assert!(leftovers(root.path()).is_empty());
    }

    #[test]
    fn refuses_input_dirs() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("model");
        std::fs::create_dir(&input).unwrap();
        let check = |target: PathBuf, force: bool| {
            let msg = format!(
                "{:#}",
                StagedDir::create(&target, force, &[&input]).unwrap_err()
            );
            assert!(
                msg.contains("refusing to write into the input model"),
                "{msg}"
            );
            assert!(msg.contains(&input.display().to_string()), "{msg}");
        };
        check(input.clone(), true); // the input itself
        check(input.join("sub"), false); // not yet existing, inside the input
        check(input.join("a/b/../c"), false);
        check(root.path().join("x/../model"), true); // same dir, spelled differently
        check(root.path().to_path_buf(), true); // the input lies inside the target
                                                // Through a symlink to the input.
        #[cfg(unix)]
        {
            let link = root.path().join("link");
            std::os::unix::fs::symlink(&input, &link).unwrap();
            check(link.join("out"), false);
            check(link.clone(), true);
        }
        // A sibling is fine, even one whose name starts with the input's.
        let ok = StagedDir::create(&root.path().join("model2"), false, &[&input]).unwrap();
        drop(ok);
        assert!(leftovers(root.path()).is_empty());
        assert!(input.is_dir());
    }

    #[test]
    fn staging_names() {
        assert_eq!(staging_pid(".out.sani-tmp-123-0"), Some(123));
        assert_eq!(staging_pid(".my.model.sani-tmp-7-12"), Some(7));
        assert_eq!(staging_pid(".out.sani-old-99"), Some(99));
        for other in [
            "out",
            ".out.sani-tmp-",
            ".out.sani-tmp-1x-0",
            "x.sani-tmp-1-0",
            ".o.sani-tmp-1-2-3",
        ] {
            assert_eq!(staging_pid(other), None, "{other}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn stale_staging_of_dead_runs_is_removed() {
        let root = tempfile::tempdir().unwrap();
        // A pid that is not running: the highest pid Linux allows is 2^22.
        let dead = 4_194_304 + 17;
        let stale_dir = root.path().join(format!(".out.sani-tmp-{dead}-0"));
        std::fs::create_dir(&stale_dir).unwrap();
        std::fs::write(stale_dir.join("model.safetensors"), "half").unwrap();
        let stale_file = root.path().join(format!(".e.json.sani-tmp-{dead}-3"));
        std::fs::write(&stale_file, "{").unwrap();
        // A live run's staging (this test's parent process is alive) stays.
        let live = root.path().join(format!(
            ".other.sani-tmp-{}-0",
            std::os::unix::process::parent_id()
        ));
        std::fs::create_dir(&live).unwrap();
        let unrelated = root.path().join("keep.sani-tmp-1-0");
        std::fs::write(&unrelated, "x").unwrap();
        let staged = StagedDir::create(&root.path().join("new"), false, &[]).unwrap();
        assert!(!stale_dir.exists() && !stale_file.exists());
        assert!(live.exists() && unrelated.exists());
        drop(staged);
    }

    #[test]
    fn relative_target_and_missing_parents() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("a/b/out");
        let staged = StagedDir::create(&target, false, &[]).unwrap();
        assert_eq!(staged.path().parent().unwrap(), root.path().join("a/b"));
        staged.commit().unwrap();
        assert!(target.is_dir());
        assert_eq!(parent_of(Path::new("out")), PathBuf::from("."));
    }
}
