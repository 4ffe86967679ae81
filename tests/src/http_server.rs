//! A small HTTP/1.1 server on 127.0.0.1 for tests of the HTTP sources: each test says what every
//! path answers (images, errors, slow replies, endless bodies, redirects), and the server counts
//! the requests per path. It stops when dropped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the server answers to one request.
pub enum Reply {
    /// A status, extra headers and a body with its `Content-Length`.
    Full {
        /// The status code.
        status: u16,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// The body.
        body: Vec<u8>,
    },
    /// Waits, then answers.
    After(Duration, Box<Reply>),
    /// 200 with no `Content-Length`: writes `total` bytes of zeros (or until the client goes),
    /// then closes the connection.
    Endless {
        /// Bytes to write at most.
        total: u64,
    },
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: Vec<u8>) -> Reply {
        Reply::Full { status: 200, headers: Vec::new(), body }
    }

    /// `status` with an empty body.
    pub fn status(status: u16) -> Reply {
        Reply::Full { status, headers: Vec::new(), body: Vec::new() }
    }

    /// 302 to `location`.
    pub fn redirect(location: &str) -> Reply {
        Reply::Full { status: 302, headers: vec![("Location".into(), location.into())], body: Vec::new() }
    }

    /// 200 (or 206 for a `Range: bytes=N-` request) with the part of `bytes` asked for.
    pub fn ranged(bytes: &[u8], range: Option<&str>) -> Reply {
        let from = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok());
        match from {
            Some(from) if from <= bytes.len() => Reply::Full {
                status: 206,
                headers: vec![(
                    "Content-Range".into(),
                    format!("bytes {from}-{}/{}", bytes.len().saturating_sub(1), bytes.len()),
                )],
                body: bytes[from..].to_vec(),
            },
            _ => Reply::ok(bytes.to_vec()),
        }
    }
}

/// A request as the handler sees it.
pub struct Request {
    /// The path, with its query.
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// The running server.
pub struct TestServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl TestServer {
    /// Starts a server answering every request with `handler`.
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(BTreeMap::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (stop2, requests2) = (Arc::clone(&stop), Arc::clone(&requests));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (handler, requests, stop) = (Arc::clone(&handler), Arc::clone(&requests2), Arc::clone(&stop2));
                std::thread::spawn(move || serve(stream, &*handler, &requests, &stop));
            }
        });
        TestServer { addr, stop, requests }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests per path so far.
    pub fn requests(&self) -> BTreeMap<String, usize> {
        self.requests.lock().expect("requests lock").clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

fn serve(stream: TcpStream, handler: &Handler, requests: &Mutex<BTreeMap<String, usize>>, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    // A reply is one write; without this, Nagle's algorithm and delayed ACKs add ~40 ms to each.
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || stop.load(Ordering::Relaxed) {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        *requests.lock().expect("requests lock").entry(path.clone()).or_default() += 1;
        let mut reply = handler(&Request { path, headers });
        while let Reply::After(delay, then) = reply {
            std::thread::sleep(delay);
            reply = *then;
        }
        match reply {
            Reply::Full { status, headers, body } => {
                let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                for (name, value) in headers {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                head.push_str("\r\n");
                let mut reply = head.into_bytes();
                reply.extend_from_slice(&body);
                if writer.write_all(&reply).is_err() {
                    return;
                }
            }
            Reply::Endless { total } => {
                let _ = writer.write_all(b"HTTP/1.1 200 X\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n");
                let chunk = vec![0u8; 64 << 10];
                let mut sent = 0;
                while sent < total && writer.write_all(&chunk).is_ok() {
                    sent += chunk.len() as u64;
                }
                return;
            }
            Reply::After(..) => unreachable!(),
        }
    }
}
