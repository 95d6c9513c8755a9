#!/usr/bin/env bash
# The wheel of the one package the lent GPU machines' image lacks, diffusers (the image has torch, triton, typer,
# rich, safetensors, pillow, huggingface_hub, pytest and hypothesis; on its Python 3.12 diffusers reads
# importlib.metadata from the standard library), into .whl/ (git-ignored through .git/info/exclude), for
# `tests/gpu/device_check.sh` there. Pure Python.
set -eu
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"  # (in a worktree .git is a file, not a folder)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl "diffusers==${DIFFUSERS_VERSION:-0.42.1}"
ls -l .whl
