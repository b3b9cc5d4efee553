//! Tune the allocator, parse arguments, run, turn the error into an exit code. Nothing else.

fn main() {
    camflow::malloc_tuning::tune();
    let code = camflow::cli::main();
    std::process::exit(code);
}
