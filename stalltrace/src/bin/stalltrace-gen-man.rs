//! `stalltrace-gen-man DIR`: writes stalltrace's man pages (one per command) into DIR, from
//! the clap definitions. A packaging helper run by `cargo xtask package`, not installed: a
//! subcommand of `stalltrace` would show up in its shell completions.
use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: stalltrace-gen-man DIR");
        return ExitCode::from(2);
    };
    match stalltrace::cli::generate::man_pages(&PathBuf::from(dir)) {
        Ok(pages) => {
            for page in pages {
                println!("{}", page.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("stalltrace-gen-man: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
