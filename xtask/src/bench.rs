//! `cargo xtask bench`: overhead of stalltrace on real workloads, measured as ratios.
//!
//! Absolute throughput on a shared 2-core machine drifts from minute to minute; ratios between
//! neighbouring runs hold. So every workload runs untraced and traced alternately within one
//! invocation (A B A B …, or A B C … with the bpftrace peer), and the report gives the per-round
//! ratio traced/untraced with its min / median / max. Results go to a table on stdout and to
//! target/bench/latest.json (plus a timestamped copy).
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{setup, workspace_root};

// openssl makes the TLS workload's certificate; nghttp2-client has h2load, the HTTP/2 load.
const BENCH_PACKAGES: &[&str] = &["nginx", "wrk", "bpftrace", "openssl", "nghttp2-client"];
const NGINX_PORT: u16 = 18_080;
/// The same file over TLS (a self-signed certificate), and over cleartext HTTP/2 (h2c).
const NGINX_TLS_PORT: u16 = 18_443;
const NGINX_H2C_PORT: u16 = 18_082;

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Rounds per workload (each round runs every variant once).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Connections for the idle-connection scale test.
    #[arg(long, default_value_t = 100_000)]
    idle_conns: usize,
    /// One short round of everything, to check that the harness works (used by CI).
    #[arg(long)]
    smoke: bool,
    /// Run only these parts (comma-separated): pingpong1, pingpong32, unix1, unix32, udp32,
    /// nginx, nginxtls, h2c, churn, fileio, udp, paced, idle, stalls, programs, unixprograms,
    /// micro.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// One way to run a workload.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Untraced,
    /// Untraced again: its ratio to the first untraced run is the machine's noise floor.
    Control,
    Stalltrace,
    /// With request capture off (`--capture-bytes 0`).
    StalltraceNoCapture,
    Bpftrace,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Control => "untraced again (noise)",
            Self::Stalltrace => "stalltrace",
            Self::StalltraceNoCapture => "stalltrace, no capture",
            Self::Bpftrace => "bpftrace",
        }
    }
}

/// What a workload run measured.
#[derive(Clone, Debug, Default)]
struct RunResult {
    ops_per_sec: f64,
    /// Tracer metrics (absent untraced).
    tracer: Option<TracerMetrics>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct TracerMetrics {
    cpu_secs: f64,
    cpu_share_of_one_core: f64,
    peak_rss_mib: f64,
    events_per_sec: f64,
    lost: u64,
}

struct Paths {
    stalltrace: PathBuf,
    loadgen: PathBuf,
    out: PathBuf,
}

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    let args = if args.smoke {
        BenchArgs {
            rounds: 1,
            secs: 0.5,
            idle_conns: 2_000,
            smoke: true,
            only: args.only,
        }
    } else {
        args
    };
    setup::run()?;
    setup::require_root("the benchmark (it loads eBPF programs and raises fd limits)")?;
    setup::install_packages(BENCH_PACKAGES)?;
    progress("building release binaries");
    setup::run_checked(crate::cargo().args([
        "build",
        "--release",
        "--package",
        "stalltrace",
        "--package",
        "xtask",
        "--bin",
        "stalltrace",
        "--bin",
        "stalltrace-loadgen",
    ]))?;
    let root = workspace_root();
    let paths = Paths {
        stalltrace: root.join("target/release/stalltrace"),
        loadgen: root.join("target/release/stalltrace-loadgen"),
        out: root.join("target/bench"),
    };
    fs::create_dir_all(&paths.out)?;
    let wanted = |part: &str| args.only.is_empty() || args.only.iter().any(|o| o == part);
    // Only its workloads need nginx (and its CPU and sockets are not there for the others).
    let nginx = ["nginx", "nginxtls", "h2c"]
        .into_iter()
        .any(wanted)
        .then(|| Nginx::start(&paths.out))
        .transpose()?;

    let secs = args.secs.to_string();
    let pingpong = |conns: &str| loadgen(&paths, &["pingpong", "--conns", conns, "--secs", &secs]);
    let unix_pingpong = |conns: &str| {
        loadgen(
            &paths,
            &["pingpong", "--unix", "--conns", conns, "--secs", &secs],
        )
    };
    // (part, name, command, also run with the bpftrace peer and an untraced control)
    let workloads: Vec<(&str, &str, Vec<String>, bool)> = vec![
        ("pingpong1", "ping-pong, 1 connection", pingpong("1"), false),
        (
            "pingpong32",
            "ping-pong, 32 connections",
            pingpong("32"),
            true,
        ),
        (
            "unix1",
            "ping-pong over Unix sockets, 1 connection",
            unix_pingpong("1"),
            false,
        ),
        (
            "unix32",
            "ping-pong over Unix sockets, 32 connections",
            unix_pingpong("32"),
            false,
        ),
        (
            "udp32",
            "UDP request/response, 32 socket pairs",
            loadgen(
                &paths,
                &["pingpong", "--udp", "--conns", "32", "--secs", &secs],
            ),
            false,
        ),
        (
            "nginx",
            "nginx + wrk, 64 connections",
            wrk(
                args.secs,
                &format!("http://127.0.0.1:{NGINX_PORT}/index.html"),
            ),
            true,
        ),
        (
            "nginxtls",
            "TLS 1.3: nginx + wrk, 64 connections",
            wrk(
                args.secs,
                &format!("https://127.0.0.1:{NGINX_TLS_PORT}/index.html"),
            ),
            false,
        ),
        (
            "h2c",
            "HTTP/2 (h2c): nginx + h2load, 16 connections x 8 streams",
            h2load(args.secs),
            false,
        ),
        (
            "churn",
            "connection churn",
            loadgen(&paths, &["churn", "--secs", &secs]),
            false,
        ),
        (
            "fileio",
            "file I/O, 64-byte reads/writes",
            loadgen(&paths, &["fileio", "--secs", &secs]),
            false,
        ),
        (
            "udp",
            "one-way UDP, sendto",
            loadgen(&paths, &["udp", "--secs", &secs]),
            false,
        ),
        (
            "udp",
            "one-way UDP, connected",
            loadgen(&paths, &["udp", "--connected", "--secs", &secs]),
            false,
        ),
    ];
    let mut results = Vec::new();
    for (part, name, command, with_bpftrace) in &workloads {
        if !wanted(part) {
            continue;
        }
        let mut variants = vec![Variant::Untraced, Variant::Stalltrace];
        if *with_bpftrace {
            variants.extend([
                Variant::StalltraceNoCapture,
                Variant::Bpftrace,
                Variant::Control,
            ]);
        }
        results.push(section(name, &|| {
            compare(&paths, name, command, &variants, args.rounds)
        }));
    }
    let run = |part: &str, part_fn: &dyn Fn() -> Result<Value>| {
        if wanted(part) {
            section(part, part_fn)
        } else {
            json!({"skipped": true})
        }
    };
    let paced = run("paced", &|| {
        paced_cpu(&paths, if args.smoke { 0.5 } else { 5.0 })
    });
    let scale = run("idle", &|| idle_scale(&paths, args.idle_conns));
    let stall_sizes: &[usize] = if args.smoke {
        &[500]
    } else {
        &[500, 3_000, 10_000]
    };
    let stalls = run("stalls", &|| mass_stalls(&paths, stall_sizes, args.smoke));
    let programs = run("programs", &|| {
        program_cost(
            &paths,
            &loadgen(&paths, &["pingpong", "--conns", "32", "--secs", &secs]),
        )
    });
    // What tracking adds to each send and receive over Unix stream sockets.
    let programs_unix = run("unixprograms", &|| {
        program_cost(
            &paths,
            &loadgen(
                &paths,
                &["pingpong", "--conns", "32", "--secs", &secs, "--unix"],
            ),
        )
    });
    // The per-datagram cost of a one-way sender (statsd): the send, and the collector's
    // receive, each run the data transfer programs.
    let programs_udp = run("udp", &|| {
        program_cost(&paths, &loadgen(&paths, &["udp", "--secs", &secs]))
    });
    let micro = run("micro", &microbenchmark);
    drop(nginx);
    let failed = [
        &paced,
        &scale,
        &stalls,
        &programs,
        &programs_unix,
        &programs_udp,
        &micro,
    ]
    .into_iter()
    .chain(&results)
    .filter(|v| v.get("error").is_some())
    .count();

    let mut report = json!({
        "machine": machine(),
        "rounds": args.rounds,
        "secs_per_run": args.secs,
        "workloads": results,
        "paced_20k_rps": paced,
        "idle_scale": scale,
        "mass_stalls": stalls,
        "program_cost": programs,
        "program_cost_unix": programs_unix,
        "program_cost_udp": programs_udp,
        "userspace_microbenchmark": micro,
    });
    report["targets"] = targets(&report);
    print_report(&report);
    let text = serde_json::to_string_pretty(&report)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    fs::write(paths.out.join("latest.json"), &text)?;
    fs::write(paths.out.join(format!("bench-{stamp}.json")), &text)?;
    println!(
        "results written to {}",
        paths.out.join("latest.json").display()
    );
    if failed > 0 {
        bail!("{failed} part(s) of the benchmark failed (see \"error\" in the report)");
    }
    Ok(())
}

/// Runs one part of the benchmark; a failure is recorded in the report, and the rest runs.
fn section(name: &str, part: &dyn Fn() -> Result<Value>) -> Value {
    part().unwrap_or_else(|err| {
        eprintln!("xtask bench: {name} failed: {err:#}");
        json!({"workload": name, "error": format!("{err:#}")})
    })
}

fn progress(what: &str) {
    println!("xtask bench: {what}");
    let _ = std::io::stdout().flush();
}

fn loadgen(paths: &Paths, args: &[&str]) -> Vec<String> {
    std::iter::once(paths.loadgen.display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect()
}

fn wrk(secs: f64, url: &str) -> Vec<String> {
    let duration = format!("{}s", secs.ceil().max(1.0) as u64);
    ["wrk", "-t1", "-c64", "-d", &duration, url]
        .iter()
        .map(|a| a.to_string())
        .collect()
}

/// h2load with prior knowledge of h2c: 16 connections, 8 concurrent streams each.
fn h2load(secs: f64) -> Vec<String> {
    let duration = format!("{}", secs.ceil().max(1.0) as u64);
    [
        "h2load",
        "-c16",
        "-m8",
        "-D",
        &duration,
        &format!("http://127.0.0.1:{NGINX_H2C_PORT}/index.html"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// Runs `command` once and returns operations per second.
fn run_workload(command: &[String]) -> Result<f64> {
    let out = Command::new(&command[0])
        .args(&command[1..])
        .output()
        .with_context(|| format!("running {}", command[0]))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if command[0] == "wrk" {
        let line = stdout
            .lines()
            .find(|l| l.starts_with("Requests/sec:"))
            .with_context(|| format!("no Requests/sec in wrk output: {stdout}"))?;
        return line["Requests/sec:".len()..]
            .trim()
            .parse()
            .context("parsing wrk's Requests/sec");
    }
    if command[0] == "h2load" {
        // "finished in 3.00s, 41234.50 req/s, 5.21MB/s"
        let line = stdout
            .lines()
            .find(|l| l.starts_with("finished in"))
            .with_context(|| format!("no result line in h2load output: {stdout}"))?;
        return line
            .split(", ")
            .find_map(|part| part.strip_suffix(" req/s"))
            .context("no req/s in h2load's result line")?
            .parse()
            .context("parsing h2load's req/s");
    }
    let result: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("loadgen printed {stdout:?}"))?;
    Ok(result["ops"].as_f64().unwrap_or(0.0) / result["secs"].as_f64().unwrap_or(1.0))
}

fn compare(
    paths: &Paths,
    name: &str,
    command: &[String],
    variants: &[Variant],
    rounds: usize,
) -> Result<Value> {
    let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); variants.len()];
    for round in 1..=rounds {
        for (i, &variant) in variants.iter().enumerate() {
            progress(&format!(
                "{name}: round {round}/{rounds}, {}",
                variant.name()
            ));
            let result = match variant {
                Variant::Untraced | Variant::Control => RunResult {
                    ops_per_sec: run_workload(command)?,
                    tracer: None,
                },
                Variant::Stalltrace | Variant::StalltraceNoCapture => {
                    let args: &[&str] = if variant == Variant::Stalltrace {
                        &[]
                    } else {
                        &["--capture-bytes", "0"]
                    };
                    let daemon = Daemon::start(paths, args)?;
                    let before = daemon.sample()?;
                    let started = Instant::now();
                    let ops_per_sec = run_workload(command)?;
                    let metrics = daemon.metrics_since(&before, started.elapsed())?;
                    daemon.stop()?;
                    RunResult {
                        ops_per_sec,
                        tracer: Some(metrics),
                    }
                }
                Variant::Bpftrace => {
                    let tracer = Bpftrace::start(&paths.out)?;
                    let before = cpu_secs(tracer.pid());
                    let started = Instant::now();
                    let ops_per_sec = run_workload(command)?;
                    let cpu = cpu_secs(tracer.pid()) - before;
                    let elapsed = started.elapsed().as_secs_f64();
                    RunResult {
                        ops_per_sec,
                        tracer: Some(TracerMetrics {
                            cpu_secs: cpu,
                            cpu_share_of_one_core: cpu / elapsed,
                            peak_rss_mib: peak_rss_mib(tracer.pid()),
                            ..TracerMetrics::default()
                        }),
                    }
                }
            };
            runs[i].push(result);
        }
    }
    let untraced: Vec<f64> = runs[0].iter().map(|r| r.ops_per_sec).collect();
    let mut variant_reports = Vec::new();
    for (i, &variant) in variants.iter().enumerate() {
        let ops: Vec<f64> = runs[i].iter().map(|r| r.ops_per_sec).collect();
        let ratios: Vec<f64> = ops.iter().zip(&untraced).map(|(t, u)| t / u).collect();
        let tracer: Vec<&TracerMetrics> =
            runs[i].iter().filter_map(|r| r.tracer.as_ref()).collect();
        variant_reports.push(json!({
            "variant": variant.name(),
            "ops_per_sec": summary(&ops),
            "ratio": summary(&ratios),
            "ratios": ratios,
            "tracer": (!tracer.is_empty()).then(|| json!({
                "cpu_share_of_one_core": summary(&tracer.iter().map(|t| t.cpu_share_of_one_core).collect::<Vec<_>>()),
                "peak_rss_mib": tracer.iter().map(|t| t.peak_rss_mib).fold(0.0, f64::max),
                "events_per_sec": summary(&tracer.iter().map(|t| t.events_per_sec).collect::<Vec<_>>()),
                "lost": tracer.iter().map(|t| t.lost).sum::<u64>(),
            })),
        }));
    }
    Ok(json!({"workload": name, "variants": variant_reports}))
}

/// min / median / max.
fn summary(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    };
    json!({
        "min": sorted.first().copied().unwrap_or(0.0),
        "median": median,
        "max": sorted.last().copied().unwrap_or(0.0),
    })
}

/// A release daemon writing events to a file, as in production.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

#[derive(Clone)]
struct DaemonSample {
    cpu_secs: f64,
    events: u64,
    lost: u64,
}

impl Daemon {
    fn start(paths: &Paths, extra: &[&str]) -> Result<Self> {
        let socket = paths.out.join("stalltrace.sock");
        let child = Command::new(&paths.stalltrace)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--events-file")
            .arg(paths.out.join("events.ndjson"))
            .args(["--log-level", "warn"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .context("starting the daemon")?;
        let daemon = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while daemon.status().is_err() {
            if Instant::now() > deadline {
                bail!("the daemon did not start answering");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status(&self) -> Result<Value> {
        let out = Command::new(
            self.socket
                .parent()
                .and_then(Path::parent)
                .map(|target| target.join("release/stalltrace"))
                .context("daemon path")?,
        )
        .args(["status", "-o", "json", "--socket"])
        .arg(&self.socket)
        .output()?;
        if !out.status.success() {
            bail!("status failed");
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn sample(&self) -> Result<DaemonSample> {
        let status = self.status()?;
        Ok(DaemonSample {
            cpu_secs: cpu_secs(self.pid()),
            events: status["events"]["kernel"].as_u64().unwrap_or(0),
            lost: status["lost_total"].as_u64().unwrap_or(0),
        })
    }

    fn metrics_since(&self, before: &DaemonSample, elapsed: Duration) -> Result<TracerMetrics> {
        // Let the daemon drain what the workload left in the ring buffer before sampling.
        thread::sleep(Duration::from_millis(200));
        let after = self.sample()?;
        let cpu = after.cpu_secs - before.cpu_secs;
        let secs = elapsed.as_secs_f64();
        Ok(TracerMetrics {
            cpu_secs: cpu,
            cpu_share_of_one_core: cpu / secs,
            peak_rss_mib: peak_rss_mib(self.pid()),
            events_per_sec: (after.events - before.events) as f64 / secs,
            lost: after.lost - before.lost,
        })
    }

    fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the daemon exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time of all of a process's threads, from /proc/<pid>/task/*/schedstat (ns precision).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

/// Peak resident set size (VmHWM) in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

fn current_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A kB field of /proc/<pid>/status, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// nginx serving a small file on loopback, configured by the harness.
struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(out: &Path) -> Result<Self> {
        let prefix = out.join("nginx");
        let www = prefix.join("www");
        fs::create_dir_all(&www)?;
        fs::write(
            www.join("index.html"),
            "<html><body>stalltrace bench</body></html>\n",
        )?;
        let (cert, key) = (prefix.join("cert.pem"), prefix.join("key.pem"));
        if !cert.exists() || !key.exists() {
            let made = Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=localhost", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .context("running openssl for the TLS workload's certificate")?;
            if !made.status.success() {
                bail!(
                    "openssl could not make a certificate: {}",
                    String::from_utf8_lossy(&made.stderr)
                );
            }
        }
        let conf = prefix.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 1;\ndaemon off;\npid {prefix}/nginx.pid;\n\
                 error_log {prefix}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 10000000;\n  \
                 keepalive_timeout 300s;\n  root {www};\n  \
                 server {{ listen 127.0.0.1:{NGINX_PORT}; }}\n  \
                 server {{ listen 127.0.0.1:{NGINX_H2C_PORT} http2; }}\n  \
                 server {{\n    listen 127.0.0.1:{NGINX_TLS_PORT} ssl;\n    \
                 ssl_certificate {cert};\n    ssl_certificate_key {key};\n  }}\n}}\n",
                prefix = prefix.display(),
                www = www.display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )?;
        progress("starting nginx");
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&prefix)
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", NGINX_PORT)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nginx did not start listening on port {NGINX_PORT} (see {}/error.log)",
                    prefix.display()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: graceful stop of master and workers.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
    }
}

/// The bpftrace peer: per-connection tracking as a bpftrace user would write it, a map keyed
/// by (pid, fd) updated on every read and write.
struct Bpftrace {
    child: Child,
}

const BPFTRACE_SCRIPT: &str = r#"
tracepoint:syscalls:sys_enter_write, tracepoint:syscalls:sys_enter_writev,
tracepoint:syscalls:sys_enter_sendto, tracepoint:syscalls:sys_enter_sendmsg
{ @sends[pid, args->fd] = count(); @last_send[pid, args->fd] = nsecs; }
tracepoint:syscalls:sys_enter_read, tracepoint:syscalls:sys_enter_readv,
tracepoint:syscalls:sys_enter_recvfrom, tracepoint:syscalls:sys_enter_recvmsg
{ @recvs[pid, args->fd] = count(); @last_recv[pid, args->fd] = nsecs; }
tracepoint:syscalls:sys_enter_close
{ delete(@sends[pid, args->fd]); delete(@last_send[pid, args->fd]);
  delete(@recvs[pid, args->fd]); delete(@last_recv[pid, args->fd]); }
"#;

/// A program that does nothing, on the hook of the send programs: the BPF statistics' floor.
const EMPTY_PROGRAM: &str = "tracepoint:sock:sock_send_length {}\n";

impl Bpftrace {
    fn start(out: &Path) -> Result<Self> {
        Self::start_script(out, "conntrack.bt", BPFTRACE_SCRIPT)
    }

    fn start_script(out: &Path, name: &str, text: &str) -> Result<Self> {
        let script = out.join(name);
        fs::write(&script, text)?;
        let mut child = Command::new("bpftrace")
            .arg(&script)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace")?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        // "Attaching N probes..." comes once everything is attached.
        match lines.next() {
            Some(Ok(line)) if line.starts_with("Attaching") => {}
            other => bail!("bpftrace did not start: {other:?}"),
        }
        thread::spawn(move || lines.for_each(drop));
        thread::sleep(Duration::from_millis(300));
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The average run time (ns) of its programs that ran, from the kernel's statistics in
    /// the `fdinfo` of its program descriptors; `None` if none ran or statistics are off.
    fn program_avg_ns(&self) -> Option<u64> {
        let (mut runs, mut ns) = (0u64, 0u64);
        for entry in fs::read_dir(format!("/proc/{}/fdinfo", self.pid())).ok()? {
            let Ok(text) = fs::read_to_string(entry.ok()?.path()) else {
                continue;
            };
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            };
            if let (Some(cnt), Some(time)) = (field("run_cnt:"), field("run_time_ns:")) {
                runs += cnt;
                ns += time;
            }
        }
        ns.checked_div(runs)
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        // SIGINT makes bpftrace print its maps and exit; output goes nowhere.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// Daemon CPU while ping-pong is paced to 20 000 requests/s over 32 connections.
fn paced_cpu(paths: &Paths, secs: f64) -> Result<Value> {
    progress("daemon CPU at 20 000 requests/s");
    let command = loadgen(
        paths,
        &[
            "pingpong",
            "--conns",
            "32",
            "--rate",
            "20000",
            "--secs",
            &secs.to_string(),
        ],
    );
    let daemon = Daemon::start(paths, &[])?;
    let before = daemon.sample()?;
    let started = Instant::now();
    let ops_per_sec = run_workload(&command)?;
    let metrics = daemon.metrics_since(&before, started.elapsed())?;
    daemon.stop()?;
    Ok(json!({"requests_per_sec": ops_per_sec, "daemon": metrics}))
}

/// Starts `stalltrace-loadgen WORKLOAD --conns N` (idle or stalled connections), and waits
/// until it holds them all; they are held until its stdin closes.
fn hold_connections(paths: &Paths, workload: &str, conns: usize) -> Result<Child> {
    let mut load = Command::new(&paths.loadgen)
        .args([workload, "--conns", &conns.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting the {workload}-connection generator"))?;
    let mut ready = String::new();
    BufReader::new(load.stdout.take().expect("piped")).read_line(&mut ready)?;
    if ready.trim() != "ready" {
        let _ = load.kill();
        bail!("the {workload}-connection generator failed (fd limits?)");
    }
    Ok(load)
}

/// Many idle connections opened in a burst: how long the daemon's loop is blocked meanwhile,
/// how soon connections whose events the burst lost are recovered, daemon memory, how long
/// sweeps take, and a full `conns` answer (its time, and the daemon's memory peak during it).
fn idle_scale(paths: &Paths, conns: usize) -> Result<Value> {
    progress(&format!("{conns} idle connections"));
    let daemon = Daemon::start(paths, &[])?;
    let started = Instant::now();
    let mut idle = hold_connections(paths, "idle", conns)?;
    let opened_in = started.elapsed();
    let burst_end = Instant::now();
    // Until the daemon tracks them all (or stops gaining for 5 s: events lost for good), noting
    // when the kernel's ring-buffer loss last grew.
    let deadline = burst_end + Duration::from_secs(60);
    // Both ends of each (the API's own connections come and go).
    let expected = 2 * conns as u64;
    let mut last_loss = (0, burst_end);
    let mut gained = (0, burst_end);
    let recovered_at = loop {
        let status = daemon.status()?;
        let now = Instant::now();
        let tracked = status["connections"]["tracked"].as_u64().unwrap_or(0);
        let lost = status["lost"]["kernel_ringbuf_full"].as_u64().unwrap_or(0);
        if lost != last_loss.0 {
            last_loss = (lost, now);
        }
        if tracked != gained.0 {
            gained = (tracked, now);
        }
        if tracked >= expected {
            break Some(now);
        }
        if now > deadline || now.duration_since(gained.1) > Duration::from_secs(5) {
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    // Then until sweeps have gone idle.
    thread::sleep(Duration::from_secs(2));
    let settled = daemon.status()?;
    let rss = current_rss_mib(daemon.pid());
    // The peak of the query alone: VmHWM restarts from the current RSS.
    let peak_reset = fs::write(format!("/proc/{}/clear_refs", daemon.pid()), "5").is_ok();
    let query_started = Instant::now();
    let conns_query = Command::new(&paths.stalltrace)
        .args(["conns", "-o", "json", "--socket"])
        .arg(&daemon.socket)
        .stdout(Stdio::null())
        .status()?;
    let conns_query_ms = query_started.elapsed().as_millis() as u64;
    let query_peak = peak_reset.then(|| peak_rss_mib(daemon.pid()));
    // The daemon's side alone: the raw answer read as fast as it comes.
    let api_answer = raw_answer(&daemon.socket, "{\"version\":1,\"command\":\"conns\"}")?;
    let during_query = daemon.status()?;
    thread::sleep(Duration::from_millis(500));
    let rss_after_query = current_rss_mib(daemon.pid());
    drop(idle.stdin.take());
    let _ = idle.wait();
    daemon.stop()?;
    let since_burst = |at: Instant| at.duration_since(burst_end).as_millis() as u64;
    let lost = last_loss.0;
    Ok(json!({
        "connections": conns,
        "tracked": settled["connections"]["tracked"],
        "opened_in_ms": opened_in.as_millis() as u64,
        "daemon_rss_mib": rss,
        "daemon_rss_after_conns_query_mib": rss_after_query,
        "daemon_peak_rss_during_conns_query_mib": query_peak,
        "sweep_avg_us": settled["sweeps"]["avg_us"],
        "sweep_max_us": settled["sweeps"]["max_us"],
        // The daemon started just before the burst: its longest turn is the burst's.
        "loop_max_blocked_us": settled["loop"]["max_blocked_us"],
        "loop_max_blocked_in": settled["loop"]["max_blocked_in"],
        "loop_max_blocked_cpu_us": settled["loop"]["max_blocked_cpu_us"],
        "resync": settled["resync"],
        "loop_max_blocked_during_conns_query_us":
            during_query["loop"]["since_last_status"]["max_blocked_us"],
        "watched_after_settling": settled["connections"]["watched"],
        "ringbuf_lost": lost,
        // From the last growth of the loss seen (100 ms polls) to every connection tracked.
        "recovered_after_loss_ms": recovered_at
            .filter(|_| lost > 0)
            .map(|at| at.duration_since(last_loss.1).as_millis() as u64),
        "all_tracked_after_burst_ms": recovered_at.map(since_burst),
        "recovered": settled["connections"]["recovered"],
        "lost": settled["lost_total"],
        "conns_query_ms": conns_query_ms,
        "conns_query_ok": conns_query.success(),
        "conns_api_answer_ms": api_answer.0.as_millis() as u64,
        "conns_api_answer_bytes": api_answer.1,
    }))
}

/// Sends one API request line on the daemon's socket and reads the answer to its end: how
/// long that took and its size.
fn raw_answer(socket: &Path, request: &str) -> Result<(Duration, usize)> {
    use std::io::Read as _;
    let started = Instant::now();
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.write_all(request.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match stream.read(&mut buffer)? {
            0 => break,
            n => total += n,
        }
    }
    Ok((started.elapsed(), total))
}

/// The stall threshold of the mass-stall scenario.
const MASS_STALL_AFTER_MS: u64 = 2_000;

/// Thousands of requests stalling at once (each connection stalls on both ends): how long
/// until all are reported and diagnosed, what the daemon costs while they stay open, and how
/// fast `stalls` answers.
fn mass_stalls(paths: &Paths, sizes: &[usize], smoke: bool) -> Result<Value> {
    let mut rows = Vec::new();
    for &conns in sizes {
        let stalls = 2 * conns;
        progress(&format!(
            "{stalls} open stalls ({conns} connections, both ends)"
        ));
        let threshold = format!("{MASS_STALL_AFTER_MS}ms");
        let daemon = Daemon::start(paths, &["--stall-after", &threshold])?;
        let mut load = hold_connections(paths, "stalled", conns)?;
        // The last request went out just now: every stall is due threshold from here.
        let sent = Instant::now();
        let deadline = sent + Duration::from_secs(60);
        let mut status = daemon.status()?;
        let diagnosed_in = loop {
            let open = status["connections"]["stalled"].as_u64().unwrap_or(0);
            let held = status["diagnosis"]["held"].as_u64().unwrap_or(u64::MAX);
            if open >= stalls as u64 && held == 0 {
                break Some(sent.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(100));
            status = daemon.status()?;
        };
        // Steady state: after the first looks at the new stalls (their refreshes back off).
        thread::sleep(Duration::from_secs(if smoke { 0 } else { 5 }));
        let steady = Duration::from_secs(if smoke { 1 } else { 10 });
        let before = daemon.sample()?;
        let started = Instant::now();
        thread::sleep(steady);
        let cpu = daemon.metrics_since(&before, started.elapsed())?;
        let query_started = Instant::now();
        let answer = Command::new(&paths.stalltrace)
            .args(["stalls", "-o", "json", "--socket"])
            .arg(&daemon.socket)
            .output()?;
        let stalls_query_ms = query_started.elapsed().as_millis() as u64;
        let listed = serde_json::from_slice::<Value>(&answer.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len));
        let settled = daemon.status()?;
        let rss = current_rss_mib(daemon.pid());
        drop(load.stdin.take());
        let _ = load.wait();
        daemon.stop()?;
        rows.push(json!({
            "stalls": stalls,
            "stall_after_ms": MASS_STALL_AFTER_MS,
            "all_reported_and_diagnosed_ms": diagnosed_in.map(|d| d.as_millis() as u64),
            "steady_cpu_share_of_one_core": cpu.cpu_share_of_one_core,
            "steady_secs": steady.as_secs(),
            "daemon_rss_mib": rss,
            "stalls_query_ms": stalls_query_ms,
            "stalls_listed": listed,
            "diagnosis": settled["diagnosis"],
            "lost": settled["lost_total"],
        }));
    }
    Ok(json!(rows))
}

/// The mass-stall row for `stalls` open stalls, if it was measured.
fn mass_stall_row(report: &Value, stalls: u64) -> Option<&Value> {
    report["mass_stalls"]
        .as_array()?
        .iter()
        .find(|row| row["stalls"].as_u64() == Some(stalls))
}

/// Per-program cost from the kernel's BPF statistics, on 32-connection ping-pong.
/// Runs `workload` under a daemon with `--bpf-stats`: each program's runs and average time,
/// and `floor_ns`, what the statistics give an empty program on `sock_send_length` in the same
/// run (their own two clock reads: ~55 ns on this project's VM), to be read off the others.
fn program_cost(paths: &Paths, workload: &[String]) -> Result<Value> {
    progress("per-program cost (kernel BPF statistics)");
    let daemon = Daemon::start(paths, &["--bpf-stats"])?;
    let empty = Bpftrace::start_script(&paths.out, "empty.bt", EMPTY_PROGRAM)?;
    run_workload(workload)?;
    let floor_ns = empty.program_avg_ns();
    drop(empty);
    let status = daemon.status()?;
    daemon.stop()?;
    let programs: Vec<Value> = status["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let runs = p["run_count"].as_u64().unwrap_or(0);
            let ns = p["run_time_ns"].as_u64().unwrap_or(0);
            json!({
                "program": p["program"],
                "runs": runs,
                "avg_ns": ns.checked_div(runs).unwrap_or(0),
            })
        })
        .collect();
    Ok(json!({"programs": programs, "floor_ns": floor_ns}))
}

fn microbenchmark() -> Result<Value> {
    progress("userspace microbenchmark (decode + state machine)");
    let out = crate::cargo()
        .args([
            "bench",
            "--quiet",
            "--package",
            "stalltrace",
            "--bench",
            "pipeline",
        ])
        .stderr(Stdio::null())
        .output()
        .context("running the pipeline microbenchmark")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no result line")?;
    Ok(serde_json::from_str(line)?)
}

fn machine() -> Value {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "cpus": thread::available_parallelism().map_or(0, |n| n.get()),
    })
}

/// The ratio median of `variant` on the workload whose name starts with `workload`.
fn median_ratio(report: &Value, workload: &str, variant: &str) -> Option<f64> {
    report["workloads"].as_array()?.iter().find(|w| {
        w["workload"]
            .as_str()
            .is_some_and(|n| n.starts_with(workload))
    })?["variants"]
        .as_array()?
        .iter()
        .find(|v| v["variant"] == variant)?["ratio"]["median"]
        .as_f64()
}

/// The issue's targets against what was measured.
fn targets(report: &Value) -> Value {
    let mut rows = Vec::new();
    let mut row = |target: &str, measured: Option<f64>, shown: String, ok: bool| {
        let met = match measured {
            Some(value) if value.is_finite() => json!(ok),
            _ => Value::Null, // not measured in this run (--only)
        };
        rows.push(json!({"target": target, "measured": measured, "shown": shown, "met": met}));
    };
    for (workload, minimum) in [
        ("ping-pong, 32", 0.97),
        ("nginx", 0.99),
        ("connection churn", 0.95),
        ("file I/O", 0.99),
    ] {
        let ratio = median_ratio(report, workload, "stalltrace");
        row(
            &format!("{workload}: traced/untraced >= {minimum}"),
            ratio,
            ratio.map_or("-".into(), |r| format!("{r:.3}")),
            ratio.is_some_and(|r| r >= minimum),
        );
    }
    for workload in ["ping-pong, 32", "nginx"] {
        let ours = median_ratio(report, workload, "stalltrace").map(|r| 1.0 - r);
        let peer = median_ratio(report, workload, "bpftrace").map(|r| 1.0 - r);
        let both = ours.zip(peer);
        row(
            &format!("{workload}: overhead at most a third of bpftrace's"),
            both.map(|(ours, peer)| peer / ours),
            both.map_or("-".into(), |(ours, peer)| {
                format!("{:.1}% vs {:.1}%", 100.0 * ours, 100.0 * peer)
            }),
            both.is_some_and(|(ours, peer)| 3.0 * ours <= peer),
        );
    }
    // Program time per send/receive, less what the statistics give an empty program; a TCP
    // receive runs the splice reads' check too.
    let cost = &report["program_cost"];
    let floor = cost["floor_ns"].as_u64();
    let net = |name: &str| {
        let avg = cost["programs"]
            .as_array()?
            .iter()
            .find(|p| p["program"] == name)?["avg_ns"]
            .as_u64()?;
        Some(avg.saturating_sub(floor?))
    };
    let receive = net("stalltrace_recv").map(|ns| ns + net("stalltrace_splice_recv").unwrap_or(0));
    let net = net("stalltrace_send")
        .zip(receive)
        .map(|(send, recv)| send.max(recv));
    row(
        "ping-pong, 32: <= 50 ns of program per send/receive",
        net.map(|ns| ns as f64),
        net.map_or("-".into(), |ns| {
            format!("{ns} ns beyond an empty program's")
        }),
        net.is_some_and(|ns| ns <= 50),
    );
    let traced_losses: Vec<u64> = report["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["variants"].as_array().into_iter().flatten())
        .filter(|v| v["variant"] == "stalltrace")
        .map(|v| v["tracer"]["lost"].as_u64().unwrap_or(0))
        .collect();
    // No traced workload ran (--only): nothing was measured, not "0 lost".
    let lost = (!traced_losses.is_empty()).then(|| traced_losses.iter().sum::<u64>());
    row(
        "0 events lost in the workloads",
        lost.map(|l| l as f64),
        lost.map_or("-".into(), |l| l.to_string()),
        lost == Some(0),
    );
    let cpu = report["paced_20k_rps"]["daemon"]["cpu_share_of_one_core"].as_f64();
    row(
        "daemon <= 3% of one core at 20 000 requests/s",
        cpu,
        cpu.map_or("-".into(), |c| format!("{:.2}%", 100.0 * c)),
        cpu.is_some_and(|c| c <= 0.03),
    );
    let rss = report["idle_scale"]["daemon_rss_mib"].as_f64();
    let conns = report["idle_scale"]["connections"]
        .as_u64()
        .map_or("the idle".to_owned(), |c| c.to_string());
    row(
        &format!("daemon <= 64 MiB RSS with {conns} connections tracked"),
        rss,
        rss.map_or("-".into(), |r| format!("{r:.1} MiB")),
        rss.is_some_and(|r| r <= 64.0),
    );
    let scale = &report["idle_scale"];
    let ends = scale["connections"]
        .as_u64()
        .map_or("the idle".to_owned(), |c| (2 * c).to_string());
    let blocked = scale["loop_max_blocked_us"].as_f64().map(|us| us / 1000.0);
    row(
        &format!("burst of {conns} connections: loop never blocked > 100 ms"),
        blocked,
        blocked.map_or("-".into(), |ms| {
            format!(
                "{ms:.1} ms ({})",
                scale["loop_max_blocked_in"].as_str().unwrap_or("?")
            )
        }),
        blocked.is_some_and(|ms| ms <= 100.0),
    );
    // Connections never all tracked are a miss, not "not measured".
    let recovery = match (
        scale["ringbuf_lost"].as_u64(),
        scale["all_tracked_after_burst_ms"].as_f64(),
    ) {
        (None, _) => None,
        (Some(0), Some(_)) => Some(0.0),
        (Some(_), Some(_)) => scale["recovered_after_loss_ms"].as_f64(),
        (Some(_), None) => Some(f64::MAX),
    };
    row(
        &format!("burst of {conns} connections: losses recovered within 1 s"),
        recovery,
        match recovery {
            None => "-".into(),
            Some(ms) if ms == f64::MAX => "not all tracked".into(),
            Some(ms) if scale["ringbuf_lost"] == 0 => format!("none lost ({ms:.0} ms)"),
            Some(ms) => format!("{ms:.0} ms after {} lost", scale["ringbuf_lost"]),
        },
        recovery.is_some_and(|ms| ms <= 1000.0),
    );
    let answer = scale["conns_query_ms"].as_f64();
    row(
        &format!("full `conns -o json` of {ends} items in < 1 s (CLI, end to end)"),
        answer,
        answer.map_or("-".into(), |ms| {
            format!(
                "{ms:.0} ms (the daemon's answer: {} ms)",
                scale["conns_api_answer_ms"]
            )
        }),
        answer.is_some_and(|ms| ms < 1000.0),
    );
    let peak = scale["daemon_peak_rss_during_conns_query_mib"]
        .as_f64()
        .zip(rss)
        .map(|(peak, steady)| peak / steady);
    row(
        "full `conns`: daemon peak RSS <= 2x steady",
        peak,
        peak.map_or("-".into(), |ratio| {
            format!(
                "{ratio:.2}x ({:.1} of {:.1} MiB)",
                scale["daemon_peak_rss_during_conns_query_mib"]
                    .as_f64()
                    .unwrap_or(0.0),
                rss.unwrap_or(0.0)
            )
        }),
        peak.is_some_and(|ratio| ratio <= 2.0),
    );
    let mass = mass_stall_row(report, 6_000);
    let cpu = mass.and_then(|row| row["steady_cpu_share_of_one_core"].as_f64());
    row(
        "6 000 open stalls: daemon <= 5% of one core",
        cpu,
        cpu.map_or("-".into(), |c| format!("{:.2}%", 100.0 * c)),
        cpu.is_some_and(|c| c <= 0.05),
    );
    let answer = mass.and_then(|row| row["stalls_query_ms"].as_f64());
    row(
        "6 000 open stalls: `stalls` answers in < 1 s",
        answer,
        answer.map_or("-".into(), |ms| format!("{ms:.0} ms")),
        answer.is_some_and(|ms| ms < 1000.0),
    );
    let onset = mass.and_then(|row| row["all_reported_and_diagnosed_ms"].as_f64());
    let bound = (MASS_STALL_AFTER_MS + 2_000) as f64;
    row(
        "6 000 stalls: all diagnosed within threshold + 2 s",
        onset,
        onset.map_or("-".into(), |ms| format!("{:.1} s", ms / 1000.0)),
        onset.is_some_and(|ms| ms <= bound),
    );
    let micro = report["userspace_microbenchmark"]["decode_and_track_per_sec"].as_f64();
    row(
        "userspace >= 2 M events/s on one core",
        micro,
        micro.map_or("-".into(), |m| format!("{:.1} M/s", m / 1e6)),
        micro.is_some_and(|m| m >= 2e6),
    );
    json!(rows)
}

fn print_report(report: &Value) {
    print!("{}", render_report(report));
}

/// Why a part has no results: `Some("not measured")` when `--only` left it out, `Some("failed:
/// …")` when it failed; `None` when it has results.
fn unmeasured(part: &Value) -> Option<String> {
    if let Some(error) = part["error"].as_str() {
        return Some(format!("failed: {error}"));
    }
    (part.is_null() || part["skipped"] == true).then(|| "not measured".to_owned())
}

/// The report as a table, in plain words: a part that did not run says so rather than showing
/// zeros, and an absent value is `-`.
/// One line: each program that ran, with its average time per run.
fn render_programs(out: &mut String, title: &str, cost: &Value) {
    use std::fmt::Write as _;
    out.push_str(title);
    match unmeasured(cost) {
        Some(why) => {
            let _ = write!(out, " {why}");
        }
        None => {
            let mut any = false;
            if let Some(floor) = cost["floor_ns"].as_u64() {
                let _ = write!(out, " (an empty program: {floor} ns)");
            }
            for program in cost["programs"].as_array().into_iter().flatten() {
                if program["runs"].as_u64().unwrap_or(0) > 0 {
                    any = true;
                    let _ = write!(
                        out,
                        " {} {} ns",
                        program["program"].as_str().unwrap_or("?"),
                        program["avg_ns"]
                    );
                }
            }
            if !any {
                out.push_str(" no runs counted");
            }
        }
    }
    out.push('\n');
}

fn render_report(report: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("\n");
    let workloads: Vec<&Value> = report["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if workloads.is_empty() {
        out.push_str("workloads: not measured\n");
    } else {
        let _ = writeln!(
            out,
            "{:<32} {:>12} {:>12} {:>22} {:>9} {:>8} {:>11} {:>5}",
            "workload / tracer",
            "ops/s",
            "untraced",
            "ratio min/med/max",
            "CPU",
            "RSS MiB",
            "events/s",
            "lost"
        );
    }
    let number = |value: &Value, precision: usize| {
        value
            .as_f64()
            .map_or("-".to_owned(), |v| format!("{v:.precision$}"))
    };
    for workload in workloads {
        let name = workload["workload"].as_str().unwrap_or("?");
        match unmeasured(workload) {
            Some(why) => {
                let _ = writeln!(out, "{name}: {why}");
                continue;
            }
            None => {
                let _ = writeln!(out, "{name}");
            }
        }
        let untraced = &workload["variants"][0]["ops_per_sec"]["median"];
        for variant in workload["variants"]
            .as_array()
            .into_iter()
            .flatten()
            .skip(1)
        {
            let ratio = &variant["ratio"];
            let tracer = &variant["tracer"];
            let cpu = tracer["cpu_share_of_one_core"]["median"]
                .as_f64()
                .map_or("-".to_owned(), |c| format!("{:.1}%", 100.0 * c));
            let _ = writeln!(
                out,
                "  {:<30} {:>12} {:>12} {:>6} /{:>6} /{:>6} {:>9} {:>8} {:>11} {:>5}",
                variant["variant"].as_str().unwrap_or("?"),
                number(&variant["ops_per_sec"]["median"], 0),
                number(untraced, 0),
                number(&ratio["min"], 3),
                number(&ratio["median"], 3),
                number(&ratio["max"], 3),
                cpu,
                number(&tracer["peak_rss_mib"], 1),
                number(&tracer["events_per_sec"]["median"], 0),
                tracer["lost"]
                    .as_u64()
                    .map_or("-".to_owned(), |n| n.to_string()),
            );
        }
    }
    let paced = &report["paced_20k_rps"];
    let _ = match unmeasured(paced) {
        Some(why) => writeln!(out, "\ndaemon at 20 000 requests/s: {why}"),
        None => writeln!(
            out,
            "\ndaemon at {} requests/s: {} of one core, {} MiB peak RSS, {} lost",
            number(&paced["requests_per_sec"], 0),
            paced["daemon"]["cpu_share_of_one_core"]
                .as_f64()
                .map_or("-".to_owned(), |c| format!("{:.2}%", 100.0 * c)),
            number(&paced["daemon"]["peak_rss_mib"], 1),
            paced["daemon"]["lost"],
        ),
    };
    let scale = &report["idle_scale"];
    let _ = match unmeasured(scale) {
        Some(why) => writeln!(out, "idle connections: {why}"),
        None => writeln!(
            out,
            "{} idle connections opened in {} ms ({} tracked ends): loop blocked {} µs at most \
             ({}, {} µs of it on a CPU); {} ring records lost, all tracked {} ms after the burst ({} recovered); \
             daemon RSS {} MiB ({} after a full `conns` query, peak {} during it), sweep max \
             {} µs (avg {} µs), `conns` query {} ms (the API's answer {} ms), {} lost",
            scale["connections"],
            scale["opened_in_ms"],
            scale["tracked"],
            scale["loop_max_blocked_us"],
            scale["loop_max_blocked_in"].as_str().unwrap_or("?"),
            scale["loop_max_blocked_cpu_us"],
            scale["ringbuf_lost"],
            scale["all_tracked_after_burst_ms"],
            scale["recovered"],
            number(&scale["daemon_rss_mib"], 1),
            number(&scale["daemon_rss_after_conns_query_mib"], 1),
            number(&scale["daemon_peak_rss_during_conns_query_mib"], 1),
            scale["sweep_max_us"],
            scale["sweep_avg_us"],
            scale["conns_query_ms"],
            scale["conns_api_answer_ms"],
            scale["lost"],
        ),
    };
    render_programs(
        &mut out,
        "kernel programs on 32-connection ping-pong:",
        &report["program_cost"],
    );
    render_programs(
        &mut out,
        "kernel programs on 32-connection Unix ping-pong:",
        &report["program_cost_unix"],
    );
    render_programs(
        &mut out,
        "kernel programs on one-way UDP (sendto):",
        &report["program_cost_udp"],
    );
    let micro = &report["userspace_microbenchmark"];
    let per_sec = |value: &Value| {
        value
            .as_f64()
            .map_or("-".to_owned(), |v| format!("{:.2}", v / 1e6))
    };
    let _ = match unmeasured(micro) {
        Some(why) => writeln!(out, "userspace, one core: {why}"),
        None => writeln!(
            out,
            "userspace, one core: {} M records/s decoded and tracked, {} M/s with NDJSON output",
            per_sec(&micro["decode_and_track_per_sec"]),
            per_sec(&micro["with_ndjson_per_sec"]),
        ),
    };
    out.push_str("\ntargets:\n");
    for row in report["targets"].as_array().into_iter().flatten() {
        let (status, shown) = match row["met"].as_bool() {
            Some(true) => ("met", row["shown"].as_str().unwrap_or("?")),
            Some(false) => ("MISS", row["shown"].as_str().unwrap_or("?")),
            None => ("n/a", "not measured"),
        };
        let _ = writeln!(
            out,
            "  {:<4} {:<58} {}",
            status,
            row["target"].as_str().unwrap_or("?"),
            shown,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of `--only fileio`: one workload, every other part skipped.
    fn partial_report() -> Value {
        let mut report = json!({
            "workloads": [{
                "workload": "file I/O, 64-byte reads/writes",
                "variants": [
                    {"variant": "untraced", "ops_per_sec": {"min": 1e6, "median": 1e6, "max": 1e6},
                     "ratio": {"min": 1.0, "median": 1.0, "max": 1.0}, "tracer": null},
                    {"variant": "stalltrace", "ops_per_sec": {"min": 9.9e5, "median": 9.9e5, "max": 9.9e5},
                     "ratio": {"min": 0.99, "median": 0.99, "max": 0.99},
                     "tracer": {"cpu_share_of_one_core": {"median": 0.001}, "peak_rss_mib": 12.0,
                                "events_per_sec": {"median": 0.0}, "lost": 0}}
                ]
            }],
            "paced_20k_rps": {"skipped": true},
            "idle_scale": {"skipped": true},
            "program_cost": {"skipped": true},
            "program_cost_udp": {"skipped": true},
            "program_cost_unix": {"skipped": true},
            "userspace_microbenchmark": {"workload": "micro", "error": "no result line"},
        });
        report["targets"] = targets(&report);
        report
    }

    #[test]
    fn parts_not_run_say_so_instead_of_showing_zeros() {
        let text = render_report(&partial_report());
        assert!(
            text.contains("daemon at 20 000 requests/s: not measured"),
            "{text}"
        );
        assert!(text.contains("idle connections: not measured"), "{text}");
        assert!(
            text.contains("kernel programs on 32-connection ping-pong: not measured"),
            "{text}"
        );
        assert!(
            text.contains("userspace, one core: failed: no result line"),
            "{text}"
        );
        for zero_or_null in [
            "0.00%",
            "null",
            "0.0 MiB",
            "NaN",
            "daemon at 0",
            "with 0 connections",
        ] {
            assert!(!text.contains(zero_or_null), "{zero_or_null}: {text}");
        }
        // What did run is shown.
        assert!(text.contains("file I/O, 64-byte reads/writes\n"), "{text}");
        assert!(text.contains(" 0.990 "), "{text}");
        assert!(
            text.contains("met  file I/O: traced/untraced >= 0.99"),
            "{text}"
        );
        assert!(
            text.contains("n/a  nginx: traced/untraced >= 0.99"),
            "{text}"
        );
        assert!(
            text.lines()
                .filter(|l| l.contains("bpftrace's"))
                .all(|l| l.trim_start().starts_with("n/a") && l.ends_with("not measured")),
            "{text}"
        );
    }

    #[test]
    fn an_empty_run_measures_nothing() {
        let mut report = json!({
            "workloads": [],
            "paced_20k_rps": {"skipped": true},
            "idle_scale": {"skipped": true},
            "program_cost": {"skipped": true},
            "program_cost_udp": {"skipped": true},
            "userspace_microbenchmark": {"skipped": true},
        });
        report["targets"] = targets(&report);
        let text = render_report(&report);
        assert!(text.contains("workloads: not measured"), "{text}");
        assert!(!text.contains("met "), "{text}");
        assert!(!text.contains("ops/s"), "{text}");
    }
}
