//! A migrating process's working folder (`dvs run --workdir`): the source packs it beside
//! the criu image while the process is stopped, and the destination puts it back at the same
//! path before the restore, where criu reopens the process's files in it. A destination that
//! sees the very same folder (the same boot and mount namespace, as nodes of one machine do)
//! leaves it alone.
//!
//! The folder comes from a node of the cluster, which is trusted with what it runs (it may
//! already relay `dvs run` requests); the path must still be absolute and plain, and the
//! archive cannot write outside it.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file in an image folder that says which working folder travels with it.
pub(crate) const MANIFEST: &str = "dvs-workdir";
/// The working folder's contents, as a tar archive.
pub(crate) const ARCHIVE: &str = "dvs-workdir.tar";

/// Where a working folder was, and in which view of the file systems.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Manifest {
    path: PathBuf,
    /// `/proc/sys/kernel/random/boot_id` of the source's machine.
    boot: String,
    /// The source node's mount namespace (`/proc/self/ns/mnt`).
    mnt: String,
}

/// This process's view of the file systems: (boot id, mount namespace).
fn view() -> Result<(String, String), String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| format!("cannot read the boot id: {e}"))?;
    let mnt = std::fs::read_link("/proc/self/ns/mnt")
        .map_err(|e| format!("cannot read the mount namespace: {e}"))?;
    Ok((boot.trim().to_string(), mnt.display().to_string()))
}

/// Whether `p` is an absolute path without `.`/`..` components, other than `/`.
pub(crate) fn is_plain(p: &Path) -> bool {
    p.is_absolute()
        && p.components().count() > 1
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Packs `workdir` into `image_dir` (blocking; the process must be stopped, so that its files
/// are as criu saw them). Returns the archive's size.
pub(crate) fn pack(workdir: &Path, image_dir: &Path) -> Result<u64, String> {
    if !is_plain(workdir) {
        return Err(format!(
            "the working folder {} is not a plain absolute path",
            workdir.display()
        ));
    }
    let (boot, mnt) = view()?;
    let archive = image_dir.join(ARCHIVE);
    let out =
        File::create(&archive).map_err(|e| format!("cannot create {}: {e}", archive.display()))?;
    let mut tar = tar::Builder::new(out);
    // A symlink travels as a symlink; what it points to is not the process's to carry.
    tar.follow_symlinks(false);
    tar.append_dir_all(".", workdir)
        .and_then(|()| tar.finish())
        .map_err(|e| format!("cannot pack the working folder {}: {e}", workdir.display()))?;
    let manifest = Manifest {
        path: workdir.to_path_buf(),
        boot,
        mnt,
    };
    let text = serde_json::to_string(&manifest).expect("paths and strings encode");
    crate::safe_fs::write_private(&image_dir.join(MANIFEST), text.as_bytes())
        .map_err(|e| format!("cannot write {MANIFEST}: {e}"))?;
    std::fs::metadata(&archive)
        .map(|m| m.len())
        .map_err(|e| e.to_string())
}

/// A working folder the destination put in place.
#[derive(Debug)]
pub(crate) struct Unpacked {
    /// Its path (the same as on the source).
    pub path: PathBuf,
    /// It did not exist here before: a rollback removes it again.
    pub created: bool,
}

impl Unpacked {
    /// Removes a folder this node created for a copy that will not run (blocking).
    pub fn undo(&self) {
        if self.created {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!(
                    "cannot remove the working folder {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// Puts the working folder that came with the image in `image_dir` in place, unless this node
/// sees the source's folder itself (blocking). `None`: the image has no working folder.
pub(crate) fn unpack(image_dir: &Path) -> Result<Option<Unpacked>, String> {
    let text = match std::fs::read_to_string(image_dir.join(MANIFEST)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {MANIFEST}: {e}")),
    };
    let m: Manifest = serde_json::from_str(&text).map_err(|e| format!("bad {MANIFEST}: {e}"))?;
    if !is_plain(&m.path) {
        return Err(format!(
            "the image's working folder {} is not a plain absolute path",
            m.path.display()
        ));
    }
    let (boot, mnt) = view()?;
    if (boot, mnt) == (m.boot.clone(), m.mnt.clone()) {
        // The source's folder is this one: the files are there already.
        return Ok(Some(Unpacked {
            path: m.path,
            created: false,
        }));
    }
    let created = !m.path.exists();
    let archive = image_dir.join(ARCHIVE);
    let file =
        File::open(&archive).map_err(|e| format!("cannot open {}: {e}", archive.display()))?;
    std::fs::create_dir_all(&m.path)
        .map_err(|e| format!("cannot create {}: {e}", m.path.display()))?;
    let mut tar = tar::Archive::new(file);
    tar.set_preserve_permissions(true);
    tar.set_preserve_mtime(true);
    tar.set_overwrite(true);
    let unpacked = Unpacked {
        path: m.path,
        created,
    };
    if let Err(e) = tar.unpack(&unpacked.path) {
        unpacked.undo();
        return Err(format!(
            "cannot unpack the working folder into {}: {e}",
            unpacked.path.display()
        ));
    }
    Ok(Some(unpacked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths() {
        assert!(is_plain(Path::new("/srv/app")));
        assert!(!is_plain(Path::new("/")));
        assert!(!is_plain(Path::new("srv/app")));
        assert!(!is_plain(Path::new("/srv/../etc")));
    }

    #[test]
    fn a_folder_packs_and_unpacks_in_another_view() {
        let t = tempfile::tempdir().unwrap();
        let work = t.path().join("work");
        std::fs::create_dir_all(work.join("sub")).unwrap();
        std::fs::write(work.join("app.log"), b"1 a\n2 b\n").unwrap();
        std::fs::write(work.join("sub/data"), vec![7u8; 70_000]).unwrap();
        std::os::unix::fs::symlink("app.log", work.join("link")).unwrap();
        let img = t.path().join("img");
        std::fs::create_dir(&img).unwrap();
        assert!(pack(&work, &img).unwrap() > 70_000);

        // Same view: left alone.
        let same = unpack(&img).unwrap().unwrap();
        assert!(!same.created);

        // Another machine's view: the manifest names another boot, and the folder is gone.
        let text = std::fs::read_to_string(img.join(MANIFEST)).unwrap();
        let mut m: Manifest = serde_json::from_str(&text).unwrap();
        m.boot = "another-boot".into();
        std::fs::write(img.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        std::fs::remove_dir_all(&work).unwrap();
        let u = unpack(&img).unwrap().unwrap();
        assert!(u.created);
        assert_eq!(std::fs::read(work.join("app.log")).unwrap(), b"1 a\n2 b\n");
        assert_eq!(
            std::fs::read(work.join("sub/data")).unwrap(),
            vec![7u8; 70_000]
        );
        assert_eq!(
            std::fs::read_link(work.join("link")).unwrap(),
            PathBuf::from("app.log")
        );
        u.undo();
        assert!(!work.exists());
    }

    #[test]
    fn a_manifest_with_a_crooked_path_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let m = Manifest {
            path: PathBuf::from("/srv/../etc"),
            boot: "b".into(),
            mnt: "m".into(),
        };
        std::fs::write(t.path().join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        let e = unpack(t.path()).unwrap_err();
        assert!(e.contains("not a plain absolute path"), "{e}");
    }
}
