//! The folder of a local cluster (`dvs up --dir`): it holds the config and the nodes'
//! runtime folders, so it must belong to whoever runs the cluster. Default `/tmp/dvs` lives
//! in a world-writable folder, where another user could have prepared it first.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Makes sure `dir` is safe to keep a cluster in and returns its canonical path: created
/// with mode 0700 if absent; otherwise it must be a real folder (not a symlink) owned by this
/// uid and writable by nobody else. Its ancestors must not let another user replace it
/// (owned by root or this uid; if writable by others, sticky like `/tmp`).
pub fn prepare(dir: &Path) -> Result<PathBuf> {
    let me = nix::unistd::geteuid().as_raw();
    let dir =
        std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let parent = parent.canonicalize()?;
        for a in parent.ancestors() {
            let md = std::fs::metadata(a)?;
            let others_write = md.mode() & 0o022 != 0;
            let sticky = md.mode() & 0o1000 != 0;
            if (md.uid() != 0 && md.uid() != me) || (others_write && !sticky) {
                bail!(
                    "refusing cluster folder {}: its ancestor {} could be changed by another user (owner uid {}, mode {:o})",
                    dir.display(),
                    a.display(),
                    md.uid(),
                    md.mode() & 0o7777
                );
            }
        }
    }
    match DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let md = std::fs::symlink_metadata(&dir)?;
    if md.file_type().is_symlink() {
        bail!(
            "refusing cluster folder {}: it is a symlink (pass the real folder with --dir)",
            dir.display()
        );
    }
    if !md.is_dir() {
        bail!("refusing cluster folder {}: not a folder", dir.display());
    }
    if md.uid() != me {
        bail!(
            "refusing cluster folder {}: it is owned by uid {}, not by uid {me} that runs dvs; remove it or pass another --dir",
            dir.display(),
            md.uid()
        );
    }
    if md.mode() & 0o022 != 0 {
        bail!(
            "refusing cluster folder {}: mode {:o} lets other users write in it (chmod go-w, or pass another --dir)",
            dir.display(),
            md.mode() & 0o7777
        );
    }
    Ok(dir)
}

/// Writes `name` in `dir` with mode 0600: a fresh temporary file renamed over it, so that a
/// symlink planted at `dir/name` is never written through; an existing symlink is refused.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    dvs_tls::files::write_file(&path, contents.as_bytes(), 0o600, true).with_context(|| {
        format!(
            "cannot write {} (a symlink there may have been planted by someone else: remove it)",
            path.display()
        )
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_fresh_folder_is_created_private() {
        let t = tempfile::tempdir().unwrap();
        let d = prepare(&t.path().join("c")).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        let p = write_file(&d, "cluster.toml", "x = 1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x = 1\n");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn writable_folders_and_symlinks_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("open");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare(&d).unwrap_err().to_string();
        assert!(e.contains("lets other users write"), "{e}");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        let e = prepare(&link).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        // Below a group-writable, non-sticky folder: refused.
        let e = prepare(&d.join("sub")).unwrap_err().to_string();
        assert!(e.contains("ancestor"), "{e}");
    }

    #[test]
    fn a_planted_config_symlink_is_not_written_through() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("victim");
        std::fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, t.path().join("cluster.toml")).unwrap();
        let e = write_file(t.path(), "cluster.toml", "evil").unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    }
}
