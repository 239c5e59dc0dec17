//! Builds the test server's image (`keel-testserver:dev`) from this
//! workspace, as the tests do: for the README's tour and the benchmarks,
//! on a machine without a registry.

fn main() -> std::process::ExitCode {
    match keel_testing::testserver::ensure_image() {
        Ok(image) => {
            println!("{image}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
