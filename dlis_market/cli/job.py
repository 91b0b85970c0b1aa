"""`dlis job ...`: a client's side of the market: escrow, signed paid jobs, status."""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

import typer

from dlis_market.cli.context import (
    U256,
    BrokerUrlOpt,
    JsonOpt,
    PasswordFileOpt,
    broker_url_of,
    call_broker,
    console,
    emit,
    handle_errors,
    parse_amount,
    read_password_file,
    state,
    unlock,
    utc,
)

app = typer.Typer(help="Deposit escrow, submit paid jobs to a broker, check their status.", no_args_is_help=True)

AccountOpt = Annotated[
    str, typer.Option("--account", "-a", help="Client account: keystore name, or dev:N on a dev chain.")
]
BrokerAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--broker",
        help="Broker account (0x address) the escrow is held for; only it can run jobs against it. "
        "Default: the broker in this chain's deployment file.",
    ),
]


@app.command()
def deposit(
    ctx: typer.Context,
    amount: Annotated[str, typer.Argument(help="DLIS to add to your escrow.")],
    account: AccountOpt,
    broker: BrokerAddressOpt = None,
    password_file: PasswordFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move DLIS into JobMarket escrow held for one broker, so it can run your jobs.

    Escrow is per broker: a deposit for broker A cannot pay jobs at broker B. To move escrow,
    `dlis job withdraw --amount X --broker A`, wait the delay, withdraw, and deposit for B."""
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.dlis_token import fmt_units
    from dlis_market.chain.job_market import JobMarket

    st = state(ctx)
    with handle_errors(as_json):
        units = parse_amount(amount)
        client = unlock(st, account, read_password_file(password_file))
        market = JobMarket(ChainClient(st.settings))
        held_for = market.broker_or_default(broker)
        market.deposit(client, units, held_for)
        escrow = market.escrow_of(client.address, held_for)
        emit(
            {"client": client.address, "broker": held_for, "escrow": U256(escrow)},
            as_json,
            lambda d: console.print(f"escrow for broker {d['broker']} now {fmt_units(d['escrow'])} DLIS"),
        )


@app.command()
def withdraw(
    ctx: typer.Context,
    account: AccountOpt,
    amount: Annotated[str | None, typer.Option(help="Request a withdrawal of this much (starts the delay).")] = None,
    broker: BrokerAddressOpt = None,
    password_file: PasswordFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Request a withdrawal (--amount), or withdraw a request whose delay has passed."""
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.dlis_token import fmt_units
    from dlis_market.chain.job_market import JobMarket

    st = state(ctx)
    with handle_errors(as_json):
        client = unlock(st, account, read_password_file(password_file))
        market = JobMarket(ChainClient(st.settings))
        held_for = market.broker_or_default(broker)
        if amount is not None:
            units = parse_amount(amount)
            market.request_withdrawal(client, units, held_for)
            _, ready, expires = market.pending_withdrawal(client.address, held_for)
            emit(
                {
                    "client": client.address,
                    "broker": held_for,
                    "requested": U256(units),
                    "ready_at": ready,
                    "expires_at": expires,
                },
                as_json,
                lambda d: console.print(
                    f"withdrawal of {amount} DLIS requested; withdraw between {utc(ready)} and {utc(expires)} UTC "
                    "(chain time; brokers count it as spent until then)"
                ),
            )
        else:
            pending, _, _ = market.pending_withdrawal(client.address, held_for)
            market.withdraw(client, held_for)
            emit(
                {"client": client.address, "broker": held_for, "withdrawn": U256(pending)},
                as_json,
                lambda d: console.print(
                    f"withdrew {fmt_units(d['withdrawn'])} DLIS from the escrow held for broker {held_for}"
                ),
            )


@app.command()
def submit(
    ctx: typer.Context,
    account: AccountOpt,
    prompt: Annotated[str, typer.Option(help="The prompt (chat-formatted with --chat).")],
    model: Annotated[str, typer.Option(help="Model name as the broker lists it.")] = "smollm2-135m",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 32,
    chat: Annotated[bool, typer.Option(help="Send the prompt as a user message (model's chat template).")] = False,
    max_cost: Annotated[str | None, typer.Option(help="Most DLIS you authorize (default: the broker's quote).")] = None,
    privacy: Annotated[
        str,
        typer.Option(
            help="low|high. high: attested nodes only, and the broker runs the first stage on secret shares at two "
            "workers of different operators, so no worker sees the prompt's embeddings "
            "(about 0.64x the tokens/s, bench/private_jobs.py)."
        ),
    ] = "low",
    proof: Annotated[
        str | None,
        typer.Option(
            help="zk: the last stage proves (halo2) that its head picked each token from the activations it "
            "committed to; the job completes only if the proof verifies. Small fp32 Llama models only."
        ),
    ] = None,
    broker_url: BrokerUrlOpt = None,
    password_file: PasswordFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Quote, sign an EIP-712 authorization for at most the quoted cost, run the job, print the answer."""
    from dlis_market.chain.dlis_token import fmt_units
    from dlis_market.chain.job_market import JobAuthorization, market_domain, sign_authorization

    st = state(ctx)
    with handle_errors(as_json):
        url = broker_url_of(state(ctx), broker_url)
        client = unlock(st, account, read_password_file(password_file))
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "policy": {"privacy": privacy}}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        quote = call_broker("POST", f"{url}/v1/quotes", json=body)
        limit = parse_amount(max_cost) if max_cost is not None else int(quote["max_total"])
        from dlis_market.broker.auth import signing_deadline
        from dlis_market.chain.client import connect_web3

        now = int(connect_web3(st.settings.chain.rpc_url).eth.get_block("latest")["timestamp"])
        auth = JobAuthorization(
            client=client.address,
            broker=quote["broker"],
            model_id=bytes.fromhex(quote["model_id"][2:]),
            max_cost=limit,
            nonce=secrets.randbits(255),
            deadline=signing_deadline(now, int(quote["max_authorization_lifetime_s"])),
        )
        sig = sign_authorization(client.key, market_domain(quote["chain_id"], quote["job_market"]), auth)
        body["authorization"] = {
            "client": client.address,
            "nonce": str(auth.nonce),
            "max_cost": str(limit),
            "deadline": auth.deadline,
            "signature": sig.hex(),
        }
        if proof is not None:
            body["proof"] = proof
        job = call_broker("POST", f"{url}/v1/jobs", json=body)

        def human(j: dict[str, Any]) -> None:
            console.print(j["answer"])
            console.print(f"\njob {j['id']}  status {j['status']}")
            console.print(
                "route: " + " -> ".join(f"{h['peer_id'][:12]}[{h['start']},{h['end']})" for h in j["route"] or [])
            )
            console.print(
                f"latency {j['latency_ms']:.0f} ms (first token {j['ttft_ms']:.0f} ms), "
                f"cost {fmt_units(int(j['cost']))} DLIS + fee {fmt_units(int(j['fee']))} DLIS"
            )

        emit(job, as_json, human)


@app.command()
def status(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="0x job id.")],
    account: Annotated[
        str | None,
        typer.Option("--account", "-a", help="The job's client account: signs a JobRead to see prompt and answer."),
    ] = None,
    broker_url: BrokerUrlOpt = None,
    password_file: PasswordFileOpt = None,
    wait: Annotated[
        float,
        typer.Option(
            help="Wait up to this many seconds until the chain has settled the job (exit 1 if it has not).",
            min=0,
        ),
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """A job's status, route, cost, receipts and settlement transaction (and whether the chain settled it).
    Its prompt and answer only for its client (--account). `--wait 60` returns as soon as the job is
    settled on chain, for scripts that act on the payment."""
    import time

    from dlis_market.broker.auth import sign_job_read
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.dlis_token import fmt_units
    from dlis_market.chain.job_market import JobMarket
    from dlis_market.errors import BrokerError

    st = state(ctx)
    with handle_errors(as_json):
        market = JobMarket(ChainClient(st.settings))
        headers = {}
        if account is not None:
            client = unlock(st, account, read_password_file(password_file))
            read = sign_job_read(client.key, market.domain(), job_id, int(time.time()) + 300)
            headers["X-DLIS-Job-Read"] = read
        url = f"{broker_url_of(state(ctx), broker_url)}/v1/jobs/{job_id}"
        deadline = time.monotonic() + wait
        while True:
            job = call_broker("GET", url, headers=headers)
            job["settled_on_chain"] = market.nonce_used(job["client"], int(job["nonce"]))
            if job["settled_on_chain"] or time.monotonic() >= deadline:
                break
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        if wait and not job["settled_on_chain"]:
            raise BrokerError(
                f"job {job_id} is not settled on chain after {wait:g} s (status {job['status']}); the broker "
                "settles in batches every broker.settle_interval_s: wait longer, or see its log"
            )

        def human(j: dict[str, Any]) -> None:
            console.print(f"job {j['id']}  status {j['status']}  settled on chain: {j['settled_on_chain']}")
            if j.get("cost") is not None:
                console.print(f"cost {fmt_units(int(j['cost']))} DLIS + fee {fmt_units(int(j.get('fee') or 0))} DLIS")
            if j.get("settlement"):
                console.print(f"settlement {json.dumps(j['settlement'])}")
            if j.get("answer") is not None:
                console.print(f"answer: {j['answer']}")

        emit(job, as_json, human)
