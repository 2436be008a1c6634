#!/usr/bin/env bash
# Run HERE (not on the GPU machine), before the device check: fills .device_kit/ (git-ignored), the
# one path the check carries. A GPU machine has no network; its image holds torch, triton,
# transformers and most of kiln's dependencies (the device tool's KINDS.md lists them), so the kit
# brings the rest as wheels for its Python, plus SmolLM2-135M-Instruct's config and tokenizer (the
# weights, 98 MB of GGUF, are over the 64 MiB a call may carry: the check serves dummy weights).
#   bash benchmarks/gpu/prepare_kit.sh [python version, default 3.12: the GPU image's]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON_VERSION=${1:-3.12}
KIT=.device_kit
PY=${PY:-.venv/bin/python}
grep -qx '/.device_kit/' .gitignore
rm -rf "$KIT" && mkdir -p "$KIT/wheels"
# kiln's runtime needs that the image lacks, at the versions kiln is tested with here
# (typing-extensions: pydantic-core needs a newer one than the image may have)
packages=(typing-extensions pydantic pydantic-core annotated-types typing-inspection xgrammar apache-tvm-ffi gguf
          fastapi starlette opentelemetry-api uvicorn jsonschema jsonschema-specifications referencing rpds-py)
pins=()
for name in "${packages[@]}"; do
    pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$KIT/wheels" "${pins[@]}"
"$PY" - "$KIT/smollm2" <<'PY'
import os, sys
from transformers import AutoConfig
from kiln.config import default_model_path
from kiln.tokenizer import get_tokenizer

path = default_model_path()
AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).save_pretrained(sys.argv[1])
get_tokenizer(path).save_pretrained(sys.argv[1])
PY
du -sh "$KIT"
