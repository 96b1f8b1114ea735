//! `cargo xtask vm-test`: the kernel matrix. Boots Debian's own kernels under QEMU, with this
//! machine's root filesystem and the workspace (at its own path, which may lie under the
//! guest's fresh /tmp) shared read-only over 9p so the binaries built here run inside
//! unchanged, and runs in each guest, once per hook rung that kernel can use (`--hooks`, passed
//! to the daemon as STALLTRACE_HOOKS), either the root integration tests that cover every stall
//! rule ([`FULL`]) or, for a rung proven in full elsewhere, every core rule against one daemon
//! ([`SMOKE`]): under emulation each daemon start verifies the programs for up to a minute.
//! Two guests run at a time ([`MAX_LANES`]), after the run on this machine's kernel.
//! The full tests run natively on this machine's kernel too (on the syscall rung: its own runs
//! every test in `cargo xtask test`). Any kernel that does not boot, or
//! any test that fails, fails the task: nothing is skipped.
//!
//! Set-up is idempotent like the rest of xtask: QEMU, static busybox, cpio and kmod from apt;
//! the Debian suites that carry the other kernels are added to apt pinned at -1 (their packages
//! are downloaded, never installed); kernel packages are downloaded and extracted once into
//! `/var/cache/stalltrace/vm-test`.
//!
//! Guests run under software emulation (TCG) unless /dev/kvm is real hardware virtualization:
//! a PVM /dev/kvm (nested cloud VMs) boots no stock kernel. `thread=single` TCG: multi-threaded
//! TCG occasionally crashed 6.12 while it patched its own code.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{cargo, setup, workspace_root};

const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
    "zstd",
    "python3",
];
const CACHE: &str = "/var/cache/stalltrace/vm-test";
const APT_SOURCES: &str = "/etc/apt/sources.list.d/stalltrace-vm-test.sources";
const APT_PIN: &str = "/etc/apt/preferences.d/stalltrace-vm-test";
/// Suites added to apt for their kernels (bookworm and bookworm-security are the host's own).
const EXTRA_SUITES: &[&str] = &["bullseye", "trixie", "trixie-backports"];

/// An architecture the guests run. Other than this machine's, it is emulated whole: the
/// binaries are cross-compiled (Debian's cross gcc and its Rust standard library for that
/// architecture, multiarch), and the guest runs on an initramfs of its own (static busybox and
/// the C libraries the binaries need) instead of this machine's root filesystem.
struct Arch {
    /// Debian's name (`dpkg --print-architecture`).
    debian: &'static str,
    /// Rust target to cross-compile for; `None` for this machine's.
    cross: Option<CrossTarget>,
    qemu: &'static str,
    machine: &'static str,
    console: &'static str,
}

struct CrossTarget {
    triple: &'static str,
    /// The linker environment variable cargo reads for the target, and its value.
    linker: (&'static str, &'static str),
    /// Where the cross C libraries are, and those the binaries load.
    libs: &'static str,
    lib_names: &'static [&'static str],
    /// Host packages: the emulator, the cross linker and libc, the Rust standard library.
    packages: &'static [&'static str],
}

const AMD64: Arch = Arch {
    debian: "amd64",
    cross: None,
    qemu: "qemu-system-x86_64",
    machine: "pc",
    console: "ttyS0",
};

const ARM64: Arch = Arch {
    debian: "arm64",
    cross: Some(CrossTarget {
        triple: "aarch64-unknown-linux-gnu",
        linker: (
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        ),
        libs: "/usr/aarch64-linux-gnu/lib",
        lib_names: &[
            "ld-linux-aarch64.so.1",
            "libc.so.6",
            "libm.so.6",
            "libgcc_s.so.1",
        ],
        packages: &[
            "qemu-system-arm",
            "gcc-aarch64-linux-gnu",
            "libc6-dev-arm64-cross",
            "libstd-rust-web-dev:arm64",
        ],
    }),
    qemu: "qemu-system-aarch64",
    machine: "virt",
    console: "ttyAMA0",
};

/// Integration test targets a rung runs in a guest.
///
/// Every stall rule (`stalls`: lifecycle, stall on both ends, idle keep-alive, true duration,
/// adoption, close, connect pending) and file I/O running no program (`file_io`): a daemon
/// start per test.
const FULL: &[&str] = &["stalls", "file_io"];
/// Every core rule against one daemon (`smoke`): for a rung already proven in full on another
/// kernel, where the point is that its programs load and judge (each daemon start verifies the
/// programs for up to a minute under emulation).
const SMOKE: &[&str] = &["smoke"];

/// A hook rung (`--hooks`) and the suites it runs.
struct Rung {
    hooks: &'static str,
    suites: &'static [&'static str],
}

const fn full(hooks: &'static str) -> Rung {
    Rung {
        hooks,
        suites: FULL,
    }
}

const fn smoke(hooks: &'static str) -> Rung {
    Rung {
        hooks,
        suites: SMOKE,
    }
}

/// Every rung the cost measurement tries (`--cost`); one a kernel lacks prints "unavailable".
const COST_RUNGS: &[&str] = &["tracepoint", "fentry", "kprobe", "syscall"];

/// A kernel of the matrix: Debian's `linux-image-ARCH` from one suite, and the rungs it is
/// tested with. Every rung runs in full on at least one kernel and at least once more in full or
/// smoke; `auto` is what probing must pick.
struct Kernel {
    suite: &'static str,
    arch: &'static Arch,
    rungs: &'static [Rung],
    auto: &'static str,
    /// Run only when named with `--kernel` (too slow for CI's budget).
    opt_in: bool,
}

const MATRIX: &[Kernel] = &[
    // The oldest kernel, without the 6.3 socket tracepoints and the 6.5 extras (the per-protocol
    // verdict code is off there): every fallback rung in full, the last-resort syscall rung too.
    Kernel {
        suite: "bullseye",
        arch: &AMD64,
        rungs: &[full("fentry"), full("kprobe"), full("syscall")],
        auto: "fentry",
        opt_in: false,
    },
    // Debian 12's own kernel, the tightest verifier of the matrix (~55 s per daemon start under
    // emulation): the rung it uses, proven in full on 5.10 with the same code switched off, in
    // one daemon here — the programs load with request capture and judge.
    Kernel {
        suite: "bookworm-security",
        arch: &AMD64,
        rungs: &[smoke("fentry")],
        auto: "fentry",
        opt_in: false,
    },
    Kernel {
        suite: "trixie",
        arch: &AMD64,
        rungs: &[full("tracepoint"), smoke("fentry")],
        auto: "tracepoint",
        opt_in: false,
    },
    // A preemptible kernel (PREEMPT_LAZY): an fexit program preempted mid-run makes the
    // kernel skip the same program for other tasks on that CPU (counted as
    // kernel_hook_missed), so a forced fentry can lose a transfer here; auto never picks it
    // on this kernel. fentry is tested where it is used: 5.10, 6.1 and 6.12 (voluntary).
    // The tracepoint rung runs in full on 6.12 and natively; here its daemon starts verify
    // for ~30 s each under emulation (the full suites took 237 s): one daemon.
    Kernel {
        suite: "trixie-backports",
        arch: &AMD64,
        rungs: &[smoke("tracepoint")],
        auto: "tracepoint",
        opt_in: false,
    },
    // arm64: request capture reads other registers there, and fentry has its own trampolines.
    // Each daemon start verifies the programs for ~2 min on emulated arm64: one daemon per rung.
    // Opt-in: cross-building takes ~8 min and the guest ~7 (docs/performance.md).
    Kernel {
        suite: "trixie",
        arch: &ARM64,
        rungs: &[smoke("tracepoint"), smoke("fentry")],
        auto: "tracepoint",
        opt_in: true,
    },
];

impl Kernel {
    /// How `--kernel` names it: the suite, with the architecture when it is not amd64.
    fn name(&self) -> String {
        match self.arch.cross {
            None => self.suite.to_owned(),
            Some(_) => format!("{}-{}", self.suite, self.arch.debian),
        }
    }
}

/// Guest size and limits.
const GUEST_MEMORY: &str = "2G";
const GUEST_CPUS: &str = "2";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// A guest's whole run: 6.12's, the longest, is the stalls suite ([`SUITE_BUDGET`]) and ~3 min
/// of others.
const RUN_TIMEOUT: Duration = Duration::from_secs(1380);

#[derive(clap::Args)]
pub(crate) struct VmTestArgs {
    /// Only these kernels, by Debian suite (bullseye, bookworm-security, trixie,
    /// trixie-backports), or trixie-arm64 for the arm64 one; default: all but arm64 (an
    /// emulated arm64 run takes ~15 min with its cross-build).
    #[arg(long = "kernel", value_name = "SUITE")]
    kernels: Vec<String>,
    /// Skip the run on this machine's own kernel.
    #[arg(long)]
    no_host: bool,
    /// Keep each guest's run directory (console log, output) under the cache.
    #[arg(long)]
    keep: bool,
    /// Measure each rung's per-call cost on every kernel instead of running the tests (amd64
    /// only: a loopback ping-pong untraced, then traced on each rung with BPF statistics on; a
    /// daemon start per rung). The numbers behind docs/performance.md's per-kernel table; not
    /// part of CI.
    #[arg(long)]
    cost: bool,
}

/// One row of the matrix table.
struct Row {
    kernel: String,
    rung: String,
    passed: u32,
    failed: u32,
    secs: f64,
    ok: bool,
}

pub(crate) fn run(args: VmTestArgs) -> Result<()> {
    let started = Instant::now();
    setup::run()?;
    setup::require_root("the kernel matrix (it loads eBPF programs, here and in the guests)")?;
    setup::install_packages(HOST_PACKAGES)?;
    let kernels: Vec<&Kernel> = if args.kernels.is_empty() {
        MATRIX.iter().filter(|k| !k.opt_in).collect()
    } else {
        args.kernels
            .iter()
            .map(|suite| {
                MATRIX.iter().find(|k| k.name() == *suite).with_context(|| {
                    format!(
                        "--kernel {suite}: not in the matrix ({})",
                        MATRIX
                            .iter()
                            .map(Kernel::name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    add_kernel_suites()?;
    // The suites each architecture's runs need, built once.
    let suites = |arch: &Arch| {
        let mut suites: Vec<&'static str> = Vec::new();
        if args.cost {
            return suites;
        }
        if arch.cross.is_none() && !args.no_host {
            suites.extend(HOST_RUNGS.iter().flat_map(|rung| rung.suites));
        }
        for kernel in kernels.iter().filter(|k| k.arch.debian == arch.debian) {
            suites.extend(kernel.rungs.iter().flat_map(|rung| rung.suites));
        }
        suites.sort_unstable();
        suites.dedup();
        suites
    };
    let binaries = build(&AMD64, &suites(&AMD64))?;
    let cross = match kernels.iter().find(|k| k.arch.cross.is_some()) {
        Some(kernel) => {
            enable_arch(kernel.arch)?;
            Some(build(kernel.arch, &suites(kernel.arch))?)
        }
        None => None,
    };
    let mut rows = Vec::new();
    let mut costs = Vec::new();
    if !args.no_host {
        let (host_rows, host_costs) = run_host(&binaries, args.cost)?;
        rows.extend(host_rows);
        costs.extend(host_costs);
    }
    // Downloads and extraction first, one at a time (apt and dpkg-deb); then the guests.
    let prepared = kernels
        .into_iter()
        .map(|kernel| Ok((kernel, prepare(kernel.suite, kernel.arch)?)))
        .collect::<Result<Vec<_>>>()?;
    // Kernels with full rungs take longest (on 6.12, 9 of a lane's 12 minutes): they start
    // first, so that the short smoke runs fill in after them.
    let mut order: Vec<usize> = (0..prepared.len()).collect();
    order.sort_by_key(|&i| {
        let full = prepared[i].0.rungs.iter().filter(|r| r.suites == FULL);
        std::cmp::Reverse(full.count())
    });
    let next = AtomicUsize::new(0);
    let mut done: Vec<_> = thread::scope(|scope| {
        let lanes: Vec<_> = (0..lanes(args.cost))
            .map(|_| {
                scope.spawn(|| {
                    let mut ran = Vec::new();
                    while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let (kernel, extracted) = &prepared[i];
                        let binaries = match kernel.arch.cross {
                            None => &binaries,
                            Some(_) => cross.as_ref().expect("built for the cross kernel above"),
                        };
                        ran.push((
                            i,
                            run_kernel(kernel, extracted, binaries, args.keep, args.cost),
                        ));
                    }
                    ran
                })
            })
            .collect();
        lanes
            .into_iter()
            .flat_map(|lane| lane.join().expect("no lane panics"))
            .collect()
    });
    // The table in the matrix's order, whichever guest finished first.
    done.sort_by_key(|(i, _)| *i);
    for (_, result) in done {
        let (kernel_rows, kernel_costs) = result?;
        rows.extend(kernel_rows);
        costs.extend(kernel_costs);
    }
    let report = report(&rows, &costs, started.elapsed());
    println!("\n{report}");
    let out = workspace_root().join("target/vm-test");
    fs::create_dir_all(&out)?;
    fs::write(out.join("matrix.md"), &report)?;
    println!(
        "xtask vm-test: table written to {}",
        out.join("matrix.md").display()
    );
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{} ({})", r.kernel, r.rung))
        .collect();
    if !failed.is_empty() {
        bail!("the kernel matrix failed on: {}", failed.join(", "));
    }
    Ok(())
}

/// The binaries the guests run, built here (release: emulated CPUs are ~20x slower).
struct Binaries {
    stalltrace: PathBuf,
    /// Integration test executables, by target name.
    tests: Vec<(String, PathBuf)>,
}

fn build(arch: &'static Arch, suites: &[&str]) -> Result<Binaries> {
    println!(
        "xtask vm-test: building the daemon and the integration tests (release, {})",
        arch.debian
    );
    // This machine's rustup toolchain has no standard library for other targets; Debian's
    // (the BPF toolchain) has it for every architecture installed with multiarch.
    let cargo = || match &arch.cross {
        None => cargo(),
        Some(cross) => {
            let mut command = setup::rustup();
            command
                .args(["run", setup::BPF_TOOLCHAIN, "cargo"])
                .current_dir(workspace_root())
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("RUSTC")
                .env(cross.linker.0, cross.linker.1);
            command
        }
    };
    let target: Vec<&str> = arch
        .cross
        .as_ref()
        .map(|cross| vec!["--target", cross.triple])
        .unwrap_or_default();
    setup::run_checked(
        cargo()
            .args(["build", "--release", "--package", "stalltrace"])
            .args(&target),
    )?;
    let out = cargo()
        .args([
            "test",
            "--release",
            "--package",
            "stalltrace-integration",
            "--no-run",
            "--message-format=json",
        ])
        .args(suites.iter().flat_map(|suite| ["--test", *suite]))
        .args(&target)
        .stderr(Stdio::inherit())
        .output()
        .context("building the integration tests")?;
    if !out.status.success() {
        bail!("building the integration tests failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let name = message["target"]["name"].as_str().unwrap_or_default();
        if let (true, Some(executable)) = (suites.contains(&name), message["executable"].as_str()) {
            tests.push((name.to_owned(), PathBuf::from(executable)));
        }
    }
    for suite in suites {
        if !tests.iter().any(|(name, _)| name == suite) {
            bail!("cargo built no integration test named {suite}");
        }
    }
    let out_dir = match &arch.cross {
        None => workspace_root().join("target/release"),
        Some(cross) => workspace_root()
            .join("target")
            .join(cross.triple)
            .join("release"),
    };
    Ok(Binaries {
        stalltrace: out_dir.join("stalltrace"),
        tests,
    })
}

/// The script each guest (and the host run) executes: for each rung, its test suites, with
/// one result line per suite for the host side to parse; then, with `cost`, the per-call cost
/// of every rung (python3: amd64 only).
/// POSIX sh: a guest of another architecture runs it with busybox.
fn test_script(binaries: &Binaries, rungs: &[Rung], cost: bool) -> String {
    let mut script = format!(
        "#!/bin/sh\nset -u\ncd /tmp\nexport STALLTRACE_BIN={}\nST=$STALLTRACE_BIN\n{UPTIME_MS}\
         SUITE_BUDGET_MS={}\n{RUN_SUITE}",
        binaries.stalltrace.display(),
        SUITE_BUDGET.as_millis()
    );
    script.push_str(AUTO_PROBE);
    for Rung {
        hooks: rung,
        suites,
    } in rungs
    {
        for (name, path) in binaries
            .tests
            .iter()
            .filter(|(name, _)| suites.contains(&&**name))
        {
            script.push_str(&format!("run_suite {rung} {name} {}\n", path.display()));
        }
    }
    if cost {
        script.push_str(&format!(
            "python3 - {} <<'EOF'\n{COST_SCRIPT}\nEOF\n",
            COST_RUNGS.join(" ")
        ));
    }
    script
}

/// Milliseconds since boot (busybox's `date` has no `%N`).
const UPTIME_MS: &str = r#"uptime_ms() { read -r up _ < /proc/uptime; echo $(( ${up%.*} * 1000 + 1${up#*.} * 10 - 1000 )); }
"#;

/// How long one suite may run before it is taken for hung: the longest (stalls, 19 tests) took
/// 200–260 s a rung on 5.10 and 730–770 s on 6.12 (every extra on: each daemon start verifies
/// the HTTP/2 walk, ~35 s under emulation) with both lanes busy; on 2026-12-02 the 18th test
/// of 19 was cut at 720 s while its daemon was still loading. A whole guest run is cut at
/// [`RUN_TIMEOUT`].
const SUITE_BUDGET: Duration = Duration::from_secs(1080);

/// `run_suite RUNG NAME PATH`: one test binary in its own session, with its result line. A
/// suite still running after `SUITE_BUDGET_MS` is killed (daemons it started included) after
/// printing what each of its threads is blocked in (state, wait channel, kernel stack) and the
/// kernel log's tail: a hang under emulation is otherwise only "still running after 900 s",
/// and the rungs after it never run.
const RUN_SUITE: &str = r#"run_suite() {
  rung=$1 name=$2
  t0=$(uptime_ms)
  STALLTRACE_HOOKS=$rung setsid "$3" --test-threads=1 2>&1 &
  sid=$!
  while kill -0 $sid 2>/dev/null; do
    if [ $(( $(uptime_ms) - t0 )) -gt $SUITE_BUDGET_MS ]; then
      echo "vm-test: suite $name (rung $rung) still running after $(( SUITE_BUDGET_MS / 1000 )) s; its threads:"
      for t in /proc/[0-9]*/task/[0-9]*; do
        read -r stat < $t/stat 2>/dev/null || continue
        set -- ${stat##*) }
        [ "$4" = $sid ] || continue
        echo "  ${t#/proc/} $(cat $t/comm) state=$1 wchan=$(cat $t/wchan 2>/dev/null)"
        sed 's/^/      /' $t/stack 2>/dev/null
      done
      echo "  kernel log, last lines:"
      dmesg 2>/dev/null | tail -n 30 | sed 's/^/    /'
      kill -9 -$sid 2>/dev/null
      break
    fi
    sleep 1
  done
  wait $sid
  rc=$?
  echo "vm-test: done rung=$rung suite=$name rc=$rc ms=$(( $(uptime_ms) - t0 ))"
}
"#;

/// Starts the daemon with `--hooks auto` and prints the rung it picked (from `status`, without
/// a JSON tool: a guest of another architecture has only busybox).
const AUTO_PROBE: &str = r#"
"$ST" daemon --stall-after 1s --socket /tmp/auto.sock > /dev/null 2> /tmp/auto.err &
pid=$!
rung=none
for _ in $(seq 1 300); do
  kill -0 $pid 2>/dev/null || break
  if "$ST" status -o json --socket /tmp/auto.sock > /tmp/auto.json 2>/dev/null; then
    rung=$(tr -d ' \n' < /tmp/auto.json | sed -n 's/.*"transfers":{[^}]*"rung":"\([a-z]*\)".*/\1/p')
    break
  fi
  sleep 0.2
done
kill -INT $pid 2>/dev/null; wait $pid
sed 's/^/  daemon: /' /tmp/auto.err
echo "vm-test: auto rung=$rung"
"#;

/// Per-call cost of each rung: a loopback ping-pong (64-byte messages, 4 transfers per round)
/// untraced, then traced by a daemon forced to each rung with BPF statistics on. Prints the
/// program time per transfer (kernel run-time statistics: the programs only, both of a kprobe
/// pair) and the ping-pong's time per transfer, untraced and traced (what the hook costs in
/// all: the trampoline or kprobe trap included; best of three runs each).
const COST_SCRIPT: &str = r#"
import json, os, socket, subprocess, sys, time
ST = os.environ["STALLTRACE_BIN"]
ROUNDS = 3000

def pingpong():
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    a = socket.create_connection(srv.getsockname()); b, _ = srv.accept()
    msg = b"x" * 64
    t = time.perf_counter()
    for _ in range(ROUNDS):
        a.sendall(msg); b.recv(64); b.sendall(msg); a.recv(64)
    elapsed = time.perf_counter() - t
    a.close(); b.close(); srv.close()
    return elapsed * 1e9 / (4 * ROUNDS)

base = min(pingpong() for _ in range(3))
for rung in sys.argv[1:]:
    sock = f"/tmp/cost-{rung}.sock"
    d = subprocess.Popen([ST, "daemon", "--hooks", rung, "--bpf-stats", "--socket", sock],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = lambda: json.loads(subprocess.run([ST, "status", "-o", "json", "--socket", sock],
                                capture_output=True, text=True).stdout or "null")
    for _ in range(300):
        if d.poll() is not None or status(): break
        time.sleep(0.2)
    if d.poll() is not None:
        print(f"vm-test: cost rung={rung} unavailable"); continue
    before = status()
    traced = min(pingpong() for _ in range(3))
    after = status()
    d.terminate(); d.wait()
    def transfer(s):
        progs = [p for p in s["programs"] if p["program"].startswith(
            ("stalltrace_send", "stalltrace_recv", "stalltrace_sys_"))]
        # The kprobe and syscall rungs run two programs per transfer: count transfers by their
        # returns.
        calls = sum(p["run_count"] for p in progs
                    if not p["program"].endswith("_kprobe")
                    and not p["program"].startswith("stalltrace_sys_enter"))
        # The splice-read program runs on every receive too (its syscall check): its time is
        # part of a transfer's cost, its runs are no transfers.
        extra = [p for p in s["programs"] if p["program"] == "stalltrace_splice_recv"]
        return calls, sum(p["run_time_ns"] for p in progs + extra)
    (c0, t0), (c1, t1) = transfer(before), transfer(after)
    per_call = (t1 - t0) / max(c1 - c0, 1)
    print(f"vm-test: cost rung={rung} program_ns={per_call:.0f} transfer_ns_untraced={base:.0f} "
          f"transfer_ns_traced={traced:.0f} transfers={c1 - c0}")
"#;

/// What this machine's own kernel runs: the last-resort syscall rung. Its own rung, the
/// tracepoints, runs every integration test natively in `cargo xtask test` already.
const HOST_RUNGS: &[Rung] = &[full("syscall")];

/// The full tests on this machine's own kernel ([`HOST_RUNGS`]), and a check that forcing a rung it lacks fails
/// with an error naming the kernel feature.
fn run_host(binaries: &Binaries, cost: bool) -> Result<(Vec<Row>, Vec<String>)> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    println!("xtask vm-test: this machine's kernel {release}");
    let script = test_script(binaries, if cost { &[] } else { HOST_RUNGS }, cost);
    let t0 = Instant::now();
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running bash")?;
    let output = BufReader::new(child.stdout.take().expect("piped"));
    let mut parse = Parse::new(&format!("{release} (host)"), "tracepoint");
    for line in output.lines() {
        let line = line?;
        println!("  host | {line}");
        parse.line(&line);
    }
    child.wait()?;
    let costs = parse.costs.clone();
    let mut rows = parse.finish(true, t0.elapsed());
    // Forcing an unavailable rung must fail clearly: this kernel has neither kprobes nor fentry.
    for rung in ["fentry", "kprobe"] {
        let out = Command::new(&binaries.stalltrace)
            .args([
                "daemon",
                "--hooks",
                rung,
                "--socket",
                "/tmp/stalltrace-vm-test-host.sock",
            ])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let available = match rung {
            "fentry" => false,
            _ => Path::new("/sys/kernel/tracing/kprobe_events").exists(),
        };
        let ok = available || (!out.status.success() && stderr.contains("cannot hook"));
        println!("  host | --hooks {rung}: {}", stderr.trim());
        rows.push(Row {
            kernel: format!("{release} (host)"),
            rung: format!("{rung} (must refuse)"),
            passed: u32::from(ok),
            failed: u32::from(!ok),
            secs: 0.0,
            ok,
        });
    }
    Ok((rows, costs))
}

/// Accumulates a run's result lines into rows.
struct Parse {
    kernel: String,
    expected_auto: String,
    auto: Option<String>,
    /// Per rung: passed, failed, seconds, all suites exited 0.
    rungs: Vec<(String, u32, u32, f64, bool)>,
    costs: Vec<String>,
    passed: u32,
    failed: u32,
}

impl Parse {
    fn new(kernel: &str, expected_auto: &str) -> Self {
        Self {
            kernel: kernel.to_owned(),
            expected_auto: expected_auto.to_owned(),
            auto: None,
            rungs: Vec::new(),
            costs: Vec::new(),
            passed: 0,
            failed: 0,
        }
    }

    fn line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            self.passed += count_before(rest, " passed");
            self.failed += count_before(rest, " failed");
        } else if let Some(rest) = line.strip_prefix("vm-test: auto rung=") {
            self.auto = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("vm-test: done ") {
            let field = |key: &str| {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key))
                    .unwrap_or_default()
                    .to_owned()
            };
            let rung = field("rung=");
            let rc = field("rc=");
            let secs = field("ms=").parse::<f64>().unwrap_or(0.0) / 1000.0;
            let (passed, failed) = (
                std::mem::take(&mut self.passed),
                std::mem::take(&mut self.failed),
            );
            match self.rungs.iter_mut().find(|r| r.0 == rung) {
                Some(r) => {
                    r.1 += passed;
                    r.2 += failed;
                    r.3 += secs;
                    r.4 &= rc == "0";
                }
                None => self.rungs.push((rung, passed, failed, secs, rc == "0")),
            }
        } else if let Some(rest) = line.strip_prefix("vm-test: cost ") {
            self.costs.push(format!("{} | {rest}", self.kernel));
        }
    }

    /// Rows for the rungs seen; `completed`: the guest ran the script to its end.
    fn finish(self, completed: bool, elapsed: Duration) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .rungs
            .into_iter()
            .map(|(rung, passed, failed, secs, exited_ok)| Row {
                kernel: self.kernel.clone(),
                ok: exited_ok && failed == 0 && passed > 0,
                rung,
                passed,
                failed,
                secs,
            })
            .collect();
        let auto = self.auto.unwrap_or_else(|| "none".into());
        let auto_ok = completed && auto == self.expected_auto;
        rows.push(Row {
            kernel: self.kernel,
            rung: format!("auto picks {auto} (expected {})", self.expected_auto),
            passed: u32::from(auto_ok),
            failed: u32::from(!auto_ok),
            secs: elapsed.as_secs_f64(),
            ok: auto_ok,
        });
        rows
    }
}

/// The number right before `word` in a libtest summary ("6 passed; 0 failed; …").
fn count_before(summary: &str, word: &str) -> u32 {
    summary
        .split(';')
        .find_map(|part| part.trim().strip_suffix(word.trim()))
        .and_then(|n| {
            n.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn report(rows: &[Row], costs: &[String], elapsed: Duration) -> String {
    let mut out = String::from(
        "| kernel | rung | tests passed | failed | time (s) | result |\n|---|---|---|---|---|---|\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {} |\n",
            row.kernel,
            row.rung,
            row.passed,
            row.failed,
            row.secs,
            if row.ok { "ok" } else { "FAILED" }
        ));
    }
    if !costs.is_empty() {
        out.push_str("\nPer-call cost (emulated CPU: compare rungs, not absolute numbers):\n\n");
        for cost in costs {
            out.push_str(&format!("- {cost}\n"));
        }
    }
    out.push_str(&format!("\nTotal: {:.0} s\n", elapsed.as_secs_f64()));
    out
}

// ------------------------------------------------------------------ apt: kernels

/// Adds the suites that carry the other kernels, pinned at -1 so nothing from them is ever
/// installed on this machine, on the mirror that serves bookworm here; refreshes apt's lists
/// when that changed.
fn add_kernel_suites() -> Result<()> {
    let uri = bookworm_mirror()?;
    let sources = format!(
        "# Added by `cargo xtask vm-test` (stalltrace): other Debian suites, only to download\n\
         # kernel packages for the kernel matrix; pinned at -1 in {APT_PIN}.\n\
         Types: deb\nURIs: {uri}\nSuites: {}\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        EXTRA_SUITES.join(" ")
    );
    let pins: String = EXTRA_SUITES
        .iter()
        .map(|suite| format!("Package: *\nPin: release n={suite}\nPin-Priority: -1\n\n"))
        .collect();
    let unchanged = fs::read_to_string(APT_SOURCES).is_ok_and(|s| s == sources)
        && fs::read_to_string(APT_PIN).is_ok_and(|s| s == pins);
    if unchanged
        && madison("linux-image-amd64")?
            .iter()
            .any(|(_, s)| s == "trixie")
    {
        println!(
            "xtask vm-test: apt suites {} present",
            EXTRA_SUITES.join(" ")
        );
        return Ok(());
    }
    println!(
        "xtask vm-test: adding apt suites {} (pinned at -1: download only)",
        EXTRA_SUITES.join(" ")
    );
    fs::write(APT_PIN, pins).with_context(|| format!("writing {APT_PIN}"))?;
    fs::write(APT_SOURCES, sources).with_context(|| format!("writing {APT_SOURCES}"))?;
    setup::run_checked(Command::new("apt-get").args(["update", "-q"]))
}

/// Lets apt install and download packages of `arch` (multiarch), and installs what building
/// and booting for it needs.
fn enable_arch(arch: &Arch) -> Result<()> {
    let Some(cross) = &arch.cross else {
        return Ok(());
    };
    let foreign = command_output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if !foreign.lines().any(|a| a.trim() == arch.debian) {
        println!(
            "xtask vm-test: adding the {} architecture to dpkg (multiarch)",
            arch.debian
        );
        setup::run_checked(Command::new("dpkg").args(["--add-architecture", arch.debian]))?;
        setup::run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    }
    setup::install_packages(cross.packages)
}

/// The URI apt uses for bookworm (deb822 .sources or one-line .list files).
fn bookworm_mirror() -> Result<String> {
    let mut texts = Vec::new();
    for dir in ["/etc/apt/sources.list.d"] {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = path.to_string_lossy();
            if (name.ends_with(".sources") || name.ends_with(".list"))
                && path != Path::new(APT_SOURCES)
            {
                texts.push(fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    texts.push(fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for text in &texts {
        let mut uri = None;
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["URIs:", u, ..] => uri = Some(*u),
                ["Suites:", suites @ ..] if suites.contains(&"bookworm") => {
                    if let Some(u) = uri {
                        return Ok(u.to_owned());
                    }
                }
                ["deb", rest @ ..] => {
                    let rest: Vec<&str> = rest
                        .iter()
                        .copied()
                        .filter(|w| !w.starts_with('[') && !w.ends_with(']'))
                        .collect();
                    if rest.get(1) == Some(&"bookworm") {
                        return Ok(rest[0].to_owned());
                    }
                }
                _ => {}
            }
        }
    }
    bail!("no apt source for bookworm in /etc/apt: cannot add the suites with other kernels")
}

/// (version, suite) of each version of `package` apt knows.
fn madison(package: &str) -> Result<Vec<(String, String)>> {
    let out = Command::new("apt-cache")
        .args(["madison", package])
        .output()
        .context("running apt-cache madison")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            let suite = cols.get(2)?.split_whitespace().nth(1)?.split('/').next()?;
            Some((cols.get(1)?.to_string(), suite.to_owned()))
        })
        .collect())
}

/// Downloads (once) `name:arch=version` into the cache; returns the .deb.
fn download(name: &str, version: &str, arch: &Arch) -> Result<PathBuf> {
    let debs = Path::new(CACHE).join("debs");
    fs::create_dir_all(&debs)?;
    let prefix = format!("{name}_{}_", version.replace(':', "%3a"));
    let suffix = format!("_{}.deb", arch.debian);
    let find = || {
        fs::read_dir(&debs).ok().and_then(|dir| {
            dir.flatten().map(|e| e.path()).find(|p| {
                p.file_name().is_some_and(|f| {
                    let f = f.to_string_lossy();
                    f.starts_with(&prefix) && (f.ends_with(&suffix) || f.ends_with("_all.deb"))
                })
            })
        })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    let package = format!("{name}:{}={version}", arch.debian);
    println!("xtask vm-test: apt-get download {package}");
    setup::run_checked(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&debs),
    )?;
    find().with_context(|| format!("apt-get download left no {prefix}*{suffix}"))
}

/// The version of `package` for `arch` in `suite`.
fn version_in(package: &str, arch: &Arch, suite: &str) -> Result<String> {
    madison(&format!("{package}:{}", arch.debian))?
        .into_iter()
        .find(|(_, s)| s == suite)
        .map(|(v, _)| v)
        .with_context(|| format!("apt knows no {package}:{} in {suite}", arch.debian))
}

/// The packages holding the kernel image and modules of `linux-image-ARCH` in `suite`,
/// following the metapackage (and, from Linux 7, the split into linux-binary / linux-modules /
/// linux-base).
fn kernel_debs(suite: &str, arch: &Arch) -> Result<(String, Vec<PathBuf>)> {
    let meta = format!("linux-image-{}", arch.debian);
    let version = version_in(&meta, arch, suite)?;
    let mut pending = vec![(meta, version.clone())];
    let mut seen = Vec::new();
    let mut debs = Vec::new();
    while let Some((name, version)) = pending.pop() {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        let deb = download(&name, &version, arch)?;
        let depends = command_output(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&deb)
                .arg("Depends"),
        )?;
        for dep in depends.split(',') {
            // "linux-image-6.1.0-57-amd64 (= 6.1.192-3)"
            let dep = dep.trim();
            let Some((dep_name, rest)) = dep.split_once(" (= ") else {
                continue;
            };
            let is_kernel = [
                "linux-image-",
                "linux-binary-",
                "linux-modules-",
                "linux-base-",
            ]
            .iter()
            .any(|p| dep_name.starts_with(p));
            if is_kernel {
                pending.push((dep_name.to_owned(), rest.trim_end_matches(')').to_owned()));
            }
        }
        debs.push(deb);
    }
    Ok((version, debs))
}

fn command_output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ------------------------------------------------------------------ the guest

/// An extracted kernel: the image to boot and its modules directory.
struct Extracted {
    arch: &'static Arch,
    release: String,
    image: PathBuf,
    modules: PathBuf,
    initrd: PathBuf,
}

fn prepare(suite: &str, arch: &'static Arch) -> Result<Extracted> {
    let (version, debs) = kernel_debs(suite, arch)?;
    let mut names: Vec<String> = debs
        .iter()
        .map(|d| {
            d.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    // Named after the metapackage: the joined package names exceed NAME_MAX from Linux 7 on.
    let root = Path::new(CACHE).join("kernels").join(format!(
        "{suite}_{}_{}",
        arch.debian,
        version.replace([':', '/', '~'], "_")
    ));
    if !root.join(".extracted").exists() {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        for deb in &debs {
            println!("xtask vm-test: extracting {}", deb.display());
            setup::run_checked(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
        }
        fs::write(root.join(".extracted"), names.join("\n"))?;
    }
    // Linux <= 6.x: boot/vmlinuz-RELEASE; 7.x: (usr/)lib/modules/RELEASE/vmlinuz.
    let mut image = None;
    for base in ["lib/modules", "usr/lib/modules"] {
        for entry in fs::read_dir(root.join(base))
            .into_iter()
            .flatten()
            .flatten()
        {
            let release = entry.file_name().to_string_lossy().into_owned();
            let candidates = [
                root.join("boot").join(format!("vmlinuz-{release}")),
                entry.path().join("vmlinuz"),
            ];
            if let Some(found) = candidates.into_iter().find(|p| p.exists()) {
                if entry.path().join("kernel").is_dir() {
                    image = Some((release, found, entry.path()));
                }
            }
        }
    }
    let (release, bzimage, modules) =
        image.with_context(|| format!("no kernel image with modules under {}", root.display()))?;
    if !modules.join("modules.dep").exists() {
        // depmod wants BASE/lib/modules/RELEASE.
        let base = if modules.starts_with(root.join("usr")) {
            root.join("usr")
        } else {
            root.clone()
        };
        setup::run_checked(Command::new("depmod").arg("-b").arg(&base).arg(&release))?;
    }
    // arm64's image is not compressed.
    let image = match arch.cross {
        None => vmlinux(&bzimage, &root)?,
        Some(_) => bzimage,
    };
    let initrd = initramfs(&root, &modules, &release, arch)?;
    Ok(Extracted {
        arch,
        release,
        image,
        modules,
        initrd,
    })
}

/// The uncompressed ELF vmlinux inside a bzImage: QEMU boots it directly (PVH entry, Debian
/// has CONFIG_PVH), sparing the guest seconds of emulated decompression. Falls back to the
/// bzImage.
fn vmlinux(bzimage: &Path, root: &Path) -> Result<PathBuf> {
    let out = root.join("vmlinux");
    if out.exists() {
        return Ok(out);
    }
    let data = fs::read(bzimage)?;
    let formats: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-qdc"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in formats {
        for start in data
            .windows(magic.len())
            .enumerate()
            .filter(|(_, w)| *w == magic)
            .map(|(i, _)| i)
        {
            let mut child = Command::new(tool)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let mut stdin = child.stdin.take().expect("piped");
            let tail = data[start..].to_vec();
            let feeder = thread::spawn(move || {
                let _ = stdin.write_all(&tail);
            });
            let output = child.wait_with_output()?;
            let _ = feeder.join();
            if output.stdout.starts_with(b"\x7fELF") {
                fs::write(&out, &output.stdout)?;
                return Ok(out);
            }
        }
    }
    println!(
        "xtask vm-test: no vmlinux found in {}: booting the bzImage",
        bzimage.display()
    );
    Ok(bzimage.to_owned())
}

/// Modules the first stage loads to reach the host's filesystem and the output port.
const BOOT_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_console",
    "virtio_rng",
];

/// The initramfs: static busybox, the boot modules (decompressed) and the first stage; for
/// another architecture also the C libraries its binaries load, since its root stays here.
fn initramfs(root: &Path, modules: &Path, release: &str, arch: &Arch) -> Result<PathBuf> {
    let initrd = root.join("initrd.cpio.gz");
    let stamp = root.join("initrd.version");
    if initrd.exists() && fs::read_to_string(&stamp).is_ok_and(|v| v == INIT_VERSION) {
        return Ok(initrd);
    }
    println!("xtask vm-test: building the initramfs for {release}");
    let stage = root.join("initrd.stage");
    let _ = fs::remove_dir_all(&stage);
    for dir in [
        "bin", "dev", "proc", "sys", "newroot", "mods", "lib", "run", "tmp",
    ] {
        fs::create_dir_all(stage.join(dir))?;
    }
    match &arch.cross {
        None => {
            fs::copy("/bin/busybox", stage.join("bin/busybox"))
                .context("copying static busybox")?;
        }
        Some(cross) => {
            let deb = download(
                "busybox-static",
                &version_in("busybox-static", arch, "bookworm")?,
                arch,
            )?;
            let unpacked = root.join("busybox.unpacked");
            setup::run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
            fs::copy(unpacked.join("bin/busybox"), stage.join("bin/busybox"))
                .context("copying the static busybox of the guest's architecture")?;
            for lib in cross.lib_names {
                fs::copy(Path::new(cross.libs).join(lib), stage.join("lib").join(lib))
                    .with_context(|| format!("copying {}/{lib}", cross.libs))?;
            }
        }
    }
    let base = modules
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("modules directory is not BASE/lib/modules/RELEASE")?;
    let mut order = Vec::new();
    for module in BOOT_MODULES {
        let deps = command_output(Command::new("modprobe").arg("-d").arg(base).args([
            "-S",
            release,
            "--show-depends",
            module,
        ]))
        .unwrap_or_default();
        for line in deps.lines() {
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = path.trim();
                if !order.iter().any(|p: &String| p == path) {
                    order.push(path.to_owned());
                }
            }
        }
    }
    let mut list = String::new();
    for path in &order {
        let file = Path::new(path)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let (name, tool): (&str, Option<&str>) = if let Some(n) = file.strip_suffix(".xz") {
            (n, Some("xz"))
        } else if let Some(n) = file.strip_suffix(".zst") {
            (n, Some("zstd"))
        } else {
            (&file, None)
        };
        let target = stage.join("mods").join(name);
        match tool {
            Some(tool) => {
                let out = Command::new(tool).args(["-dc", path]).output()?;
                if !out.status.success() {
                    bail!("decompressing {path} failed");
                }
                fs::write(&target, out.stdout)?;
            }
            None => {
                fs::copy(path, &target)?;
            }
        }
        list.push_str(name);
        list.push('\n');
    }
    fs::write(stage.join("modules.list"), list)?;
    if arch.cross.is_some() {
        fs::write(stage.join("own-root"), "")?;
    }
    write_executable(&stage.join("init"), STAGE1)?;
    let cpio = Command::new("sh")
        .arg("-c")
        .arg("find . -mindepth 1 | cpio -o -H newc --quiet -R 0:0 | gzip -1")
        .current_dir(&stage)
        .output()?;
    if !cpio.status.success() {
        bail!(
            "building the initramfs failed: {}",
            String::from_utf8_lossy(&cpio.stderr)
        );
    }
    fs::write(&initrd, cpio.stdout)?;
    fs::write(&stamp, INIT_VERSION)?;
    fs::remove_dir_all(&stage)?;
    Ok(initrd)
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Bumped when the initramfs changes, so cached ones are rebuilt.
const INIT_VERSION: &str = "3";

/// PID 1 in the initramfs: load the boot modules, mount the host's root read-only with fresh
/// tmpfs over its writable places, and hand over to the second stage in the run directory. A
/// guest of another architecture (`/own-root`) stays on the initramfs instead: it only mounts
/// the run directory, the modules and the workspace.
const STAGE1: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
say() { echo "vm-test init: $*" > /dev/console; }
while read -r ko; do [ -n "$ko" ] && { insmod "/mods/$ko" 2> /dev/console || say "insmod $ko failed"; }; done < /modules.list
mount9p() {  # tag dir options; the device may show up a moment after its driver
  for _ in $(seq 1 100); do
    mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144,$3" "$1" "$2" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}
if [ -e /own-root ]; then
  R=
else
  R=/newroot
  mount9p hostroot $R ro,cache=loose || { say "cannot mount the host root"; poweroff -f; }
fi
mount -t tmpfs -o mode=755 tmpfs $R/run
mkdir -p $R/run/vm $R/run/vm-modules
mount9p vmrun $R/run/vm cache=none || { say "cannot mount the run directory"; poweroff -f; }
mount9p vmmodules $R/run/vm-modules ro,cache=loose || say "cannot mount the modules"
for d in tmp var/tmp; do mkdir -p $R/$d; mount -t tmpfs -o mode=1777 tmpfs $R/$d; done
# The workspace (its binaries) at its own path: it may lie under a tmpfs mounted above.
W=$(cat $R/run/vm/workspace)
mkdir -p "$R$W" 2>/dev/null
mount9p vmworkspace "$R$W" ro,cache=loose || { say "cannot mount the workspace $W"; poweroff -f; }
[ -n "$R" ] && mount -o move /dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts; mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
cp /bin/busybox $R/run/busybox
umount /proc /sys
[ -n "$R" ] && exec switch_root $R /run/vm/stage2
exec /run/vm/stage2
"#;

/// PID 1 on the host's root: kernel filesystems, module autoloading from the shared modules,
/// loopback, then the test script; its exit status goes to the run directory.
const STAGE2: &str = r#"#!/run/busybox sh
BB=/run/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
$BB mount -t proc proc /proc; $BB mount -t sysfs sysfs /sys
$BB mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
$BB mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
$BB mount -t bpf bpf /sys/fs/bpf 2>/dev/null
$BB mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
# modprobe (inet_diag, tcp_diag for the TCP signals) reads the modules shared from the host.
REL=$($BB uname -r)
$BB mkdir -p /run/modroot/lib/modules
$BB ln -s /run/vm-modules /run/modroot/lib/modules/$REL
printf '#!/bin/sh\nexec /usr/sbin/modprobe -d /run/modroot "$@"\n' > /run/modprobe
$BB chmod 755 /run/modprobe
echo /run/modprobe > /proc/sys/kernel/modprobe
$BB ip link set lo up
OUT=/dev/console
for p in /sys/class/virtio-ports/*; do
  [ "$($BB cat $p/name 2>/dev/null)" = vmtest.out ] && OUT=/dev/${p##*/}
done
echo started > /run/vm/started
$BB env -i PATH="$PATH" HOME=/root LANG=C.UTF-8 /run/vm/script < /dev/null > "$OUT" 2>&1
echo $? > /run/vm/rc
$BB sync
$BB poweroff -f
"#;

/// Whether /dev/kvm can boot a stock kernel: PVM (kvm_pvm, for nested cloud VMs) cannot.
fn kvm_usable() -> bool {
    let pvm = Path::new("/sys/module/kvm_pvm").exists()
        && !Path::new("/sys/module/kvm_intel").exists()
        && !Path::new("/sys/module/kvm_amd").exists();
    !pvm && fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Most guests booted at once. Each emulates its CPUs on one host thread (`thread=single`), so
/// on this 2-core machine two guests take a core each and the matrix takes about half the
/// wall-clock time, each guest as fast as alone. `--cost` times the programs: one at a time.
const MAX_LANES: usize = 2;

fn lanes(cost: bool) -> usize {
    if cost {
        return 1;
    }
    thread::available_parallelism().map_or(1, |n| n.get().min(MAX_LANES))
}

fn run_kernel(
    kernel: &Kernel,
    extracted: &Extracted,
    binaries: &Binaries,
    keep: bool,
    cost: bool,
) -> Result<(Vec<Row>, Vec<String>)> {
    let label = format!("{} ({})", extracted.release, kernel.suite);
    if cost && kernel.arch.cross.is_some() {
        println!("xtask vm-test: {label}: no per-call cost (the guest has no python3)");
    }
    let rungs = if cost { &[] } else { kernel.rungs };
    let script = test_script(binaries, rungs, cost && kernel.arch.cross.is_none());
    // A guest that dies before the script starts (rare early-boot crashes under TCG) is booted
    // again, once: the tests have not run, so this hides nothing.
    for attempt in 1..=2 {
        let t0 = Instant::now();
        let outcome = boot(extracted, &label, &script, kernel.auto, keep)?;
        match outcome {
            Boot::Ran(parse, completed) => {
                let costs = parse.costs.clone();
                return Ok((parse.finish(completed, t0.elapsed()), costs));
            }
            Boot::NeverStarted(why) if attempt == 1 => {
                println!("xtask vm-test: {label}: {why}; booting again");
            }
            Boot::NeverStarted(why) => {
                return Ok((
                    vec![Row {
                        kernel: label,
                        rung: format!("boot: {why}"),
                        passed: 0,
                        failed: 1,
                        secs: t0.elapsed().as_secs_f64(),
                        ok: false,
                    }],
                    Vec::new(),
                ));
            }
        }
    }
    unreachable!("the loop returns on its second attempt")
}

enum Boot {
    /// The script ran; true when it finished (exit status written).
    Ran(Parse, bool),
    NeverStarted(String),
}

fn boot(extracted: &Extracted, label: &str, script: &str, auto: &str, keep: bool) -> Result<Boot> {
    let runs = Path::new(CACHE).join("runs");
    fs::create_dir_all(&runs)?;
    let run = runs.join(format!("{}-{}", extracted.release, std::process::id()));
    let _ = fs::remove_dir_all(&run);
    let share = run.join("share");
    fs::create_dir_all(&share)?;
    write_executable(&share.join("stage2"), STAGE2)?;
    write_executable(&share.join("script"), script)?;
    let workspace = workspace_root();
    fs::write(
        share.join("workspace"),
        workspace.to_string_lossy().as_bytes(),
    )?;
    let out = run.join("out");
    fs::write(&out, "")?;
    let accel = if kvm_usable() {
        vec!["-accel", "kvm", "-cpu", "host"]
    } else {
        vec!["-accel", "tcg,thread=single", "-cpu", "max"]
    };
    println!(
        "xtask vm-test: booting {label} ({}, {GUEST_CPUS} CPUs, {GUEST_MEMORY})",
        if accel[1] == "kvm" {
            "KVM"
        } else {
            "software emulation"
        }
    );
    let fsdev = |id: &str, path: &Path, ro: bool| {
        format!(
            "local,id={id},path={},security_model=none{}",
            path.display(),
            if ro {
                ",readonly=on,multidevs=remap"
            } else {
                ""
            }
        )
    };
    let arch = extracted.arch;
    let mut qemu = Command::new(arch.qemu);
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-nic",
        "none",
        "-no-reboot",
    ])
    .args([
        "-machine",
        arch.machine,
        "-m",
        GUEST_MEMORY,
        "-smp",
        GUEST_CPUS,
    ])
    .args(&accel)
    .arg("-kernel")
    .arg(&extracted.image)
    .arg("-initrd")
    .arg(&extracted.initrd)
    .arg("-append")
    .arg(format!(
        "console={} rdinit=/init panic=-1 quiet",
        arch.console
    ))
    .arg("-serial")
    .arg(format!("file:{}", run.join("console.log").display()))
    .args(["-device", "virtio-serial-pci"])
    .arg("-chardev")
    .arg(format!("file,id=out,path={},append=on", out.display()))
    .args(["-device", "virtserialport,chardev=out,name=vmtest.out"])
    .arg("-fsdev")
    .arg(fsdev("vmrun", &share, false))
    .args(["-device", "virtio-9p-pci,fsdev=vmrun,mount_tag=vmrun"])
    .arg("-fsdev")
    .arg(fsdev("vmworkspace", &workspace, true))
    .args([
        "-device",
        "virtio-9p-pci,fsdev=vmworkspace,mount_tag=vmworkspace",
    ])
    .arg("-fsdev")
    .arg(fsdev("vmmodules", &extracted.modules, true))
    .args([
        "-device",
        "virtio-9p-pci,fsdev=vmmodules,mount_tag=vmmodules",
    ])
    .args(["-device", "virtio-rng-pci"]);
    if arch.cross.is_none() {
        qemu.arg("-fsdev")
            .arg(fsdev("hostroot", Path::new("/"), true))
            .args(["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"]);
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(run.join("qemu.stderr"))?);
    let mut child = qemu
        .spawn()
        .with_context(|| format!("starting {}", arch.qemu))?;
    let t0 = Instant::now();
    let mut parse = Parse::new(label, auto);
    let mut reader = BufReader::new(fs::File::open(&out)?);
    let mut pending = String::new();
    let mut timed_out = None;
    loop {
        // Stream the guest's output as it comes.
        let mut chunk = String::new();
        while reader.read_line(&mut chunk)? > 0 {
            pending.push_str(&chunk);
            chunk.clear();
            if pending.ends_with('\n') {
                let line = pending.trim_end();
                println!("  {} | {line}", extracted.release);
                parse.line(line);
                pending.clear();
            }
        }
        if child.try_wait()?.is_some() {
            break;
        }
        let started = share.join("started").exists();
        if !started && t0.elapsed() > BOOT_TIMEOUT {
            timed_out = Some(format!("did not boot within {} s", BOOT_TIMEOUT.as_secs()));
        } else if t0.elapsed() > RUN_TIMEOUT {
            timed_out = Some(format!("still running after {} s", RUN_TIMEOUT.as_secs()));
        }
        if timed_out.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let started = share.join("started").exists();
    let rc = fs::read_to_string(share.join("rc")).ok();
    let console = fs::read_to_string(run.join("console.log")).unwrap_or_default();
    let result = if !started {
        let tail: Vec<&str> = console.lines().rev().take(15).collect();
        println!(
            "xtask vm-test: {label}: the guest never ran the tests; end of its console:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        Boot::NeverStarted(timed_out.unwrap_or_else(|| "the guest died while booting".into()))
    } else {
        if let Some(why) = &timed_out {
            println!("xtask vm-test: {label}: {why}: killed");
        }
        Boot::Ran(parse, rc.is_some() && timed_out.is_none())
    };
    if keep || rc.is_none() {
        println!("xtask vm-test: run directory kept: {}", run.display());
    } else {
        let _ = fs::remove_dir_all(&run);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summaries_are_counted() {
        let summary = "ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(count_before(summary, " passed"), 6);
        assert_eq!(count_before(summary, " failed"), 0);
        let summary = "FAILED. 4 passed; 2 failed; 0 ignored";
        assert_eq!(count_before(summary, " passed"), 4);
        assert_eq!(count_before(summary, " failed"), 2);
    }

    #[test]
    fn a_rung_passes_only_with_tests_passed_none_failed_and_exit_zero() {
        let mut parse = Parse::new("5.10", "fentry");
        for line in [
            "vm-test: auto rung=fentry",
            "test result: ok. 7 passed; 0 failed; 0 ignored",
            "vm-test: done rung=fentry suite=stalls rc=0 ms=50500",
            "test result: ok. 1 passed; 0 failed; 0 ignored",
            "vm-test: done rung=fentry suite=file_io rc=0 ms=9500",
            "test result: FAILED. 6 passed; 1 failed; 0 ignored",
            "vm-test: done rung=kprobe suite=stalls rc=101 ms=40000",
            // A suite that crashed before its summary.
            "vm-test: done rung=kprobe suite=file_io rc=134 ms=1000",
        ] {
            parse.line(line);
        }
        let rows = parse.finish(true, Duration::from_secs(100));
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].passed, rows[0].failed, rows[0].ok), (8, 0, true));
        assert!((rows[0].secs - 60.0).abs() < 1e-9);
        assert_eq!((rows[1].passed, rows[1].failed, rows[1].ok), (6, 1, false));
        assert!(rows[2].ok, "auto picked the expected rung");

        // A guest that stopped half-way fails, whatever it printed.
        let mut parse = Parse::new("6.1", "fentry");
        parse.line("vm-test: auto rung=fentry");
        assert!(!parse.finish(false, Duration::ZERO)[0].ok);
        // No rung ran at all: the auto row is the only one, and it fails on a wrong pick.
        let mut parse = Parse::new("6.1", "fentry");
        parse.line("vm-test: auto rung=kprobe");
        let rows = parse.finish(true, Duration::ZERO);
        assert!(!rows[0].ok);
    }
}
