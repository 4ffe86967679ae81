//! Which files a `path` means: one file, every matching file under a folder, or a glob.

use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::file::metadata::PageIndexPolicy;

/// The files `path` names, sorted: a file itself, the files under a folder (recursively) whose
/// extension is one of `extensions`, or the files a glob pattern matches.
///
/// ```no_run
/// use latentflow_operators::tables::files::expand;
/// let files = expand("data/laion/*.parquet", &["parquet"]).unwrap();
/// ```
pub fn expand(path: &str, extensions: &[&str]) -> Result<Vec<PathBuf>, String> {
    let mut files = if path.contains(['*', '?', '[']) {
        let paths = glob::glob(path).map_err(|e| format!("`{path}` is not a valid glob: {e}"))?;
        paths.filter_map(Result::ok).filter(|p| p.is_file()).collect()
    } else {
        let p = Path::new(path);
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, extensions, &mut found).map_err(|e| format!("cannot list {path}: {e}"))?;
            found
        } else if p.is_file() {
            vec![p.to_path_buf()]
        } else {
            return Err(format!("{path} does not exist"));
        }
    };
    files.sort();
    if files.is_empty() {
        return Err(format!("no {} files match `{path}`", extensions.join("/")));
    }
    Ok(files)
}

fn walk(dir: &Path, extensions: &[&str], out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, extensions, out)?;
        } else if has_extension(&path, extensions) {
            out.push(path);
        }
    }
    Ok(())
}

/// A parquet file's footer (schema, row groups, key-value metadata), read once and reused for
/// every row group read from the file.
pub fn open_metadata(path: &Path) -> Result<ArrowReaderMetadata, String> {
    load_metadata(path, ArrowReaderOptions::new())
}

/// [`open_metadata`] with the file's page index when it has one: where each data page starts
/// and how many rows it holds, so that a read of some rows skips the pages of the others.
pub fn open_metadata_with_page_index(path: &Path) -> Result<ArrowReaderMetadata, String> {
    load_metadata(path, ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional))
}

fn load_metadata(path: &Path, options: ArrowReaderOptions) -> Result<ArrowReaderMetadata, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    unless_corrupt(path, || {
        ArrowReaderMetadata::load(&file, options)
            .map_err(|e| format!("{}: not a readable parquet file: {e}", path.display()))
    })
}

/// Runs a parquet or arrow call on `path`, turning a panic into an error naming the file: those
/// crates panic on some corrupt files (found by `tests/tests/fuzz.rs`: an arrow schema in the
/// footer with a zero-width integer) instead of returning an error.
pub fn unless_corrupt<T>(path: &Path, read: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    quiet_panics::install();
    let _quiet = quiet_panics::Quiet::new();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|payload| {
        let message = latentflow_engine::runtime::panic_message(payload.as_ref());
        Err(format!("{}: not a readable parquet file (corrupt: {message})", path.display()))
    })
}

/// Keeps the panics [`unless_corrupt`] turns into errors off stderr: the error says it all.
mod quiet_panics {
    use std::cell::Cell;
    use std::sync::Once;

    thread_local! {
        static QUIET: Cell<bool> = const { Cell::new(false) };
    }

    /// Wraps the panic hook once: panics on a thread inside a [`Quiet`] scope print nothing.
    pub fn install() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if !QUIET.with(Cell::get) {
                    previous(info);
                }
            }));
        });
    }

    /// Silences this thread's panics while it lives.
    pub struct Quiet(bool);

    impl Quiet {
        pub fn new() -> Self {
            Quiet(QUIET.with(|q| q.replace(true)))
        }
    }

    impl Drop for Quiet {
        fn drop(&mut self) {
            QUIET.with(|q| q.set(self.0));
        }
    }
}

/// True when `path`'s extension is one of `extensions` (case-insensitive).
pub fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| extensions.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_folders_and_globs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for name in ["b.parquet", "a.parquet", "sub/c.PARQUET", "notes.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let root = dir.path().to_str().unwrap();
        let names =
            |v: Vec<PathBuf>| v.iter().map(|p| p.strip_prefix(root).unwrap().display().to_string()).collect::<Vec<_>>();
        assert_eq!(names(expand(root, &["parquet"]).unwrap()), ["a.parquet", "b.parquet", "sub/c.PARQUET"]);
        assert_eq!(names(expand(&format!("{root}/*.parquet"), &["parquet"]).unwrap()), ["a.parquet", "b.parquet"]);
        assert_eq!(names(expand(&format!("{root}/a.parquet"), &["parquet"]).unwrap()), ["a.parquet"]);
        assert!(expand(&format!("{root}/none/*.parquet"), &["parquet"])
            .unwrap_err()
            .starts_with("no parquet files match"));
        assert!(expand(&format!("{root}/missing.parquet"), &["parquet"]).unwrap_err().ends_with("does not exist"));
    }
}
