//! The README's "Getting started" program is `examples/getting_started.rs`, word for word (CI
//! builds the example, so the README's code compiles as pasted).

#[test]
fn getting_started_is_the_example_file() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/getting_started.rs");
    let block = format!("```rust,no_run\n{example}```");
    assert!(
        readme.contains(&block),
        "README.md's Getting started block differs from examples/getting_started.rs"
    );
    assert!(readme.contains("tiercache = \"0.1\""));
    assert!(
        !readme.contains("\n# "),
        "no hidden doctest lines: the README is pasted as read"
    );
}
