#!/usr/bin/env bash
# Every test Sidecar has, in one command: formatting, lints, unit tests, then the
# process-level suite (tests/e2e) against the real release binary with real clients.
set -euo pipefail
cd "$(dirname "$0")"

scripts/install-test-deps
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
cargo build --release --locked
SIDECAR_BIN="$PWD/target/release/sidecar" python3 -m pytest tests/e2e -q -p no:cacheprovider
