use clap::Parser;

use walvault::cli::Cli;
use walvault::error::exit;

fn main() {
    let cli = Cli::parse();
    walvault::logging::init(cli.log_format, cli.verbose, cli.quiet);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = match runtime.block_on(walvault::commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            e.exit_code()
        }
    };
    // Do not wait for background tasks still holding the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(if code == exit::OK { 0 } else { code });
}
