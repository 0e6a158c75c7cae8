#!/usr/bin/env bash
# The GPU check: one call on one GPU machine with no network, about 8 minutes.
#
#   bash benchmarks/gpu_prepare.sh            # here, with the network: wheels and the baseline's code into .gpu/
#   bash benchmarks/gpu_check.sh              # there, from the repository root, with .gpu/ beside it
#
# 1. installs the wheels in .gpu/whl (what the machine lacks: nvflare, cma and their needs), if any;
# 2. builds roberta-large's architecture from a config (random weights, the real RoBERTa tokenizer);
# 3. times a site round with benchmarks/throughput.py --size large: today's defaults against 33d3fce
#    (its src/fedbpt from .gpu/baseline, or from git where the history is there);
# 4. runs the README's GPU command (the block marked gpu-run) with that model folder and the repository's
#    SST-2 copy, for ROUNDS rounds and 10 sites, through nvflare simulator;
# 5. adds the simulator's seconds per round to benchmarks/results/throughput_<gpu>.json.
#
# Dry run on a CPU (writes its JSON elsewhere, not over the committed CPU figures):
#   WHEELS=none SIZE=tiny DEVICE=cpu ROUNDS=1 RESULT_JSON=/tmp/throughput_dry.json bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
SIZE=${SIZE:-large}
DEVICE=${DEVICE:-cuda:0}
ROUNDS=${ROUNDS:-3}
SITES=${SITES:-10}
BASELINE=${BASELINE:-33d3fce}
WORK=${WORK:-/tmp/fedbpt-gpu-check}
LOG=${OUT:-$WORK}  # where the logs go ($OUT on the device machine brings them back)
mkdir -p "$WORK" "$LOG"
T0=$(date +%s)
stamp() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$LOG/gpu_check.log"; }

WHEELS=${WHEELS:-.gpu/whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/site/bin:$PATH"
fi
[ -d .gpu/baseline/src/fedbpt ] && BASELINE=.gpu/baseline
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG/gpu_check.log"
python3 -c "import torch, transformers, nvflare, cma; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'nvflare', nvflare.__version__, 'cma', cma.__version__)" | tee -a "$LOG/gpu_check.log" || exit 1
stamp installed

MODEL="$WORK/roberta-$SIZE"
timeout "${BENCH_S:-240}" python3 benchmarks/throughput.py --size "$SIZE" --model_dir "$MODEL" --device "$DEVICE" \
  --baseline "$BASELINE" ${RESULT_JSON:+--out "$RESULT_JSON"} 2>&1 | tee "$LOG/throughput.log"
stamp "throughput rc=$?"
RESULT=$(sed -n 's/^wrote //p' "$LOG/throughput.log" | tail -1)
[ -f "$MODEL/config.json" ] || { stamp "no model in $MODEL"; exit 1; }

# The README's GPU command as written, with the model folder for the hub id, the repository's SST-2 copy,
# ROUNDS rounds, SITES sites, this device, and a workspace of its own; run in a copy of what it reads, so
# that the committed jobs/fedbpt stays as it is.
rm -rf "$WORK/repo" && mkdir -p "$WORK/repo/jobs" && cp -r job_templates src data "$WORK/repo/"
python3 - "$MODEL" "$DEVICE" "$ROUNDS" "$SITES" "$WORK" "$(pwd)/data/sst2" >"$WORK/gpu_run.sh" <<'EOF'
import re, sys
from pathlib import Path

model, device, rounds, sites, work, data = sys.argv[1:]
for page in [Path("README.md"), *sorted(Path("docs").glob("*.md"))]:
    found = re.search(r"<!-- gpu-run -->\s*```(?:bash|sh)?\n(.*?)```", page.read_text(), re.S) if page.exists() else None
    if found:
        break
else:
    sys.exit("no page has a block marked <!-- gpu-run -->")
block = found.group(1)
for old, new in [("--model_name roberta-large", f"--model_name {model} --data_dir {data}"),
                 ("--device cuda:0", f"--device {device}"), ("num_rounds=200", f"num_rounds={rounds}"),
                 ("N_CLIENTS=10", f"N_CLIENTS={sites}"), ("/tmp/nvflare/fedbpt", f"{work}/simulator")]:
    if old not in block:
        sys.exit(f"the gpu-run block in {page} no longer holds {old!r}")
    block = block.replace(old, new)
print(f"export HOME={work}/home\nmkdir -p $HOME\nrm -rf {work}/simulator\ncd {work}/repo\n{block}")
EOF
[ -s "$WORK/gpu_run.sh" ] || { stamp "could not read the README's gpu-run block"; exit 1; }
cp "$WORK/gpu_run.sh" "$LOG/gpu_run.sh"
SIM0=$(date +%s)
tree() { local c; for c in $(ps -o pid= --ppid "$1"); do tree "$c"; echo "$c"; done; }
bash -e "$WORK/gpu_run.sh" >"$LOG/simulator.log" 2>&1 &
SIM=$!
while kill -0 "$SIM" 2>/dev/null && [ $(($(date +%s) - SIM0)) -lt "${SIM_S:-300}" ]; do sleep 2; done
if kill -0 "$SIM" 2>/dev/null; then  # out of time: stop the simulator and its site processes, by process id
  stamp "simulator still running after ${SIM_S:-300} s: stopping it"
  kill -9 $(tree "$SIM") "$SIM" 2>/dev/null
fi
wait "$SIM"
SIM_RC=$?
stamp "simulator rc=$SIM_RC"
cp "$WORK/simulator/server/simulate_job/metrics.jsonl" "$LOG/sim_metrics.jsonl" 2>/dev/null

python3 - "$RESULT" "$WORK/simulator/server/simulate_job/metrics.jsonl" "$SIM_RC" "$(($(date +%s) - SIM0))" \
  "$SITES" "$ROUNDS" <<'EOF'
import json, sys
from pathlib import Path

result, metrics, rc, wall, sites, rounds = sys.argv[1:]
rows = [json.loads(line) for line in Path(metrics).read_text().splitlines()] if Path(metrics).exists() else []
simulator = {"rc": int(rc), "sites": int(sites), "rounds_asked": int(rounds), "wall_s": int(wall),
             "rounds": [r["round"] for r in rows], "seconds_per_round": [r.get("seconds") for r in rows],
             "sites_used": [len(r["sites"]) for r in rows], "test_acc": [r.get("test_acc") for r in rows]}
print(json.dumps(simulator))
if result and Path(result).exists():
    data = json.loads(Path(result).read_text())
    data["simulator"] = simulator
    Path(result).write_text(json.dumps(data, indent=1))
    print(f"added the simulator's rounds to {result}")
EOF
stamp done
