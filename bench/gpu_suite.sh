#!/usr/bin/env bash
# The GPU checks and benchmarks, in stages that each fit in a 10-minute slot on an H100/H200.
#
#   bash bench/gpu_suite.sh STAGE [STAGE ...]
#
# Stages, in the order to run them:
#   tests     nvidia-smi, then every gpu-marked test (engines, FP8, kernels)
#   kernels   bench kernels at 2048², bf16: postprocess (torch / torch-compile / Triton), pixel-block
#             modulation (torch / torch-compile), and the device's copy bandwidth as the ceiling
#   eager     bench engine, 2k_flux random weights at 2048², bf16, torch backend, batch 1/2/4
#   compile   the same on torch and torch-compile side by side (torch.compile mode: $COMPILE_MODE,
#             default "default"; max-autotune-no-cudagraphs autotunes for minutes)
#   fp8       the same in fp8 (FP8 matmuls through torch._scaled_mm), torch and torch-compile
#   attention the attention kernels (PyTorch's choice, flash, cudnn, efficient) at 2k_flux's attention
#             shapes in TFLOP/s, then torch-compile at batch 1 with auto vs cudnn attention, side by side
#   cascade   bench cascade, 2k_flux at 2048², bf16: PiD vs FLUX.1 VAE decode + bicubic and + a PiD-sized
#             SR diffusion model at 50 and 4 steps (random weights everywhere: timing only)
#   tiles     bench tiles, 2k_flux at 2048², 4096², 8192² output, bf16: tiled (2048² windows, the native
#             size) against untiled up to 4096² (untiled 8192² is ~16x 4096²'s attention): time, memory
#   http      bench http on a started server, 2k_flux random weights at 2048², bf16, eager torch, max
#             batch 4: raw and PNG at concurrency 1, 2, 4 (the HTTP, encoding and batching overheads)
#   http-compile  the same server on torch-compile (CUDA graphs, warmed for batch 1 and 2 at start-up),
#             raw at concurrency 1 and 2: the serving configuration the README recommends
#
# Environment: OUT (results folder, default bench/out/gpu), BATCHES (default 1,2,4), REPEAT (default 10),
# PYTHON (default python3), WHEELS (wheels to install first, default .whl), STAGE_TIMEOUT (seconds; a
# stage still running then is interrupted, its log keeps what it measured, and the next stage runs;
# default: none). Each stage writes OUT/<stage>/ and OUT/<stage>.log, and packs them into
# OUT/<stage>.tar.gz (one file to copy back).
#
# On a machine without network access (the lent GPU machines), first run `make gpu-wheels` where pip
# works: it downloads pidserve's pure-Python and binary dependencies that such images lack into .whl/
# (Python 3.12, x86-64); this script installs them from there. Torch, Triton, NumPy and friends are the
# machine's own.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
PYTHON=${PYTHON:-python3}
BATCHES=${BATCHES:-1,2,4}
REPEAT=${REPEAT:-10}
COMPILE_MODE=${COMPILE_MODE:-default}
WHEELS=${WHEELS:-.whl}
# Interrupt (SIGINT, so Python unwinds and logs) a stage's command past its time; kill it 20 s later.
# limit_share PERCENT: the next command may use that share of STAGE_TIMEOUT, at least 1 s (a stage of
# two commands splits it, so the whole stage ends within STAGE_TIMEOUT plus a 20 s grace per command).
if [ -n "${STAGE_TIMEOUT:-}" ] && ! [[ $STAGE_TIMEOUT =~ ^[0-9]+$ ]]; then
    echo "STAGE_TIMEOUT must be a whole number of seconds, got '$STAGE_TIMEOUT'" >&2
    exit 2
fi
LIMIT=()
limit_share() {
    LIMIT=()
    if [ -n "${STAGE_TIMEOUT:-}" ]; then
        local seconds=$((STAGE_TIMEOUT * $1 / 100))
        LIMIT=(timeout --signal=INT --kill-after=20 "$((seconds > 0 ? seconds : 1))")
    fi
}
FLUX=(--preset 2k_flux --size 2048x2048 --device cuda --batches "$BATCHES" --repeat "$REPEAT" --warmup 2)

if [ $# -eq 0 ]; then
    sed -n '2,34p' "$0"
    exit 2
fi

install() {
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/pidserve-site \
            "$WHEELS"/*.whl
        export PYTHONPATH=/tmp/pidserve-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! "$PYTHON" -c "import pidserve.engines, pidserve.cli" 2>/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    fi
    "$PYTHON" -c "import torch, pidserve; print('pidserve', pidserve.__version__, 'torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
}

run_stage() {
    local stage=$1 dir=$OUT/$1
    mkdir -p "$dir"
    limit_share 100
    case $stage in
        tests)
            nvidia-smi | tee "$dir/nvidia-smi.txt"
            "${LIMIT[@]}" "$PYTHON" -m pytest -m gpu -rs -v tests/engines tests/kernels --junitxml "$dir/junit.xml"
            ;;
        kernels)
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench kernels --preset 2k_flux --size 2048x2048 --batch 1 \
                --device cuda --precision bf16 --repeat 50 --out "$dir"
            ;;
        eager)
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench engine "${FLUX[@]}" --precision bf16 --backends torch --out "$dir"
            ;;
        compile)
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench engine "${FLUX[@]}" --precision bf16 --backends torch,torch-compile \
                --compile-mode "$COMPILE_MODE" --out "$dir"
            ;;
        attention)
            # Both commands run; the stage fails if either does (set -e is off inside `if ! run_stage`).
            local status=0
            limit_share 25
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench kernels --preset 2k_flux --size 2048x2048 --batch 1 \
                --device cuda --precision bf16 --operations patch-attention,pixel-attention --repeat 20 \
                --out "$dir/kernels" || status=$?
            limit_share 70
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench engine --preset 2k_flux --size 2048x2048 --device cuda \
                --batches 1 --repeat "$REPEAT" --warmup 2 --precision bf16 --backends torch-compile \
                --attention-backends auto,cudnn --compile-mode "$COMPILE_MODE" --out "$dir/engine" || status=$?
            return $status
            ;;
        fp8)
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench engine "${FLUX[@]}" --precision fp8 --backends torch,torch-compile \
                --compile-mode "$COMPILE_MODE" --out "$dir"
            ;;
        cascade)
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench cascade --preset 2k_flux --size 2048x2048 --device cuda \
                --precision bf16 --sr-steps 50,4 --warmup 1 --repeat 3 --out "$dir"
            ;;
        tiles)
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench tiles --preset 2k_flux --device cuda --precision bf16 \
                --sizes 2048x2048,4096x4096,8192x8192 --untiled-up-to 4096 --warmup 1 --repeat 3 --out "$dir"
            ;;
        http)
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench http --preset 2k_flux --size 2048x2048 --device cuda \
                --precision bf16 --backend torch --max-batch 4 --formats raw,png --concurrency 1,2,4 \
                --requests 24 --max-seconds 60 --out "$dir"
            ;;
        http-compile)
            "${LIMIT[@]}" "$PYTHON" -m pidserve.cli bench http --preset 2k_flux --size 2048x2048 --device cuda \
                --precision bf16 --backend torch-compile --max-batch 2 --formats raw --concurrency 1,2 \
                --requests 12 --max-seconds 60 --out "$dir"
            ;;
        *)
            echo "unknown stage '$stage'; stages: tests kernels eager compile attention fp8 cascade tiles http http-compile" >&2
            return 2
            ;;
    esac
}

install
status=0
for stage in "$@"; do
    echo "=== $stage ($(date -u +%FT%TZ))"
    mkdir -p "$OUT"
    # A failing stage is recorded and the next one still runs: every stage's output is worth having.
    if ! run_stage "$stage" 2>&1 | tee "$OUT/$stage.log"; then
        echo "=== $stage FAILED" | tee -a "$OUT/$stage.log"
        status=1
    fi
    tar -czf "$OUT/$stage.tar.gz" -C "$OUT" "$stage" "$stage.log"
done
exit $status
