//! deploy/kubernetes/daemonset.yaml: valid against the Kubernetes API's types (offline, with
//! k8s-openapi: a misspelt or misplaced field, a wrong type or a missing required field fails),
//! and its container's command starts the daemon with no more than the capabilities the
//! manifest gives it (the bounding set and no_new_privs a container runtime would apply; the
//! rest of a pod — namespaces, mounts — is not exercised here).
use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};
use stalltrace_integration::{binary, require_root, status_at, RUNTIME_CAPABILITIES, START_WITHIN};

fn manifest_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn daemon_set() -> DaemonSet {
    serde_yaml_ng::from_str(&manifest_text())
        .unwrap_or_else(|e| panic!("daemonset.yaml is not a valid apps/v1 DaemonSet: {e}"))
}

fn container(daemon_set: &DaemonSet) -> Container {
    let pod = daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.containers.len(), 1);
    pod.containers[0].clone()
}

#[test]
fn the_daemonset_is_a_valid_kubernetes_object() {
    let text = manifest_text();
    let parsed: DaemonSet = daemon_set();
    // k8s-openapi ignores fields it does not know: compare what it understood with the whole
    // document, so that a misspelt or misplaced field fails too.
    let as_written: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let understood = serde_json::to_value(&parsed).unwrap();
    assert_eq!(
        understood, as_written,
        "daemonset.yaml has fields the Kubernetes API does not define where they are"
    );

    let spec = parsed.spec.as_ref().unwrap();
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the selector must match the pod template's labels"
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.host_pid,
        Some(true),
        "hostPID: the daemon reads every process's /proc"
    );
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "true");

    let container = container(&parsed);
    let security = container.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true), "not privileged");
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert!(
        !caps.add.as_ref().unwrap().iter().any(|c| c == "SYS_ADMIN"),
        "CAP_SYS_ADMIN is not needed"
    );
    let mounts: Vec<&str> = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    for path in [
        "/sys/kernel/tracing",
        "/run/stalltrace",
        "/var/log/stalltrace",
    ] {
        assert!(mounts.contains(&path), "{path} is not mounted: {mounts:?}");
    }
}

/// The container's arguments and capabilities start a daemon that answers and runs with the
/// four run-time capabilities only.
#[test]
fn the_daemonsets_command_runs_with_its_capabilities() {
    require_root();
    let container = container(&daemon_set());
    let security = container.security_context.unwrap();
    assert_eq!(security.run_as_user, Some(0));
    let bounding: Vec<String> = security
        .capabilities
        .unwrap()
        .add
        .unwrap()
        .iter()
        .map(|cap| format!("+{}", cap.to_lowercase()))
        .collect();
    let dir = std::env::temp_dir().join(format!("stalltrace-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The node's /var/log/stalltrace and /run/stalltrace, here a directory of the test's.
    let args: Vec<String> = container
        .args
        .unwrap()
        .iter()
        .map(|arg| arg.replace("/var/log/stalltrace", &dir.display().to_string()))
        .collect();
    let socket = dir.join("api.sock");
    let mut command = Command::new("setpriv");
    command
        .arg("--bounding-set")
        .arg(format!("-all,{}", bounding.join(",")))
        .arg("--inh-caps")
        .arg("-all");
    if security.allow_privilege_escalation == Some(false) {
        command.arg("--no-new-privs");
    }
    let mut daemon = command
        .arg(binary())
        .args(&args)
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + START_WITHIN;
    let status = loop {
        if let Some(status) = status_at(&socket) {
            break status;
        }
        if let Some(exit) = daemon.try_wait().unwrap() {
            panic!(
                "the daemon exited ({exit}):\n{}",
                std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the daemon did not answer");
        thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let exit = daemon.wait().unwrap();
    assert_eq!(
        status["privileges"]["capabilities"],
        serde_json::json!(RUNTIME_CAPABILITIES)
    );
    assert!(exit.success(), "{exit}");
    assert!(
        dir.join("events.ndjson").exists(),
        "the events file is where the args say"
    );
    // With exactly its capabilities, nothing is lost: no warning at start, every program
    // attached (the cgroup program for UDP closes needs NET_ADMIN).
    let stderr = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    assert!(!stderr.contains("warn:"), "{stderr}");
    assert_eq!(status["features"]["udp"], true, "{status:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}
