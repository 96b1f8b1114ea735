//! The system's OpenSSL library (`libssl.so.3`), whose `SSL_read` the daemon hooks with
//! uprobes (`stalltrace-ebpf/src/libssl.rs`): found in the dynamic linker's cache
//! (`ldconfig -p`, what programs linked against it load), else in the usual library
//! directories.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The library's soname: OpenSSL 3 (Debian 12+, Ubuntu 22.04+, RHEL 9+).
pub(crate) const SONAME: &str = "libssl.so.3";

/// The `ldconfig -p` tag of this machine's ABI (what the cache lists next to each library).
#[cfg(target_arch = "x86_64")]
const ABI_TAG: &str = "x86-64";
#[cfg(target_arch = "aarch64")]
const ABI_TAG: &str = "AArch64";
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ABI_TAG: &str = "";

/// Where distributions install it when the cache does not say: multiarch Debian/Ubuntu,
/// then Fedora/RHEL, then Arch and others.
#[cfg(target_arch = "x86_64")]
const DIRECTORIES: [&str; 5] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
];
#[cfg(not(target_arch = "x86_64"))]
const DIRECTORIES: [&str; 5] = [
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
];

/// The path of the system's `libssl.so.3`, or why there is none. In a container (the
/// DaemonSet runs with the host's PID namespace), the host's library, reached through
/// `/proc/1/root`: that is the file the host's processes map (the image's own copy is mapped
/// by nobody else).
pub(crate) fn find() -> Result<PathBuf, String> {
    let listed = ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .iter()
        .find_map(|ldconfig| Command::new(ldconfig).arg("-p").output().ok())
        .and_then(|output| from_ldconfig(&String::from_utf8_lossy(&output.stdout), ABI_TAG));
    let root = host_root();
    let candidates = listed
        .iter()
        .cloned()
        .chain(DIRECTORIES.iter().map(|dir| Path::new(dir).join(SONAME)));
    candidates
        .map(|path| match &root {
            Some(root) => root.join(path.strip_prefix("/").unwrap_or(&path)),
            None => path,
        })
        .find(|path| path.is_file())
        .ok_or_else(|| {
            format!(
                "no {SONAME} in the dynamic linker's cache (ldconfig -p) nor in {}{}",
                DIRECTORIES.join(", "),
                if root.is_some() {
                    " of the host (/proc/1/root)"
                } else {
                    ""
                }
            )
        })
}

/// `/proc/1/root` when it is not this process's root (the daemon runs in a container).
fn host_root() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let host = Path::new("/proc/1/root");
    let (ours, theirs) = (std::fs::metadata("/").ok()?, std::fs::metadata(host).ok()?);
    ((ours.dev(), ours.ino()) != (theirs.dev(), theirs.ino())).then(|| host.to_path_buf())
}

/// The path of [`SONAME`] for ABI `abi` in `ldconfig -p` output: lines like
/// `\tlibssl.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so.3`.
fn from_ldconfig(listing: &str, abi: &str) -> Option<PathBuf> {
    listing.lines().find_map(|line| {
        let (name, rest) = line.trim().split_once(' ')?;
        let (tags, path) = rest.split_once(" => ")?;
        let abi_matches = tags
            .trim_matches(|c| c == '(' || c == ')')
            .split(',')
            .any(|tag| tag.trim() == abi);
        (name == SONAME && abi_matches && path.starts_with('/')).then(|| PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_entry_of_this_abi_is_taken() {
        let listing = "1234 libs found in cache `/etc/ld.so.cache'\n\
            \tlibssl3.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl3.so\n\
            \tlibssl.so.3 (libc6) => /lib/i386-linux-gnu/libssl.so.3\n\
            \tlibssl.so.3 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libssl.so.3\n\
            \tlibssl.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so\n";
        assert_eq!(
            from_ldconfig(listing, "x86-64"),
            Some(PathBuf::from("/lib/x86_64-linux-gnu/libssl.so.3"))
        );
        assert_eq!(from_ldconfig(listing, "AArch64"), None);
        assert_eq!(from_ldconfig("", "x86-64"), None);
        assert_eq!(
            from_ldconfig("\tlibssl.so.3 (libc6,x86-64) => relative/x\n", "x86-64"),
            None
        );
    }
}
