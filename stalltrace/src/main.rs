use std::process::ExitCode;

use clap::{parser::ValueSource, CommandFactory as _, FromArgMatches as _};
use stalltrace::{
    cli::{client, Cli, Command},
    config,
    daemon::{self, DaemonConfig},
    logger,
};

/// `stalls --fail-if-any` found stalls.
const EXIT_STALLS: u8 = 2;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    if !matches!(cli.command, Command::Daemon(_)) {
        // A client piped into `head` stops quietly, as Unix tools do, instead of panicking on
        // the broken pipe (Rust ignores SIGPIPE). The daemon keeps ignoring it: its writers
        // handle a reader that went away.
        // SAFETY: restoring a signal's default disposition, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Daemon(mut args) => {
            let mut socket = cli.socket;
            let daemon_matches = matches.subcommand_matches("daemon");
            let given = |id: &str| {
                daemon_matches.and_then(|m| m.value_source(id)) == Some(ValueSource::CommandLine)
            };
            let mut rules = config::Rules::default();
            if let Some(path) = args.config.clone() {
                match config::load(&path) {
                    Ok(loaded) => {
                        rules = loaded.rules;
                        loaded.file.apply(&mut args, &mut socket, given);
                    }
                    Err(err) => return fail(&err.context("invalid configuration")),
                }
            }
            logger::init(args.log_level.filter());
            let config = DaemonConfig {
                stall_after: args.stall_after.0,
                rules,
                config_path: args.config,
                stall_after_from_flag: given("stall_after"),
                metrics_address: args.metrics_address,
                metrics_labels: args.metrics_labels,
                events_file: args.events_file,
                socket,
                max_conns: args.max_conns,
                ring_buffer_bytes: args.ring_buffer_size,
                bpf_stats: args.bpf_stats,
                capture_bytes: args.capture_bytes,
                hooks: args.hooks.rung(),
                libssl: args.libssl,
                btf: args.btf,
                capture_raw: args.capture_raw,
                events_file_mode: args.events_file_mode,
                events_file_max_size: args.events_file_max_size,
                events_file_keep: args.events_file_keep,
                events_buffer: usize::try_from(args.events_buffer).unwrap_or(usize::MAX),
                socket_group: args.socket_group,
                privacy: stalltrace_core::protocols::Privacy {
                    preview: args.capture_preview,
                    path_templates: !args.no_path_templates,
                },
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(daemon::run(config)))
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::Status(output) => client::status(&cli.socket, output.format),
        Command::Conns { filter, output } => client::conns(&cli.socket, filter, output.format),
        Command::Stalls {
            older_than,
            fail_if_any,
            filter,
            output,
        } => match client::stalls(
            &cli.socket,
            filter,
            older_than.map(|d| d.0.as_millis() as u64),
            output.format,
        ) {
            Ok(count) if fail_if_any && count > 0 => return ExitCode::from(EXIT_STALLS),
            other => other.map(drop),
        },
        Command::Watch { filter, format } => client::watch(&cli.socket, filter, format),
        Command::Show { id, output } => client::show(&cli.socket, id, output.format),
        Command::Why {
            filter,
            limit,
            output,
        } => client::why(
            &cli.socket,
            filter.into_filter(),
            limit.get(),
            output.format,
        ),
        Command::Completions { shell } => {
            stalltrace::cli::generate::completion(shell, &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!(
        "stalltrace: error: {}",
        stalltrace::cli::table::terminal_safe(&format!("{err:#}"))
    );
    ExitCode::FAILURE
}

/// `check-config FILE`: what the daemon would make of the file, or its first error.
fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let loaded = config::load(path)?;
    for line in config::describe(path, &loaded) {
        println!("{}", stalltrace::cli::table::terminal_safe(&line));
    }
    Ok(())
}
