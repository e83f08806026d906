#!/usr/bin/env bash
# Create the separate virtual environment for the llm-compressor peer runner.
#
#   benchmarks/peer/setup_peer.sh [VENV_DIR]     (default: benchmarks/.venv-peer)
#
# Installs torch (CPU wheel, FIRST, so that no multi-GB CUDA build is pulled in),
# then the pinned packages of requirements-peer.txt (llmcompressor and friends).
# Idempotent: when VENV_DIR already imports llmcompressor nothing is done.
# Needs nothing from the network but the package index.
#
# Environment knobs:
#   PYTHON         interpreter used to create the venv (default: python3)
#   TORCH_VERSION  torch release to install first  (default: 2.13.0)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$(dirname "$here")/.venv-peer}"
python="${PYTHON:-python3}"
torch_version="${TORCH_VERSION:-2.13.0}"
req="$here/requirements-peer.txt"

say() { echo "[setup_peer] $*" >&2; }

if [ -x "$venv/bin/python" ] && have="$("$venv/bin/python" -c 'import llmcompressor; print(llmcompressor.__version__)' 2>/dev/null | tail -n1)"; then
    say "$venv already provides llmcompressor $have; nothing to do"
    exit 0
fi

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    say "need Python >= 3.10 (llmcompressor 0.14); got $("$python" --version 2>&1)"
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    say "creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

say "installing torch==$torch_version first"
"${pip[@]}" install "torch==$torch_version"

# Keep the torch we just installed: pin it for the second step.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" - >"$constraints" <<'EOF'
import torch
print("torch==" + torch.__version__.split("+")[0])
EOF

say "installing pinned peer packages from $req"
"${pip[@]}" install -c "$constraints" -r "$req"

"$venv/bin/python" - <<'EOF' >&2
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch, transformers, compressed_tensors, llmcompressor
print(f"[setup_peer] ok: llmcompressor {llmcompressor.__version__}, "
      f"compressed-tensors {compressed_tensors.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
EOF
