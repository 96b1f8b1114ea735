//! Least privilege: once the programs are loaded and attached and start-up is done, the daemon
//! keeps only the capabilities it uses at run time ([`RUNTIME`]), drops every other one from
//! all its sets (bounding included, so that not even an exec could get them back), and sets
//! `no_new_privs`.
//!
//! Capabilities and no_new_privs are per thread: this must run before the daemon starts any
//! thread (threads started later inherit the reduced sets).
use anyhow::{Context as _, Result};
use caps::{CapSet, Capability, CapsHashSet};
use serde::Serialize;

/// What the daemon still needs after start-up, and why (see docs/design.md). Found by
/// dropping and running the root integration tests, plus reading the kernel's checks for what
/// those tests cannot show (their processes all run as root).
pub(crate) const RUNTIME: &[(Capability, &str)] = &[
    (
        Capability::CAP_PERFMON,
        "perf events sampling the stacks of spinning threads",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "/proc/PID/task/TID/{stat,syscall} and fd links of other users' threads; pidfd_getfd",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "listing /proc/PID/fd of processes of other users (mode 0500)",
    ),
    (
        Capability::CAP_CHECKPOINT_RESTORE,
        "opening mapped binaries through /proc/PID/map_files for symbols",
    ),
];

/// Kept in addition on kernels before 6.5, where every bpf() command (the daemon's map reads
/// and its epoch writes included) needs CAP_BPF or CAP_SYS_ADMIN unless unprivileged BPF is
/// enabled; from 6.5 only loading programs and creating maps do.
pub(crate) const MAP_ACCESS_BEFORE_6_5: (Capability, &str) = (
    Capability::CAP_BPF,
    "bpf() map reads and writes (kernels before 6.5 check it on every command)",
);

/// The capabilities to keep on a kernel of this (major, minor) version.
pub(crate) fn runtime_set(version: (u32, u32)) -> Vec<(Capability, &'static str)> {
    let mut set = RUNTIME.to_vec();
    if version < (6, 5) {
        set.push(MAP_ACCESS_BEFORE_6_5);
    }
    set
}

/// The privileges the daemon runs with, as `status` shows them.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Privileges {
    /// Effective capabilities, e.g. `CAP_PERFMON`, sorted.
    pub capabilities: Vec<String>,
    pub no_new_privs: bool,
}

/// Drops every capability but [`runtime_set`] from this thread and sets no_new_privs.
pub(crate) fn drop_to_runtime() -> Result<Privileges> {
    let keep: CapsHashSet = runtime_set(crate::probes::running_version())
        .iter()
        .map(|(cap, _)| *cap)
        .collect();
    drop_to(&keep)?;
    current()
}

/// Drops every capability but `keep` from all the sets of this thread (bounding included)
/// and sets no_new_privs.
pub(crate) fn drop_to(keep: &CapsHashSet) -> Result<()> {
    // The bounding set first: changing it needs CAP_SETPCAP, dropped below.
    for cap in caps::all().difference(keep) {
        if caps::has_cap(None, CapSet::Bounding, *cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, *cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable capabilities")?;
    let permitted = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    let kept: CapsHashSet = keep.intersection(&permitted).copied().collect();
    // Effective must stay within permitted at every step.
    caps::set(None, CapSet::Effective, &kept).context("setting the effective capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("setting the permitted capabilities")?;
    // SAFETY: prctl with integer arguments only.
    let set = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if set != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    Ok(())
}

/// The privileges of the calling thread.
pub(crate) fn current() -> Result<Privileges> {
    let mut capabilities: Vec<String> = caps::read(None, CapSet::Effective)
        .context("reading capabilities")?
        .iter()
        .map(ToString::to_string)
        .collect();
    capabilities.sort();
    // SAFETY: prctl with integer arguments only.
    let no_new_privs = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } == 1;
    Ok(Privileges {
        capabilities,
        no_new_privs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_set_names_each_capability_once() {
        let names: std::collections::BTreeSet<String> =
            RUNTIME.iter().map(|(cap, _)| cap.to_string()).collect();
        assert_eq!(names.len(), RUNTIME.len());
        assert!(names.iter().all(|name| name.starts_with("CAP_")));
        assert!(!names.contains("CAP_SYS_ADMIN") && !names.contains("CAP_BPF"));
    }

    #[test]
    fn cap_bpf_is_kept_only_where_map_access_needs_it() {
        let has_bpf = |version| {
            runtime_set(version)
                .iter()
                .any(|(cap, _)| *cap == Capability::CAP_BPF)
        };
        assert!(has_bpf((5, 10)) && has_bpf((6, 1)) && has_bpf((6, 4)));
        assert!(!has_bpf((6, 5)) && !has_bpf((6, 18)) && !has_bpf((7, 3)));
    }
}
