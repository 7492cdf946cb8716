#!/usr/bin/env bash
# Builds the Python wheel, installs it into a fresh virtual environment and runs the installed
# `expo` there: `--version` and the README quick start on the bundled example pair. Also checks
# that the wheel holds nothing but the binary and its metadata.
#
# Usage: scripts/check-wheel.sh [WORKDIR]   (default: a new temporary directory)
# Needs python3 with venv and pip, a Rust toolchain, and access to PyPI (for maturin).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if ! command -v python3 >/dev/null 2>&1; then
  echo "check-wheel: skipped: python3 is not installed"
  exit 0
fi

work=${1:-$(mktemp -d)}
mkdir -p "$work"
venv="$work/venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip

# The wheel, built as `pip wheel .` builds it (maturin in an isolated build environment).
"$venv/bin/python" -m pip wheel --quiet --no-deps -w "$work/wheels" "$repo"
wheel=$(ls "$work"/wheels/expo_extrapolate-*.whl)
echo "check-wheel: built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"

# Only the binary and the metadata: <name>.data/scripts/expo and <name>.dist-info/*.
"$venv/bin/python" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names
       if not (n.endswith(".data/scripts/expo") or n.split("/", 1)[0].endswith(".dist-info"))]
if bad:
    sys.exit(f"check-wheel: the wheel holds more than the binary and metadata: {bad}")
if not any(n.endswith(".data/scripts/expo") for n in names):
    sys.exit(f"check-wheel: no expo binary in the wheel: {names}")
print("check-wheel: wheel contents:", ", ".join(sorted(names)))
PY

"$venv/bin/python" -m pip install --quiet "$wheel"
expo="$venv/bin/expo"
version=$("$expo" --version)
expected="expo $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
if [ "$version" != "$expected" ]; then
  echo "check-wheel: installed expo says '$version', expected '$expected'" >&2
  exit 1
fi
echo "check-wheel: $version installed at $expo"

# The README quick start, run by the installed binary from inside the environment.
out="$work/expo-demo"
rm -rf "$out"
(
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
  expo extrapolate --sft examples/tiny-sft --aligned examples/tiny-dpo --alpha 0.3 --output "$out" --quiet
)
for f in config.json expo.json README.md model.safetensors.index.json; do
  [ -f "$out/$f" ] || { echo "check-wheel: quick start wrote no $f" >&2; exit 1; }
done
echo "check-wheel: quick start wrote $(ls "$out" | wc -l) files to $out"
echo "check-wheel: ok"
