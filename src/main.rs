//! The `sani` command line. Exit codes: 0 success (gate passed), 1 the eval gate failed,
//! 2 error (bad input, unreadable model), 130 interrupted by Ctrl-C (no output left behind).

use clap::{Parser, Subcommand};

use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "sani",
    version,
    about = "Sanitize fine-tuned causal LMs so they stop regurgitating sensitive data (SANI, arXiv 2510.21322)",
    after_help = "Exit codes: 0 success (eval gate passed or no gate), 1 eval gate failed, 2 error, 130 interrupted."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Erase and repair a fine-tuned model so it stops reproducing sensitive spans
    Sanitize(Box<sani::recipes::sanitize::SanitizeArgs>),
    /// Measure regurgitation of sensitive spans and perplexity; gate a pipeline by exit code
    Eval(Box<sani::eval::EvalArgs>),
    /// Plain causal-LM fine-tuning (or training from a fresh config)
    Finetune(Box<sani::recipes::finetune::FinetuneArgs>),
    /// Print a model directory's architecture, sizes, dtypes and sharding
    Inspect(sani::recipes::inspect::InspectArgs),
    /// Run the whole story on bundled synthetic clinical notes
    Demo(sani::recipes::demo::DemoArgs),
}

fn main() -> ExitCode {
    sani::runtime::keep_freed_memory();
    let cli = Cli::parse();
    sani::io::staged::install_interrupt_handler();
    let runtime = match &cli.command {
        Command::Sanitize(a) => &a.model.runtime,
        Command::Eval(a) => &a.runtime,
        Command::Finetune(a) => &a.runtime,
        Command::Inspect(a) => &a.model.runtime,
        Command::Demo(a) => &a.runtime,
    };
    let result = runtime
        .set_threads()
        .and_then(|()| sani::runtime::on_worker_pool(|| run(&cli.command)));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: &Command) -> anyhow::Result<ExitCode> {
    Ok(match command {
        Command::Sanitize(a) => sani::recipes::sanitize::run(a).map(|_| ExitCode::SUCCESS)?,
        Command::Eval(a) => match sani::eval::run(a)? {
            sani::eval::Verdict::Pass => ExitCode::SUCCESS,
            sani::eval::Verdict::Fail => ExitCode::from(1),
        },
        Command::Finetune(a) => sani::recipes::finetune::run(a).map(|_| ExitCode::SUCCESS)?,
        Command::Inspect(a) => sani::recipes::inspect::run(a).map(|_| ExitCode::SUCCESS)?,
        Command::Demo(a) => sani::recipes::demo::run(a).map(|_| ExitCode::SUCCESS)?,
    })
}
