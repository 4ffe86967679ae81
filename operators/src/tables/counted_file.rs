//! A parquet file that counts the bytes read from it, so a source can say how much of its files
//! each worker read (a worker reading its share of a row group skips the others' pages).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use parquet::errors::{ParquetError, Result};
use parquet::file::reader::{ChunkReader, Length};

/// A file whose reads through the parquet reader add up in [`CountedFile::bytes_read`].
///
/// ```
/// use latentflow_operators::tables::counted_file::CountedFile;
/// use parquet::file::reader::ChunkReader;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("f");
/// std::fs::write(&path, b"0123456789")?;
/// let file = CountedFile::open(&path)?;
/// assert_eq!(&file.get_bytes(2, 3)?[..], b"234");
/// assert_eq!(file.bytes_read(), 3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CountedFile {
    file: File,
    read: Arc<AtomicU64>,
}

impl CountedFile {
    /// Opens `path` for reading.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(CountedFile { file: File::open(path)?, read: Arc::default() })
    }

    /// The bytes read so far, by every reader handed out.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Relaxed)
    }

    /// A handle on the count that outlives the file (the parquet reader takes the file).
    pub fn counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.read)
    }
}

impl Length for CountedFile {
    fn len(&self) -> u64 {
        Length::len(&self.file)
    }
}

/// A reader from some offset of a [`CountedFile`] that adds what it reads to the file's count.
pub struct CountedRead {
    inner: BufReader<File>,
    read: Arc<AtomicU64>,
}

impl Read for CountedRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Relaxed);
        Ok(n)
    }
}

impl ChunkReader for CountedFile {
    type T = CountedRead;

    fn get_read(&self, start: u64) -> Result<CountedRead> {
        let mut file = self.file.try_clone()?;
        file.seek(SeekFrom::Start(start))?;
        Ok(CountedRead { inner: BufReader::new(file), read: Arc::clone(&self.read) })
    }

    fn get_bytes(&self, start: u64, length: usize) -> Result<Bytes> {
        let mut file = self.file.try_clone()?;
        file.seek(SeekFrom::Start(start))?;
        let mut buffer = Vec::with_capacity(length);
        let read = file.take(length as u64).read_to_end(&mut buffer)?;
        self.read.fetch_add(read as u64, Relaxed);
        if read != length {
            return Err(ParquetError::EOF(format!("expected to read {length} bytes at {start}, read {read}")));
        }
        Ok(buffer.into())
    }
}
