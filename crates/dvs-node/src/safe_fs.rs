//! Folders and files the node keeps private: runtime and image folders owned by the node's
//! uid with explicit modes, never followed through a symlink someone else planted.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of private folders (runtime dir without an admin group, image folders).
pub(crate) const PRIVATE_DIR: u32 = 0o700;
/// Mode of private files (images, snapshots, pid file).
pub(crate) const PRIVATE_FILE: u32 = 0o600;

/// Makes sure `dir` is a real folder owned by this process's uid, with mode `mode` and (if
/// given) group `gid`; creates it (not its parents) when absent. A symlink, a non-folder or a
/// folder owned by another uid is refused, since someone else could then swap its contents.
pub(crate) fn secure_dir(dir: &Path, mode: u32, gid: Option<u32>) -> io::Result<()> {
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let md = std::fs::symlink_metadata(dir)?;
    if md.file_type().is_symlink() {
        return Err(io::Error::other(format!(
            "{} is a symlink; refusing to use it",
            dir.display()
        )));
    }
    if !md.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a folder",
            dir.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(io::Error::other(format!(
            "{} is owned by uid {}, not by uid {me} that runs the node; refusing to use it",
            dir.display(),
            md.uid()
        )));
    }
    if let Some(gid) = gid {
        std::os::unix::fs::chown(dir, None, Some(gid))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Creates or truncates `path` with mode 0600 and writes `data`, refusing to follow a
/// symlink at `path`.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = open_private(path)?;
    f.write_all(data)
}

/// Opens `path` for writing (created with mode 0600, truncated), refusing a symlink.
pub(crate) fn open_private(path: &Path) -> io::Result<std::fs::File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // An existing file keeps its old mode through O_CREAT.
    f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))?;
    Ok(f)
}

/// Sets mode 0600 on every regular file directly in `dir` (files written by another
/// program, e.g. criu, whatever its umask).
pub(crate) fn private_files_in(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(PRIVATE_FILE))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn secure_dir_creates_fixes_and_refuses_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("rt");
        secure_dir(&d, PRIVATE_DIR, None).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        secure_dir(&d, PRIVATE_DIR, None).unwrap();
        assert_eq!(mode(&d), 0o700);
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = secure_dir(&link, PRIVATE_DIR, None).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
    }

    #[test]
    fn write_private_refuses_a_symlink_and_sets_0600() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write_private(&link, b"x").is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        let f = t.path().join("f");
        std::fs::write(&f, "old").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&f, b"new").unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "new");
    }
}
