#!/usr/bin/env bash
# The GPU check: does retain's GPU path work? At most ~8 minutes on one GPU, no network. One JSON line per
# measurement on stdout (what each is: bench/gpu_check.py); the last line is {"check": "summary", "ok": ...}.
#
#   bash bench/gpu_check.sh [--wheels DIR] [--python PY] [--cpu]
#
# --wheels DIR  install what is missing — the project itself and any of its dependencies or TRL — from the wheels in
#               DIR only (pip --no-index --find-links DIR). A GPU machine may have torch, transformers, accelerate
#               and peft but no TRL or pydantic, and no network. Build DIR on a machine with network, from the
#               repository root:  pip wheel --wheel-dir DIR . 'trl==1.16.*' 'datasets>=3'
#               (torch is never installed from DIR: the machine's own CUDA build is used and checked.)
# --python PY   the interpreter to use (default: $PYTHON, else python3)
# --cpu         the smoke test on the CPU with tiny sizes (what `make test` runs); the 0.5B-shape model is then a
#               scaled-down Qwen2 shape, and its lines say so.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
wheels=""
cpu=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="${2:?--wheels needs a directory}"; shift 2 ;;
    --python) python="${2:?--python needs an interpreter}"; shift 2 ;;
    --cpu) cpu=(--cpu); shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # never the network, whatever pip.conf says

if ! "$python" -c "import torch" 2>/dev/null; then
  echo '{"check": "torch", "ok": false, "error": "torch is not importable: install the machine'"'"'s CUDA build first"}'
  exit 1
fi

# Modules the check needs -> the distribution that provides them (torch is not among them on purpose).
missing="$("$python" - <<'EOF'
import importlib.util
needs = {"retain": None, "transformers": "transformers", "accelerate": "accelerate", "peft": "peft",
         "pydantic": "pydantic", "yaml": "pyyaml", "typer": "typer", "rich": "rich", "regex": "regex",
         "safetensors": "safetensors", "tokenizers": "tokenizers", "numpy": "numpy", "pyarrow": "pyarrow",
         "matplotlib": "matplotlib", "trl": "trl==1.16.*", "datasets": "datasets>=3"}
print(" ".join(sorted(k for k in needs if importlib.util.find_spec(k) is None)))
EOF
)"

if [ -n "$missing" ]; then
  if [ -n "$wheels" ]; then
    [ -d "$wheels" ] || { echo "{\"check\": \"install\", \"ok\": false, \"error\": \"no wheel folder $wheels\"}"; exit 1; }
    # The project and its dependencies from DIR (torch already satisfied: pip keeps the installed build); TRL and
    # datasets for the TRL comparisons.
    if ! "$python" -m pip install -q --no-index --find-links "$wheels" "$root" 'trl==1.16.*' 'datasets>=3' >&2; then
      echo "{\"check\": \"install\", \"ok\": false, \"error\": \"pip could not install from $wheels (missing: $missing)\"}"
      exit 1
    fi
    echo "{\"check\": \"install\", \"ok\": true, \"installed_from\": \"$wheels\", \"were_missing\": \"$missing\"}"
  elif [ "$missing" != "retain" ]; then
    echo "{\"check\": \"install\", \"ok\": false, \"error\": \"missing: $missing; give --wheels DIR\"}"
    exit 1
  fi
fi

# This checkout's sources come first, whatever retain is installed: the code under check is the code here.
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$here/gpu_check.py" "${cpu[@]}"
