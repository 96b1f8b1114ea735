use std::process::ExitCode;

use clap::Parser as _;
use stalltrace::{
    cli::{client, Cli, Command},
    daemon::{self, DaemonConfig},
    logger,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Daemon(args) => {
            logger::init(args.log_level.filter());
            let config = DaemonConfig {
                stall_after: args.stall_after.0,
                events_file: args.events_file,
                socket: cli.socket,
                max_conns: args.max_conns,
                ring_buffer_bytes: args.ring_buffer_size,
                bpf_stats: args.bpf_stats,
                capture_bytes: args.capture_bytes,
                hooks: args.hooks.rung(),
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
        Command::Status(output) => client::status(&cli.socket, output.format),
        Command::Conns { filter, output } => client::conns(&cli.socket, filter, output.format),
        Command::Stalls {
            older_than,
            filter,
            output,
        } => client::stalls(
            &cli.socket,
            filter,
            older_than.map(|d| d.0.as_millis() as u64),
            output.format,
        ),
        Command::Watch { filter } => client::watch(&cli.socket, filter),
        Command::Show { id, output } => client::show(&cli.socket, id, output.format),
        Command::Why {
            filter,
            limit,
            output,
        } => client::why(&cli.socket, filter.into_filter(), limit, output.format),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "stalltrace: error: {}",
                stalltrace::cli::table::terminal_safe(&format!("{err:#}"))
            );
            ExitCode::FAILURE
        }
    }
}
