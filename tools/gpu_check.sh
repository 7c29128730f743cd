#!/usr/bin/env bash
# ==============================================================================================
# tools/gpu_check.sh: the prepared GPU check of d2kd (one script, at most 8 minutes on one GPU).
#
# On the GPU machine it installs d2kd with upstream detectron2 compiled for CUDA, then runs
# `pytest -m cuda`, short real distillation runs on DigitsDet (RetinaNet with GK, Faster R-CNN
# with MTPD + MGD; untrained teachers) each with SOLVER.AMP.ENABLED off and on, the overhead
# benchmark on the GPU and (where tools/benchmark.py has it) the COCO 2-iteration benchmark.
# Each step runs under a time limit and the script carries on after a failure; the result is
# one JSON + one markdown summary (per step: command, status, seconds, key numbers) and a
# tarball of the raw logs, all written under $OUT (default output/gpu_check) after every step,
# so a run killed at its limit still leaves them.
#
# ---- 1. HERE (package registries reachable), before a session that is lent a GPU -----------
#   bash tools/gpu_check.sh prepare            # about 30 s; writes gpu_wheels/ (git-ignored)
# gpu_wheels/ then holds, for Python 3.12 manylinux x86_64: the wheels of every dependency of
# d2kd and detectron2 that the GPU machine lacks (about 15 MiB; never torch/torchvision/CUDA
# libraries), src/ with the detectron2 source tarball (from ../shared/third_party/) and the
# pb1-detectron2 sdist (pure-Python fallback), requirements.txt and manifest.json. The
# device tool carries at most 64 MiB per call (working tree + carried paths): keep it small.
# The DigitsDet data set (189 MB) is NOT carried: it is generated there (~25 s, in the
# background while detectron2 compiles).
#
# ---- 2. the device call (one call; nothing else is needed on the machine) -------------------
#   run(command="bash tools/gpu_check.sh", carry=["gpu_wheels"], timeout_s=540)
# The script's own budget is 480 s (--budget): steps that no longer fit are recorded as
# skipped and the summary is written before the call's limit. Expected: install ~30 s,
# detectron2 CUDA build 2-4 min on 16 cores (the largest unknown; limited to leave the rest
# at least ~3 min; if it fails, the pure-Python detectron2 is installed and the rest runs),
# tests + distillation runs ~1.5 min, overhead ~1 min, COCO benchmark ~1 min.
# Device time is 15 minutes per session including the machine's start: there is no time for
# a second full run; call give_back right after it.
#
# ---- 3. the results ----------------------------------------------------------------------
# The call returns $OUT/gpu_check.json, $OUT/gpu_check.md and $OUT/gpu_check_logs.tar.gz
# (raw logs, pip's install report, the runs' metrics.json / log.txt / config.yaml, overhead
# JSON); they land read-only under the reply's files_at. Commit them as
#   benchmarks/gpu/gpu_check.{json,md}  (+ benchmarks/gpu/gpu_check_logs.tar.gz, ~100s of KB)
# and update README.md's "What has run on a GPU" paragraph from gpu_check.md.
#
# ---- checking the script here, without a GPU --------------------------------------------
#   bash tools/gpu_check.sh prepare --python-version 3.11 --dest /tmp/w311
#   python3.11 tools/gpu_check/fake_machine.py --source .venv/lib/python3.11/site-packages \
#       --dest /tmp/machine311       # a stand-in of the machine's Python: torch + its packages
#   nice bash tools/gpu_check.sh --cpu --wheels /tmp/w311 --base-python /tmp/machine311/bin/python \
#       --out /tmp/o --work /tmp/w    # ~20 min on 2 busy cores (detectron2 compiles for the CPU)
# runs the same steps on the CPU (MODEL.DEVICE cpu, 4 iterations, a 48-image DigitsDet, one
# COCO config; AMP runs are skipped: detectron2's AMPTrainer needs CUDA; time limits x5).
# The base Python must have torch and torchvision: the script never installs those.
# --skip-install --python PY skips the install and detectron2 build and uses PY as it is.
# ==============================================================================================
set -uo pipefail
export LC_ALL=C  # $EPOCHREALTIME with a decimal point

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
H=$REPO/tools/gpu_check

usage() { awk 'NR > 1 && /^# =====/ {n++} NR > 1 && n < 2' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; cat <<'EOF'
usage: tools/gpu_check.sh prepare [--python-version 3.12] [--dest gpu_wheels] [--limit-mib 40]
       tools/gpu_check.sh [run] [--cpu] [--skip-install --python PY] [--budget S] [--iters N]
                          [--out DIR] [--work DIR] [--wheels DIR] [--base-python PY]
EOF
}

case ${1:-} in
  prepare) shift; exec "${PREP_PYTHON:-python3}" "$H/prepare_wheels.py" "$@" ;;
  run) shift ;;
  -h|--help) usage; exit 0 ;;
esac

# ---- internal sub-commands (each one step's command) ----------------------------------------
if [[ ${1:-} == _install ]]; then
  # A virtualenv on top of the machine's Python: the machine's site-packages (its torch,
  # torchvision, numpy, ...) are added after the venv's own by a .pth file, so that pip keeps
  # them (requirements they satisfy stay as they are) and what it installs shadows nothing of
  # torch. (`python -m venv --system-site-packages` from a Python that is itself a venv, as
  # the machine's is, would expose the base interpreter's site-packages, not the venv's.)
  set -euxo pipefail
  unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
  export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
  sites=${MACHINE_SITE:-$("$BASE_PYTHON" -c 'import json, site; print(json.dumps(site.getsitepackages()))')}
  rm -rf "$VENV"
  sees_machine_torch() {
    "$VENV/bin/python" "$H/env_info.py" torch "$LOGS/torch_before.json" >/dev/null &&
      "$BASE_PYTHON" -c 'import json, sys; a, b = (json.load(open(p)) for p in sys.argv[1:])
sys.exit(a["torch_file"] != b["torch_file"])' "$LOGS/machine.json" "$LOGS/torch_before.json"
  }
  if "$BASE_PYTHON" -m venv --without-pip "$VENV"; then
    purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; [__import__('site').addsitedir(d) for d in $sites]" > "$purelib/_gpu_check_machine_site.pth"
  fi
  if ! sees_machine_torch; then
    # no venv module, or the venv does not see the machine's torch: install into the machine's
    # Python itself (the machine is thrown away after the call)
    echo "VENV FAILED: installing into $BASE_PYTHON's own environment"
    rm -rf "$VENV"; mkdir -p "$VENV/bin"
    printf '#!/bin/sh\nexec %q "$@"\n' "$(command -v "$BASE_PYTHON")" > "$VENV/bin/python"
    chmod +x "$VENV/bin/python"
    sees_machine_torch
  fi
  cat "$LOGS/torch_before.json"
  # --no-index: gpu_wheels/ holds no torch / torchvision, so pip cannot replace them (it would
  # fail instead); the --dry-run report and torch_after.json check it. (No `-c` pin of torch:
  # pip 23.2 rejected the installed 2.15.0+cu132 against `torch==2.15.0+cu132` here.)
  pipi=("$VENV/bin/python" -m pip install --no-index --find-links "$WHEELS")
  "${pipi[@]}" "setuptools<81" wheel
  if "${pipi[@]}" --dry-run --report "$LOGS/pip_report.json" --no-build-isolation \
      -e ".[test]" -r "$WHEELS/requirements.txt"; then
    "${pipi[@]}" --no-build-isolation -e ".[test]" -r "$WHEELS/requirements.txt"
  else
    # pip's resolver failed (e.g. a machine package's own requirement is not met there):
    # install the carried wheels of what is missing, and d2kd, without resolution
    echo "RESOLUTION FAILED: installing the missing carried wheels with --no-deps"
    "$VENV/bin/python" - "$WHEELS" >"$WORK/missing_wheels.txt" <<'EOF'
import glob, os, re, sys
from importlib import metadata
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(d.metadata["Name"]) for d in metadata.distributions()}
for w in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    if norm(os.path.basename(w).split("-")[0]) not in have:
        print(w)
EOF
    cat "$WORK/missing_wheels.txt"
    [[ -s $WORK/missing_wheels.txt ]] && "${pipi[@]}" --no-deps $(cat "$WORK/missing_wheels.txt")
    "${pipi[@]}" --no-deps --no-build-isolation -e ".[test]"
    "$VENV/bin/python" -c 'import json, sys; json.dump({"install": [], "resolution_failed": True}, open(sys.argv[1], "w"))' \
      "$LOGS/pip_report.json"
  fi
  "$VENV/bin/python" "$H/env_info.py" torch "$LOGS/torch_after.json"
  "$VENV/bin/python" "$H/env_info.py" install "$LOGS/pip_report.json" "$LOGS/torch_before.json" \
    "$LOGS/torch_after.json" "$LOGS/install.json"
  exit 0
fi
if [[ ${1:-} == _detectron2 ]]; then
  set -euxo pipefail
  unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
  export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
  rm -rf "$WORK/src"; mkdir -p "$WORK/src"
  tar xzf "$(ls "$WHEELS"/src/detectron2-*.tar.gz | head -1)" -C "$WORK/src"
  if [[ $DEVICE == cuda ]]; then
    export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    command -v nvcc && nvcc --version
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # torch's extension builder compiles in parallel only with ninja (the machine's venv has it)
  PATH=$(dirname "$(command -v "$BASE_PYTHON")"):$PATH
  ninja --version || echo "no ninja: the build compiles one file at a time"
  "$VPY" -m pip install -v --no-index --find-links "$WHEELS" --no-build-isolation \
    --no-deps "$WORK/src/detectron2"
  cd /tmp && "$VPY" -c "from detectron2 import _C; print('detectron2._C:', _C.__file__)"
  exit 0
fi
if [[ ${1:-} == _detectron2_fallback ]]; then
  # the pure-Python detectron2 0.6 of `make setup`, from the carried sdist
  set -euxo pipefail
  "$VPY" -m pip uninstall -y detectron2 || true
  mkdir -p "$WORK/provision/downloads"
  cp "$WHEELS"/src/pb1-detectron2-0.6.tar.gz "$WORK/provision/downloads/"
  unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
  PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS" \
    "$VPY" -m d2kd.apps.provision --work-dir "$WORK/provision"
  exit 0
fi

# The run, as one function: bash reads a script while it runs it, so a script edited during a
# run would go astray; a function body is read whole before it starts.
main() {
# ---- options -------------------------------------------------------------------------------
DEVICE=cuda SKIP_INSTALL=0 BUDGET="" ITERS=""
OUT_DIR=${OUT:-$REPO/output/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/d2kd_gpu_check}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/gpu_wheels}
BASE_PYTHON=${BASE_PYTHON:-python3}
PYTHON=${PYTHON:-}
while (($#)); do
  case $1 in
    --cpu) DEVICE=cpu ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --python) PYTHON=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --iters) ITERS=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --work) WORK=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --base-python) BASE_PYTHON=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# on the CPU (a dry run on a 2-core machine) every step may take 5 times its GPU limit
if [[ $DEVICE == cuda ]]; then BUDGET=${BUDGET:-480}; ITERS=${ITERS:-40}; LIMIT_SCALE=1
else BUDGET=${BUDGET:-5400}; ITERS=${ITERS:-4}; LIMIT_SCALE=5; fi
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd) || { echo "no wheels folder: run 'bash tools/gpu_check.sh prepare' first (or --skip-install)" >&2; [[ $SKIP_INSTALL == 1 ]] || exit 2; WHEELS=""; }
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [[ -e $WORK && ! -e $WORK/.gpu_check ]] && [[ -n $(ls -A "$WORK" 2>/dev/null) ]]; then
  echo "$WORK exists and is not a gpu_check work folder: pass --work DIR" >&2; exit 2
fi
rm -rf "$WORK"; mkdir -p "$WORK/logs/runs" && touch "$WORK/.gpu_check"
rm -f "$OUT_DIR"/gpu_check.json "$OUT_DIR"/gpu_check.md "$OUT_DIR"/gpu_check_logs.tar.gz
LOGS=$WORK/logs VENV=$WORK/venv DATASETS=$WORK/datasets
if [[ $SKIP_INSTALL == 1 ]]; then VPY=${PYTHON:-$(command -v python3)}; else VPY=$VENV/bin/python; fi
SUMPY=$BASE_PYTHON
export REPO H WORK LOGS VENV WHEELS BASE_PYTHON VPY DEVICE
export DETECTRON2_DATASETS=$DATASETS PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# detectron2_projects:// teachers (COCO MTPD chains ending in ViTDet's Swin-B) read the
# projects/ folder of the detectron2 source that the detectron2 step unpacks
[[ $SKIP_INSTALL == 0 ]] && export DETECTRON2_PROJECTS=${DETECTRON2_PROJECTS:-$WORK/src/detectron2/projects}
RESERVE=12   # seconds kept for the last summary
START=${EPOCHREALTIME%.*}
DEADLINE=$((START + BUDGET))

say() { echo "[gpu_check $(date +%T) +$((${EPOCHREALTIME%.*} - START))s] $*"; }
left() { echo $((DEADLINE - ${EPOCHREALTIME%.*} - RESERVE)); }

write_summary() {
  "$SUMPY" "$H/summarize.py" write "$LOGS" "$OUT_DIR" || say "summary failed"
  local tmp="$OUT_DIR/.logs-$BASHPID.tar.gz"
  tar czf "$tmp" -C "$WORK" logs 2>/dev/null && mv -f "$tmp" "$OUT_DIR/gpu_check_logs.tar.gz"
}

skip_step() {  # NAME REASON CMD
  "$SUMPY" "$H/summarize.py" skip "$LOGS" "$1" "$2" -- "$3"
  say "[$1] skipped: $2"
}

# run_step NAME LIMIT_S CMD: CMD (a bash command line) with a time limit cut to what is left of
# the budget; its output goes to LOGS/NAME.log; one record in LOGS/steps.jsonl.
run_step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE)) cmd=$3 log=$LOGS/$1.log rc t0 t1 avail
  avail=$(left)
  if ((avail < 15)); then skip_step "$name" "time budget spent" "$cmd"; return 99; fi
  ((limit > avail)) && limit=$avail
  say "[$name] start, limit ${limit}s: $cmd"
  t0=$EPOCHREALTIME
  timeout -k 5 "$limit" bash -c "$cmd" >"$log" 2>&1 </dev/null
  rc=$?
  t1=$EPOCHREALTIME
  "$SUMPY" "$H/summarize.py" record "$LOGS" "$name" "$rc" "$t0" "$t1" "$limit" "$log" -- "$cmd"
  say "[$name] rc=$rc after $((${t1%.*} - ${t0%.*}))s"
  ((rc == 0)) || tail -n 15 "$log" | sed "s/^/[$name] | /"
  write_summary
  return $rc
}

q() { printf '%q ' "$@"; }

# ---- meta, GPU sampler ----------------------------------------------------------------------
# .git may not travel to the GPU machine: GPU_CHECK_COMMIT=<sha> names the commit there
commit=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
dirty=$([[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && echo true || echo false)
overhead_sync=$(grep -q "synchronize" dev/benchmark/overhead.py && echo true || echo false)
"$SUMPY" -c '
import json, os, sys, time
(path, device, budget, iters, commit, dirty, skip, started, sync, wheels) = sys.argv[1:]
manifest = os.path.join(wheels, "manifest.json")
manifest = json.load(open(manifest)) if wheels and os.path.exists(manifest) else {}
json.dump({"device": device, "budget_s": int(budget), "iters": int(iters), "commit": commit,
           "dirty": dirty == "true", "skip_install": skip == "1", "started": int(started),
           "started_iso": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(int(started))),
           "overhead_synchronizes": sync == "true",
           "wheels": {k: manifest.get(k) for k in ("python_version", "created", "repo_commit",
                                                     "total_bytes")}},
          open(path, "w"), indent=1)' "$LOGS/meta.json" "$DEVICE" "$BUDGET" "$ITERS" "$commit" \
  "$dirty" "$SKIP_INSTALL" "$START" "$overhead_sync" "$WHEELS"
SAMPLER=""
if [[ $DEVICE == cuda ]] && command -v nvidia-smi >/dev/null; then
  ( while :; do
      v=$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits 2>/dev/null | head -1)
      [[ -n $v ]] && echo "$EPOCHREALTIME,$v"
      sleep 0.5
    done ) >>"$LOGS/gpu_samples.csv" 2>/dev/null &
  SAMPLER=$!
fi
cleanup() { [[ -n $SAMPLER ]] && kill "$SAMPLER" 2>/dev/null; }
trap cleanup EXIT
say "device $DEVICE, budget ${BUDGET}s, $ITERS iterations per run, work $WORK, results $OUT_DIR"

# ---- 1. machine ------------------------------------------------------------------------------
run_step machine 60 "{ nvidia-smi || true; } && { nvcc --version || true; } && nproc && { free -g || true; } && { $(q "$BASE_PYTHON") -m pip --version || true; } && $(q "${PYTHON:-$BASE_PYTHON}" "$H/env_info.py" torch "$LOGS/machine.json")"

# ---- 2. install: wheels, detectron2 ------------------------------------------------------------
if [[ $SKIP_INSTALL == 0 ]]; then
  run_step install 180 "$(q bash "$REPO/tools/gpu_check.sh" _install)"
else
  skip_step install "--skip-install: using $VPY as it is" ""
fi

# DigitsDet, in the background (it needs numpy, Pillow, pycocotools, scikit-learn: installed)
if [[ $DEVICE == cuda ]]; then ds_size=(); else ds_size=(--num-train 48 --num-val 16); fi
run_step digitsdet 240 "$(q "$VPY" "$H/gen_digitsdet.py" --out "$DATASETS/digitsdet" --quiet "${ds_size[@]}")" &
DIGITS_PID=$!

if [[ $SKIP_INSTALL == 0 ]]; then
  # leave at least ~3 minutes for the tests, runs and benchmarks
  d2_limit=$(( $(left) - 190 )); ((d2_limit > 420)) && d2_limit=420; ((d2_limit < 60)) && d2_limit=60
  if ! run_step detectron2 "$d2_limit" "$(q bash "$REPO/tools/gpu_check.sh" _detectron2)"; then
    run_step detectron2_fallback 120 "$(q bash "$REPO/tools/gpu_check.sh" _detectron2_fallback)"
  fi
else
  skip_step detectron2 "--skip-install" ""
fi
run_step collect_env 60 "$(q "$VPY" -m d2kd.apps.collect_env) && $(q "$VPY" "$H/env_info.py" detectron2 "$LOGS/detectron2.json")"
wait "$DIGITS_PID"

# ---- 3. tests, distillation runs ---------------------------------------------------------------
RETINA=configs/DigitsDet/retinanet_R18_from_R50_gk.yaml
FRCNN=configs/DigitsDet/faster_rcnn_R18_from_R50_R34_mtpd_mgd.yaml
run_step teachers 120 "$(q "$VPY" "$H/teachers.py" --out "$WORK/teachers" --json "$LOGS/teachers.json" "$RETINA" "$FRCNN")"

if [[ $DEVICE == cuda ]]; then
  RUN_ENV="env OMP_NUM_THREADS=4"  # four runs and two test processes share 16 cores
  RUN_OPTS=(DATALOADER.NUM_WORKERS 4)
  GK_OPTS=()
else
  RUN_ENV=""
  RUN_OPTS=(DATALOADER.NUM_WORKERS 0 SOLVER.IMS_PER_BATCH 4 DISTILL.PROTOTYPES.EXTRACT_BATCH_SIZE 4)
  GK_OPTS=(DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS 3)
fi
half=$((ITERS / 2))

# run_distill NAME CONFIG AMP OPTS...: tools/train_net.py with random teachers, a randomly
# initialised student (MODEL.WEIGHTS "": no DigitsDet backbone pre-training, which takes
# minutes), ITERS iterations, the final evaluation on digitsdet_val; its files copied to
# LOGS/runs/NAME.
run_distill() {
  local name=$1 config=$2 amp=$3; shift 3
  local out=$WORK/runs/$name weights
  if [[ $amp == True && $DEVICE != cuda ]]; then
    skip_step "run_$name" "AMP needs CUDA (detectron2's AMPTrainer)" ""; return 0
  fi
  weights=$("$SUMPY" -c 'import json, sys; print(repr(json.load(open(sys.argv[1]))[sys.argv[2]]))' \
            "$LOGS/teachers.json" "$config" 2>/dev/null) || {
    skip_step "run_$name" "no random teachers (teachers step failed)" ""; return 0; }
  run_step "run_$name" 200 "$RUN_ENV $(q "$VPY" tools/train_net.py --config-file "$config" \
    MODEL.DEVICE "$DEVICE" SOLVER.AMP.ENABLED "$amp" SOLVER.MAX_ITER "$ITERS" \
    SOLVER.WARMUP_ITERS $((ITERS / 4)) SOLVER.CHECKPOINT_PERIOD 100000 \
    MODEL.WEIGHTS "" DISTILL.TEACHER.WEIGHTS "$weights" OUTPUT_DIR "$out" "${RUN_OPTS[@]}" "$@")"
  mkdir -p "$LOGS/runs/$name"
  cp "$out/metrics.json" "$out/log.txt" "$out/config.yaml" "$out/inference/results.json" \
    "$out/stages.json" "$LOGS/runs/$name/" 2>/dev/null
  [[ -f $out/model_final_student.pth ]] && touch "$LOGS/runs/$name/student_exported"
  echo "{\"amp\": \"$amp\"}" >"$LOGS/runs/$name/amp.json"
  rm -f "$out"/*.pth  # checkpoints: not needed any more
  write_summary
}

# concurrently (one GPU, 16 cores): the two test groups, and the two families' runs, each
# family's AMP off / on in sequence (their step times are comparable with each other).
run_step pytest_cuda 240 "$(q "$VPY" -m pytest -m cuda -q -rs tests --junitxml="$LOGS/pytest_cuda.xml")" &
P1=$!
run_step pytest_compiled 180 "$(q "$VPY" -m pytest -q -rs tests/compat/test_compiled_build.py --junitxml="$LOGS/pytest_compiled.xml")" &
P2=$!
( run_distill retinanet_gk_amp_off "$RETINA" False "${GK_OPTS[@]}"
  run_distill retinanet_gk_amp_on "$RETINA" True "${GK_OPTS[@]}" ) &
P3=$!
( run_distill faster_rcnn_mtpd_amp_off "$FRCNN" False DISTILL.SCHEDULE.STAGE_ITERS "[$half, $((ITERS - half))]"
  run_distill faster_rcnn_mtpd_amp_on "$FRCNN" True DISTILL.SCHEDULE.STAGE_ITERS "[$half, $((ITERS - half))]" ) &
P4=$!
wait "$P1" "$P2" "$P3" "$P4"

# ---- 4. overhead benchmark (alone on the GPU) --------------------------------------------------
if [[ $DEVICE == cuda ]]; then OVH=(--iters 20 --warmup 3); OVH_OPTS=()
else OVH=(--iters 2 --warmup 1); OVH_OPTS=(SOLVER.IMS_PER_BATCH 2); fi
ovh_files=()
for cfg in configs/DigitsDet/retinanet_R18_from_R50_gk.yaml configs/DigitsDet/faster_rcnn_R18_from_R50_mgd.yaml; do
  n=$(basename "$cfg" .yaml)
  run_step "overhead_$n" 150 "$(q "$VPY" tools/benchmark.py overhead --config-file "$cfg" \
    --json "$LOGS/overhead_$n.json" "${OVH[@]}" --random-teacher MODEL.DEVICE "$DEVICE" "${OVH_OPTS[@]}")" \
    && ovh_files+=("$LOGS/overhead_$n.json")
done
if ((${#ovh_files[@]})); then
  run_step overhead_summary 60 "$(q "$VPY" tools/benchmark.py overhead-summary --inputs "${ovh_files[@]}" \
    --json "$LOGS/overhead_summary.json" --markdown "$LOGS/overhead_summary.md")"
fi

# ---- 5. COCO 2-iteration benchmark (if tools/benchmark.py has it) --------------------------------
coco_cmd=$("$SUMPY" "$H/coco_step.py" "$VPY" "$DEVICE" "$LOGS" 2>"$LOGS/coco_detect.log") || coco_cmd=""
if [[ -n $coco_cmd ]]; then
  run_step coco_2iter 240 "$coco_cmd"
else
  skip_step coco_2iter "no COCO benchmark sub-command in tools/benchmark.py ($(tail -1 "$LOGS/coco_detect.log" 2>/dev/null))" ""
fi

# ---- done ------------------------------------------------------------------------------------
touch "$LOGS/FINISHED"
cp "$LOGS/pip_report.json" "$LOGS/overhead_summary.md" "$WORK/" 2>/dev/null
write_summary
say "done: $OUT_DIR/gpu_check.md"
cat "$OUT_DIR/gpu_check.md"
# exit status 1 if a step failed or timed out (skipped steps do not count)
"$SUMPY" -c 'import json, sys
sys.exit(any(s["status"] in ("failed", "timeout") for s in json.load(open(sys.argv[1]))["steps"]))' \
  "$OUT_DIR/gpu_check.json"
}

# one line: parsed whole before main runs (see above)
main "$@"; exit $?
