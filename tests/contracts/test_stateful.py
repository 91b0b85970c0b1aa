"""Stateful property tests (hypothesis via brownie's state machine) over the whole market.

Random sequences of staking, unstaking, withdrawals, slashes, deposits, escrow withdrawals (not
ready, ready, expired), settlement batches (valid, forged, replayed, over budget, under-escrowed,
with unroutable nodes whose receipts are forfeited), claims and time jumps. A Python model
predicts every outcome (success, or the exact custom error); after every step the invariants check:

* token conservation: balanceOf(staking) == totalStaked + claimables, balanceOf(market) ==
  totalEscrow + totalClaimable, and the supply held by all holders stays the initial supply;
* the chain state equals the model (escrow, claimables, stakes, unbonding, used nonces);
* no settlement without valid client and node signatures, no double settlement (the model only
  credits a job when its signatures are genuine and its nonce unused, and the chain must agree);
* a slash never takes more than the operator's stake; unbonded stake never leaves early;
* a forfeited receipt is neither paid to its operator nor charged to the client.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

from brownie import chain
from brownie.exceptions import VirtualMachineError
from brownie.test import strategy
from conftest import (
    FEE_BPS,
    INITIAL_SUPPLY,
    MIN_STAKE,
    MODEL_LAYERS,
    NODES,
    OTHER_MODEL_ID,
    OTHER_MODEL_LAYERS,
    REPORTER_SHARE_BPS,
    UNBONDING,
    UNIT,
    WITHDRAW_DELAY,
    WITHDRAW_WINDOW,
    chain_id,
    error_args,
    error_name,
    make_job,
    read_many,
)
from eth_utils import keccak
from hypothesis import strategies as st

from dlis_market.chain.typed_data import Domain, sign_typed

FORGERIES = ("none",) * 4 + ("client_key", "broker", "receipt_amount", "receipt_domain")
START_STAKE = 1_000 * UNIT  # per operator, on top of the live fixture's stake
NODE_OPERATOR = {0: "op1", 1: "op2", 2: "op2"}
NONCES = 16  # nonces 0..14 are drawn (the 2nd job of a batch uses nonce + 1); all 16 are checked
OUTCOMES: dict[str, int] = {}  # "Contract.function outcome" -> count, printed with DLIS_SM_DEBUG=1 -s


@dataclass
class Model:
    active: dict[str, int] = field(default_factory=dict)
    unbonding: dict[str, tuple[int, int]] = field(default_factory=dict)  # amount, releaseTime
    staking_claimable: dict[str, int] = field(default_factory=dict)
    escrow: dict[str, int] = field(default_factory=dict)
    pending: dict[str, tuple[int, int]] = field(default_factory=dict)  # amount, readyAt
    market_claimable: dict[str, int] = field(default_factory=dict)
    used: set = field(default_factory=set)  # (client name, nonce)

    def routable(self, node: int) -> bool:
        return self.active[NODE_OPERATOR[node]] >= MIN_STAKE


class MarketMachine:
    st_op = st.sampled_from(["op1", "op2"])
    st_client = st.sampled_from(["client1", "client2"])
    st_stake = strategy("uint256", min_value=1, max_value=300 * UNIT)
    # mostly small amounts (operators stay routable), sometimes enough to drop below the minimum
    st_unstake = st.one_of(st.integers(1, 100 * UNIT), st.integers(1, 1_500 * UNIT))
    st_slash = st.one_of(st.integers(1, 100 * UNIT), st.integers(1, 1_500 * UNIT))
    st_deposit = strategy("uint256", min_value=1, max_value=200 * UNIT)
    st_withdrawal = strategy("uint256", min_value=1, max_value=2_500 * UNIT)
    st_late = st.booleans()
    st_sleep = st.sampled_from([1, WITHDRAW_DELAY // 2, WITHDRAW_DELAY + 1, UNBONDING // 2, UNBONDING + 1])
    st_nonce = st.integers(min_value=0, max_value=NONCES - 2)
    st_amount = st.one_of(st.integers(0, 50 * UNIT), st.integers(0, 600 * UNIT))
    st_shape = st.sampled_from(["two_stage", "three_stage", "other_model"])
    st_forgery = st.sampled_from(FORGERIES)
    st_budget = st.sampled_from(["exact", "short", "ample"])
    st_jobs = st.integers(min_value=1, max_value=2)
    st_claimer = st.sampled_from(["op1", "op2", "treasury"])
    st_staking_claimer = st.sampled_from(["reporter", "treasury"])

    def __init__(cls, live, roles):
        cls.d = live
        cls.roles = roles
        for op in ("op1", "op2"):
            live.token.approve(live.staking, START_STAKE, {"from": roles[op]})
            live.staking.stake(START_STAKE, {"from": roles[op]})
        cls.holders = list(roles.values())
        cls.initial_model = None

    def setup(self):
        # every example starts from the same snapshot, so the starting model is read once
        cls = type(self)
        if getattr(cls, "initial_model", None) is None:
            s, m, r = self.d.staking, self.d.market, self.roles
            a1, a2, e1, e2 = read_many(
                [(s, "activeStake", (r[o].address,)) for o in ("op1", "op2")]
                + [(m, "escrowOf", (r[c].address,)) for c in ("client1", "client2")]
            )
            cls.initial_model = Model(
                active={"op1": a1, "op2": a2},
                unbonding={o: (0, 0) for o in ("op1", "op2")},
                staking_claimable={a: 0 for a in ("reporter", "treasury")},
                escrow={"client1": e1, "client2": e2},
                pending={c: (0, 0) for c in ("client1", "client2")},
                market_claimable={a: 0 for a in ("op1", "op2", "treasury")},
            )
        self.model = copy.deepcopy(cls.initial_model)
        OUTCOMES["examples"] = OUTCOMES.get("examples", 0) + 1
        self.batches = 0
        self.evidence = 0
        self._cache = None

    # ------------------------------------------------------------------ helpers

    def _attempt(self, fn, *args):
        """(tx, error): the transaction (mined even when it reverts) and its revert, if any."""
        self._cache = None
        try:
            tx = fn(*args)
            OUTCOMES[f"{fn._name} ok"] = OUTCOMES.get(f"{fn._name} ok", 0) + 1
            return tx, None
        except VirtualMachineError as exc:
            assert exc.txid, f"revert without a mined transaction: {exc.revert_msg}"
            key = f"{fn._name} {error_name(exc)}"
            OUTCOMES[key] = OUTCOMES.get(key, 0) + 1
            return chain.get_transaction(exc.txid), exc

    @staticmethod
    def _expect(exc, name, *args):
        assert exc is not None, f"expected {name}, the transaction succeeded"
        assert error_name(exc) == name, f"expected {name}, got {exc.revert_msg!r}"
        if args:
            want = ", ".join(str(a).lower() if isinstance(a, str) else str(a) for a in args)
            got = error_args(exc)
            assert got == want or got.startswith(want + ", "), f"{exc.revert_msg!r} vs {want!r}"

    @staticmethod
    def _ok(exc):
        assert exc is None, f"unexpected revert {exc.revert_msg!r}"

    # ------------------------------------------------------------------ staking

    def rule_stake(self, op="st_op", amount="st_stake"):
        a = self.roles[op]
        self.d.token.approve(self.d.staking, amount, {"from": a})
        _, exc = self._attempt(self.d.staking.stake, amount, {"from": a})
        self._ok(exc)
        self.model.active[op] += amount

    def rule_request_unstake(self, op="st_op", amount="st_unstake"):
        tx, exc = self._attempt(self.d.staking.requestUnstake, amount, {"from": self.roles[op]})
        active = self.model.active[op]
        if amount > active:
            self._expect(exc, "StakingManagerInsufficientStake", amount, active)
            return
        self._ok(exc)
        self.model.active[op] = active - amount
        self.model.unbonding[op] = (self.model.unbonding[op][0] + amount, tx.timestamp + UNBONDING)

    def rule_withdraw_stake(self, op="st_op"):
        amount, release = self.model.unbonding[op]
        tx, exc = self._attempt(self.d.staking.withdraw, {"from": self.roles[op]})
        if amount == 0:
            self._expect(exc, "StakingManagerNothingUnbonding", self.roles[op].address)
        elif tx.timestamp < release:  # unbonding respected
            self._expect(exc, "StakingManagerStillUnbonding", release)
        else:
            self._ok(exc)
            assert tx.events["Withdrawn"][0]["amount"] == amount
            self.model.unbonding[op] = (0, 0)

    def rule_slash(self, op="st_op", amount="st_slash"):
        self.evidence += 1
        ev = keccak(text=f"stateful-evidence-{self.evidence}")
        r = self.roles
        tx, exc = self._attempt(self.d.staking.slash, r[op], amount, ev, r["reporter"], {"from": r["oracle"]})
        active, (unb, release) = self.model.active[op], self.model.unbonding[op]
        total = active + unb
        if total == 0:
            self._expect(exc, "StakingManagerNothingToSlash", r[op].address)
            return
        self._ok(exc)
        slashed = min(amount, total)
        assert tx.return_value == slashed <= total  # never more than the stake
        from_active = min(slashed, active)
        self.model.active[op] = active - from_active
        self.model.unbonding[op] = (unb - (slashed - from_active), release)
        share = slashed * REPORTER_SHARE_BPS // 10_000
        self.model.staking_claimable["reporter"] += share
        self.model.staking_claimable["treasury"] += slashed - share

    def rule_claim_staking(self, who="st_staking_claimer"):
        _, exc = self._attempt(self.d.staking.claim, {"from": self.roles[who]})
        if self.model.staking_claimable[who] == 0:
            self._expect(exc, "StakingManagerNothingToClaim")
        else:
            self._ok(exc)
            self.model.staking_claimable[who] = 0

    # ------------------------------------------------------------------ escrow

    def rule_withdraw_stake_after_unbonding(self, op="st_op"):
        """Wait out the unbonding period, then withdraw (the release-time path of withdraw)."""
        chain.sleep(UNBONDING + 1)
        self.rule_withdraw_stake(op)

    def rule_deposit(self, client="st_client", amount="st_deposit"):
        a = self.roles[client]
        self.d.token.approve(self.d.market, amount, {"from": a})
        _, exc = self._attempt(self.d.market.deposit, amount, {"from": a})
        self._ok(exc)
        self.model.escrow[client] += amount

    def rule_request_withdrawal(self, client="st_client", amount="st_withdrawal"):
        tx, exc = self._attempt(self.d.market.requestWithdrawal, amount, {"from": self.roles[client]})
        self._ok(exc)
        self.model.pending[client] = (amount, tx.timestamp + WITHDRAW_DELAY)

    def rule_withdraw_escrow(self, client="st_client"):
        amount, ready = self.model.pending[client]
        tx, exc = self._attempt(self.d.market.withdraw, {"from": self.roles[client]})
        if amount == 0:
            self._expect(exc, "JobMarketNoPendingWithdrawal")
        elif tx.timestamp < ready:
            self._expect(exc, "JobMarketWithdrawalNotReady", ready)
        elif tx.timestamp > ready + WITHDRAW_WINDOW:
            self._expect(exc, "JobMarketWithdrawalExpired", ready, ready + WITHDRAW_WINDOW)
        else:
            self._ok(exc)
            paid = min(amount, self.model.escrow[client])
            assert tx.events["Withdrawn"][0]["amount"] == paid
            self.model.escrow[client] -= paid
            self.model.pending[client] = (0, 0)

    def rule_withdraw_escrow_after_delay(self, client="st_client"):
        chain.sleep(WITHDRAW_DELAY + 1)
        self.rule_withdraw_escrow(client)

    def rule_request_then_withdraw(self, client="st_client", amount="st_withdrawal", late="st_late"):
        """Request, wait the delay (and, when ``late``, the window too), withdraw: paid or expired."""
        self.rule_request_withdrawal(client, amount)
        chain.sleep(WITHDRAW_DELAY + (WITHDRAW_WINDOW + 1 if late else 1))
        self.rule_withdraw_escrow(client)

    def rule_settle_after_operator_leaves(
        self, op="st_op", client="st_client", nonce="st_nonce", a="st_amount", b="st_amount", shape="st_shape"
    ):
        """An operator unstakes to just below the minimum after its nodes served, then the job is
        settled: its nodes' receipts are forfeited, the others paid."""
        active = self.model.active[op]
        if active >= MIN_STAKE:
            self.rule_request_unstake(op, active - MIN_STAKE + 1)
        self.rule_settle(1, client, nonce, a, b, shape, "none", "ample")

    # ------------------------------------------------------------------ settlement

    def _build(self, client, nonce, a, b, shape, forgery, budget):
        """A signed job and its stages as (node index, amount)."""
        m, r = self.d.market, self.roles
        if shape == "two_stage":
            stages = [(0, 0, 12, a), (1, 12, MODEL_LAYERS, b)]
            kw = {}
        elif shape == "three_stage":
            stages = [(1, 0, 10, a), (2, 10, 20, b), (1, 20, MODEL_LAYERS, a // 3)]
            kw = {}
        else:
            stages = [(2, 0, OTHER_MODEL_LAYERS, a + b)]
            kw = {"model_id": OTHER_MODEL_ID}
        cost = sum(s[3] for s in stages)
        total = cost + cost * FEE_BPS // 10_000
        max_cost = {"exact": total, "short": max(total - 1, 0), "ample": total * 2 + 1}[budget]
        broker = r["stranger"] if forgery == "broker" else r["broker"]
        key = keccak(text="not-the-client") if forgery == "client_key" else None
        job = make_job(
            m,
            r[client],
            broker,
            nonce,
            [(NODES[n], s, e, amt) for n, s, e, amt in stages],
            max_cost=max_cost,
            client_key=key,
            **kw,
        )
        t = list(job.as_tuple())
        if forgery == "receipt_amount":
            receipts = [list(x) for x in t[7]]
            receipts[-1][3] += 1
            t[7] = [tuple(x) for x in receipts]
        elif forgery == "receipt_domain":
            # last receipt signed by its node for another verifying contract
            rc = job.receipts[-1].receipt
            sig = sign_typed(
                NODES[stages[-1][0]].key,
                Domain("DLIS JobMarket", "1", chain_id(), self.d.registry.address),
                "Receipt",
                rc.message(),
            )
            receipts = [list(x) for x in t[7]]
            receipts[-1][5], receipts[-1][6] = sig.r, sig.vs
            t[7] = [tuple(x) for x in receipts]
        return tuple(t), [(n, amt) for n, _, _, amt in stages], cost, total, max_cost

    def _predict(self, model, index, client, nonce, stages, max_cost, forgery):
        """Apply one job to ``model``; return (error name, args) if it must revert. Receipts of
        registered nodes that are not routable are forfeited: not paid, not charged."""
        if forgery in ("client_key", "broker"):
            return "JobMarketInvalidClientSignature", (index, self.roles[client].address)
        if (client, nonce) in model.used:
            return "JobMarketJobAlreadySettled", (index, self.roles[client].address, nonce)
        for j in range(len(stages)):
            forged_here = forgery in ("receipt_amount", "receipt_domain") and j == len(stages) - 1
            if forged_here:
                return "JobMarketNodeNotRoutable", (index, j)
        paid = [(n, amt) for n, amt in stages if model.routable(n)]
        if len(paid) < len(stages):
            OUTCOMES["receipts forfeited (predicted)"] = OUTCOMES.get("receipts forfeited (predicted)", 0) + 1
        cost = sum(amt for _, amt in paid)
        total = cost + cost * FEE_BPS // 10_000
        if total > max_cost:
            return "JobMarketCostExceedsAuthorization", (index, total, max_cost)
        if model.escrow[client] < total:
            return "JobMarketInsufficientEscrow", (index, self.roles[client].address, total, model.escrow[client])
        model.used.add((client, nonce))
        model.escrow[client] -= total
        for n, amt in paid:
            model.market_claimable[NODE_OPERATOR[n]] += amt
        model.market_claimable["treasury"] += total - cost
        return None

    def rule_settle(
        self,
        n_jobs="st_jobs",
        client="st_client",
        nonce="st_nonce",
        a="st_amount",
        b="st_amount",
        shape="st_shape",
        forgery="st_forgery",
        budget="st_budget",
    ):
        # the second job (if any) is a valid job of the other client with the next nonce
        other = "client2" if client == "client1" else "client1"
        specs = [(client, nonce, a, b, shape, forgery, budget), (other, nonce + 1, b, a, "two_stage", "none", "ample")]
        specs = specs[:n_jobs]
        built = [self._build(*s) for s in specs]
        model = copy.deepcopy(self.model)
        expected = None
        for i, ((client_i, nonce_i, *_rest), (_, stages, _cost, _total, max_cost)) in enumerate(
            zip(specs, built, strict=True)
        ):
            expected = self._predict(model, i, client_i, nonce_i, stages, max_cost, specs[i][5])
            if expected:
                break
        self.batches += 1
        bid = keccak(text=f"stateful-batch-{self.batches}")
        tx, exc = self._attempt(self.d.market.settleBatch, bid, [b_[0] for b_ in built], {"from": self.roles["broker"]})
        if expected:
            self._expect(exc, expected[0], *expected[1])
            assert not self.d.market.batchSettled(self.roles["broker"], bid)
        else:
            self._ok(exc)
            assert tx.events["BatchSettled"][0]["jobs"] == n_jobs
            assert self.d.market.batchSettled(self.roles["broker"], bid)
            self.model = model

    def rule_settle_honest(self, client="st_client", nonce="st_nonce", a="st_amount", b="st_amount", shape="st_shape"):
        """Genuine signatures and an ample budget: settles unless the nonce is used, a node is
        unroutable or the escrow is short (a second settlement rule also weights the draw)."""
        self.rule_settle(1, client, nonce, a, b, shape, "none", "ample")

    def rule_replay_settled_job(self, client="st_client", nonce="st_nonce"):
        """Re-submitting any job whose nonce was already used never pays twice."""
        if (client, nonce) not in self.model.used:
            return
        job, *_ = self._build(client, nonce, UNIT, UNIT, "two_stage", "none", "ample")
        self.batches += 1
        _, exc = self._attempt(
            self.d.market.settleBatch, keccak(text=f"replay-{self.batches}"), [job], {"from": self.roles["broker"]}
        )
        self._expect(exc, "JobMarketJobAlreadySettled", 0, self.roles[client].address, nonce)

    def rule_claim_market(self, who="st_claimer"):
        _, exc = self._attempt(self.d.market.claim, {"from": self.roles[who]})
        if self.model.market_claimable[who] == 0:
            self._expect(exc, "JobMarketNothingToClaim")
        else:
            self._ok(exc)
            self.model.market_claimable[who] = 0

    def rule_sleep(self, seconds="st_sleep"):
        chain.sleep(seconds)

    # ------------------------------------------------------------------ invariants

    def _snapshot(self) -> dict:
        """Every value the invariants look at, read in ONE JSON-RPC batch per step (cached until
        the next transaction)."""
        if self._cache is not None:
            return self._cache
        t, s, m, r = self.d.token, self.d.staking, self.d.market, self.roles
        ops, clients = ("op1", "op2"), ("client1", "client2")
        holders = [h.address for h in self.holders]
        holders += [c.address for c in (s, m, self.d.registry, self.d.oracle)]
        keys, calls = [], []

        def add(key, contract, fn, *args):
            keys.append(key)
            calls.append((contract, fn, args))

        add("supply", t, "totalSupply")
        for h in holders:
            add(("balance", h), t, "balanceOf", h)
        add("totalStaked", s, "totalStaked")
        for o in ops:
            add(("active", o), s, "activeStake", r[o].address)
            add(("unbonding", o), s, "unbondingOf", r[o].address)
            add(("stakeOf", o), s, "totalStakeOf", r[o].address)
        for a in ("reporter", "treasury"):
            add(("s_claimable", a), s, "claimableOf", r[a].address)
        add("totalEscrow", m, "totalEscrow")
        add("totalClaimable", m, "totalClaimable")
        for c in clients:
            add(("escrow", c), m, "escrowOf", r[c].address)
            for n in range(NONCES):
                add(("used", c, n), m, "nonceUsed", r[c].address, n)
        for a in ("op1", "op2", "treasury"):
            add(("m_claimable", a), m, "claimableOf", r[a].address)
        self._cache = dict(zip(keys, read_many(calls), strict=True))
        return self._cache

    def invariant_staking_conservation(self):
        v, s = self._snapshot(), self.d.staking
        claimables = v[("s_claimable", "reporter")] + v[("s_claimable", "treasury")]
        assert v[("balance", s.address)] == v["totalStaked"] + claimables
        assert v["totalStaked"] == v[("stakeOf", "op1")] + v[("stakeOf", "op2")]

    def invariant_market_conservation(self):
        v, m = self._snapshot(), self.d.market
        assert v[("balance", m.address)] == v["totalEscrow"] + v["totalClaimable"]
        assert v["totalEscrow"] == v[("escrow", "client1")] + v[("escrow", "client2")]
        assert v["totalClaimable"] == sum(v[("m_claimable", a)] for a in ("op1", "op2", "treasury"))

    def invariant_supply_constant(self):
        OUTCOMES["invariant checks"] = OUTCOMES.get("invariant checks", 0) + 1
        v = self._snapshot()
        held = sum(value for key, value in v.items() if isinstance(key, tuple) and key[0] == "balance")
        assert held == v["supply"] == INITIAL_SUPPLY

    def invariant_chain_matches_model(self):
        v, md = self._snapshot(), self.model
        for o in ("op1", "op2"):
            assert v[("active", o)] == md.active[o]
            amount, release = v[("unbonding", o)]
            assert amount == md.unbonding[o][0]
            if amount:
                assert release == md.unbonding[o][1]
        for a, want in md.staking_claimable.items():
            assert v[("s_claimable", a)] == want
        for c, want in md.escrow.items():
            assert v[("escrow", c)] == want
        for a, want in md.market_claimable.items():
            assert v[("m_claimable", a)] == want
        for c in ("client1", "client2"):
            for n in range(NONCES):
                assert v[("used", c, n)] == ((c, n) in md.used), (c, n)


def test_market_state_machine(live, roles, state_machine):
    state_machine(
        MarketMachine,
        live,
        roles,
        settings={
            "max_examples": int(os.environ.get("DLIS_SM_EXAMPLES", 40)),
            "stateful_step_count": 20,
            "deadline": None,
        },
    )
    if os.environ.get("DLIS_SM_DEBUG"):
        for key in sorted(OUTCOMES):
            print(f"{OUTCOMES[key]:5d}  {key}")
