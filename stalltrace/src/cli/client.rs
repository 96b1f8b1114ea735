//! The client commands: send one request to the daemon, print the answer.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{value::RawValue, Value};

use super::{
    table::{bytes, endpoint, Table},
    Format,
};
use crate::{
    api::{self, Command, Request, Response},
    duration::format_millis,
    sinks::json::ConnItemJson,
};

/// Queries can take a while on hosts with very many connections (one kernel lookup each).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the stalltrace daemon at {} (is `stalltrace daemon` running? \
             start it as root, or pass --socket)",
            socket.display()
        )
    })
}

fn send(stream: &mut UnixStream, command: Command) -> Result<()> {
    let request = Request {
        version: api::VERSION,
        command,
    };
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .context("sending the request")
}

fn read_response(reader: &mut impl std::io::BufRead) -> Result<Box<RawValue>> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the daemon's answer")?;
    if line.is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    let response: Response =
        serde_json::from_str(&line).context("the daemon's answer is not valid JSON")?;
    match (response.ok, response.result, response.error) {
        (true, Some(result), _) => Ok(result),
        (_, _, Some(error)) => bail!(
            "the daemon refused the request ({}): {}",
            error.code,
            error.message
        ),
        _ => bail!("the daemon sent an empty answer"),
    }
}

/// Sends `command` and returns the `result` of the answer, as raw JSON.
pub fn query(socket: &Path, command: Command) -> Result<Box<RawValue>> {
    let mut stream = connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    send(&mut stream, command)?;
    read_response(&mut BufReader::new(stream))
}

pub fn status(socket: &Path, format: Format) -> Result<()> {
    let status: Value = serde_json::from_str(query(socket, Command::Status)?.get())?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Format::Table => print!("{}", render_status(&status)),
    }
    Ok(())
}

fn render_status(status: &Value) -> String {
    let number = |path: &str| status.pointer(path).and_then(Value::as_u64).unwrap_or(0);
    let mut out = format!(
        "stalltrace {} (pid {}), up {}\n\
         stall threshold: {}\n\
         connections:     {} tracked, {} stalled, {} watched (capacity {})\n\
         events:          {} from the kernel, {} written to {}\n\
         lost:            {}\n",
        status["version"].as_str().unwrap_or("?"),
        number("/pid"),
        format_millis(number("/uptime_ms")),
        format_millis(number("/stall_after_ms")),
        number("/connections/tracked"),
        number("/connections/stalled"),
        number("/connections/watched"),
        number("/connections/capacity"),
        number("/events/kernel"),
        number("/events/written"),
        status["events_to"].as_str().unwrap_or("?"),
        number("/lost_total"),
    );
    if let Some(lost) = status["lost"].as_object() {
        for (cause, count) in lost.iter().filter(|(_, c)| c.as_u64() != Some(0)) {
            out.push_str(&format!("  {cause}: {count}\n"));
        }
    }
    out.push_str("hooks:\n");
    for program in status["programs"].as_array().into_iter().flatten() {
        let runs = program["run_count"].as_u64().unwrap_or(0);
        let stats = match runs {
            0 => String::new(),
            _ => {
                let avg = program["run_time_ns"].as_u64().unwrap_or(0) / runs;
                format!(" ({runs} runs, {avg} ns avg)")
            }
        };
        out.push_str(&format!(
            "  {} -> {}{stats}\n",
            program["program"].as_str().unwrap_or("?"),
            program["hook"].as_str().unwrap_or("?")
        ));
    }
    out
}

pub fn conns(socket: &Path, filter: api::Filter, format: Format) -> Result<()> {
    let result = query(socket, Command::Conns { filter })?;
    print_items(&result, format, render_conns)
}

/// Prints a list answer as JSON, or as the table `render` makes of its items.
fn print_items(
    result: &RawValue,
    format: Format,
    render: fn(&[ConnItemJson]) -> String,
) -> Result<()> {
    let items: Vec<ConnItemJson> = serde_json::from_str(result.get())
        .context("the daemon's answer has an unexpected shape")?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&items)?),
        Format::Table => print!("{}", render(&items)),
    }
    Ok(())
}

fn render_conns(items: &[ConnItemJson]) -> String {
    let mut table = Table::new(&[
        ("ID", true),
        ("ROLE", false),
        ("STATE", false),
        ("PID", true),
        ("COMM", false),
        ("LOCAL", false),
        ("PEER", false),
        ("SENT", true),
        ("RECV", true),
        ("EXCH", true),
        ("LAST-SEND", true),
        ("LAST-RECV", true),
    ]);
    let ago = |ms: Option<u64>| ms.map_or("-".to_owned(), format_millis);
    for item in items {
        let conn = &item.conn;
        let (pid, comm) = process_cells(&item.process);
        table.push(vec![
            conn.id.to_string(),
            conn.role.to_string(),
            conn.state.as_deref().unwrap_or_default().to_owned(),
            pid,
            comm,
            endpoint(&item.network.local.address, item.network.local.port),
            endpoint(&item.network.peer.address, item.network.peer.port),
            conn.bytes_sent.map_or("-".into(), bytes),
            conn.bytes_received.map_or("-".into(), bytes),
            conn.exchanges.map_or("-".into(), |n| n.to_string()),
            ago(conn.last_send_ago_ms),
            ago(conn.last_receive_ago_ms),
        ]);
    }
    format!("{}{} connections\n", table.render(), items.len())
}

fn process_cells(process: &Option<crate::sinks::json::ProcessJson>) -> (String, String) {
    match process {
        Some(p) => (p.pid.to_string(), p.executable.name.clone()),
        None => ("-".into(), "-".into()),
    }
}

pub fn stalls(
    socket: &Path,
    filter: api::Filter,
    older_than_ms: Option<u64>,
    format: Format,
) -> Result<()> {
    let result = query(
        socket,
        Command::Stalls {
            filter,
            older_than_ms,
        },
    )?;
    print_items(&result, format, render_stalls)
}

fn render_stalls(items: &[ConnItemJson]) -> String {
    if items.is_empty() {
        return "no open stalls\n".into();
    }
    let mut table = Table::new(&[
        ("ID", true),
        ("KIND", false),
        ("AGE", true),
        ("PID", true),
        ("COMM", false),
        ("TID", true),
        ("LOCAL", false),
        ("PEER", false),
        ("QUIET SINCE", false),
    ]);
    for item in items {
        let (pid, comm) = process_cells(&item.process);
        let stall = item.stall.clone().unwrap_or_default();
        table.push(vec![
            item.conn.id.to_string(),
            stall.kind.into_owned(),
            stall.age_ms.map_or("-".into(), format_millis),
            pid,
            comm,
            item.thread
                .as_ref()
                .map_or("-".into(), |t| t.id.to_string()),
            endpoint(&item.network.local.address, item.network.local.port),
            endpoint(&item.network.peer.address, item.network.peer.port),
            stall.since.unwrap_or_default(),
        ]);
    }
    format!("{}{} open stalls\n", table.render(), items.len())
}

/// Copies the daemon's event stream to stdout until the daemon or the reader goes away.
pub fn watch(socket: &Path, filter: api::Filter) -> Result<()> {
    let mut stream = connect(socket)?;
    send(&mut stream, Command::Watch { filter })?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader)?;
    let stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).context("reading events")? == 0 {
            bail!("the daemon closed the event stream (stopped?)");
        }
        let mut out = stdout.lock();
        if out
            .write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader of our stdout went away (e.g. `| head`): a normal end.
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stalls_table_shows_kind_age_and_process() {
        let item: ConnItemJson = serde_json::from_value(json!({
            "conn": {"id": 3, "role": "server"},
            "process": {"pid": 77, "executable": {"name": "api"}},
            "thread": {"id": 78},
            "network": {"transport": "tcp", "type": "ipv4",
                "local": {"address": "127.0.0.1", "port": 8080},
                "peer": {"address": "127.0.0.1", "port": 50000}},
            "stall": {"kind": "unanswered_request", "age_ms": 65000, "since": "T"}
        }))
        .unwrap();
        let text = render_stalls(&[item]);
        assert!(text.starts_with(
            "ID  KIND                  AGE  PID  COMM  TID  LOCAL           PEER             QUIET SINCE\n"
        ), "{text}");
        assert!(
            text.contains(
                " 3  unanswered_request  1m05s   77  api    78  127.0.0.1:8080  127.0.0.1:50000  T"
            ),
            "{text}"
        );
        assert_eq!(render_stalls(&[]), "no open stalls\n");
    }

    #[test]
    fn unreachable_daemon_is_one_clear_error() {
        let err = query(Path::new("/nonexistent/stalltrace.sock"), Command::Status).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("is `stalltrace daemon` running?"), "{text}");
    }

    #[test]
    fn status_renders_losses_by_cause() {
        let text = render_status(&json!({
            "version": "0.1.0", "pid": 1, "uptime_ms": 61000, "stall_after_ms": 5000,
            "connections": {"tracked": 3, "stalled": 1, "watched": 2, "capacity": 10},
            "events": {"kernel": 9, "written": 4}, "events_to": "stdout",
            "lost": {"kernel_ringbuf_full": 2, "watch_dropped": 0}, "lost_total": 2,
            "programs": [{"program": "p", "hook": "tracepoint/a/b"}]
        }));
        assert!(text.contains("up 1m01s"), "{text}");
        assert!(text.contains("kernel_ringbuf_full: 2"), "{text}");
        assert!(!text.contains("watch_dropped"), "{text}");
        assert!(text.contains("p -> tracepoint/a/b"), "{text}");
    }
}
