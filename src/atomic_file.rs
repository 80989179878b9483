//! Replacing a file so that readers (and a crash) see either the old content or the new
//! one, never a mix: write a temporary file next to it, sync it, rename it over.
//!
//! The replacement keeps the old file's permissions and owner (proxy.toml holds
//! passwords; an operator who made it 0600 and owned by a service user keeps it so);
//! a file that did not exist is created readable by its owner only (0600).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of files this module creates.
const NEW_FILE_MODE: u32 = 0o600;

pub fn replace(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let existing = std::fs::metadata(path).ok();
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(NEW_FILE_MODE)
        .open(&tmp)?;
    if let Some(old) = &existing {
        file.set_permissions(std::fs::Permissions::from_mode(old.mode() & 0o7777))?;
        // Only root may give a file away; for anyone else the owner is already theirs.
        if let Err(e) = std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()))
            && e.kind() != std::io::ErrorKind::PermissionDenied
        {
            return Err(e);
        }
    }
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_file_is_private_and_a_replaced_one_keeps_its_mode() {
        let dir = std::env::temp_dir().join(format!("atomic-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        replace(&path, b"one").unwrap();
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        replace(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o640);
        // Root can tell that the owner is kept too.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
            replace(&path, b"owned").unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        }
        // A leftover temporary file from a crash does not stop the next write.
        std::fs::write(dir.join("state.json.tmp"), b"half").unwrap();
        replace(&path, b"three").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
