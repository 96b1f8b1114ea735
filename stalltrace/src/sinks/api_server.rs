//! The control API server: a Unix socket (mode 0660), one task per client. Queries go to the
//! daemon's main loop, which owns all state; `watch` clients stream event lines. A malformed,
//! oversized or slow request gets an error reply and never disturbs the daemon; a client that
//! stops reading its answer (or its `watch` stream) is dropped after `WRITE_TIMEOUT`.
use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot, Semaphore},
};

use stalltrace_core::api::{self, Command, ErrorCode, Filter, Response};

use crate::sinks::ndjson::WatchLine;

const MAX_CLIENTS: usize = 64;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after its request an answer may take to be computed and written (and writing one
/// `watch` line may take) before the client is dropped, with its slot and the answer's memory:
/// clients that stop reading hold slots for at most this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Answers above this size (bytes) are followed by returning their memory to the OS.
const LARGE_ANSWER: usize = 1 << 20;

/// A query for the main loop, with where to send its answer.
pub struct Query {
    pub command: Command,
    pub reply: oneshot::Sender<Answer>,
}

/// The main loop's answer to a query.
pub enum Answer {
    Whole(Response),
    /// A successful list answer, streamed: chunks of serialized items, each starting with a
    /// comma but the first, until the sender is dropped. The daemon never holds the whole
    /// list (`conns` on a host with 100 000 connections).
    Items(mpsc::Receiver<String>),
}

pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Binds the socket, refusing to steal it from a running daemon and replacing a stale one
    /// (never anything that is not a socket); `group` becomes its group.
    pub fn bind(path: &Path, group: Option<&str>) -> Result<Self> {
        let gid = group.map(group_id).transpose()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        }
        if let Ok(existing) = std::fs::symlink_metadata(path) {
            if !existing.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; refusing to delete it: give another \
                     --socket, or remove it yourself",
                    path.display()
                );
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another stalltrace daemon is already serving {}; stop it first, or give \
                     this one another --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the API socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("setting the group of {}", path.display()))?;
        }
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients until the process ends.
    pub fn spawn(
        self,
        queries: mpsc::Sender<Query>,
        watchers: broadcast::Sender<Arc<WatchLine>>,
        watch_dropped: Arc<AtomicU64>,
    ) -> PathBuf {
        let path = self.path.clone();
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        tokio::spawn(async move {
            loop {
                let stream = match self.listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        log::warn!("API accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tokio::spawn(reply_and_close(
                        stream,
                        Response::error(
                            ErrorCode::Busy,
                            format!("more than {MAX_CLIENTS} API clients"),
                        ),
                    ));
                    continue;
                };
                let client = Client {
                    queries: queries.clone(),
                    watchers: watchers.clone(),
                    watch_dropped: watch_dropped.clone(),
                };
                tokio::spawn(async move {
                    client.serve(stream).await;
                    drop(slot);
                });
            }
        });
        path
    }
}

struct Client {
    queries: mpsc::Sender<Query>,
    watchers: broadcast::Sender<Arc<WatchLine>>,
    watch_dropped: Arc<AtomicU64>,
}

impl Client {
    async fn serve(self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read).take(api::MAX_REQUEST_BYTES as u64 + 1);
        let mut line = String::new();
        let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
        let mut deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        let response = match read {
            Err(_) => Response::error(
                ErrorCode::Timeout,
                format!(
                    "no complete request line within {}s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            ),
            Ok(Err(err)) => {
                Response::error(ErrorCode::BadRequest, format!("unreadable request: {err}"))
            }
            Ok(Ok(_)) if line.len() > api::MAX_REQUEST_BYTES => Response::error(
                ErrorCode::TooLarge,
                format!("requests are limited to {} bytes", api::MAX_REQUEST_BYTES),
            ),
            Ok(Ok(_)) => match api::parse_request(line.trim_end()) {
                Err(error) => Response::failed(error),
                Ok(request) => match request.command {
                    Command::Watch { filter } => {
                        self.watch(write, filter).await;
                        return;
                    }
                    command => match tokio::time::timeout_at(deadline, self.ask(command)).await {
                        Ok(Answer::Whole(response)) => response,
                        Ok(Answer::Items(chunks)) => {
                            let _ = write_items(&mut write, chunks).await;
                            return;
                        }
                        Err(_) => {
                            // A short error line: it fits in the socket's buffer.
                            deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
                            Response::error(
                                ErrorCode::Timeout,
                                format!("no answer within {}s", WRITE_TIMEOUT.as_secs()),
                            )
                        }
                    },
                },
            },
        };
        let _ = write_answer(&mut write, &response, deadline).await;
        if response
            .result
            .as_ref()
            .is_some_and(|r| r.get().len() > LARGE_ANSWER)
        {
            drop(response);
            crate::heap::release_free_memory();
        }
    }

    async fn ask(&self, command: Command) -> Answer {
        let (reply, answer) = oneshot::channel();
        if self.queries.send(Query { command, reply }).await.is_err() {
            return Answer::Whole(Response::error(
                ErrorCode::Internal,
                "the daemon is shutting down",
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Answer::Whole(Response::error(
                ErrorCode::Internal,
                "the daemon dropped the query",
            ))
        })
    }

    /// Streams event lines matching `filter` until the client goes away.
    async fn watch(self, mut write: tokio::net::unix::OwnedWriteHalf, filter: Filter) {
        let mut events = self.watchers.subscribe();
        let started = Response::ok(&serde_json::json!({"watching": true}));
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        if write_answer(&mut write, &started, deadline).await.is_err() {
            return;
        }
        loop {
            let line = match events.recv().await {
                Ok(line) => line,
                Err(broadcast::error::RecvError::Lagged(dropped)) => {
                    self.watch_dropped.fetch_add(dropped, Ordering::Relaxed);
                    let notice = serde_json::json!({
                        "time": stalltrace_core::timefmt::rfc3339_ns(stalltrace_core::timefmt::realtime_ns()),
                        "event": "loss",
                        "schema": stalltrace_core::api::schema::EVENT_SCHEMA,
                        "loss": {"watch_dropped": dropped},
                    });
                    if write_line(&mut write, format!("{notice}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let selected = match &line.endpoints {
                Some(endpoints) => {
                    filter.matches(line.pid, &line.comm, endpoints)
                        && filter.matches_path(line.path.as_deref())
                        && (!filter.selects_cgroup()
                            || filter.matches_cgroup(line.cgroup_id, line.cgroup_path.as_deref()))
                }
                None => true,
            };
            if selected && write_line(&mut write, line.line.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

async fn write_response(
    write: &mut (impl tokio::io::AsyncWrite + Unpin),
    response: &Response,
) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response).expect("responses serialize");
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.flush().await
}

/// Writes an answer, giving up at `deadline`.
async fn write_answer(
    write: &mut (impl tokio::io::AsyncWrite + Unpin),
    response: &Response,
    deadline: tokio::time::Instant,
) -> std::io::Result<()> {
    tokio::time::timeout_at(deadline, write_response(write, response))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Writes one `watch` line, giving up after `WRITE_TIMEOUT`: a client that stopped reading
/// loses its stream (lines it misses meanwhile are counted by the broadcast channel).
async fn write_line(
    write: &mut (impl tokio::io::AsyncWrite + Unpin),
    line: &[u8],
) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, write.write_all(line))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Writes a streamed list answer as one response line, chunk by chunk as they come.
async fn write_items(
    write: &mut (impl tokio::io::AsyncWrite + Unpin),
    mut chunks: mpsc::Receiver<String>,
) -> std::io::Result<()> {
    let head = format!("{{\"version\":{},\"ok\":true,\"result\":[", api::VERSION);
    write.write_all(head.as_bytes()).await?;
    while let Some(chunk) = chunks.recv().await {
        // A client that stops reading must not hold its slot and the stream forever: dropping
        // `chunks` ends it in the main loop.
        tokio::time::timeout(WRITE_TIMEOUT, write.write_all(chunk.as_bytes()))
            .await
            .map_err(|_| std::io::Error::other("client stopped reading"))??;
    }
    write.write_all(b"]}\n").await?;
    write.flush().await
}

async fn reply_and_close(mut stream: UnixStream, response: Response) {
    let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
    let _ = write_answer(&mut stream, &response, deadline).await;
}

/// The id of the group `name`.
fn group_id(name: &str) -> Result<u32> {
    let c_name =
        std::ffi::CString::new(name).with_context(|| format!("invalid group name {name:?}"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    loop {
        // SAFETY: all-zero is a valid `group` (null pointers, zero ids).
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call; `buf` outlives `group`.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            bail!(
                "looking up the group {name:?} for --socket-group: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        if found.is_null() {
            bail!("--socket-group: no group named {name:?} on this system");
        }
        return Ok(group.gr_gid);
    }
}
