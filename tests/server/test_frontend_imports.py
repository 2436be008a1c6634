"""The server's frontend process starts the engine core process before it loads torch: importing
the API server must not pull in torch or the engine core (their ~5 s of imports would delay the
core process's start by as much, since the core imports the same again)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_api_server_import_leaves_torch_and_the_engine_core_out():
    probe = (
        "import json, sys; import kiln.entrypoints.openai.api_server; "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'xgrammar', 'kiln.engine.core', "
        "'kiln.worker.model_runner') if m in sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
