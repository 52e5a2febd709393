//! `ledger-tests`: the end-to-end tests, in `tests/tests/*.rs` (`cargo test -p ledger-tests
//! --test NAME`). The harness they use (the real binaries, a throwaway PostgreSQL, clients) is
//! the crate `ledger-testkit` (`tests/testkit/`); the benchmark is `ledger-bench`
//! (`tests/bench/`).
