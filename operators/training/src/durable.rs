//! Files that survive a kill or a power cut whole or not at all: written under a temporary name,
//! fsynced (files, then their folders) and renamed into place, the parent folder fsynced after.
//! Temporaries a killed run left behind are swept away when the next run starts.

use std::fs::File;
use std::io;
use std::path::Path;

/// Flushes `path` (a file or a folder) to disk.
pub fn sync(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Flushes every file and folder under `dir`, `dir` itself last.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync(&path)?;
        }
    }
    sync(dir)
}

/// Moves a complete, synced `from` to `to` and flushes the folder that now holds it.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    match to.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync(parent),
        None => sync(Path::new(".")),
    }
}

/// Removes the entries of `dir` (files or folders) whose names `is_stale` picks, returning how
/// many. A missing `dir` has none.
pub fn remove_stale(dir: &Path, is_stale: impl Fn(&str) -> bool) -> io::Result<usize> {
    if !dir.is_dir() {
        return Ok(0);
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !is_stale(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
        tracing::info!(path = %path.display(), "removed what a killed run left half-written");
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_sync_rename_into_place_and_stale_entries_go() {
        let dir = tempfile::tempdir().unwrap();
        let temp = dir.path().join(".ckpt.partial-1");
        std::fs::create_dir_all(temp.join("unet")).unwrap();
        std::fs::write(temp.join("unet/w.bin"), b"w").unwrap();
        sync_tree(&temp).unwrap();
        rename(&temp, &dir.path().join("ckpt")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ckpt/unet/w.bin")).unwrap(), b"w");
        std::fs::create_dir(dir.path().join(".ckpt.partial-2")).unwrap();
        std::fs::write(dir.path().join(".part.tmp"), b"").unwrap();
        let removed = remove_stale(dir.path(), |n| n.contains(".partial-") || n.ends_with(".tmp")).unwrap();
        assert_eq!(removed, 2);
        assert!(dir.path().join("ckpt").is_dir());
        assert_eq!(remove_stale(&dir.path().join("missing"), |_| true).unwrap(), 0);
    }
}
