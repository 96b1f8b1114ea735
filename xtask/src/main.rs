//! Project tasks: `cargo xtask setup | run | test | package | fuzz | bench | vm-test`.
//!
//! Each task first makes the machine ready, idempotently, saying what it does: Debian packages
//! for the BPF compiler toolchain, the rustup link to it, bpf-linker, and tracefs. A second run
//! finds everything in place and changes nothing.
mod bench;
mod package;
mod setup;
mod vm_test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "stalltrace project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and running stalltrace needs (root for packages and mounts).
    Setup,
    /// Set up, build in release mode, and run the daemon; arguments after `--` go to
    /// `stalltrace daemon` (e.g. `cargo xtask run -- --stall-after 2s`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test: unit tests, and the root integration tests that load the
    /// real eBPF programs. Arguments after `--` go to `cargo test` (e.g. a test name filter).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then build the Debian package (target/debian/stalltrace_VERSION_ARCH.deb) with
    /// cargo-deb: the release binary, the systemd unit, the logrotate snippet, man pages and
    /// shell completions. `cargo xtask test` builds it too, and installs and removes it.
    Package,
    /// Fuzz the parsers of untrusted input (request recognizers, API request decoder, BTF) with
    /// cargo fuzz (a nightly toolchain), all targets within the time given.
    Fuzz {
        /// How long to fuzz, in total (shared by the targets).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Measure stalltrace's overhead on real workloads (release builds, alternating untraced
    /// and traced runs); writes target/bench/latest.json. Needs root.
    Bench(bench::BenchArgs),
    /// The kernel matrix: boot Debian's kernels 5.10, 6.1, 6.12 and 7.x under QEMU and run the
    /// stall and file I/O integration tests inside each, once per hook rung (tracepoint, fentry,
    /// kprobe), plus on this machine's kernel. Downloads the kernels with apt (once); needs
    /// root. Fails if a kernel does not boot or a test fails.
    VmTest(vm_test::VmTestArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Run { args } => run_daemon(&args),
        Task::Test { args } => test(&args),
        Task::Package => package::build().map(|_| ()),
        Task::Bench(args) => bench::run(args),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::VmTest(args) => vm_test::run(args),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// `cargo` with the environment the eBPF build needs.
fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command.env("PATH", setup::path_with_cargo_bin());
    command
}

fn run_daemon(args: &[String]) -> Result<()> {
    setup::run()?;
    setup::require_root("running the daemon (it loads eBPF programs)")?;
    println!("xtask: building stalltrace (release)");
    setup::run_checked(cargo().args(["build", "--release", "--package", "stalltrace"]))?;
    let binary = workspace_root().join("target/release/stalltrace");
    println!(
        "xtask: starting {} daemon {}",
        binary.display(),
        args.join(" ")
    );
    // Replace this process so signals (Ctrl-C, SIGTERM) reach the daemon directly.
    use std::os::unix::process::CommandExt as _;
    let err = Command::new(&binary).arg("daemon").args(args).exec();
    Err(err).with_context(|| format!("executing {}", binary.display()))
}

/// The cargo-fuzz targets (stalltrace-core/fuzz/fuzz_targets), sharing the time budget.
const FUZZ_TARGETS: [(&str, &str); 5] = [
    ("recognizers", "the request recognizers"),
    ("http1", "the HTTP/1.x response framing parser"),
    ("dns", "the DNS query recognizer and the UDP datagram rule"),
    ("api_request", "the API request decoder"),
    ("btf", "the BTF parser"),
];

fn fuzz(seconds: u64) -> Result<()> {
    if !setup::has_nightly() {
        println!(
            "xtask fuzz: skipped: no nightly Rust toolchain (cargo fuzz needs one; the \
             parsers' malformed-input unit tests still run in `cargo xtask test`)"
        );
        return Ok(());
    }
    setup::install_cargo_fuzz()?;
    // Both targets within the budget: build them first (not counted by libFuzzer), then split
    // the seconds.
    let each = (seconds / FUZZ_TARGETS.len() as u64).max(1);
    for (target, what) in FUZZ_TARGETS {
        setup::run_checked(
            setup::rustup()
                .current_dir(workspace_root().join("stalltrace-core"))
                .args(["run", "nightly", "cargo", "fuzz", "build", target]),
        )?;
        println!("xtask fuzz: fuzzing {what} for {each} s");
        let mut run = setup::rustup();
        run.current_dir(workspace_root().join("stalltrace-core"))
            .args(["run", "nightly", "cargo", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={each}"))
            // An input that takes seconds is a hang in a parser of untrusted input: a failure,
            // reported at once (libFuzzer's default waits 20 minutes per input).
            .arg("-timeout=5");
        // A dictionary of the input's tokens, when the target has one.
        let dict = workspace_root().join(format!("stalltrace-core/fuzz/{target}.dict"));
        if dict.exists() {
            run.arg(format!("-dict={}", dict.display()));
        }
        setup::run_checked(&mut run)?;
    }
    Ok(())
}

/// Servers and clients the integration tests run for real (proxies for the blame chains,
/// python3 for an asyncio proxy and for servers owned by another user, php-fpm behind nginx
/// over a Unix socket), the peers of the
/// protocol-verdict tests (socat, openssl, grpcio, websockets, postgresql), the tools of the
/// package and log-shipping tests (a real syslog-ng reading the events file, logrotate rotating
/// it with the packaged snippet, systemd-analyze checking the unit), and prometheus to scrape
/// the daemon's metrics, with promtool to check and unit-test the shipped alerting rules, and
/// iproute2 (`ip netns`) for the network namespace test.
const TEST_PACKAGES: &[&str] = &[
    "nginx",
    "haproxy",
    "php8.2-fpm",
    "python3",
    // unshare (a private resolv.conf for glibc's resolver) and logger (one-way syslog over
    // UDP): essential packages, named for the UDP tests.
    "util-linux",
    "bsdutils",
    "socat",
    "openssl",
    // The HTTP/1.x client of the response framing tests, and the TLS tests' HTTPS client (it
    // links the system's libssl.so.3, as python3's ssl does).
    "curl",
    "python3-grpcio",
    "python3-websockets",
    // D-Bus: a private dbus-daemon, and python3-dbus (with GLib's main loop) for its clients.
    "dbus",
    "python3-dbus",
    "python3-gi",
    "postgresql",
    "syslog-ng-core",
    "logrotate",
    "systemd",
    "prometheus",
    "iproute2",
];

fn test(args: &[String]) -> Result<()> {
    setup::run()?;
    setup::require_root("the integration tests (they load eBPF programs)")?;
    setup::install_packages(TEST_PACKAGES)?;
    // The package tests install it, start the daemon from its unit's ExecStart and remove it.
    let deb = package::build()?;
    println!("xtask: building the daemon for the integration tests");
    setup::run_checked(cargo().args(["build", "--package", "stalltrace"]))?;
    let binary = workspace_root().join("target/debug/stalltrace");
    println!("xtask: running the unit tests and the root integration tests");
    // The whole workspace but the eBPF crate (built for the BPF target by stalltrace's build
    // script): this includes the integration tests, outside the default members.
    setup::run_checked(
        cargo()
            .args([
                "test",
                "--no-fail-fast",
                "--workspace",
                "--exclude",
                "stalltrace-ebpf",
            ])
            .args(args)
            .env("STALLTRACE_BIN", binary)
            .env("STALLTRACE_DEB", deb),
    )
}
