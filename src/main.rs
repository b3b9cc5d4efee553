//! Parse arguments, run, turn the error into an exit code. Nothing else.

fn main() {
    let code = camflow::cli::main();
    std::process::exit(code);
}
