//! cgroup v2: its root, ids and paths. The kernel programs record the owner's cgroup id
//! (`bpf_get_current_cgroup_id`), which is the inode of the cgroup's directory in the cgroup v2
//! file system: a path is found by walking that file system for the inode, on a thread of its
//! own ([`Names`]); the loop only looks up what was found. The root is also where a
//! `cgroup/sock_release` program sees the release of every inet socket on the host (UDP closes:
//! UDP has no state-change tracepoint).
use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    ffi::CString,
    fs::{self, File},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        mpsc::{self, Receiver, SyncSender},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Ids remembered at most (resolved or not); a full table turns new ids away (counted).
const MAX_NAMES: usize = 65_536;
/// Ids waiting for the walker at most.
const QUEUE: usize = 4096;
/// Directories visited per walk at most (a host has a few thousand cgroups).
const MAX_DIRECTORIES: usize = 200_000;
/// The walker waits this long between walks, so that a burst of new ids costs one walk.
const PAUSE: Duration = Duration::from_millis(200);

/// Where the root of the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones, as `/proc/self/mountinfo` says); `None` on a host
/// without one.
pub(crate) fn root() -> Option<&'static Path> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| root_mount(&fs::read_to_string("/proc/self/mountinfo").ok()?))
        .as_deref()
}

/// Where the daemon mounts cgroup2 for a moment when no mount of its root exists.
const PRIVATE_MOUNT: &str = "/run/stalltrace/cgroup2";

/// The cgroup v2 root directory, opened. A mount of it is found in `/proc/self/mountinfo`
/// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid systems); without one, cgroup2 is
/// mounted at [`PRIVATE_MOUNT`], opened and unmounted again (the open directory keeps naming
/// the hierarchy's root).
pub(crate) fn open_root() -> Result<File> {
    if let Some(path) = root() {
        return File::open(path).with_context(|| format!("opening {}", path.display()));
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

/// The cgroup v2 id of process `pid` (the inode of its cgroup's directory).
pub(crate) fn id_of_process(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|line| line.strip_prefix("0::"))?;
    let directory = root()?.join(path.trim_start_matches('/'));
    Some(fs::metadata(directory).ok()?.ino())
}

/// The loop's table of cgroup paths by id, filled by the walker thread. Used on the loop
/// only (hence the cell: lookups happen while answering read-only queries).
pub(crate) struct Names {
    table: RefCell<Table>,
    requests: SyncSender<u64>,
    answers: Receiver<Vec<(u64, Option<String>)>>,
}

#[derive(Default)]
struct Table {
    /// Id → path below the cgroup v2 root (`None`: not found, e.g. already removed).
    known: HashMap<u64, Option<Arc<str>>>,
    /// Asked for, not answered yet.
    pending: HashSet<u64>,
    /// Ids not resolved because the table or the queue was full.
    dropped: u64,
}

impl Names {
    /// Starts the walker thread.
    pub(crate) fn spawn() -> Result<Self> {
        let (requests, queue) = mpsc::sync_channel(QUEUE);
        let (answer, answers) = mpsc::sync_channel(16);
        std::thread::Builder::new()
            .name("cgroups".into())
            .spawn(move || walker(queue, answer))
            .context("starting the cgroup path thread")?;
        Ok(Self {
            table: RefCell::default(),
            requests,
            answers,
        })
    }

    /// The path of cgroup `id`, if known; an unknown id is handed to the walker (never
    /// waited for: its events until then carry the id alone).
    pub(crate) fn path(&self, id: u64) -> Option<Arc<str>> {
        if id == 0 {
            return None;
        }
        let mut table = self.table.borrow_mut();
        while let Ok(batch) = self.answers.try_recv() {
            for (id, path) in batch {
                table.pending.remove(&id);
                table.known.insert(id, path.map(Arc::from));
            }
        }
        if let Some(known) = table.known.get(&id) {
            return known.clone();
        }
        if table.pending.contains(&id) {
            return None;
        }
        if table.known.len() + table.pending.len() >= MAX_NAMES
            || self.requests.try_send(id).is_err()
        {
            table.dropped += 1;
            return None;
        }
        table.pending.insert(id);
        None
    }

    /// Lookups of an id that could not be resolved because the table or the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.table.borrow().dropped
    }
}

fn walker(requests: Receiver<u64>, answers: SyncSender<Vec<(u64, Option<String>)>>) {
    let mut last_walk = None::<Instant>;
    while let Ok(first) = requests.recv() {
        if let Some(pause) = last_walk.and_then(|at| PAUSE.checked_sub(at.elapsed())) {
            std::thread::sleep(pause);
        }
        let mut wanted: HashSet<u64> = std::iter::once(first).collect();
        wanted.extend(requests.try_iter());
        let mut found = root().map(|root| walk(root, &wanted)).unwrap_or_default();
        last_walk = Some(Instant::now());
        let batch: Vec<_> = wanted
            .into_iter()
            .map(|id| (id, found.remove(&id)))
            .collect();
        if answers.send(batch).is_err() {
            return;
        }
    }
}

/// Finds the directories below `root` whose inode is one of `wanted`: their paths relative to
/// `root` (`/` for the root itself), as `/proc/PID/cgroup` writes them.
fn walk(root: &Path, wanted: &HashSet<u64>) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut visited = 0;
    while let Some(directory) = stack.pop() {
        visited += 1;
        if visited > MAX_DIRECTORIES || found.len() == wanted.len() {
            break;
        }
        let Ok(meta) = fs::symlink_metadata(&directory) else {
            continue;
        };
        if wanted.contains(&meta.ino()) {
            let relative = directory.strip_prefix(root).unwrap_or(&directory);
            found.insert(meta.ino(), format!("/{}", relative.display()));
        }
        let Ok(entries) = fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    found
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

    /// On this host's cgroup v2 file system: the id of this process's cgroup resolves to the
    /// path /proc/self/cgroup gives.
    #[test]
    fn the_id_of_this_process_resolves_to_its_path() {
        let root = root().expect("a cgroup v2 file system (the daemon reads cgroup ids there)");
        let pid = std::process::id();
        let id = id_of_process(pid).expect("this process's cgroup id");
        let text = fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = text
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .unwrap();
        let found = walk(root, &[id].into_iter().collect());
        assert_eq!(found.get(&id).map(String::as_str), Some(path));

        let names = Names::spawn().unwrap();
        assert_eq!(names.path(id), None, "resolved off the caller's thread");
        let deadline = Instant::now() + Duration::from_secs(10);
        let resolved = loop {
            if let Some(path) = names.path(id) {
                break path;
            }
            assert!(Instant::now() < deadline, "never resolved");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(&*resolved, path);
        assert_eq!(names.path(0), None);
    }
}
