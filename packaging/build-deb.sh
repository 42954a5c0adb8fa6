#!/usr/bin/env bash
# Builds the Debian package into target/debian/: the release binary, man pages
# and shell completions generated from it, the systemd units, the examples.
# PROFILE=dev packages the debug binary instead (quicker; the tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
if [ "$profile" = release ]; then
  cargo build --release --locked
  bin=target/release/replicafs
else
  cargo build --locked
  bin=target/debug/replicafs
fi
rm -rf target/assets
mkdir -p target/assets/man target/assets/completions
"$bin" man-pages target/assets/man
gzip -9nf target/assets/man/*.1
"$bin" completions bash > target/assets/completions/replicafs
"$bin" completions zsh > target/assets/completions/_replicafs
"$bin" completions fish > target/assets/completions/replicafs.fish
exec cargo deb --no-build --profile "$profile" "$@"
