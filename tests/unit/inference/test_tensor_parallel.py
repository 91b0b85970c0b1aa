"""Head (tensor) parallelism (inference/tensor_parallel.py): k members together equal the unsplit model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dlis_market.inference.tensor_parallel import (
    TensorParallelError,
    TensorParallelMember,
    ThreadGroup,
    run_threads,
)

from .reference import hf_generate


def whole(model: LlamaForCausalLM, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    """The unsplit model's greedy tokens and last-position logits (transformers generate)."""
    tokens, logits = hf_generate(model, prompt, new)
    return tokens, torch.stack(logits)


def greedy_split(
    model: LlamaForCausalLM, k: int, prompt: list[int], new: int, secure: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """Prefill then ``new`` greedy steps through a k-member group; the last-position logits of every step."""
    group = ThreadGroup(k)
    members = [
        TensorParallelMember(list(model.model.layers), model.config, k, r, group.member(r), secure_aggregation=secure)
        for r in range(k)
    ]
    ids, logits, tokens = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(new):
            outs = run_threads(members, group, model.model.embed_tokens(ids))
            assert all(torch.equal(o, outs[0]) for o in outs)  # every member ends with the same hidden state
            step = model.lm_head(model.model.norm(outs[0][:, -1]))
            logits.append(step)
            tokens.append(int(step.argmax(-1)))
            ids = torch.tensor([[tokens[-1]]])
    return torch.cat(logits), tokens


@pytest.mark.parametrize(
    ("k", "heads", "kv", "secure"),
    [(2, 8, 4, False), (4, 8, 4, False), (4, 16, 4, False), (4, 8, 4, True), (4, 16, 4, True)],
)
def test_random_llama_split_k_ways_is_exact(k, heads, kv, secure):
    torch.manual_seed(k * 100 + heads)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=heads, num_key_value_heads=kv)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    prompt = [5, 17, 42, 3, 88, 9, 60]
    want, want_logits = whole(model, prompt, 6)
    got_logits, got = greedy_split(model, k, prompt, 6, secure)
    assert got == want
    assert (got_logits - want_logits).abs().max() < 1e-5


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-aggregation"])
def test_smollm2_three_ways_is_exact(smollm2_dir: Path, secure: bool):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads == 3
    prompt = [504, 3458, 282, 4649, 314]  # "The capital of France is"
    want, want_logits = whole(model, prompt, 3)
    got_logits, got = greedy_split(model, 3, prompt, 3, secure)
    assert got == want
    assert (got_logits - want_logits).abs().max() < 1e-5 * max(1.0, float(want_logits.abs().max()))


def test_secure_aggregation_needs_three_members():
    """With two, each member would learn the other's partial from the sum and its own."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with pytest.raises(TensorParallelError, match="needs 3 to 8 members, got 2"):
        TensorParallelMember(list(model.model.layers), cfg, 2, 0, lambda t: t, secure_aggregation=True)


def test_splits_that_do_not_divide_are_refused():
    cfg = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=3)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with pytest.raises(TensorParallelError, match=r"choose k from \[1, 3\]"):
        TensorParallelMember(list(model.model.layers), cfg, 2, 0, lambda t: t)
    with pytest.raises(TensorParallelError, match="rank 3 is not in a group of 3"):
        TensorParallelMember(list(model.model.layers), cfg, 3, 3, lambda t: t)


def _gloo_member(rank: int, k: int, port: int, model_dir: str, prompt: list[int], out, secure: bool) -> None:
    from dlis_market.inference.tensor_parallel import GlooGroup

    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    group = GlooGroup(rank, k, port, timeout_s=60)
    member = TensorParallelMember(list(model.model.layers), model.config, k, rank, group, secure_aggregation=secure)
    with torch.no_grad():
        hidden = member.forward(model.model.embed_tokens(torch.tensor([prompt])))
    out.put((rank, hidden, member.bytes_reduced))
    group.close()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-aggregation"])
def test_members_in_separate_processes_meet_over_gloo_on_loopback(tmp_path: Path, secure: bool):
    import torch.multiprocessing as mp

    from dlis_market.chain.anvil import free_port

    torch.manual_seed(7)
    k = 3 if secure else 2  # masked sums need 3 members
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=3 if secure else 2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    prompt = [3, 14, 15, 9, 2]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gloo_member, args=(r, k, port, str(tmp_path), prompt, q, secure)) for r in range(k)]
    for p in procs:
        p.start()
    got = dict((r, (h, b)) for r, h, b in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    with torch.no_grad():
        want = model.model(torch.tensor([prompt])).last_hidden_state
        got_final = model.model.norm(got[0][0])
    assert all(torch.equal(got[0][0], got[r][0]) for r in range(k))
    assert (got_final - want).abs().max() < 1e-5
    # two all-reduces per layer, each of the partial sums [1, tokens, hidden] in fp32 (masked: int64)
    assert got[0][1] == 2 * cfg.num_hidden_layers * len(prompt) * cfg.hidden_size * (8 if secure else 4)


def test_a_multi_token_call_after_the_first_sees_the_cache_causally():
    """Chunked prefill / a second turn: 4 tokens, then 3 at once, then 1, equal the unsplit model."""
    torch.manual_seed(11)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[3, 14, 15, 9, 2, 6, 5, 35]])
    group = ThreadGroup(2)
    members = [TensorParallelMember(list(model.model.layers), cfg, 2, r, group.member(r)) for r in range(2)]
    with torch.no_grad():
        want = model.model(ids).last_hidden_state
        emb = model.model.embed_tokens(ids)
        got = torch.cat([run_threads(members, group, emb[:, a:b])[0] for a, b in ((0, 4), (4, 7), (7, 8))], dim=1)
    assert (model.model.norm(got) - want).abs().max() < 1e-5


def test_secure_aggregation_shows_members_only_masked_numbers_and_the_sum():
    """What each member hands to the group is uniform mod 2^60 whatever its partial sum; the masks
    cancel only in the sum of all members, and a new group draws new ones."""
    torch.manual_seed(13)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    emb = model.model.embed_tokens(torch.tensor([[3, 14, 15, 9, 2, 6]])).detach()
    k = 4

    def session() -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], torch.Tensor]:
        group = ThreadGroup(k)
        handed: list[list[torch.Tensor]] = [[] for _ in range(k)]  # what each member sent, per all-reduce
        partials: list[list[torch.Tensor]] = [[] for _ in range(k)]  # what it would have sent in the clear
        members = []
        for r in range(k):
            inner = group.member(r)

            def recording(t: torch.Tensor, r: int = r, inner=inner) -> torch.Tensor:
                handed[r].append(t.clone())
                return inner(t)

            member = TensorParallelMember(list(model.model.layers), cfg, k, r, recording, secure_aggregation=True)
            secure = member.all_reduce

            def plain(t: torch.Tensor, r: int = r, secure=secure) -> torch.Tensor:
                partials[r].append(t.clone())
                return secure(t)

            member.all_reduce = plain
            members.append(member)
        out = run_threads(members, group, emb)[0]
        return handed, partials, out

    handed, partials, out = session()
    modulus = 1 << 60
    for r in range(k):
        sent = handed[r][1:]  # [0] is the public-key exchange
        assert len(sent) == len(partials[r]) == 2 * cfg.num_hidden_layers
        for masked, partial in zip(sent, partials[r], strict=True):
            assert masked.dtype == torch.int64 and int(masked.min()) >= 0 and int(masked.max()) < modulus
            clear = torch.remainder(torch.round(partial.double() * 2.0**24).to(torch.int64), modulus)
            assert (masked != clear).float().mean() > 0.99  # nothing of the partial shows through
            assert abs(float((masked >> 59).float().mean()) - 0.5) < 0.1  # top bit a fair coin, not a small value
    # each all-reduce draws new masks: a member's two contributions differ by other than its partials do
    step = torch.remainder(handed[0][2] - handed[0][1], modulus)
    clear_step = torch.remainder(
        torch.round(partials[0][1].double() * 2.0**24).to(torch.int64)
        - torch.round(partials[0][0].double() * 2.0**24).to(torch.int64),
        modulus,
    )
    assert (step != clear_step).float().mean() > 0.99
    # all four contributions sum to the four partials; any three sum to noise
    first = [handed[r][1] for r in range(k)]
    clear_sum = sum(p[0].double() for p in partials)
    total = torch.remainder(sum(first), modulus)
    total = torch.where(total >= modulus // 2, total - modulus, total).double() / 2.0**24
    assert (total - clear_sum).abs().max() < 1e-6
    three = torch.remainder(sum(first[:3]), modulus)
    three = torch.where(three >= modulus // 2, three - modulus, three).double() / 2.0**24
    assert (three - sum(p[0].double() for p in partials[:3])).abs().median() > 1e6
    # a second group on the same input: new keys, new masks, the same output
    again, _, out_again = session()
    assert not torch.equal(again[0][1], handed[0][1])
    assert (out_again - out).abs().max() < 1e-5
