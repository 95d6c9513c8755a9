#!/usr/bin/env bash
# Every GPU check in one run, sized to finish within 9 minutes (the steps' limits add up to 530 s) on one H100
# or H200 (a lent machine has 15 minutes in all, its start included; run it with timeout_s 560): the GPU suite, the attention and MoE benchmarks, training throughput.
#
#   bash tests/gpu/fetch_wheels.sh              # here, once: wheels of what the GPU image lacks (diffusers) into .whl/
#   bash tests/gpu/device_check.sh OUTDIR       # there, from the repository root; carry .whl
#
# OUTDIR gets 8 files: log.txt (everything printed, each step's exit status), bench-attn.json/.png,
# bench-mta.json/.png, bench-moe.json, bench-moe-large.json, train.json (one JSON line per training run). Every step has its own time
# limit and a failed step does not stop the next; the script's exit status is the number of failed steps.
set -u -o pipefail
out=${1:?usage: bash tests/gpu/device_check.sh OUTDIR}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=0

# step NAME SECONDS COMMAND...: run with a time limit, output to the log (and the screen), status recorded.
step() {
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name ($(date -u +%T), limit ${limit} s)" | tee -a "$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
    [ "$status" = 0 ] || failed=$((failed + 1))
}

# step_json NAME SECONDS FILE COMMAND...: the same, stdout appended to FILE (the command's --json), stderr to the log.
step_json() {
    local name=$1 limit=$2 file=$3 start=$SECONDS status
    shift 3
    echo "== $name ($(date -u +%T), limit ${limit} s)" | tee -a "$log"
    timeout -k 10 "$limit" "$@" >>"$file" 2>>"$log"
    status=$?
    tail -c 2000 "$file" | tee -a "$log"
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
    [ "$status" = 0 ] || failed=$((failed + 1))
}

step environment 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv &&
    python3 -c "import torch, triton, diffusers, typer; print(\"torch\", torch.__version__, \"triton\", triton.__version__,
    \"diffusers\", diffusers.__version__, \"typer\", typer.__version__, torch.cuda.get_device_name())"'
[ "$failed" = 0 ] || { echo "== no GPU, or a package missing: nothing else can run" | tee -a "$log"; exit 1; }

# compiled Triton kernels against the references (fp32 exact with IEEE dots), bf16 training smoke runs
step gpu-suite 150 env SIGMA_TEST_GPU=1 TRITON_F32_DEFAULT=ieee python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider

# issue 4's target: bf16 at 64k tokens (16x64x64), NSA forward >= 9x and backward >= 6x of SDPA's flash backend
step_json bench-attn 80 "$out/bench-attn.json" python3 -m sigmacli bench-attn --device cuda --dtype bf16 \
    --grid 8x32x32,16x32x32,16x64x64 --backends triton --out "$out/bench-attn.png" --json
# Multi-Token Attention's fused kernel against SDPA (quadratic: the smaller grids only)
step_json bench-mta 50 "$out/bench-mta.json" python3 -m sigmacli bench-attn --device cuda --dtype bf16 \
    --grid 4x16x16,8x32x32 --backends triton --mta --mta-backends triton --out "$out/bench-mta.png" --json

# issue 6's shape, then one closer to a real MoE layer (each also times the Triton path: its JIT compile is in the limit)
step_json bench-moe 40 "$out/bench-moe.json" python3 -m sigmacli bench-moe --device cuda --json
step_json bench-moe-large 50 "$out/bench-moe-large.json" python3 -m sigmacli bench-moe --device cuda --dtype bf16 \
    --tokens 65536 --dim 1024 --experts 64 --hidden 256 --top-k 6 --json

# training throughput on the GPU (bf16 autocast): the shipped tokenizer's latents, pixels with NSA, the MoE LM
tmp=$(mktemp -d)
step_json train-imm 40 "$out/train.json" python3 -m sigmacli train-imm --tokenizer checkpoints/pretrained/imm/tokenizer \
    --latent-norm token --steps 300 --batch-size 256 --sample-every 0 --device cuda --out "$tmp/imm" --json
step_json train-imm-nsa 60 "$out/train.json" python3 -m sigmacli train-imm --space pixels --image-size 64 --patch-size 2 \
    --attn nsa --steps 100 --sample-every 0 --device cuda --out "$tmp/nsa" --json
step_json train-lm 30 "$out/train.json" python3 -m sigmacli train-lm --steps 200 --sample-every 0 --device cuda \
    --out "$tmp/lm" --json

echo "== $failed step(s) failed" | tee -a "$log"
exit "$failed"
