"""The batched stage model (sim/passes.py): what a real worker and a shared machine do to concurrent
jobs, which the per-session chunked model missed (bench/sim_calibration.py, issue #19 item 3)."""

from __future__ import annotations

from typing import Any

import pytest
import simpy

from dlis_market.settings import Settings
from dlis_market.sim.engine import SimResult, simulate
from dlis_market.sim.errors import ScenarioError
from dlis_market.sim.passes import HostCpu
from dlis_market.sim.scenario import Market, parse_scenario

FREE_LINK = {"link_latency_ms": 0.0, "bandwidth_bytes_per_s": 1e15, "hazard_per_slot": 0}


def _scenario(users: int, peers: int = 1, new: int = 9, **extra: Any) -> dict[str, Any]:
    """``peers`` replicas serving all 30 layers at 1 ms/layer (a prefill of 10 tokens: 30 ms, a
    decode step 30 ms); ``users`` closed-loop users, one job each of ``new`` tokens."""
    profile = {"compute_ms_per_layer": 1.0, **FREE_LINK}
    return {
        "peers": [{"device": "laptop", "layers": "0:30", "profile": profile} for _ in range(peers)],
        "clients": [{"concurrency": users, "jobs": users, "prompt_tokens": 10, "max_new_tokens": new}],
        "prefill_ratio": 0.1,
        "stage_model": "batched",
        **extra,
    }


def _run(data: dict[str, Any]) -> SimResult:
    sc = parse_scenario(data)
    return simulate(sc, Market.of(sc.market, Settings.load(environ={})), seed=0)


def _decode_ms(r: SimResult) -> list[float]:
    return sorted(1000 * (j.finished - j.first_token) for j in r.jobs)


def test_concurrent_sessions_share_one_decode_pass_per_step() -> None:
    # the worker merges queued steps into one forward pass: 4 sessions' 8 decode steps are 8 passes
    # costing the measured curve's 1.18 of one, not 4 x 8 passes each slowed by the session count
    alone = _decode_ms(_run(_scenario(1)))[0]
    assert alone == pytest.approx(8 * 30.0)
    four = _run(_scenario(4, batch_decode_cost={1: 1.0, 4: 1.18}))
    assert _decode_ms(four) == pytest.approx([8 * 30.0 * 1.18] * 4)
    busy = (30 * 2.52 + 8 * 30 * 1.18) / 1000  # one prefill of 4 prompts (the default curve), 8 decodes
    assert four.extra["passes"][0] == pytest.approx(
        {"decode_passes": 8, "decode_steps": 32, "prefill_passes": 1, "prefill_steps": 4, "busy_s": busy,
         "decode_busy_s": 8 * 30 * 1.18 / 1000}
    )  # fmt: skip
    chunked = _run({**_scenario(4), "stage_model": "chunked"})  # the old model: each session slowed down
    assert min(_decode_ms(chunked)) > 1.5 * alone


def test_simultaneous_starts_open_one_at_a_time_at_the_broker() -> None:
    # four jobs admitted at once: the broker opens their sessions one after another, so their first
    # tokens come 50 ms apart (each 30 ms prefill is done before the next job's sessions are open)
    data = _scenario(4, new=1, overheads={"open_ms": 50.0})
    ttft = sorted(1000 * (j.first_token - j.started) for j in _run(data).jobs)
    assert ttft == pytest.approx([80.0, 130.0, 180.0, 230.0])
    old = _run({**data, "stage_model": "chunked"})  # every job opened at once: none waits 130 ms
    assert max(1000 * (j.first_token - j.started) for j in old.jobs) < 130.0


def test_message_delays_split_sessions_a_pass_answered_together() -> None:
    # measured messages are not all equally fast: a session whose step comes more than the worker's
    # batch_wait_ms after the other's misses the pass, and the two run apart from then on
    def per_pass(jitter: list[float]) -> float:
        log = _run(_scenario(2, new=30, message_jitter_ms=jitter, batch_wait_ms=4.0)).extra["passes"][0]
        return log["decode_steps"] / log["decode_passes"]

    assert per_pass([]) == pytest.approx(2.0)
    assert per_pass([0.0, 1.0]) == pytest.approx(2.0)  # within the wait: still one pass
    assert per_pass([0.0, 10.0]) < 1.3  # half the messages 10 ms late: most passes run one session
    with pytest.raises(ScenarioError, match="message_jitter_ms"):
        parse_scenario(_scenario(1, message_jitter_ms=[-1.0]))


def test_peers_on_one_host_share_its_cores() -> None:
    # two replicas, one job each: on separate machines each runs at full speed; on one single-core
    # host their passes share the core and take twice as long
    apart = _run(_scenario(2, peers=2))
    assert {j.route for j in apart.jobs} == {(0,), (1,)}
    shared = _scenario(2, peers=2, hosts={"box": {"cores": 1}})
    for g in shared["peers"]:
        g["host"] = "box"
    together = _run(shared)
    assert _decode_ms(together) == pytest.approx([2 * d for d in _decode_ms(apart)])


def test_host_shares_cores_with_its_background_and_running_passes() -> None:
    env = simpy.Environment()
    host = HostCpu(env, cores=2, background=1.0)
    done: dict[str, float] = {}

    def work(name: str, ms: float, threads: int, at: float) -> Any:
        yield env.timeout(at)
        yield host.run(ms, threads)
        done[name] = 1000 * env.now

    env.process(work("a", 30.0, 1, 0.0))  # alone with the background: 2 cores for 2 threads, full speed
    env.process(work("b", 20.0, 2, 0.010))  # from 10 ms: 4 threads on 2 cores, both at half speed
    env.run()
    # a: 10 ms at full speed, then 20 ms of work at half speed until b's 20 ms... b: 20 ms at half
    # speed = 40 ms, so a ends at 10 + 40 = 50 ms together with b
    assert done == pytest.approx({"a": 50.0, "b": 50.0})


def test_a_host_of_a_group_share_slows_even_a_lone_pass() -> None:
    # with autogroup the demo's session gets its share of the cores (bench/sim_calibration.py
    # RunQueue), less than one core under other sessions' load: the host is that share
    env = simpy.Environment()
    host = HostCpu(env, cores=0.65, background=0.0)
    done: list[float] = []

    def work(ms: float) -> Any:
        yield host.run(ms, 1)
        done.append(1000 * env.now)

    env.process(work(26.0))
    env.run()
    assert done == pytest.approx([40.0])


def test_a_batch_cost_curve_must_start_at_one_session_costing_one() -> None:
    with pytest.raises(Exception, match="batch cost curve"):
        parse_scenario(_scenario(1, batch_decode_cost={1: 1.2, 4: 1.5}))
    with pytest.raises(Exception, match="not in hosts"):
        data = _scenario(1)
        data["peers"][0]["host"] = "nowhere"
        parse_scenario(data)


def test_a_spot_check_reruns_the_call_on_the_replica() -> None:
    # node/replay.py: after job 1 the replica runs its session again, the prefill then each decode
    # step, while job 2 runs (the run ends with job 2, before its own check)
    data = _scenario(1, peers=2, market={"check_fraction": 1.0}, offers_track_load=False)
    data["clients"][0]["jobs"] = 2
    fast = {"compute_ms_per_layer": 0.5, "advertised_ms_per_layer": 2.0}  # routed around, twice as fast
    data["peers"][1]["profile"] = {**data["peers"][1]["profile"], **fast}
    r = _run(data)
    assert [j.route for j in r.jobs] == [(0,), (0,)]
    checked = r.extra["passes"][1]
    assert checked == pytest.approx({"decode_passes": 8, "decode_steps": 8, "prefill_passes": 1, "prefill_steps": 1,
                                     "busy_s": 0.135, "decode_busy_s": 0.12})  # fmt: skip
    assert _run({**data, "stage_model": "chunked"}).extra == {}  # the chunked model books checks only


def test_a_pass_sends_its_rows_on_in_one_message() -> None:
    # node/server.py _deliver: a stage sends a pass's rows to the next stage in one message, and a
    # later stage waits at most RELAY_WAIT_S (4 ms) for rows. The driver's messages to the first
    # stage are drawn apart (0 or 10 ms late) but the first stage waits 20 ms, so it merges both
    # sessions; the second stage gets them together and merges them too, although a message 10 ms
    # late would be past its wait
    data = _scenario(2, peers=2, new=30, message_jitter_ms=[0.0, 10.0], batch_wait_ms=20.0)
    data["peers"][0]["layers"], data["peers"][1]["layers"] = "0:15", "15:30"
    first, second = _run(data).extra["passes"]
    assert first["decode_steps"] / first["decode_passes"] == pytest.approx(2.0)
    assert second["decode_steps"] / second["decode_passes"] == pytest.approx(2.0)
