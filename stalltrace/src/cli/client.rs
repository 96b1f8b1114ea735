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
    table::{bytes, endpoint, sanitize_json, terminal_safe, Table, Terminal},
    Format,
};
use stalltrace_core::{
    api::{self, schema::ConnItemJson, Command, Request, Response},
    diagnosis::{Confidence, Diagnosis, ThreadVerdict},
    duration::format_millis,
    why::WhyRow,
};

/// Queries can take a while on hosts with very many connections (one kernel lookup each).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).map_err(|err| {
        let hint = if err.kind() == std::io::ErrorKind::PermissionDenied {
            "the socket is the daemon's (mode 0660): run as root, or as a member of the group \
             the daemon gives it with --socket-group"
        } else {
            "is `stalltrace daemon` running? start it as root, or pass --socket"
        };
        anyhow::anyhow!(
            "cannot reach the stalltrace daemon at {} ({hint}): {err}",
            socket.display()
        )
    })
}

/// Sends `command`. A daemon that refuses a client (too many already: `busy`) answers and
/// closes at once, so the request may not go out: its answer is then what to report.
fn send(stream: &mut UnixStream, command: Command) -> Result<()> {
    let request = Request {
        version: api::VERSION,
        command,
    };
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    match stream.write_all(line.as_bytes()) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {
            read_response(&mut BufReader::new(&*stream))?;
            Err(err).context("sending the request")
        }
        Err(err) => Err(err).context("sending the request"),
    }
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
            terminal_safe(&error.code.to_string()),
            terminal_safe(&error.message)
        ),
        _ => bail!("the daemon sent an empty answer"),
    }
}

/// An answer, with every string made terminal-safe, as the type a text renderer takes.
fn for_terminal<T: serde::de::DeserializeOwned>(result: &RawValue) -> Result<T> {
    let mut value: Value =
        serde_json::from_str(result.get()).context("the daemon's answer is not valid JSON")?;
    sanitize_json(&mut value);
    serde_json::from_value(value).context("the daemon's answer has an unexpected shape")
}

/// Sends `command` and returns the `result` of the answer, as raw JSON.
pub fn query(socket: &Path, command: Command) -> Result<Box<RawValue>> {
    let mut stream = connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    send(&mut stream, command)?;
    read_response(&mut BufReader::new(stream))
}

/// Prints `value` as pretty JSON or as YAML (one document); false for `Format::Table`, which
/// the caller renders.
fn print_structured(value: &impl serde::Serialize, format: Format) -> Result<bool> {
    // Written as it is made: a `conns` of 200 000 items is 150 MB of pretty JSON.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, value)?;
            out.write_all(b"\n")?;
        }
        Format::Yaml => serde_norway::to_writer(&mut out, value)?,
        Format::Table => return Ok(false),
    }
    out.flush()?;
    Ok(true)
}

pub fn status(socket: &Path, format: Format) -> Result<()> {
    let result = query(socket, Command::Status)?;
    let status: Value = serde_json::from_str(result.get())?;
    if !print_structured(&status, format)? {
        print!("{}", render_status(&for_terminal(&result)?));
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
    let recovered = number("/connections/recovered");
    if recovered > 0 {
        out.push_str(&format!(
            "  {recovered} connections recovered from the kernel's map after lost events\n"
        ));
    }
    let uncounted = number("/connections/http1_runs_uncounted");
    if uncounted > 0 {
        out.push_str(&format!(
            "  {uncounted} HTTP/1.x request runs not all counted: requests pipelined behind \
             those counted were judged by the direction rule alone\n"
        ));
    }
    out.push_str(&format!(
        "diagnosis:       {} open stalls, {} awaiting their first look; {} reported before \
         it, {} looks dropped (worker busy)\n",
        number("/diagnosis/open"),
        number("/diagnosis/held"),
        number("/diagnosis/reported_before_diagnosis"),
        number("/diagnosis/jobs_dropped"),
    ));
    // The loop's longest turn, from daemons that report it.
    if let Some(job) = status
        .pointer("/loop/max_blocked_in")
        .and_then(Value::as_str)
    {
        let ms = |path: &str| format_millis(number(path) / 1000);
        out.push_str(&format!(
            "event loop:      longest turn {} ({job}, {} of it on a CPU); {} since the last \
             status\n",
            ms("/loop/max_blocked_us"),
            ms("/loop/max_blocked_cpu_us"),
            ms("/loop/since_last_status/max_blocked_us"),
        ));
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
    match format {
        Format::Json => stream_json(socket, Command::Conns { filter }),
        Format::Table => stream_conns_table(socket, Command::Conns { filter }),
        Format::Yaml => {
            let result = query(socket, Command::Conns { filter })?;
            let items: Vec<ConnItemJson> = serde_json::from_str(result.get())
                .context("the daemon's answer has an unexpected shape")?;
            print_structured(&items, format).map(drop)
        }
    }
}

/// Sends `command` and gives each item of its streamed list answer to `each` as it arrives
/// (see `items.rs`); how many there were.
fn stream_items<T: serde::de::DeserializeOwned>(
    socket: &Path,
    command: Command,
    each: impl FnMut(T) -> std::io::Result<()>,
) -> Result<usize> {
    let mut stream = connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    send(&mut stream, command)?;
    match super::items::for_each_item(&stream, each) {
        Ok(Ok(count)) => Ok(count),
        Ok(Err(error)) => bail!(
            "the daemon refused the request ({}): {}",
            terminal_safe(&error.code.to_string()),
            terminal_safe(&error.message)
        ),
        Err(err) if err.is_eof() => {
            bail!("the daemon closed the connection before the end of its answer")
        }
        Err(err) => Err(err).context("reading the daemon's answer"),
    }
}

/// Prints a streamed list answer as pretty JSON (as [`print_structured`] would), each item
/// re-indented as it arrives, as the daemon wrote it (members this CLI does not know
/// included): with 200 000 connections, reading the whole answer first doubled the time to
/// the last line and took 500 MB, and parsing each item into its type and back cost as much
/// CPU as the daemon spent making it (on a 2-core host the two often share one core).
fn stream_json(socket: &Path, command: Command) -> Result<()> {
    let mut out = Indented(std::io::BufWriter::new(std::io::stdout().lock()));
    let mut first = true;
    stream_items(socket, command, |item: Box<RawValue>| {
        out.0.write_all(if first { b"[\n  " } else { b",\n  " })?;
        first = false;
        let mut item = serde_json::Deserializer::from_str(item.get());
        serde_transcode::transcode(&mut item, &mut serde_json::Serializer::pretty(&mut out))
            .map_err(std::io::Error::other)
    })?;
    let mut out = out.0;
    out.write_all(if first { b"[]\n" } else { b"\n]\n" })?;
    out.flush()?;
    Ok(())
}

/// The `conns` table, its rows made as the items arrive: with 200 000 connections, the whole
/// answer parsed into a JSON tree first (to make its strings terminal-safe) took 1.7 GB and
/// 8–10 s. Cells are made terminal-safe by [`Table::push`].
fn stream_conns_table(socket: &Path, command: Command) -> Result<()> {
    let mut table = conns_table();
    let count = stream_items(socket, command, |item: ConnItemJson| {
        table.push(conn_row(&item));
        Ok(())
    })?;
    let mut out = std::io::stdout().lock();
    out.write_all(table.render_for(&Terminal::stdout()).as_bytes())?;
    writeln!(out, "{count} connections")?;
    Ok(())
}

/// Writes pretty JSON one level deeper: two spaces after every newline (a JSON string holds
/// none), so that a value written alone reads as an element of an array.
struct Indented<W>(W);

impl<W: std::io::Write> std::io::Write for Indented<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while let Some(at) = buf.iter().position(|&byte| byte == b'\n') {
            self.0.write_all(&buf[..at])?;
            self.0.write_all(b"\n  ")?;
            buf = &buf[at + 1..];
        }
        self.0.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Prints a list answer as JSON or YAML, or as the table `render` makes of its items;
/// returns how many items it had.
fn print_items(
    result: &RawValue,
    format: Format,
    render: fn(&[ConnItemJson], &Terminal) -> String,
) -> Result<usize> {
    let items: Vec<ConnItemJson> = serde_json::from_str(result.get())
        .context("the daemon's answer has an unexpected shape")?;
    if !print_structured(&items, format)? {
        let items = for_terminal::<Vec<ConnItemJson>>(result)?;
        print!("{}", render(&items, &Terminal::stdout()));
    }
    Ok(items.len())
}

fn conns_table() -> Table {
    Table::new(&[
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
    ])
}

/// One connection's row of the `conns` table (cells as the daemon wrote them: [`Table::push`]
/// makes them terminal-safe).
fn conn_row(item: &ConnItemJson) -> Vec<String> {
    let ago = |ms: Option<u64>| ms.map_or("-".to_owned(), format_millis);
    let conn = &item.conn;
    let (pid, comm) = process_cells(&item.process);
    vec![
        conn.id.to_string(),
        conn.role.to_string(),
        conn.state.as_deref().unwrap_or_default().to_owned(),
        pid,
        comm,
        endpoint(&item.network.local),
        endpoint(&item.network.peer),
        conn.bytes_sent.map_or("-".into(), bytes),
        conn.bytes_received.map_or("-".into(), bytes),
        conn.exchanges.map_or("-".into(), |n| n.to_string()),
        ago(conn.last_send_ago_ms),
        ago(conn.last_receive_ago_ms),
    ]
}

fn process_cells(process: &Option<stalltrace_core::api::schema::ProcessJson>) -> (String, String) {
    match process {
        Some(p) => (p.pid.to_string(), p.executable.name.clone()),
        None => ("-".into(), "-".into()),
    }
}

/// Prints the open stalls; returns how many there are.
pub fn stalls(
    socket: &Path,
    filter: api::Filter,
    older_than_ms: Option<u64>,
    format: Format,
) -> Result<usize> {
    let result = query(
        socket,
        Command::Stalls {
            filter,
            older_than_ms,
        },
    )?;
    print_items(&result, format, render_stalls)
}

fn render_stalls(items: &[ConnItemJson], terminal: &Terminal) -> String {
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
        ("REQUEST", false),
        ("WHY", false),
    ]);
    for item in items {
        let (pid, comm) = process_cells(&item.process);
        let stall = item.stall.clone().unwrap_or_default();
        let diagnosis = stall.diagnosis.unwrap_or_default();
        table.push(vec![
            item.conn.id.to_string(),
            stall.kind.into_owned(),
            stall.age_ms.map_or("-".into(), format_millis),
            pid,
            comm,
            item.thread
                .as_ref()
                .map_or("-".into(), |t| t.id.to_string()),
            endpoint(&item.network.local),
            endpoint(&item.network.peer),
            diagnosis
                .request
                .as_ref()
                .map_or("-".into(), |r| r.signature.clone()),
            why_summary(&diagnosis),
        ]);
    }
    format!(
        "{}{} open stalls\n",
        table.render_for(terminal),
        items.len()
    )
}

/// One line on why: the TCP cause, what the thread does, where the chain leads.
fn why_summary(diagnosis: &Diagnosis) -> String {
    let mut parts = Vec::new();
    if let Some(cause) = &diagnosis.cause {
        parts.push(cause.to_string());
    }
    if let Some(thread) = &diagnosis.thread {
        parts.push(verdict_text(&thread.verdict));
    }
    if let Some(root) = diagnosis.blame.last() {
        parts.push(format!("root: conn {}", root.conn));
    }
    if diagnosis.confidence == Confidence::Partial {
        // The reason's lead clause: events lost, or a start inferred at start-up.
        match diagnosis.confidence_reason.as_deref() {
            Some(reason) => parts.push(format!(
                "partial: {}",
                reason.split(':').next().unwrap_or(reason)
            )),
            None => parts.push("partial".into()),
        }
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

fn verdict_text(verdict: &ThreadVerdict) -> String {
    match verdict {
        ThreadVerdict::Spinning { cpu_share, stack } => match stack.first() {
            Some(top) => format!("spinning {:.0}% CPU in {top}", cpu_share * 100.0),
            None => format!("spinning {:.0}% CPU", cpu_share * 100.0),
        },
        ThreadVerdict::Blocked {
            syscall,
            fd,
            fd_target,
            fd_conn,
        } => {
            let mut text = format!("blocked in {syscall}");
            if let Some(fd) = fd {
                text.push_str(&format!("(fd {fd})"));
            }
            match (fd_conn, fd_target) {
                (Some(conn), _) => text.push_str(&format!(" on conn {conn}")),
                (None, Some(target)) => text.push_str(&format!(" on {target}")),
                _ => {}
            }
            text
        }
        ThreadVerdict::Waiting { syscall } => format!("waiting in {syscall}"),
        ThreadVerdict::Starved { cpu_share } => {
            format!("runnable but starved ({:.0}% CPU)", cpu_share * 100.0)
        }
        ThreadVerdict::Gone => "thread gone".into(),
        ThreadVerdict::Unknown => "thread state unknown".into(),
    }
}

pub fn show(socket: &Path, id: u64, format: Format) -> Result<()> {
    let result = query(socket, Command::Show { id })?;
    let answer: Value = serde_json::from_str(result.get())?;
    if !print_structured(&answer, format)? {
        print!("{}", render_show(&for_terminal(&result)?)?);
    }
    Ok(())
}

fn render_show(answer: &Value) -> Result<String> {
    let item: ConnItemJson = serde_json::from_value(answer["item"].clone())
        .context("the daemon's answer has an unexpected shape")?;
    let conn = &item.conn;
    let (pid, comm) = process_cells(&item.process);
    let local = endpoint(&item.network.local);
    let peer = endpoint(&item.network.peer);
    let mut out = format!(
        "conn {} {} {}: {comm} (pid {pid}) {local} <-> {peer}\nopened {}\n",
        conn.id,
        conn.role,
        conn.state.as_deref().unwrap_or("?"),
        answer["opened"].as_str().unwrap_or("?"),
    );
    if let (Some(sent), Some(received)) = (conn.bytes_sent, conn.bytes_received) {
        out.push_str(&format!(
            "sent {} in {} calls, received {} in {} calls, {} requests, {} exchanges\n",
            bytes(sent),
            conn.sends.unwrap_or(0),
            bytes(received),
            conn.receives.unwrap_or(0),
            conn.requests.unwrap_or(0),
            conn.exchanges.unwrap_or(0),
        ));
    }
    if let Some(stall) = &item.stall {
        out.push_str(&format!(
            "stall: {} for {} (quiet since {})\n",
            stall.kind,
            stall.age_ms.map_or("?".into(), format_millis),
            stall.since.as_deref().unwrap_or("?")
        ));
        if let Some(retries) = stall.retries {
            out.push_str(&format!("  retries:    {retries} (request sent again)\n"));
        }
        if let Some(http2) = &stall.http2 {
            out.push_str(&format!(
                "  http2:      stream {} awaits its response\n",
                http2.stream.id
            ));
            if let Some(late) = http2.other_late_streams {
                out.push_str(&format!(
                    "              other streams answered late meanwhile: {late}\n"
                ));
            }
        }
        if let Some(diagnosis) = &stall.diagnosis {
            out.push_str(&render_diagnosis(diagnosis));
        }
    }
    let timeline = answer["timeline"].as_array().cloned().unwrap_or_default();
    if !timeline.is_empty() {
        out.push_str("timeline:\n");
        for event in timeline {
            let stall = &event["stall"];
            let mut line = format!(
                "  {}  {:<12} {}",
                event["time"].as_str().unwrap_or("?"),
                event["event"].as_str().unwrap_or("?"),
                stall["kind"].as_str().unwrap_or(""),
            );
            if let Some(resolution) = resolution_text(stall) {
                line.push_str(&format!(
                    " -> {resolution} after {} ms",
                    stall["duration_ms"]
                ));
            }
            if let Some(cause) = stall["cause"].as_str() {
                line.push_str(&format!(" ({cause})"));
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    Ok(out)
}

fn render_diagnosis(diagnosis: &Diagnosis) -> String {
    let mut out = String::new();
    if let Some(cause) = &diagnosis.cause {
        out.push_str(&format!("  cause:      {cause}"));
        if let Some(tcp) = &diagnosis.tcp {
            out.push_str(&format!(
                " (recv-q {}, send-q {}, unacked {}, retransmits {})",
                tcp.recv_queue, tcp.send_queue, tcp.unacked, tcp.total_retransmits
            ));
        }
        out.push('\n');
    }
    if let Some(request) = &diagnosis.request {
        out.push_str(&format!(
            "  request:    {} ({})\n",
            request.signature, request.protocol
        ));
    }
    if let Some(thread) = &diagnosis.thread {
        out.push_str(&format!(
            "  thread {}: {}\n",
            thread.id,
            verdict_text(&thread.verdict)
        ));
        if let ThreadVerdict::Spinning { stack, .. } = &thread.verdict {
            for frame in stack {
                out.push_str(&format!("      {frame}\n"));
            }
        }
    }
    for (index, link) in diagnosis.blame.iter().enumerate() {
        let label = if index == 0 {
            "  blame:     "
        } else {
            "             <-"
        };
        let who = match (&link.executable, link.pid) {
            (Some(exe), Some(pid)) => format!("{exe} (pid {pid})"),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{label} conn {} {} {} {} -> {}{}{}\n",
            link.conn,
            link.role,
            who,
            link.local,
            link.peer,
            link.stall
                .as_ref()
                .map_or(String::new(), |s| format!(" [{s}]")),
            link.via
                .as_ref()
                .map_or(String::new(), |v| format!(" (via {v})")),
        ));
    }
    out.push_str(&format!("  confidence: {}", diagnosis.confidence));
    if let Some(reason) = &diagnosis.confidence_reason {
        out.push_str(&format!(": {reason}"));
    }
    out.push('\n');
    out
}

pub fn why(socket: &Path, filter: api::Filter, limit: usize, format: Format) -> Result<()> {
    let result = query(socket, Command::Why { filter })?;
    let rows: Vec<WhyRow> = serde_json::from_str(result.get())
        .context("the daemon's answer has an unexpected shape")?;
    if !print_structured(&rows, format)? {
        let rows = for_terminal::<Vec<WhyRow>>(&result)?;
        print!("{}", render_why(&rows, limit, &Terminal::stdout()));
    }
    Ok(())
}

fn render_why(rows: &[WhyRow], limit: usize, terminal: &Terminal) -> String {
    if rows.is_empty() {
        return "no requests sampled yet\n".into();
    }
    let percent = |share: f64| format!("{:.1}%", share * 100.0);
    let ms = |value: Option<f64>| value.map_or("-".into(), |v| format!("{v:.1}ms"));
    let mut table = Table::new(&[
        ("STALLS", true),
        ("OF STALLS", true),
        ("COMPLETED", true),
        ("OF COMPLETED", true),
        ("P50", true),
        ("P99", true),
        ("PROCESS", false),
        ("ROLE", false),
        ("ENDPOINT", false),
        ("REQUEST", false),
    ]);
    for row in rows.iter().take(limit) {
        table.push(vec![
            row.stalls.to_string(),
            percent(row.stall_share),
            row.completed.to_string(),
            percent(row.completed_share),
            ms(row.p50_ms),
            ms(row.p99_ms),
            row.key.executable.clone(),
            row.key.role.clone(),
            row.key.endpoint.clone(),
            row.key.signature.clone(),
        ]);
    }
    let mut out = table.render_for(terminal);
    if let Some(top) = rows.first().filter(|r| r.stalls > 0) {
        out.push_str(&format!(
            "\n{} accounts for {} of stalls and {} of completed requests{}.\n",
            top.key.signature,
            percent(top.stall_share),
            percent(top.completed_share),
            top.p99_ms.map_or(String::new(), |p| format!(
                " (p99 to the first response byte when completed: {p:.1} ms)"
            )),
        ));
    }
    if rows.len() > limit {
        out.push_str(&format!(
            "({} more groups: --limit or -o json)\n",
            rows.len() - limit
        ));
    }
    out.push_str(
        "completed requests are sampled (each connection's first, then one per connection per \
         sweep)\n",
    );
    out
}

/// Prints the daemon's event stream until the daemon or the reader goes away: the NDJSON lines
/// as they come (`json`), one YAML document per event, or one readable line per event
/// (`table`).
pub fn watch(socket: &Path, filter: api::Filter, format: Format) -> Result<()> {
    let terminal = Terminal::stdout();
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
        let text = match format {
            Format::Json => std::borrow::Cow::Borrowed(line.as_str()),
            Format::Yaml => {
                let event: Value =
                    serde_json::from_str(&line).context("the daemon sent an invalid event")?;
                format!("---\n{}", serde_norway::to_string(&event)?).into()
            }
            Format::Table => {
                let mut event: Value =
                    serde_json::from_str(&line).context("the daemon sent an invalid event")?;
                sanitize_json(&mut event);
                format!("{}\n", event_line(&event, &terminal)).into()
            }
        };
        let mut out = stdout.lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader of our stdout went away (e.g. `| head`): a normal end.
            return Ok(());
        }
    }
}

/// How a stall ended, for people: `stall.resolution`, with the end that reset an HTTP/2
/// stream (`stream_reset by client`).
fn resolution_text(stall: &Value) -> Option<String> {
    let resolution = stall["resolution"].as_str()?;
    Some(
        match stall
            .pointer("/http2/stream/reset_by")
            .and_then(Value::as_str)
        {
            Some(by) => format!("{resolution} by {by}"),
            None => resolution.to_owned(),
        },
    )
}

/// One event on one line: time (UTC, ms), event, connection, process, endpoints, then what
/// the event says (stall kind, quiet time or duration, resolution, cause, request; losses by
/// cause). `event`'s strings must be terminal-safe already.
fn event_line(event: &Value, terminal: &Terminal) -> String {
    use anstyle::{AnsiColor, Style};
    let text = |pointer: &str| event.pointer(pointer).and_then(Value::as_str);
    let number = |pointer: &str| event.pointer(pointer).and_then(Value::as_u64);
    // `2026-11-27T22:58:42.633452694Z` -> `22:58:42.633`
    let time = text("/time").map_or("?", |t| t.get(11..23).unwrap_or(t));
    let name = text("/event").unwrap_or("?");
    let colour = match name {
        "stall.start" | "loss" => Some(AnsiColor::Red),
        "stall.update" => Some(AnsiColor::Yellow),
        "stall.end" => Some(AnsiColor::Green),
        _ => None,
    };
    let style = colour.map_or(Style::new(), |c| {
        Style::new().fg_color(Some(c.into())).bold()
    });
    let mut line = format!("{time}  {}", terminal.paint(&format!("{name:<12}"), style));
    if name == "loss" {
        let causes = event["loss"]["new"]
            .as_object()
            .or(event["loss"].as_object())
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
            .map(|(cause, n)| format!("{cause}={n}"))
            .collect::<Vec<_>>();
        line.push_str(&format!(" {}", causes.join(" ")));
        return line;
    }
    let endpoint_of = |side: &str| {
        event
            .pointer(&format!("/network/{side}"))
            .and_then(|end| serde_json::from_value(end.clone()).ok())
            .map_or_else(|| "?".to_owned(), |end| endpoint(&end))
    };
    line.push_str(&format!(
        " conn {} {} {}[{}] {} -> {}",
        number("/conn/id").unwrap_or(0),
        text("/conn/role").unwrap_or("?"),
        text("/process/executable/name").unwrap_or("-"),
        number("/process/pid").map_or("-".into(), |p| p.to_string()),
        endpoint_of("local"),
        endpoint_of("peer"),
    ));
    let stall = &event["stall"];
    let mut details = Vec::new();
    if let Some(kind) = stall["kind"].as_str() {
        details.push(kind.to_owned());
    }
    if let Some(severity) = stall["severity"].as_str() {
        details.push(format!("severity {severity}"));
    }
    if let Some(quiet) = stall["quiet_ms"].as_u64() {
        details.push(format!("quiet {}", format_millis(quiet)));
    }
    if let Some(resolution) = resolution_text(stall) {
        let after = stall["duration_ms"]
            .as_u64()
            .map_or("?".into(), format_millis);
        details.push(format!("{resolution} after {after}"));
    }
    if let Some(cause) = stall["cause"].as_str() {
        details.push(cause.to_owned());
    }
    if let Some(signature) = stall.pointer("/request/signature").and_then(Value::as_str) {
        details.push(signature.to_owned());
    }
    if let Some(end) = text("/conn/end") {
        let after = number("/conn/duration_ms").map_or("?".into(), format_millis);
        details.push(format!("{end} after {after}"));
    }
    if event.pointer("/conn/adopted") == Some(&Value::Bool(true)) {
        details.push("adopted".into());
    }
    if !details.is_empty() {
        line.push_str("  ");
        line.push_str(&details.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn items_written_one_by_one_read_as_the_pretty_array() {
        use std::io::Write as _;
        let items = [
            serde_json::json!({"conn": {"id": 1, "state": "idle"}, "a": [1, 2], "s": "x\ny"}),
            serde_json::json!({"conn": {"id": 2}, "a": []}),
        ];
        let mut out = super::Indented(Vec::new());
        for (i, item) in items.iter().enumerate() {
            out.0
                .write_all(if i == 0 { b"[\n  " } else { b",\n  " })
                .unwrap();
            serde_json::to_writer_pretty(&mut out, item).unwrap();
        }
        out.0.extend_from_slice(b"\n]");
        let whole = serde_json::to_string_pretty(&items).unwrap();
        assert_eq!(String::from_utf8(out.0).unwrap(), whole);
    }

    #[test]
    fn a_partial_diagnosis_says_why_in_a_few_words() {
        let mut diagnosis = Diagnosis {
            confidence: Confidence::Partial,
            confidence_reason: Some(
                "the request predates the daemon: its start is inferred from the socket's \
                 tcp_info"
                    .into(),
            ),
            ..Diagnosis::default()
        };
        assert_eq!(
            why_summary(&diagnosis),
            "partial: the request predates the daemon"
        );
        diagnosis.confidence_reason = None;
        assert_eq!(why_summary(&diagnosis), "partial");
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn stalls_table_shows_kind_age_process_request_and_why() {
        let item: ConnItemJson = serde_json::from_value(json!({
            "conn": {"id": 3, "role": "server"},
            "process": {"pid": 77, "executable": {"name": "api"}},
            "thread": {"id": 78},
            "network": {"transport": "tcp", "type": "ipv4",
                "local": {"address": "127.0.0.1", "port": 8080},
                "peer": {"address": "127.0.0.1", "port": 50000}},
            "stall": {"kind": "unanswered_request", "age_ms": 65000, "since": "T",
                "cause": "read_no_reply", "confidence": "full",
                "thread": {"id": 78, "verdict": "blocked", "syscall": "recvfrom", "fd": 9,
                    "fd_conn": 4},
                "blame": [
                    {"conn": 3, "role": "server", "local": "127.0.0.1:8080",
                        "peer": "127.0.0.1:50000"},
                    {"conn": 4, "role": "client", "local": "127.0.0.1:40000",
                        "peer": "127.0.0.1:5432"}
                ],
                "request": {"protocol": "http", "signature": "GET /coupon/apply"}}
        }))
        .unwrap();
        let text = render_stalls(&[item], &Terminal::plain());
        let header = text.lines().next().unwrap();
        assert!(
            header.starts_with("ID  KIND                  AGE  PID  COMM  TID  LOCAL"),
            "{text}"
        );
        assert!(header.ends_with("REQUEST            WHY"), "{text}");
        let row = text.lines().nth(1).unwrap();
        assert!(
            row.starts_with(" 3  unanswered_request  1m05s   77  api    78  127.0.0.1:8080"),
            "{text}"
        );
        assert!(
            row.ends_with(
                "GET /coupon/apply  read_no_reply; blocked in recvfrom(fd 9) on conn 4; \
                 root: conn 4"
            ),
            "{text}"
        );
        assert_eq!(render_stalls(&[], &Terminal::plain()), "no open stalls\n");
    }

    #[test]
    fn why_table_states_the_finding() {
        let rows: Vec<WhyRow> = serde_json::from_value(json!([
            {"executable": "shop", "role": "server", "endpoint": ":8080",
             "signature": "GET /coupon/apply", "stalls": 97, "stall_share": 0.97,
             "completed": 2, "completed_share": 0.002, "p50_ms": 30.0, "p99_ms": 40.0,
             "over_representation": 0.968},
            {"executable": "shop", "role": "server", "endpoint": ":8080",
             "signature": "GET /cart", "stalls": 3, "stall_share": 0.03,
             "completed": 998, "completed_share": 0.998, "over_representation": -0.968}
        ]))
        .unwrap();
        let text = render_why(&rows, 1, &Terminal::plain());
        assert!(
            text.contains(
                "GET /coupon/apply accounts for 97.0% of stalls and 0.2% of completed \
                 requests (p99 to the first response byte when completed: 40.0 ms)."
            ),
            "{text}"
        );
        assert!(text.contains("(1 more groups"), "{text}");
        assert_eq!(
            render_why(&[], 5, &Terminal::plain()),
            "no requests sampled yet\n"
        );
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
            "connections": {"tracked": 3, "stalled": 1, "watched": 2, "capacity": 10,
                "recovered": 7, "http1_runs_uncounted": 5},
            "events": {"kernel": 9, "written": 4}, "events_to": "stdout",
            "lost": {"kernel_ringbuf_full": 2, "watch_dropped": 0}, "lost_total": 2,
            "diagnosis": {"open": 1, "held": 0, "reported_before_diagnosis": 4,
                "jobs_dropped": 0},
            "programs": [{"program": "p", "hook": "tracepoint/a/b"}],
            "loop": {"turns": 9, "max_blocked_us": 88_000, "max_blocked_in": "drain",
                "max_blocked_cpu_us": 9_500, "since_last_status": {"max_blocked_us": 1_200,
                "max_blocked_in": "sweep", "max_blocked_cpu_us": 1_200}}
        }));
        assert!(text.contains("up 1m01s"), "{text}");
        assert!(text.contains("kernel_ringbuf_full: 2"), "{text}");
        assert!(!text.contains("watch_dropped"), "{text}");
        assert!(text.contains("7 connections recovered"), "{text}");
        assert!(
            text.contains("5 HTTP/1.x request runs not all counted"),
            "{text}"
        );
        assert!(text.contains("p -> tracepoint/a/b"), "{text}");
        assert!(text.contains("1 open stalls, 0 awaiting"), "{text}");
        assert!(text.contains("4 reported before it"), "{text}");
        assert!(
            text.contains("longest turn 88ms (drain, 9ms of it on a CPU); 1ms since"),
            "{text}"
        );
    }
}
