//! What a cgroup path says about a process's container: the container runtimes name the
//! cgroup of each container after its id.
//!
//! | runtime | cgroup path (cgroupfs driver / systemd driver) |
//! |---|---|
//! | docker | `/docker/<id>` / `/system.slice/docker-<id>.scope` |
//! | containerd (Kubernetes) | `/kubepods/<qos>/pod<uid>/<id>` / `…/cri-containerd-<id>.scope` |
//! | cri-o | `…/crio-<id>` / `…/crio-<id>.scope` (`crio-conmon-<id>` is its monitor, not the container) |
//! | podman | `/libpod_parent/libpod-<id>` / `/machine.slice/libpod-<id>.scope[/container]` |
//!
//! Ids are 64 lowercase hexadecimal digits.

/// Runtimes' prefixes of a container's cgroup directory name.
const PREFIXES: [&str; 5] = [
    "docker-",
    "cri-containerd-",
    "crio-",
    "libpod-",
    "containerd-",
];
const ID_LEN: usize = 64;

/// The container id a cgroup path holds (the innermost one, for nested runtimes), or `None`.
pub fn container_id(path: &str) -> Option<&str> {
    path.rsplit('/').find_map(|component| {
        let name = component.strip_suffix(".scope").unwrap_or(component);
        let id = PREFIXES
            .iter()
            .find_map(|prefix| name.strip_prefix(prefix))
            .unwrap_or(name);
        is_id(id).then_some(id)
    })
}

fn is_id(text: &str) -> bool {
    text.len() == ID_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `path` is the cgroup `want` or one below it (`/system.slice` selects
/// `/system.slice/nginx.service`, not `/system.slice-other`).
pub fn is_within(path: &str, want: &str) -> bool {
    let want = want.trim_end_matches('/');
    want.is_empty()
        || path
            .strip_prefix(want)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3";

    #[test]
    fn the_runtimes_patterns_give_the_container_id() {
        for path in [
            format!("/docker/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods/burstable/pod0b1c2d3e-aaaa-bbbb-cccc-0123456789ab/{ID}"),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod0b1c2d3e_aaaa.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod1.slice/crio-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/libpod_parent/libpod-{ID}"),
        ] {
            assert_eq!(container_id(&path), Some(ID), "{path}");
        }
    }

    #[test]
    fn other_cgroups_hold_no_container_id() {
        for path in [
            "/",
            "/system.slice/nginx.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/machine.slice/libpod-conmon-3f2a9c.scope",
            // A runtime's monitor process is not in the container.
            &format!("/kubepods.slice/crio-conmon-{ID}.scope"),
            // Not 64 digits, or not lowercase hexadecimal.
            "/docker/3f2a9c",
            &format!("/docker/{}", ID.to_uppercase()),
            &format!("/docker/{}g", &ID[1..]),
            "",
        ] {
            assert_eq!(container_id(path), None, "{path}");
        }
    }

    #[test]
    fn within_is_the_cgroup_or_below() {
        assert!(is_within("/system.slice/nginx.service", "/system.slice"));
        assert!(is_within("/system.slice/nginx.service", "/system.slice/"));
        assert!(is_within("/system.slice", "/system.slice"));
        assert!(is_within("/anything", "/"));
        assert!(!is_within("/system.slice-other/x", "/system.slice"));
        assert!(!is_within("/user.slice", "/system.slice"));
    }
}
