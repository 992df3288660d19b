#!/usr/bin/env bash
# The one command for a session with a lent GPU (one H200, bare image, no network): measure AEM LoRA training's real
# GPU memory for the full Qwen2.5-1.5B and -7B (benchmarks/memory.py --device cuda) and compare it with the CPU
# tracer's plan for the same sizes (benchmarks/memory_plan.py). See benchmarks/gpu/README.md.
#
#   bash benchmarks/gpu/run_checks.sh                # on the GPU machine, after fetch_wheels.sh here; carry: [".whl"]
#   DRY_RUN=1 bash benchmarks/gpu/run_checks.sh      # anywhere: print the commands, build the table from what exists
#
# Env: OUT (default benchmarks/results/gpu), PYTHON (default python3), BUDGET (seconds for the whole script, default
# 530, so it ends inside a 560 s device call), WORK (scratch folder, default /tmp/aem-gpu-checks), SITE (pip --target
# for the wheels, default /tmp/site).
# Files under $OUT (8, the most a device call returns): env.txt, memory_1.5b.{json,txt}, memory_7b.{json,txt},
# plan.json (both traced plans), plan_vs_measured.txt (table + the tracer's reports), log.txt (steps, timings).
# Every step has its own timeout; a failed step does not stop the next one.
set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 1

DRY=${DRY_RUN:-0}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-530}
OUT=${OUT:-benchmarks/results/gpu}
WORK=${WORK:-/tmp/aem-gpu-checks}
SITE=${SITE:-/tmp/site}
T0=$SECONDS
MODELS=(1.5b 7b)

if [[ $DRY == 1 ]]; then
  LOG=/dev/null
else
  mkdir -p "$OUT" "$WORK" || exit 1
  OUT=$(cd "$OUT" && pwd)
  rm -f "$WORK"/plan_* "$WORK"/summary
  LOG=$OUT/log.txt
  : >"$LOG"
fi
SUM=$WORK/summary
[[ $DRY == 1 ]] && SUM=/dev/null

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export WANDB_MODE=disabled HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg HF_HOME=/tmp/aem-hf-home

say() { echo "$*" | tee -a "$LOG"; }

# step NAME NOMINAL_TIMEOUT RESERVE OUTFILE CMD... : run CMD (stdout+stderr appended to OUTFILE) under
# timeout min(NOMINAL, time left in BUDGET - RESERVE); RESERVE keeps time for the steps that come after it.
step() {
  local name=$1 nominal=$2 reserve=$3 out=$4
  shift 4
  local left=$((BUDGET - (SECONDS - T0) - reserve))
  local t=$((nominal < left ? nominal : left))
  if [[ $DRY == 1 ]]; then
    say "[dry] $name: timeout ${nominal}s $* >> $out"
    return 0
  fi
  if ((t < 10)); then
    echo "$name: SKIPPED (no time left in the ${BUDGET}s budget)" >>"$SUM"
    say "$name: SKIPPED (no time left in the ${BUDGET}s budget)"
    return 1
  fi
  say "[$(date +%T) +$((SECONDS - T0))s] $name: start, timeout ${t}s: $*"
  local started=$SECONDS rc status
  timeout -k 10 "$t" "$@" >>"$out" 2>&1
  rc=$?
  if ((rc == 0)); then status=ok
  elif ((rc == 124 || rc == 137)); then status="TIMEOUT (${t}s)"
  else status="FAILED (rc=$rc)"; fi
  echo "$name: $status, $((SECONDS - started)) s" >>"$SUM"
  say "[$(date +%T) +$((SECONDS - T0))s] $name: $status, $((SECONDS - started)) s"
  if ((rc != 0)); then tail -n 15 "$out" 2>/dev/null | sed 's/^/    | /' | tee -a "$LOG"; fi
  return "$rc"
}

# lengths MEMORY_JSON -> "B G P L": per_device_train_batch_size; generation batch = B x steps_per_generation (1 in
# memory.py: gradient_accumulation_steps 1, steps_per_generation unset); mean prompt length; longest prompt+completion.
lengths() {
  "$PY" - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
b, p, l = int(r["batch_size"]), int(round(r["mean_prompt_length"])), int(r["max_sequence_length"])
assert 0 < p < l, (p, l)
print(b, b, p, l)
EOF
}

# plan MODEL SOURCE_JSON TIMEOUT RESERVE: trace MODEL with the lengths measured in SOURCE_JSON (CPU only).
plan() {
  local model=$1 src=$2 nominal=$3 reserve=$4 B=B G=G P=P L=L
  if [[ -f $src ]]; then
    read -r B G P L < <(lengths "$src") || { say "plan_$model: cannot read lengths from $src"; return 1; }
  elif [[ $DRY != 1 ]]; then
    say "plan_$model: $src missing"; return 1
  fi
  [[ $DRY == 1 ]] || { basename "$src" >"$WORK/plan_$model.src"; : >"$WORK/plan_$model.txt"; }
  step "plan_$model" "$nominal" "$reserve" "$WORK/plan_$model.txt" \
    nice -n 10 env CUDA_VISIBLE_DEVICES= "$PY" benchmarks/memory_plan.py --model "$model" --batch-size "$B" \
    --generation-batch-size "$G" --prompt-length "$P" --sequence-length "$L" --lora-dropout 0 \
    --json "$WORK/plan_$model.json"
}

say "== AEM GPU checks: OUT=$OUT, budget ${BUDGET}s, $(date -u +%FT%TZ)"

# ---- a. wheels (trl, datasets, gymnasium, ... : see fetch_wheels.sh) and versions -> env.txt
[[ $DRY == 1 ]] || : >"$OUT/env.txt"
[[ $DRY == 1 ]] || echo "== pip install .whl/*.whl --target $SITE" >>"$OUT/env.txt"
step install 90 0 "$OUT/env.txt" \
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl
export PYTHONPATH=$SITE:$PWD
[[ $DRY == 1 ]] || echo "== versions (PYTHONPATH=$PYTHONPATH)" >>"$OUT/env.txt"
step versions 90 0 "$OUT/env.txt" "$PY" -c '
import importlib, platform, sys, traceback
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "gymnasium", "tokenizers", "safetensors",
             "huggingface_hub", "fsspec", "pyarrow", "pandas", "numpy", "dill", "multiprocess", "xxhash"):
    try:
        mod = importlib.import_module(name)
        print(name.ljust(16), str(getattr(mod, "__version__", "?")).ljust(24), getattr(mod, "__file__", ""))
    except Exception as exc:
        print(f"{name:16s} IMPORT FAILED: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
try:
    import trl_aem
    from trl_aem import AEMGRPOConfig, AEMGRPOTrainer
    print("trl_aem", trl_aem.__version__, "AEMGRPOTrainer imported; wandb imported:", "wandb" in sys.modules)
except Exception:
    traceback.print_exc()
    sys.exit(1)
'
[[ $DRY == 1 ]] || echo "== nvidia-smi" >>"$OUT/env.txt"
step nvidia-smi 20 0 "$OUT/env.txt" nvidia-smi

# ---- b. full Qwen2.5-1.5B, bf16, on the GPU (keep 250 s for the 7B)
step memory_1.5b 180 250 "$OUT/memory_1.5b.txt" \
  "$PY" benchmarks/memory.py --model 1.5b --device cuda --json "$OUT/memory_1.5b.json"

# ---- d (first part). The CPU traces run beside the 7B measurement (16 cores; the trace uses fake tensors and no
# GPU). Lengths come from the 1.5B run: they are set by turns x tokens and the observation size, not by the model;
# the 7B plan is traced again below if the 7B run measured other lengths.
pids=()
if [[ -f $OUT/memory_1.5b.json || $DRY == 1 ]]; then
  for m in "${MODELS[@]}"; do
    if [[ $DRY == 1 ]]; then plan "$m" "$OUT/memory_1.5b.json" 240 20; continue; fi
    plan "$m" "$OUT/memory_1.5b.json" 240 20 &
    pids+=($!)
  done
fi

# ---- c. full Qwen2.5-7B
step memory_7b 240 15 "$OUT/memory_7b.txt" \
  "$PY" benchmarks/memory.py --model 7b --device cuda --json "$OUT/memory_7b.json"

for pid in "${pids[@]}"; do wait "$pid"; done

# ---- d (second part): plans from the 7B lengths where needed
if [[ $DRY != 1 && -f $OUT/memory_7b.json ]]; then
  if ((${#pids[@]} == 0)); then
    for m in "${MODELS[@]}"; do plan "$m" "$OUT/memory_7b.json" 240 15 & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done
  elif [[ -f $OUT/memory_1.5b.json && "$(lengths "$OUT/memory_1.5b.json")" != "$(lengths "$OUT/memory_7b.json")" ]]; then
    say "7B lengths differ from the 1.5B ones: tracing the 7B plan again with its own"
    for f in json txt; do mv -f "$WORK/plan_7b.$f" "$WORK/plan_7b.first.$f" 2>/dev/null; done
    if ! plan 7b "$OUT/memory_7b.json" 240 15 && [[ -f $WORK/plan_7b.first.json ]]; then
      say "keeping the 7B plan traced with the 1.5B lengths"
      for f in json txt; do mv -f "$WORK/plan_7b.first.$f" "$WORK/plan_7b.$f"; done
      echo memory_1.5b.json >"$WORK/plan_7b.src"
    fi
  fi
fi

# ---- plan vs measured: table -> plan_vs_measured.txt, both plans -> plan.json
table() {
  "$PY" - "$OUT" "$WORK" "$DRY" <<'EOF'
import json, os, sys

out, work, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
GIB = 2**30

def load(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None

def gib(n):
    return "-" if n is None else f"{n / GIB:.2f}"

plans, rows, notes = {}, [], []
for model in ("1.5b", "7b"):
    m = load(os.path.join(out, f"memory_{model}.json"))
    p = load(os.path.join(work, f"plan_{model}.json"))
    if p is not None:
        try:
            with open(os.path.join(work, f"plan_{model}.src"), encoding="utf-8") as handle:
                p["lengths_from"] = handle.read().strip()
        except OSError:
            p["lengths_from"] = "?"
        plans[model] = p
    ratio = "-"
    if m and p and m.get("peak_bytes"):
        ratio = f"{p['peak_bytes'] / m['peak_bytes']:.3f}"
    rows.append([
        model,
        f"{p['batch_size']}/{p['generation_batch_size']}/{p['prompt_length']}/{p['sequence_length']}" if p else "-",
        f"{m['batch_size']}/{m['batch_size']}/{m['mean_prompt_length']:.0f}/{m['max_sequence_length']}" if m else "-",
        gib(m.get("memory_before_training_bytes")) if m else "-",
        gib(p.get("weight_bytes")) if p else "-",
        gib(m.get("peak_bytes")) if m else "-",
        gib(m.get("peak_reserved_bytes")) if m else "-",
        gib(p["phase_peak_bytes"]["generation"]) if p else "-",
        gib(p["phase_peak_bytes"]["training"]) if p else "-",
        f"{gib(p['peak_bytes'])} ({p['peak_phase']})" if p else "-",
        ratio,
    ])
    if m:
        notes.append(f"{model}: {m.get('hardware', '?')}; step {m['step_seconds_median']:.1f} s median "
                     f"[{m['step_seconds_min']:.1f}-{m['step_seconds_max']:.1f}], {m['tokens_per_s']:,.0f} tokens/s "
                     f"({m['generated_tokens_per_s']:,.0f} generated + {m['trained_tokens_per_s']:,.0f} trained); "
                     f"{m['turns']} turns x {m['tokens_per_turn']} tokens, {m['obs_tokens']}-word observations; "
                     f"versions {m.get('versions')}")
    if p:
        notes.append(f"{model}: plan traced in {p.get('trace_seconds', float('nan')):.0f} s with the lengths of "
                     f"{p['lengths_from']}; generate call batch {p['generate_call_batch']}, KV cache "
                     f"{gib(p['generation'].get('kv_cache_bytes'))} GiB, Adam {gib(p['adam_bytes'])} GiB; "
                     f"versions {p.get('versions')}")
head = ["model", "plan B/G/P/L", "measured B/G/P/L", "meas. before", "plan weights", "meas. peak", "meas. reserved",
        "plan gen.", "plan train.", "plan PEAK (phase)", "plan/meas."]
widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
lines = ["AEM LoRA training, full Qwen2.5 in bf16 on the GPU: memory.py (measured, torch.cuda.max_memory_allocated "
         "per step) vs memory_plan.py (traced with fake tensors on the CPU). GiB = 2^30 bytes.",
         "B/G/P/L = per_device_train_batch_size / generation batch / prompt length (measured: mean) / longest "
         "prompt+completion.", "", fmt(head), fmt(["-" * w for w in widths])]
lines += [fmt(r) for r in rows]
lines += ["", "meas. before = allocated after building the trainer (weights + LoRA); plan weights = bf16 weights + fp32 "
          "LoRA. meas. reserved = max_memory_reserved (allocator cache on top); the CUDA context is in neither.", ""]
lines += notes
print("\n".join(lines))
if not dry:
    with open(os.path.join(out, "plan.json"), "w", encoding="utf-8") as handle:
        json.dump(plans, handle, indent=2, default=str)
EOF
}

if [[ $DRY == 1 ]]; then
  say "[dry] table from $OUT/memory_*.json and $WORK/plan_*.json (printed only):"
  table
else
  {
    table
    for m in "${MODELS[@]}"; do
      echo
      echo "== memory_plan.py --model $m (lengths from $(cat "$WORK/plan_$m.src" 2>/dev/null || echo -))"
      cat "$WORK/plan_$m.txt" 2>/dev/null || echo "(no output)"
    done
  } >"$OUT/plan_vs_measured.txt" 2>&1 || say "table: FAILED"
  head -n 16 "$OUT/plan_vs_measured.txt" | tee -a "$LOG"
fi

for m in "${MODELS[@]}"; do
  [[ $DRY == 1 || -f $WORK/plan_$m.json ]] || grep -q "^plan_$m:" "$SUM" ||
    echo "plan_$m: not run (no memory JSON to take the lengths from)" >>"$SUM"
done
say ""
say "== summary ($((SECONDS - T0)) s in all; files in $OUT)"
[[ $DRY == 1 ]] || while read -r line; do say "  $line"; done <"$SUM"
exit 0
