//! `geopush-loadtest`: simulated fleets against a running gateway.

fn main() {
    eprintln!("geopush-loadtest: no scenarios yet");
    std::process::exit(2);
}
