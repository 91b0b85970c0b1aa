"""Install the solcjs shim where py-solc-x (and so brownie) looks for compilers.

py-solc-x looks for ``solc-v<version>`` in ``$SOLCX_BINARY_PATH`` or ``~/.solcx``. No native
solc can be downloaded here, so the "binary" is a tiny sh wrapper that runs
``scripts/toolchain/solc-shim.js`` (npm solcjs) from this checkout. Re-running is harmless; it
rewrites the wrapper so it points at the checkout that ran it last.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    solc_pkg = ROOT / "node_modules" / "solc" / "package.json"
    if not solc_pkg.exists():
        print("solc shim: node_modules/solc is missing; run `npm ci` first", file=sys.stderr)
        return 1
    version = json.loads(solc_pkg.read_text())["version"]
    shim = ROOT / "scripts" / "toolchain" / "solc-shim.js"
    folder = Path(os.environ.get("SOLCX_BINARY_PATH") or Path.home() / ".solcx")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"solc-v{version}"
    node = subprocess.run(["which", "node"], capture_output=True, text=True, check=True).stdout.strip()
    target.write_text(f'#!/bin/sh\nexec "{node}" "{shim}" "$@"\n')
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    out = subprocess.run([str(target), "--version"], capture_output=True, text=True, check=True).stdout
    if version not in out:
        print(f"solc shim: {target} answered {out!r}, expected version {version}", file=sys.stderr)
        return 1
    print(f"solc shim: {target} -> solcjs {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
