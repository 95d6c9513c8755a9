#!/usr/bin/env bash
# Wheels of the packages the lent GPU machines' image lacks (diffusers, and importlib_metadata which it needs; the
# image has torch, triton, typer, rich, safetensors, pillow, pytest and hypothesis), into .whl/ (git-ignored
# through .git/info/exclude), for `tests/gpu/device_check.sh` there. Both are pure Python; the image's Python is 3.12.
set -eu
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION:-10.2.0}"
ls -l .whl
