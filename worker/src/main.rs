//! `geopush-worker`: not built yet (issue 5). Exits with an explanation instead of pretending.

fn main() {
    eprintln!(
        "geopush-worker is not implemented yet; see issue 5. In single-node mode run geopush-gateway."
    );
    std::process::exit(2);
}
