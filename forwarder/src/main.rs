use std::io::IsTerminal;

use clap::Parser;
use forwarder::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: journald, log files and
        // pipes would store the escape sequences as text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let json = cli.wants_json();
    match cli::main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            if forwarder::control::client::already_reported(&error) && json {
                // Its own document said what failed, item by item.
            } else if json {
                cli::print_json_error(&error);
            } else {
                eprintln!("error: {}", cli::error_message(&error));
            }
            std::process::ExitCode::from(cli::exit_status(&error) as u8)
        }
    }
}
