"""Hardware and model profile of a worker: GEMM FLOP/s, free memory, memory bandwidth, layer latency.

Measured once and cached as JSON next to the node identity (keyed by model, range, dtype and
threads); ``--reprofile`` measures again. The per-layer latency is a real decode step of the
stage the worker serves, on a throwaway session, divided by its number of layers; the
announced throughput is derived from it.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError

from dlis_market.inference.messages import StageInput
from dlis_market.types import WireModel

if TYPE_CHECKING:
    from dlis_market.inference.stage import Stage  # only its callers load one: a broker reads profiles without it

log = logging.getLogger(__name__)

PROFILE_SESSION = "__dlis-profile__"


class HardwareProfile(WireModel):
    gemm_flops: float  # fp32 matmul, FLOP/s
    memory_bandwidth: float  # bytes/s, large tensor copy (read + write)
    free_memory: int  # bytes available to new allocations
    layer_latency_s: float  # one decode token through one layer of the served model
    threads: int
    device: str
    measured_at: float

    def throughput(self, layers: int) -> float:
        """Tokens/s one session can get through ``layers`` layers."""
        return 1.0 / max(self.layer_latency_s * layers, 1e-9)


def free_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux: fall back to the free page count below
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def gemm_flops(n: int = 512, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / max(min(times), 1e-9)


def memory_bandwidth(mbytes: int = 64, repeats: int = 3) -> float:
    src = torch.empty(mbytes * (1 << 20) // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / max(min(times), 1e-9)


def layer_latency(stage: Stage, prompt: int = 8, steps: int = 6) -> float:
    """Median decode time of one token through ``stage`` divided by its layer count."""
    hidden = int(stage.config.hidden_size)

    def make(pos: int, n: int) -> StageInput:
        if stage.is_first:
            return StageInput((PROFILE_SESSION,), (pos,), 0, token_ids=torch.ones(1, n, dtype=torch.long))
        return StageInput((PROFILE_SESSION,), (pos,), 0, hidden=torch.zeros(1, n, hidden, dtype=stage.dtype))

    stage.open_session(PROFILE_SESSION, prompt + steps + 1)
    try:
        stage.forward(make(0, prompt))
        times = []
        for i in range(steps):
            t = time.perf_counter()
            stage.forward(make(prompt + i, 1))
            times.append(time.perf_counter() - t)
    finally:
        stage.close_session(PROFILE_SESSION)
    return statistics.median(times) / stage.layers.size


def measure(stage: Stage) -> HardwareProfile:
    return HardwareProfile(
        gemm_flops=gemm_flops(),
        memory_bandwidth=memory_bandwidth(),
        free_memory=free_memory(),
        layer_latency_s=layer_latency(stage),
        threads=torch.get_num_threads(),
        device="cpu",
        measured_at=time.time(),
    )


def cached_profile(cache_dir: Path, stage: Stage, rerun: bool = False) -> HardwareProfile:
    """The cached profile for this model/range/dtype/threads, measured when absent or ``rerun``."""
    m = stage.manifest
    name = f"profile-{m.model_name}-{stage.layers.start}-{stage.layers.end}-{m.dtype}-t{torch.get_num_threads()}.json"
    path = cache_dir / name.replace("/", "_")
    if path.is_file() and not rerun:
        try:
            return HardwareProfile.model_validate(json.loads(path.read_text()))
        except (ValidationError, ValueError) as exc:
            log.info("re-measuring: cached profile %s is unreadable (%s)", path, exc)
    profile = measure(stage)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json(indent=2))
    return profile
