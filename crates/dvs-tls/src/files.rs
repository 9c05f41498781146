//! Writing files safely (keys, certificates, the cluster config): never through a symlink,
//! through a temporary file and a rename, with the mode asked for (keys 0600).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::TlsError;

/// Writes `data` to `path` with `mode`. With `replace`, an existing regular file is replaced
/// (through a temporary file and a rename, so readers never see half a key); without it, an
/// existing file is an error. A symlink at `path` is never followed.
pub fn write_file(path: &Path, data: &[u8], mode: u32, replace: bool) -> Result<(), TlsError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(TlsError::Io {
                path: path.into(),
                source: std::io::Error::other("is a symlink; refusing to write through it"),
            })
        }
        Ok(_) if !replace => return Err(TlsError::Exists(path.into())),
        _ => {}
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|_| f.sync_all()))
        .map_err(TlsError::io(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(TlsError::io(path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Creates `dir` (0700) if it does not exist; refuses a symlink.
pub fn ensure_private_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(TlsError::Io {
            path: dir.into(),
            source: std::io::Error::other("is a symlink; refusing to use it"),
        }),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(TlsError::Io {
            path: dir.into(),
            source: std::io::Error::other("exists and is not a folder"),
        }),
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(TlsError::io(dir)),
    }
}

/// Reads a whole file.
pub fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(TlsError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_private_and_symlinks_refused() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("a.key");
        write_file(&key, b"secret", 0o600, false).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_file(&key, b"x", 0o600, false),
            Err(TlsError::Exists(_))
        ));
        write_file(&key, b"new", 0o600, true).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"new");

        let target = d.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = d.path().join("link.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = write_file(&link, b"evil", 0o600, true).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
