#!/usr/bin/env bash
# Downloads the wheels in bench/gpu/wheels.txt into bench/gpu/wheels for the GPU machine's
# CPython 3.12 (run on a machine with PyPI access; build.sh calls it), then checks with
# check_carry.py that nothing they need is missing there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$here/wheels"
grep -v '^\s*#' "$here/wheels.txt" | grep -v '^\s*$' | while read -r pin; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$here/wheels" "$pin"
done
python3 "$here/check_carry.py" "$here/wheels"
