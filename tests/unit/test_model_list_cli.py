"""`dlis model list` answers without importing torch or transformers (it used to take ~7 s), in JSON too."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys
from typer.testing import CliRunner
from dlis_market.cli.main import app
res = CliRunner().invoke(app, ["model", "list", "--json"], env={"DLIS_HOME": sys.argv[1]})
assert res.exit_code == 0, res.output
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(json.dumps({"rows": json.loads(res.stdout), "heavy": heavy}))
"""


def test_model_list_is_light_and_speaks_json(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["heavy"] == []
    assert {
        "name": "tiny",
        "status": "available",
        "model_type": "llama",
        "path": str(tmp_path / "models" / "tiny"),
    } in answer["rows"]
    assert any(r["status"] == "known" for r in answer["rows"])  # importable models are listed too
