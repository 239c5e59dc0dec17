//! Builds the test server's image (when missing or stale) and prints its
//! name: for scripts such as `bench/deploy.sh` and the README tour.

fn main() -> anyhow::Result<()> {
    println!("{}", keel_testing::testserver::ensure_image()?);
    Ok(())
}
