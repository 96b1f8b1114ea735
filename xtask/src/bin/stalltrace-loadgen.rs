//! Load generators for `cargo xtask bench`, built in release mode. Each workload runs for a
//! fixed time and prints one JSON line: `{"ops": N, "secs": S}`.
//!
//! - `pingpong`: 1-byte request / 1-byte response over loopback (or a Unix stream socket with
//!   `--unix`), one epoll-driven client thread and one server thread (almost pure syscalls: the
//!   worst case for a socket tracer);
//! - `churn`: connect, one 1-byte exchange, close, as fast as possible;
//! - `fileio`: 64-byte writes then reads on a regular file;
//! - `udp`: one-way datagrams, statsd-style (`sendto` of 32-byte lines to a collector that
//!   only reads, or `send` on a connected socket): what a metrics-heavy host costs;
//! - `idle`: opens N connections, prints `ready`, holds them until stdin closes.
use std::{
    io::{Read, Seek, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{
        fd::AsRawFd,
        unix::net::{UnixListener, UnixStream},
    },
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand)]
enum Workload {
    Pingpong {
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Total request rate to pace to (requests/s); unpaced when absent.
        #[arg(long)]
        rate: Option<f64>,
        /// Over Unix stream sockets instead of TCP.
        #[arg(long, conflicts_with = "udp")]
        unix: bool,
        /// Over UDP: each "connection" a pair of sockets connected to each other, a request
        /// and its answer one datagram each (a DNS-like exchange).
        #[arg(long)]
        udp: bool,
    },
    Churn {
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    Fileio {
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// One-way UDP: a sender thread and a collector thread that only reads.
    Udp {
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// `connect()` the sender and use `send` (else `sendto` on an unconnected socket).
        #[arg(long)]
        connected: bool,
    },
    /// Opens `conns` loopback connections across as many worker processes as the open-file
    /// limit requires, prints `ready`, and holds them until stdin closes.
    Idle {
        #[arg(long)]
        conns: usize,
    },
    /// One worker of `idle`: both ends of `conns` connections in this process.
    #[command(hide = true)]
    IdleWorker {
        #[arg(long)]
        conns: usize,
        /// Send a request on each that the server reads and never answers.
        #[arg(long)]
        stalled: bool,
    },
    /// Like `idle`, but each client sends a request that its server reads and never
    /// answers: `conns` connections stall on both ends (2 × `conns` stalls).
    Stalled {
        #[arg(long)]
        conns: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().workload {
        Workload::Pingpong {
            conns,
            secs,
            rate,
            unix,
            udp,
        } => match (unix, udp) {
            (true, _) => pingpong(unix_pairs(conns)?, secs, rate),
            (_, true) => pingpong(udp_pairs(conns)?, secs, rate),
            _ => pingpong(tcp_pairs(conns)?, secs, rate),
        },
        Workload::Churn { workers, secs } => churn(workers, secs),
        Workload::Fileio { secs } => fileio(secs),
        Workload::Udp { secs, connected } => udp(secs, connected),
        Workload::Idle { conns } => idle(conns, false),
        Workload::Stalled { conns } => idle(conns, true),
        Workload::IdleWorker { conns, stalled } => idle_worker(conns, stalled),
    }
}

fn report(ops: u64, elapsed: Duration) {
    println!("{{\"ops\":{ops},\"secs\":{}}}", elapsed.as_secs_f64());
}

fn listener() -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// One client thread and one server thread, each driving all its sockets through epoll: the
/// cost is syscalls (epoll_wait, read, write), not scheduler ping-pong between many threads,
/// which keeps run-to-run noise low. Each thread is pinned to a CPU of its own where there
/// are two: left to the scheduler, the pair ran on one core or two from run to run, and the
/// throughput of a run was one of two values ~30 % apart, whatever was traced. With `rate`,
/// requests are paced per connection.
fn pingpong<S: Stream>(
    (clients, servers): (Vec<S>, Vec<S>),
    secs: f64,
    rate: Option<f64>,
) -> Result<()> {
    let conns = clients.len();
    let stop = Arc::new(AtomicBool::new(false));
    let cpus = allowed_cpus();
    let server = {
        let stop = stop.clone();
        let cpu = cpus.get(1).copied();
        thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin_to(cpu)?;
            }
            serve_echo(&servers, &stop)
        })
    };
    if cpus.len() >= 2 {
        pin_to(cpus[0])?;
    }
    let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let ops = drive_requests(&clients, interval, deadline)?;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    drop(clients);
    server.join().expect("server thread")?;
    report(ops, elapsed);
    Ok(())
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: as in `allowed_cpus`; `cpu` is below CPU_SETSIZE (it came from a set).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        anyhow::bail!(
            "pinning a thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A connected socket the ping-pong drives: TCP, Unix or UDP.
trait Stream: AsRawFd + Send + 'static {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn send(&self, buf: &[u8]) -> std::io::Result<()>;
}

macro_rules! stream {
    ($($kind:ty),+) => {$(
        impl Stream for $kind {
            fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
                (&*self).read(buf)
            }
            fn send(&self, buf: &[u8]) -> std::io::Result<()> {
                (&*self).write_all(buf)
            }
        }
    )+};
}

stream!(TcpStream, UnixStream);

impl Stream for UdpSocket {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        UdpSocket::recv(self, buf)
    }
    fn send(&self, buf: &[u8]) -> std::io::Result<()> {
        UdpSocket::send(self, buf).map(drop)
    }
}

/// `conns` pairs of loopback UDP sockets, each connected to the other.
fn udp_pairs(conns: usize) -> Result<(Vec<UdpSocket>, Vec<UdpSocket>)> {
    let mut pairs = (Vec::with_capacity(conns), Vec::with_capacity(conns));
    for _ in 0..conns {
        let client = UdpSocket::bind("127.0.0.1:0").context("binding a UDP socket")?;
        let server = UdpSocket::bind("127.0.0.1:0").context("binding a UDP socket")?;
        client.connect(server.local_addr()?)?;
        server.connect(client.local_addr()?)?;
        for socket in [&client, &server] {
            socket.set_nonblocking(true)?;
        }
        pairs.0.push(client);
        pairs.1.push(server);
    }
    Ok(pairs)
}

/// `conns` loopback TCP connections: (client ends, server ends), non-blocking.
fn tcp_pairs(conns: usize) -> Result<(Vec<TcpStream>, Vec<TcpStream>)> {
    let (listener, addr) = listener()?;
    let mut pairs = (Vec::with_capacity(conns), Vec::with_capacity(conns));
    for _ in 0..conns {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        for stream in [&client, &server] {
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
        }
        pairs.0.push(client);
        pairs.1.push(server);
    }
    Ok(pairs)
}

/// `conns` Unix stream connections through a listener on a temporary path (removed once
/// they are made): (client ends, server ends), non-blocking.
fn unix_pairs(conns: usize) -> Result<(Vec<UnixStream>, Vec<UnixStream>)> {
    let path = std::env::temp_dir().join(format!("stalltrace-loadgen-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).context("binding a Unix listener")?;
    let mut pairs = (Vec::with_capacity(conns), Vec::with_capacity(conns));
    for _ in 0..conns {
        let client = UnixStream::connect(&path)?;
        let (server, _) = listener.accept()?;
        for stream in [&client, &server] {
            stream.set_nonblocking(true)?;
        }
        pairs.0.push(client);
        pairs.1.push(server);
    }
    std::fs::remove_file(&path)?;
    Ok(pairs)
}

struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    fn new(streams: &[impl AsRawFd]) -> Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain epoll syscalls on fds we own; events are initialized.
        unsafe {
            let fd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            anyhow::ensure!(
                fd >= 0,
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            );
            let epoll = Self(std::os::fd::OwnedFd::from_raw_fd(fd));
            for (index, stream) in streams.iter().enumerate() {
                let mut event = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: index as u64,
                };
                let rc = libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, stream.as_raw_fd(), &mut event);
                anyhow::ensure!(rc == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
            }
            Ok(epoll)
        }
    }

    /// Indexes of the readable streams.
    fn wait(&self, timeout: Duration, ready: &mut Vec<usize>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let timeout_ms = timeout.as_millis().min(100) as i32;
        // SAFETY: the buffer holds 64 events.
        let n =
            unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), 64, timeout_ms) };
        ready.clear();
        ready.extend(events[..n.max(0) as usize].iter().map(|e| e.u64 as usize));
    }
}

/// The server side: answer every byte with a byte.
fn serve_echo<S: Stream>(streams: &[S], stop: &AtomicBool) -> Result<()> {
    let epoll = Epoll::new(streams)?;
    let mut ready = Vec::new();
    let mut byte = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        epoll.wait(Duration::from_millis(100), &mut ready);
        for &index in &ready {
            if let Ok(1) = streams[index].recv(&mut byte) {
                match streams[index].send(&byte) {
                    // The client closed at the end of the run, a request still in flight
                    // (a Unix socket says so at once; TCP at the next write).
                    Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {}
                    result => result?,
                }
            }
        }
    }
    Ok(())
}

/// The client side: one request outstanding per connection; returns completed exchanges.
fn drive_requests<S: Stream>(
    streams: &[S],
    interval: Option<Duration>,
    deadline: Instant,
) -> Result<u64> {
    let epoll = Epoll::new(streams)?;
    let mut ready = Vec::new();
    let mut byte = [1u8; 1];
    let mut ops = 0;
    // When each idle connection may send its next request (None: awaiting a response).
    let start = Instant::now();
    let mut due: Vec<Option<Instant>> = (0..streams.len())
        .map(|i| {
            Some(start + interval.map_or(Duration::ZERO, |d| d * i as u32 / streams.len() as u32))
        })
        .collect();
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(ops);
        }
        for (index, slot) in due.iter_mut().enumerate() {
            if slot.is_some_and(|at| at <= now) {
                streams[index].send(&byte)?;
                *slot = None;
            }
        }
        let next_due = due.iter().flatten().min().copied();
        let timeout = next_due.map_or(Duration::from_millis(100), |at| {
            at.saturating_duration_since(now)
        });
        epoll.wait(timeout, &mut ready);
        for &index in &ready {
            if let Ok(1) = streams[index].recv(&mut byte) {
                ops += 1;
                due[index] = Some(match interval {
                    Some(interval) => Instant::now().max(now + interval),
                    None => Instant::now(),
                });
            }
        }
    }
}

fn churn(workers: usize, secs: f64) -> Result<()> {
    let (listener, addr) = listener()?;
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut byte = [0u8; 1];
            if stream.read_exact(&mut byte).is_ok() && stream.write_all(&byte).is_ok() {
                // Wait for the client's close, so that the client side holds TIME_WAIT.
                let _ = stream.read(&mut byte);
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..workers)
        .map(|_| {
            let (stop, ops) = (stop.clone(), ops.clone());
            thread::spawn(move || {
                let mut done = 0;
                let mut byte = [1u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = TcpStream::connect(addr) else {
                        continue;
                    };
                    if stream.write_all(&byte).is_ok() && stream.read_exact(&mut byte).is_ok() {
                        done += 1;
                    }
                }
                ops.fetch_add(done, Ordering::Relaxed);
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for client in clients {
        client.join().expect("client thread");
    }
    report(ops.load(Ordering::Relaxed), elapsed);
    Ok(())
}

/// Sends 32-byte datagrams for `secs` to a collector thread that reads them and never
/// answers; ops are datagrams sent (a full receive buffer drops some: they still cost a
/// send).
fn udp(secs: f64, connected: bool) -> Result<()> {
    let collector = UdpSocket::bind("127.0.0.1:0").context("binding the collector")?;
    let to = collector.local_addr()?;
    collector.set_read_timeout(Some(Duration::from_millis(100)))?;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !done.load(Ordering::Relaxed) {
                let _ = collector.recv(&mut buf);
            }
        })
    };
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    if connected {
        sender.connect(to)?;
    }
    let line = *b"app.requests.count:1|c|#env:dev
";
    const BATCH: u64 = 1024;
    let mut ops = 0;
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < secs {
        for _ in 0..BATCH {
            if connected {
                sender.send(&line)?;
            } else {
                sender.send_to(&line, to)?;
            }
        }
        ops += BATCH;
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    reader.join().expect("collector thread");
    report(ops, elapsed);
    Ok(())
}

fn fileio(secs: f64) -> Result<()> {
    let path = std::env::temp_dir().join(format!("stalltrace-fileio-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    const BATCH: u64 = 1024;
    let block = [7u8; 64];
    let mut buf = [0u8; 64];
    let mut ops = 0;
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < secs {
        file.rewind()?;
        for _ in 0..BATCH {
            file.write_all(&block)?;
        }
        file.rewind()?;
        for _ in 0..BATCH {
            file.read_exact(&mut buf)?;
        }
        ops += 2 * BATCH;
    }
    let elapsed = started.elapsed();
    std::fs::remove_file(&path)?;
    report(ops, elapsed);
    Ok(())
}

/// Each connection costs two descriptors (both ends are local). The hard open-file limit may
/// not be raisable (no CAP_SYS_RESOURCE in some sandboxes), so the connections are spread over
/// worker processes that each stay under it.
fn idle(conns: usize, stalled: bool) -> Result<()> {
    let per_worker = (open_file_limit()?.saturating_sub(128) / 2).max(1) as usize;
    let workers = conns.div_ceil(per_worker);
    let started = Instant::now();
    let mut children = Vec::new();
    let mut remaining = conns;
    for _ in 0..workers {
        let share = remaining.min(per_worker);
        remaining -= share;
        let mut worker = std::process::Command::new(std::env::current_exe()?);
        worker.args(["idle-worker", "--conns", &share.to_string()]);
        if stalled {
            worker.arg("--stalled");
        }
        children.push(
            worker
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()?,
        );
    }
    for child in &mut children {
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut ready,
        )?;
        anyhow::ensure!(ready.trim() == "ready", "an idle worker failed");
    }
    eprintln!(
        "opened {conns} connections in {workers} processes in {:?}",
        started.elapsed()
    );
    println!("ready");
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    for mut child in children {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    Ok(())
}

fn idle_worker(conns: usize, stalled: bool) -> Result<()> {
    let (listener, addr) = listener()?;
    let mut held = Vec::with_capacity(2 * conns);
    // Connect and accept in lockstep: the accept queue never overflows (an overflowing queue
    // drops SYNs, and each costs a 1 s retransmit).
    for i in 0..conns {
        let mut client =
            TcpStream::connect(addr).with_context(|| format!("connection {i} of {conns}"))?;
        let (mut server, _) = listener.accept()?;
        if stalled {
            client.write_all(b"GET /never/answered HTTP/1.1\r\nHost: bench\r\n\r\n")?;
            let mut request = [0u8; 64];
            let _ = server.read(&mut request)?;
        }
        held.push(client);
        held.push(server);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(held);
    Ok(())
}

/// Raises the soft open-file limit to the hard one and returns it.
fn open_file_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer / rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            anyhow::bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            anyhow::bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_max)
}
