#!/usr/bin/env bash
# The whole book on one GPU at the study's shapes (issue 10), plus one torchrun collect+train over nccl,
# in one call that fits a 10-minute GPU session. Results: per-chapter wall time and peak GPU memory,
# GPU name and versions, as JSON in RESULTS_DIR (default benchmarks/results) and in $OUT when set.
#
#   bash benchmarks/gpu_book.sh download            # here, with PyPI: wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu_book.sh [RESULTS_DIR]       # on the GPU machine (carry .whl), from the repo root
#   DRY_RUN=1 bash benchmarks/gpu_book.sh /tmp/dry  # anywhere: the same steps on the tiny CPU book, gloo
#   DRY_RUN=1 DRY_RUN_WHEELS=1 PY=<python 3.12 with the image's packages> bash benchmarks/gpu_book.sh /tmp/dry
#                                                   # the same, installing .whl/ as the GPU machine does
#
# Assumptions about the GPU machine: python3 is 3.12 with a CUDA build of torch, transformers >= 5.17,
# numpy, scipy, matplotlib, pyyaml, tqdm, pandas, pyarrow, xxhash (the nvidia-h200 image has them); no hub and
# no PyPI, so the Jupyter stack (papermill, jupytext, nbclient, ipykernel and their needs) and chapter 08's
# trl, peft, datasets, dill and multiprocess (the image lacks all but peft), pinned to the versions of the
# CPU venv, travel as wheels in .whl/ (about 17 MB) and are installed with --no-deps into /tmp/site.
# Steps, each with its own time limit (a failing step is reported and the next still runs):
#   torchrun  `torchrun --nproc_per_node 1 -m mechlib.scale collect train` on the tiny Gemma 4 (nccl on CUDA)
#   book      `python -m mechlib.book params/gpu_smoke_e4b.yaml --only 01 ... 07`: the issue's seven chapters
#             (whatever time is left, at most BOOK_LIMIT)
#   ch08      `... --only 08`, the feature reward and GRPO (TRL), in the time still left (skipped under 60 s):
#             a step of its own, after the seven, so that it can never cost them; its rc is reported apart
#   summary   benchmarks/gpu_book_summary.py: the JSON (also from a book stopped by its time limit:
#             each finished chapter's time from the log, each chapter's device snapshot from its kernel)
set -u
WHEELS=(asttokens==3.0.2 comm==0.2.3 debugpy==1.8.22 entrypoints==0.4.2 executing==2.3.0 fastjsonschema==2.22.3
        ipykernel==7.4.0 ipython==9.18.1 ipython-pygments-lexers==1.1.1 jedi==0.20.1 jsonschema==4.26.0
        jsonschema-specifications==2025.9.1 jupyter-client==8.10.0 jupyter-core==5.9.1 jupytext==1.19.6
        matplotlib-inline==0.2.2 mdit-py-plugins==0.7.0 nbclient==0.11.0 nbformat==5.11.1 nest-asyncio2==1.7.4
        papermill==2.7.0 parso==0.8.7 pexpect==4.9.0 platformdirs==4.14.8 prompt-toolkit==3.0.53 ptyprocess==0.7.0
        pure-eval==0.2.4 pyzmq==27.3.0 referencing==0.37.0 rpds-py==2026.9.1 stack-data==0.6.3 tenacity==9.2.1
        tornado==6.6.1 traitlets==5.16.1 wcwidth==0.9.4
        trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

if [ "${1:-}" = download ]; then
    mkdir -p .whl
    PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_5_x86_64)
    exec ${PY:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLAT[@]}" -d .whl "${WHEELS[@]}"
fi

RESULTS=${1:-benchmarks/results}
mkdir -p "$RESULTS"
PY=${PY:-python3}
BUDGET=${BUDGET:-560}            # seconds for the whole script (a 10-minute call, minus transfers)
BOOK_LIMIT=${BOOK_LIMIT:-480}    # the target is <= 8 minutes for the seven chapters
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && { [ -z "${DRY_RUN:-}" ] || [ -n "${DRY_RUN_WHEELS:-}" ]; }; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    # ipykernel's kernelspec `python3` must exist for papermill; point it at this interpreter
    $PY -m ipykernel install --prefix /tmp/kernels --name python3 >/dev/null && export JUPYTER_PATH=/tmp/kernels/share/jupyter
fi

if [ -n "${DRY_RUN:-}" ]; then
    SMOKE=${SMOKE:-params/tiny_gemma4.yaml}; DEVICE=cpu; RUN=${RUN:-gpu-book-dry}
else
    SMOKE=${SMOKE:-params/gpu_smoke_e4b.yaml}; DEVICE=cuda; RUN=${RUN:-gpu_smoke_e4b}
fi
TORCHRUN_PARAMS=$(mktemp --suffix=.yaml)
{ grep -v -E '^(device|run):' params/tiny_gemma4.yaml; echo "device: $DEVICE"; echo "run: $RUN-torchrun"; } > "$TORCHRUN_PARAMS"
T0=$SECONDS
echo "=== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, transformers, papermill; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'papermill', papermill.__version__)"

echo "=== torchrun (limit 150 s): collect + train on the tiny Gemma 4, one process, $DEVICE"
t=$SECONDS
NCCL_DEBUG=INFO timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m mechlib.scale collect train \
    "$TORCHRUN_PARAMS" --no-progress > "$RESULTS/torchrun.log" 2>&1
TORCHRUN_RC=$?; TORCHRUN_S=$((SECONDS - t))
tail -n 8 "$RESULTS/torchrun.log"; echo "=== torchrun: rc=$TORCHRUN_RC in ${TORCHRUN_S}s"

LEFT=$((BUDGET - (SECONDS - T0) - 20)); LIMIT=$(( LEFT < BOOK_LIMIT ? LEFT : BOOK_LIMIT ))
echo "=== book $SMOKE, chapters 01-07 (limit ${LIMIT} s)"
t=$SECONDS
timeout "$LIMIT" $PY -m mechlib.book "$SMOKE" --run "$RUN" --only 01 02 03 04 05 06 07 > "$RESULTS/book.log" 2>&1
BOOK_RC=$?; BOOK_S=$((SECONDS - t))
grep '^\[mechbook\]' "$RESULTS/book.log" | tail -n 20; echo "=== book: rc=$BOOK_RC in ${BOOK_S}s"

CH08_LIMIT=$((BUDGET - (SECONDS - T0) - 20)); CH08_RC=-1; CH08_S=0
if [ "$BOOK_RC" -eq 0 ] && [ "$CH08_LIMIT" -ge 60 ]; then
    echo "=== chapter 08 (limit ${CH08_LIMIT} s)"
    t=$SECONDS
    timeout "$CH08_LIMIT" $PY -m mechlib.book "$SMOKE" --run "$RUN" --only 08 > "$RESULTS/book08.log" 2>&1
    CH08_RC=$?; CH08_S=$((SECONDS - t))
    tail -n 6 "$RESULTS/book08.log"  # the runner's lines, or the error that stopped the chapter
    echo "=== chapter 08: rc=$CH08_RC in ${CH08_S}s"
else
    echo "=== chapter 08: skipped (book rc $BOOK_RC, ${CH08_LIMIT} s left)"; : > "$RESULTS/book08.log"
fi

$PY benchmarks/gpu_book_summary.py --run "$RUN" --params "$SMOKE" --book-log "$RESULTS/book.log" \
    --book-rc "$BOOK_RC" --book-seconds "$BOOK_S" --book-limit "$LIMIT" --torchrun-log "$RESULTS/torchrun.log" \
    --ch08-log "$RESULTS/book08.log" --ch08-rc "$CH08_RC" --ch08-seconds "$CH08_S" --ch08-limit "$CH08_LIMIT" \
    --torchrun-rc "$TORCHRUN_RC" --torchrun-seconds "$TORCHRUN_S" \
    --results "$RESULTS" ${OUT:+--out "$OUT"}
rm -f "$TORCHRUN_PARAMS"
[ "$BOOK_RC" -eq 0 ] && [ "$TORCHRUN_RC" -eq 0 ]
