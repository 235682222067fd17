#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, 30 by default), starting from the
# corpus kept in fuzz/corpus; fails on the first crash, leak, overflow or input slower than 10 s
# (the input is left in fuzz/artifacts/<target>/). New inputs found go to a scratch directory,
# not the repo: copy an interesting one into fuzz/corpus by hand.
#
# cargo-fuzz builds with AddressSanitizer, which needs a nightly compiler: the nightly toolchain
# when rustup has one, else the stable compiler with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.cargo/bin:$PATH"

seconds="${FUZZ_SECONDS:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
targets="$("${fuzz[@]}" list)"
for target in $targets; do
  "${fuzz[@]}" build --release "$target"
done
for target in $targets; do
  mkdir -p "$scratch/$target"
  echo "fuzzing $target for ${seconds}s"
  # libFuzzer writes new inputs to the first directory and only reads the others.
  "${fuzz[@]}" run --release "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
done
