//! The `tiercache` command line (being written).
fn main() {}
