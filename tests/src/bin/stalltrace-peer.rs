//! A peer process for the integration tests: an HTTP-like server or client running under a
//! process name (comm) of the test's choosing, so that tests can select processes by pid and
//! comm as well as by port.
//!
//! - `stalltrace-peer NAME server`: prints its port, then answers every request at once, except
//!   `/hang`, which it never answers.
//! - `stalltrace-peer NAME client ADDR N`: makes N requests to `/ok`, each on a new connection
//!   (closed after the answer), then sends `/hang` on one more and prints `ready`.
//!
//! Both run until their stdin closes.
use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = CString::new(args[0].as_str()).expect("a name without NUL");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes). Threads
    // spawned later inherit the name.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    // Exit when the test closes our stdin (or dies).
    thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    match args[1].as_str() {
        "server" => server(),
        "client" => client(args[2].parse().expect("ADDR"), args[3].parse().expect("N")),
        other => panic!("unknown role {other}"),
    }
}

fn server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        thread::spawn(move || {
            let mut request = [0u8; 512];
            loop {
                let n = conn.read(&mut request).unwrap_or(0);
                if n == 0 {
                    return;
                }
                if request[..n].windows(5).any(|w| w == b"/hang") {
                    // Hold the connection, never answer.
                    thread::sleep(Duration::from_secs(3600));
                }
                if conn.write_all(REPLY).is_err() {
                    return;
                }
            }
        });
    }
}

fn client(addr: SocketAddr, requests: usize) {
    for _ in 0..requests {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET /ok HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let mut reply = [0u8; REPLY.len()];
        conn.read_exact(&mut reply).unwrap();
    }
    let mut hanging = TcpStream::connect(addr).unwrap();
    hanging
        .write_all(b"GET /hang HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    thread::sleep(Duration::from_secs(3600));
    drop(hanging);
}
