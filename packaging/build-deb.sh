#!/usr/bin/env bash
# Builds the Debian package into target/debian/: the release binary, man pages
# and shell completions generated from it, the systemd units, the examples.
# PROFILE=dev packages the debug binary instead (quicker; the tests use it);
# SKIP_BUILD=1 packages the binary already built. Other arguments go to cargo deb.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
command -v cargo-deb >/dev/null || cargo install cargo-deb --version 3.8.0 --locked
if [ "$profile" = release ]; then
  bin=target/release/replicafs
  [ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked
else
  bin=target/debug/replicafs
  [ -n "${SKIP_BUILD:-}" ] || cargo build --locked
fi
rm -rf target/assets
mkdir -p target/assets/man target/assets/completions
"$bin" man-pages target/assets/man
gzip -9nf target/assets/man/*.1
"$bin" completions bash > target/assets/completions/replicafs
"$bin" completions zsh > target/assets/completions/_replicafs
"$bin" completions fish > target/assets/completions/replicafs.fish
exec cargo deb --no-build --profile "$profile" "$@"
