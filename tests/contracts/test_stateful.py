"""Stateful property tests (hypothesis via brownie's state machine) over the whole market.

Random sequences of staking, unstaking, withdrawals, slashes, deposits, escrow withdrawals (not
ready, ready, expired), settlement batches (valid, forged, replayed, over budget, under-escrowed,
with unroutable nodes whose receipts are forfeited, with a layer range shared by two nodes), the
same batches through settleBatchMerkle (one batch receipt per node; forged totals, roots and node
keys), single jobs through settleJob, claims and time jumps. Two brokers settle
(roles["broker"] and roles["stranger"], both with BROKER_ROLE) and each client holds a part of its
escrow for each, so deposits, withdrawal requests and charges are fuzzed per (client, broker). A
Python model predicts every outcome (success, or the exact custom error); after every step the
invariants check:

* token conservation: balanceOf(staking) == totalStaked + claimables, balanceOf(market) ==
  totalEscrow + totalClaimable, totalEscrow == the sum of all (client, broker) parts, and the
  supply held by all holders stays the initial supply;
* the chain state equals the model (escrow parts, pending withdrawals, claimables, stakes,
  unbonding, used nonces);
* a broker never draws from another broker's part (checked around every settlement, apart from
  the model);
* no settlement without valid client and node signatures, no double settlement (the model only
  credits a job when its signatures are genuine and its nonce unused, and the chain must agree);
* a slash never takes more than the operator's stake; unbonded stake never leaves early;
* a forfeited receipt is neither paid to its operator nor charged to the client.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace

from brownie import chain
from brownie.exceptions import VirtualMachineError
from brownie.test import strategy
from conftest import (
    FEE_BPS,
    INITIAL_SUPPLY,
    MIN_STAKE,
    MODEL_LAYERS,
    NODE_KEYS,
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
    merkle_jobs,
    read_many,
    resign,
    sign_batch,
    solo,
)
from eth_utils import keccak
from hypothesis import strategies as st

from dlis_market.chain.job_market import merkle_batch_args
from dlis_market.chain.typed_data import Domain, sign_typed

FORGERIES = ("none",) * 4 + ("client_key", "broker", "receipt_amount", "receipt_domain")
MERKLE_FORGERIES = ("none",) * 4 + ("client_key", "broker", "node_total", "node_root", "node_key")
START_STAKE = 1_000 * UNIT  # per operator, on top of the live fixture's stake
BROKERS = ("broker", "stranger")  # role names of the two settling brokers
CLIENTS = ("client1", "client2")
SECOND_BROKER_ESCROW = 150 * UNIT  # each client's part for roles["stranger"] at the start
NODE_OPERATOR = {0: "op1", 1: "op2", 2: "op2"}
NONCES = 16  # nonces 0..14 are drawn (the 2nd job of a batch uses nonce + 1); all 16 are checked
OUTCOMES: dict[str, int] = {}  # "Contract.function outcome" -> count, printed with DLIS_SM_DEBUG=1 -s


@dataclass
class Model:
    active: dict[str, int] = field(default_factory=dict)
    unbonding: dict[str, tuple[int, int]] = field(default_factory=dict)  # amount, releaseTime
    staking_claimable: dict[str, int] = field(default_factory=dict)
    escrow: dict[tuple[str, str], int] = field(default_factory=dict)  # (client, broker) -> part
    pending: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # amount, readyAt
    market_claimable: dict[str, int] = field(default_factory=dict)
    used: set = field(default_factory=set)  # (client name, nonce)

    def routable(self, node: int) -> bool:
        return self.active[NODE_OPERATOR[node]] >= MIN_STAKE


class MarketMachine:
    st_op = st.sampled_from(["op1", "op2"])
    st_client = st.sampled_from(CLIENTS)
    st_broker = st.sampled_from(BROKERS)
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
    st_shape = st.sampled_from(["two_stage", "three_stage", "shared", "other_model"])
    st_forgery = st.sampled_from(FORGERIES)
    st_merkle_forgery = st.sampled_from(MERKLE_FORGERIES)
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
        live.market.grantRole(live.market.BROKER_ROLE(), roles["stranger"], {"from": roles["deployer"]})
        for c in CLIENTS:
            live.token.approve(live.market, SECOND_BROKER_ESCROW, {"from": roles[c]})
            live.market.deposit(roles["stranger"], SECOND_BROKER_ESCROW, {"from": roles[c]})
        cls.holders = list(roles.values())
        cls.initial_model = None

    def setup(self):
        # every example starts from the same snapshot, so the starting model is read once
        cls = type(self)
        if getattr(cls, "initial_model", None) is None:
            s, m, r = self.d.staking, self.d.market, self.roles
            parts = [(c, b) for c in CLIENTS for b in BROKERS]
            a1, a2, *escrow = read_many(
                [(s, "activeStake", (r[o].address,)) for o in ("op1", "op2")]
                + [(m, "escrowOf", (r[c].address, r[b].address)) for c, b in parts]
            )
            cls.initial_model = Model(
                active={"op1": a1, "op2": a2},
                unbonding={o: (0, 0) for o in ("op1", "op2")},
                staking_claimable={a: 0 for a in ("reporter", "treasury")},
                escrow=dict(zip(parts, escrow, strict=True)),
                pending={part: (0, 0) for part in parts},
                market_claimable={a: 0 for a in ("op1", "op2", "treasury")},
            )
            assert all(escrow), f"every (client, broker) part starts funded: {cls.initial_model.escrow}"
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

    def rule_deposit(self, client="st_client", broker="st_broker", amount="st_deposit"):
        a = self.roles[client]
        self.d.token.approve(self.d.market, amount, {"from": a})
        tx, exc = self._attempt(self.d.market.deposit, self.roles[broker], amount, {"from": a})
        self._ok(exc)
        self.model.escrow[client, broker] += amount
        ev = tx.events["Deposited"][0]
        assert (ev["broker"], ev["escrow"]) == (self.roles[broker], self.model.escrow[client, broker])

    def rule_request_withdrawal(self, client="st_client", broker="st_broker", amount="st_withdrawal"):
        args = (self.roles[broker], amount, {"from": self.roles[client]})
        tx, exc = self._attempt(self.d.market.requestWithdrawal, *args)
        self._ok(exc)
        self.model.pending[client, broker] = (amount, tx.timestamp + WITHDRAW_DELAY)

    def rule_withdraw_escrow(self, client="st_client", broker="st_broker"):
        amount, ready = self.model.pending[client, broker]
        tx, exc = self._attempt(self.d.market.withdraw, self.roles[broker], {"from": self.roles[client]})
        if amount == 0:
            self._expect(exc, "JobMarketNoPendingWithdrawal", self.roles[client].address, self.roles[broker].address)
        elif tx.timestamp < ready:
            self._expect(exc, "JobMarketWithdrawalNotReady", ready)
        elif tx.timestamp > ready + WITHDRAW_WINDOW:
            self._expect(exc, "JobMarketWithdrawalExpired", ready, ready + WITHDRAW_WINDOW)
        else:
            self._ok(exc)
            paid = min(amount, self.model.escrow[client, broker])  # never more than this broker's part
            assert dict(tx.events["Withdrawn"][0]) == {
                "client": self.roles[client],
                "broker": self.roles[broker],
                "amount": paid,
            }
            self.model.escrow[client, broker] -= paid
            self.model.pending[client, broker] = (0, 0)

    def rule_withdraw_escrow_after_delay(self, client="st_client", broker="st_broker"):
        chain.sleep(WITHDRAW_DELAY + 1)
        self.rule_withdraw_escrow(client, broker)

    def rule_request_then_withdraw(
        self, client="st_client", broker="st_broker", amount="st_withdrawal", late="st_late"
    ):
        """Request, wait the delay (and, when ``late``, the window too), withdraw: paid or expired."""
        self.rule_request_withdrawal(client, broker, amount)
        chain.sleep(WITHDRAW_DELAY + (WITHDRAW_WINDOW + 1 if late else 1))
        self.rule_withdraw_escrow(client, broker)

    def rule_request_then_withdraw_other_part(self, client="st_client", broker="st_broker", amount="st_withdrawal"):
        """A ready request for one broker's part, then a withdrawal from the other broker's part:
        only what the other part's own request allows (usually none)."""
        self.rule_request_withdrawal(client, broker, amount)
        chain.sleep(WITHDRAW_DELAY + 1)
        self.rule_withdraw_escrow(client, _other_broker(broker))

    def rule_settle_after_operator_leaves(
        self,
        op="st_op",
        client="st_client",
        broker="st_broker",
        nonce="st_nonce",
        a="st_amount",
        b="st_amount",
        shape="st_shape",
    ):
        """An operator unstakes to just below the minimum after its nodes served, then the job is
        settled: its nodes' receipts are forfeited, the others paid."""
        active = self.model.active[op]
        if active >= MIN_STAKE:
            self.rule_request_unstake(op, active - MIN_STAKE + 1)
        self.rule_settle(1, client, broker, nonce, a, b, shape, "none", "ample")

    # ------------------------------------------------------------------ settlement

    def _build(self, client, broker, nonce, a, b, shape, forgery, budget):
        """A signed job for settlement by ``broker`` and its stages as (node index, amount); the
        "broker" forgery authorizes the other broker instead."""
        m, r = self.d.market, self.roles
        if shape == "two_stage":
            stages = [(0, 0, 12, a), (1, 12, MODEL_LAYERS, b)]
            kw = {}
        elif shape == "three_stage":
            stages = [(1, 0, 10, a), (2, 10, 20, b), (1, 20, MODEL_LAYERS, a // 3)]
            kw = {}
        elif shape == "shared":  # [0, 1) shared by NODES[0] and NODES[1] (ascending addresses)
            stages = [(0, 0, 1, a), (1, 0, 1, b), (2, 1, MODEL_LAYERS, a // 3)]
            kw = {}
        else:  # "other_model" on op2's NODES[2], "other_model_op1" on op1's NODES[0]
            stages = [(0 if shape == "other_model_op1" else 2, 0, OTHER_MODEL_LAYERS, a + b)]
            kw = {"model_id": OTHER_MODEL_ID}
        cost = sum(s[3] for s in stages)
        total = cost + cost * FEE_BPS // 10_000
        max_cost = {"exact": total, "short": max(total - 1, 0), "ample": total * 2 + 1}[budget]
        named = _other_broker(broker) if forgery == "broker" else broker
        key = keccak(text="not-the-client") if forgery == "client_key" else None
        job = make_job(
            m,
            r[client],
            r[named],
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
        return tuple(t), [(n, amt) for n, _, _, amt in stages], cost, total, max_cost, job

    def _predict(self, model, index, client, broker, nonce, stages, max_cost, forgery):
        """Apply one job settled by ``broker`` to ``model``; return (error name, args) if it must
        revert. Receipts of registered nodes that are not routable are forfeited: not paid, not
        charged. Only the (client, broker) part is charged."""
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
        available = model.escrow[client, broker]
        if available < total:
            args = (index, self.roles[client].address, self.roles[broker].address, total, available)
            return "JobMarketInsufficientEscrow", args
        model.used.add((client, nonce))
        model.escrow[client, broker] = available - total
        for n, amt in paid:
            model.market_claimable[NODE_OPERATOR[n]] += amt
        model.market_claimable["treasury"] += total - cost
        return None

    def rule_settle(
        self,
        n_jobs="st_jobs",
        client="st_client",
        broker="st_broker",
        nonce="st_nonce",
        a="st_amount",
        b="st_amount",
        shape="st_shape",
        forgery="st_forgery",
        budget="st_budget",
    ):
        # the second job (if any) is a valid job of the other client with the next nonce
        other = "client2" if client == "client1" else "client1"
        specs = [
            (client, broker, nonce, a, b, shape, forgery, budget),
            (other, broker, nonce + 1, b, a, "two_stage", "none", "ample"),
        ][:n_jobs]
        built = [self._build(*s) for s in specs]
        model = copy.deepcopy(self.model)
        expected = None
        for i, (spec, (_, stages, _cost, _total, max_cost, _job)) in enumerate(zip(specs, built, strict=True)):
            expected = self._predict(model, i, spec[0], broker, spec[2], stages, max_cost, spec[6])
            if expected:
                break
        self.batches += 1
        bid = keccak(text=f"stateful-batch-{self.batches}")
        settler = self.roles[broker]
        others_before = self._parts_of(_other_broker(broker))
        tx, exc = self._attempt(self.d.market.settleBatch, bid, [b_[0] for b_ in built], {"from": settler})
        # whatever the outcome, the other broker's parts are untouched (independent of the model)
        assert self._parts_of(_other_broker(broker)) == others_before
        if expected:
            self._expect(exc, expected[0], *expected[1])
            assert not self.d.market.batchSettled(settler, bid)
        else:
            self._ok(exc)
            ev = tx.events["BatchSettled"][0]
            assert (ev["jobs"], ev["broker"]) == (n_jobs, settler)
            assert self.d.market.batchSettled(settler, bid)
            self.model = model

    def rule_settle_merkle(
        self,
        n_jobs="st_jobs",
        client="st_client",
        broker="st_broker",
        nonce="st_nonce",
        a="st_amount",
        b="st_amount",
        shape="st_shape",
        forgery="st_merkle_forgery",
        budget="st_budget",
    ):
        """The same jobs through settleBatchMerkle (one batch receipt per node). Job-level
        forgeries are predicted as in rule_settle; a node-level one (the last node of the batch
        signs a wrong total, a root over other leaves, or another key signs for it) reverts with
        its named error once every job passed, and nothing moves."""
        other = "client2" if client == "client1" else "client1"
        job_forgery = forgery if forgery in ("client_key", "broker") else "none"
        specs = [
            (client, broker, nonce, a, b, shape, job_forgery, budget),
            (other, broker, nonce + 1, b, a, "two_stage", "none", "ample"),
        ][:n_jobs]
        built = [self._build(*s) for s in specs]
        model = copy.deepcopy(self.model)
        expected = None
        for i, (spec, (_, stages, _cost, _total, max_cost, _job)) in enumerate(zip(specs, built, strict=True)):
            expected = self._predict(model, i, spec[0], broker, spec[2], stages, max_cost, spec[6])
            if expected:
                break
        self.batches += 1
        bid = keccak(text=f"stateful-merkle-{self.batches}")
        settler = self.roles[broker]
        jobs = merkle_jobs(self.d.market, [b_[5] for b_ in built])
        signed = sign_batch(self.d.market, settler, bid, jobs)
        last = list(signed)[-1]
        honest = signed[last].receipt
        if forgery == "node_total":
            signed[last] = resign(self.d.market, NODE_KEYS[last], replace(honest, total=honest.total + 1))
            expected = expected or ("JobMarketBatchTotalMismatch", (len(signed) - 1, last, honest.total))
        elif forgery == "node_root":
            forged_root = keccak(text=f"forged-{self.batches}")
            signed[last] = resign(self.d.market, NODE_KEYS[last], replace(honest, root=forged_root))
            expected = expected or ("JobMarketBatchRootMismatch", (len(signed) - 1, last))
        elif forgery == "node_key":
            signed[last] = resign(self.d.market, keccak(text="not-the-node"), honest)
            expected = expected or ("JobMarketInvalidBatchSignature", (len(signed) - 1, last))
        nodes, tuples = merkle_batch_args(jobs, signed)
        others_before = self._parts_of(_other_broker(broker))
        tx, exc = self._attempt(self.d.market.settleBatchMerkle, bid, nodes, tuples, {"from": settler})
        assert self._parts_of(_other_broker(broker)) == others_before
        assert not self.d.market.batchSettled(settler, bid)  # Merkle batches are not recorded
        if expected:
            self._expect(exc, expected[0], *expected[1])
        else:
            self._ok(exc)
            ev = tx.events["BatchSettled"][0]
            assert (ev["jobs"], ev["broker"]) == (n_jobs, settler)
            self.model = model

    def rule_settle_solo(
        self,
        client="st_client",
        broker="st_broker",
        nonce="st_nonce",
        a="st_amount",
        b="st_amount",
        shape="st_shape",
        forgery="st_forgery",
        budget="st_budget",
    ):
        """One job through settleJob (settled alone): the outcome predicted as for a batch of one
        (every forgery, replay, budget, escrow and forfeit), no BatchSettled, nothing recorded
        under a batch id."""
        t, stages, _cost, _total, max_cost, _job = self._build(client, broker, nonce, a, b, shape, forgery, budget)
        model = copy.deepcopy(self.model)
        expected = self._predict(model, 0, client, broker, nonce, stages, max_cost, forgery)
        settler = self.roles[broker]
        others_before = self._parts_of(_other_broker(broker))
        tx, exc = self._attempt(self.d.market.settleJob, solo(t), {"from": settler})
        assert self._parts_of(_other_broker(broker)) == others_before
        if expected:
            self._expect(exc, expected[0], *expected[1])
        else:
            self._ok(exc)
            assert "BatchSettled" not in tx.events
            self.model = model

    def _parts_of(self, broker) -> list[int]:
        """Both clients' escrow parts held for ``broker``, read from the chain."""
        m, r = self.d.market, self.roles
        return read_many([(m, "escrowOf", (r[c].address, r[broker].address)) for c in CLIENTS])

    def rule_settle_honest(
        self, client="st_client", broker="st_broker", nonce="st_nonce", a="st_amount", b="st_amount", shape="st_shape"
    ):
        """Genuine signatures and an ample budget: settles unless the nonce is used, a node is
        unroutable or the settling broker's part is short (a second settlement rule also weights
        the draw)."""
        self.rule_settle(1, client, broker, nonce, a, b, shape, "none", "ample")

    def rule_settle_beyond_own_part(self, client="st_client", broker="st_broker", nonce="st_nonce"):
        """A one-stage job costing just more than the settling broker's part: refused with that
        part as available (unless the node's receipt is forfeited), even when the client's part
        for the other broker would cover it."""
        cost = self.model.escrow[client, broker] + 1
        shape = "other_model" if self.model.routable(2) else "other_model_op1"
        self.rule_settle(1, client, broker, nonce, cost, 0, shape, "none", "ample")

    def rule_replay_settled_job(self, client="st_client", broker="st_broker", nonce="st_nonce"):
        """Re-submitting any job whose nonce was already used never pays twice, whichever broker
        settled it first and whichever broker replays it (nonces are per client)."""
        if (client, nonce) not in self.model.used:
            return
        job, *_ = self._build(client, broker, nonce, UNIT, UNIT, "two_stage", "none", "ample")
        self.batches += 1
        _, exc = self._attempt(
            self.d.market.settleBatch, keccak(text=f"replay-{self.batches}"), [job], {"from": self.roles[broker]}
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
        ops = ("op1", "op2")
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
        for c in CLIENTS:
            for b in BROKERS:
                add(("escrow", c, b), m, "escrowOf", r[c].address, r[b].address)
                add(("pending", c, b), m, "pendingWithdrawal", r[c].address, r[b].address)
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
        assert v["totalEscrow"] == sum(v[("escrow", c, b)] for c in CLIENTS for b in BROKERS)
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
        for (c, b), want in md.escrow.items():
            assert v[("escrow", c, b)] == want, (c, b)
        for (c, b), (amount, ready) in md.pending.items():
            want = (amount, ready, ready + WITHDRAW_WINDOW) if amount else (0, 0, 0)
            assert tuple(v[("pending", c, b)]) == want, (c, b)
        for a, want in md.market_claimable.items():
            assert v[("m_claimable", a)] == want
        for c in CLIENTS:
            for n in range(NONCES):
                assert v[("used", c, n)] == ((c, n) in md.used), (c, n)


def _other_broker(broker: str) -> str:
    return BROKERS[1 - BROKERS.index(broker)]


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
