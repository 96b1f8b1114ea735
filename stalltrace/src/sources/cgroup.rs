//! The root of the cgroup v2 hierarchy, where a `cgroup/sock_release` program sees the release
//! of every inet socket on the host (UDP closes: UDP has no state-change tracepoint).
use std::{
    ffi::CString,
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// Where the daemon mounts cgroup2 for a moment when no mount of its root exists.
const PRIVATE_MOUNT: &str = "/run/stalltrace/cgroup2";

/// The cgroup v2 root directory, opened. A mount of it is found in `/proc/self/mountinfo`
/// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid systems); without one, cgroup2 is
/// mounted at [`PRIVATE_MOUNT`], opened and unmounted again (the open directory keeps naming
/// the hierarchy's root).
pub(crate) fn open_root() -> Result<File> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    if let Some(path) = root_mount(&mountinfo) {
        return File::open(&path).with_context(|| format!("opening {}", path.display()));
    }
    std::fs::create_dir_all(PRIVATE_MOUNT).with_context(|| format!("creating {PRIVATE_MOUNT}"))?;
    if let Err(err) = super::mount("cgroup2", PRIVATE_MOUNT) {
        bail!("no cgroup2 mount, and mounting one at {PRIVATE_MOUNT} failed: {err}");
    }
    let target = CString::new(PRIVATE_MOUNT).expect("no NUL");
    let root = File::open(PRIVATE_MOUNT).with_context(|| format!("opening {PRIVATE_MOUNT}"));
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_dir(PRIVATE_MOUNT);
    root
}

/// The mount point of a cgroup2 mount of the hierarchy's root, from `mountinfo` text.
fn root_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fields: Vec<&str> = mount.split(' ').collect();
        let fstype = fs.split(' ').next()?;
        let point = fields.get(4)?;
        (fstype == "cgroup2" && fields.get(3) == Some(&"/")).then(|| Path::new(point).to_path_buf())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_mount_of_cgroup2_is_found_among_v1_ones() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
35 30 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
36 30 0:32 /docker/abc /sys/fs/cgroup/inner rw - cgroup2 cgroup2 rw
37 30 0:33 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            root_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(root_mount("35 30 0:31 / /x rw - cgroup cgroup rw"), None);
    }
}
