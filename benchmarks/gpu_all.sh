#!/usr/bin/env bash
# The GPU benchmarks and the CUDA-only tests, each step with its own time limit (H100/H200).
#
#   bash benchmarks/gpu_all.sh [RESULTS_DIR] [STEP|GROUP ...]    # default: benchmarks/results, all steps
#
# A GPU session has 15 minutes of device time in all (machine start included) and 10 minutes per call, so
# all the steps (~20 min of limits) never fit one session. Run one GROUP per call, for the issue still open:
#   issue12   sae_step cuda_tests collect stream_study   (~7.5 min; limits 580 s)
#   issue11   generate graph_tests                       (~8 min; limits 580 s)
#   (issue 10 is benchmarks/gpu_book.sh, a call of its own: the book at the study's shapes, ~9 min)
# so a session that gets a GPU runs one group, gives the machine back, and the next session the next one.
#
# Steps: sae_step (~105 s, see below), cuda_tests (~40 s), collect (~3 min) and stream_study (~1.5 min), generate
# (~6.5 min) and graph_tests (~1.5 min), each estimated where it runs below. Only sae_step, cuda_tests, collect
# and generate's older methods have been measured (one H100, 2026-11-26).
#
# Each step has its own time limit and its own log; a failing step is reported and the next one
# still runs, so one broken method does not cost the whole (rationed) GPU session. The sizes are
# trimmed from each benchmark's defaults (10 s per collection method, 100 equivalence steps, 7 of the 14
# generation methods); run the scripts alone with their defaults for the full-length measurements.
set -u
RESULTS=${1:-benchmarks/results}
shift || true
STEPS=${*:-sae_step cuda_tests graph_tests collect stream_study generate}
STEPS=${STEPS//issue12/sae_step cuda_tests collect stream_study}
STEPS=${STEPS//issue11/generate graph_tests}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
PY=${PY:-python3}
status=0

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$RESULTS/$name.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

# sae_step, estimated for an H200 (~105 s of the 150 s limit): start + CUDA init ~10 s; fp32/tf32 dense at
# batch 8192 and 16384 (5 timed + 2 warm-up steps; ~0.26 / 0.06 s per step at 8192) ~7 s; the four fast
# variants x 2 batches x 25 steps at 10-25 ms ~4 s, plus first-call compile and config timing of ~26
# Triton kernel configs ~25 s; the top-k alone at 6 chunkings ~1 s, then maybe one more variant and
# <best>_no_dead ~2 s; the equivalence (100 fp32 steps ~26 s, then 100 steps of each fast variant ~8 s);
# the profile ~3 s. The JSON is rewritten after each stage, so a timeout keeps whatever was measured.
step sae_step 150 $PY benchmarks/sae_step.py --equiv-steps 100 --out "$RESULTS/sae_step.json"
step cuda_tests 90 $PY -m pytest --noconftest -q -p no:cacheprovider tests/test_sae_fast_cuda.py
# collect (issue 12), estimated for an H200, not yet measured: E4B build + corpus + reference ~15 s; each method
# 10 s timed after its warm-up: study ~12 s, stream_eager ~12 s, stream_stack ~12 s + its compile (one graph of
# 22 layers, ~40-70 s cold), disk ~14 s, stream_stack_b32 ~12 s + a recompile (~40-70 s), stream_layers ~12 s +
# ~30 s: ~3-3.5 min. Methods that would start after 150 s are skipped (recorded as such); the JSON is rewritten
# after every method, so the 210 s limit never costs what was measured.
step collect 210 $PY benchmarks/collect.py --seconds 10 --budget-s 150 --results "$RESULTS"
# stream_study (issue 12): model + TopK SAE on one GPU through StreamStore and train_sae, 25 s timed; ~10 s
# build, ~40 s warm-up (the stack graph and the SAE kernels come from the caches collect and sae_step filled),
# ~30 s timed run: ~1.5 min of the 130 s limit.
step stream_study 130 $PY benchmarks/stream_study.py --seconds 25 --results "$RESULTS"
# generate: the graph methods first (issue 11), then the eager reference for row agreement, then the
# baselines; the JSON is rewritten after each method, so a cut-off run keeps what it measured.
# Estimate on an H200 (E4B bf16, 256 new tokens; first + steady call each): graph b128/b256 ~10 s each
# (seconds of warm-up + capture, ~2 s steady), eager static b128 ~40 s (one call), hf_dynamic_b64 ~30 s,
# graph_inductor_b256 ~90 s (inductor compile), mechlib_b128 ~85 s (79 s first call measured),
# hf_static_b128 ~130 s (123 s first call on an H100): ~6.5 min with the model build; hf_dynamic_b1 last (~15 s),
# if time is left; 470 s limit.
step generate 470 $PY benchmarks/generate.py \
    --only mechlib_graph_b128,mechlib_graph_b256,mechlib_eager_static_b128,hf_dynamic_b64,mechlib_graph_inductor_b256,mechlib_b128,hf_static_b128,hf_dynamic_b1 \
    --results "$RESULTS"
# graph_tests (issue 11): capture/replay == the eager buffer step on tiny models (graph mode: Llama, Gemma 4,
# Qwen 3.5; graph-inductor: Llama, three compiles) and the compiled-path CUDA tests, with chapter 06's mixed
# steering sweep (one graph for every scale and control); ~1.5 min estimated, after generate so that the
# measurement comes first.
step graph_tests 110 $PY -m pytest -q -p no:cacheprovider tests/test_graph_decode.py -k cuda tests/test_generate_cuda.py
exit $status
