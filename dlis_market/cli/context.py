"""Shared CLI plumbing: the settings object, output (rich or --json), unlocking accounts, and
turning typed errors into a clear message and a non-zero exit without a traceback."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from dlis_market.errors import DlisError
from dlis_market.settings import Settings

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from rich.progress import Progress

    from dlis_market.chain.client import ChainClient

T = TypeVar("T")
# What a read-only command prints: its data, and how to print that for a human (see emit).
Shown = tuple[Any, Callable[[Any], None]]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
BrokerUrlOpt = Annotated[str | None, typer.Option(help="Broker URL (default http://127.0.0.1:<broker.port>).")]
PasswordFileOpt = Annotated[
    Path | None,
    typer.Option(help="Read the account password from this file instead of prompting.", exists=True, dir_okay=False),
]

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class CliState:
    settings: Settings

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> CliState:
        try:
            return cls(Settings.load(overrides=overrides))
        except DlisError as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    if not isinstance(obj, CliState):  # commands invoked without the root callback (tests)
        obj = CliState.from_overrides({})
        ctx.find_root().obj = obj
    return obj


class U256(int):
    """An on-chain uint256 (token units, wei): a number in human output, a decimal *string* in
    ``--json`` output, because JSON readers (JavaScript, jq) lose integers past 2**53."""


@contextmanager
def handle_errors(as_json: bool = False) -> Iterator[None]:
    """Typed errors exit with code 1 and no traceback: ``error: <message>`` on stderr, or with
    ``--json`` an object ``{"error": {"type", "message"}}`` on stdout, so a script reading stdout
    gets JSON whether the command worked or not."""
    try:
        yield
    except DlisError as exc:
        if as_json:
            sys.stdout.write(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}, indent=2) + "\n")
        else:
            err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(_jsonable(data), indent=2, default=_json_default) + "\n")
    else:
        human(data)


def _jsonable(value: Any) -> Any:
    """``data`` with every :class:`U256` as a decimal string (json.dumps writes int subclasses as
    numbers without asking ``default``)."""
    if isinstance(value, U256):
        return str(int(value))
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


def utc(timestamp: int) -> str:
    """A unix (or chain) time as a UTC date for human output."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def read_password_file(path: Path | None) -> str | None:
    return path.read_text().strip() if path else None


def password_for(name: str, password: str | None, confirm: bool = False) -> str:
    """Password from --password / DLIS_CHAIN__KEYSTORE_PASSWORD, else an interactive prompt."""
    if password:
        return password
    if not sys.stdin.isatty():
        err_console.print(
            f"[red]error:[/red] account {name!r} needs a password: pass --password-file or set "
            "DLIS_CHAIN__KEYSTORE_PASSWORD when not running interactively"
        )
        raise typer.Exit(2)
    return str(typer.prompt(f"password for {name}", hide_input=True, confirmation_prompt=confirm))


def unlock(st: CliState, name: str, password: str | None) -> LocalAccount:
    """Load a keystore account, or a dev account (``dev:N``) on a dev chain."""
    from dlis_market.chain.accounts import Keystore, dev_accounts
    from dlis_market.chain.errors import DevKeyRefusedError
    from dlis_market.settings import DEV_CHAIN_IDS

    if name.startswith("dev:"):
        from dlis_market.chain.client import connect_web3

        chain_id = int(connect_web3(st.settings.chain.rpc_url).eth.chain_id)
        if chain_id not in DEV_CHAIN_IDS:
            raise DevKeyRefusedError(
                f"dev accounts are publicly known keys and chain {chain_id} is not a dev chain; "
                "use a keystore account (`dlis account new NAME`)"
            )
        index = int(name.split(":", 1)[1])
        return dev_accounts(st.settings.chain.dev_mnemonic)[index]
    pw = password_for(name, password or st.settings.chain.keystore_password)
    return Keystore(st.settings.keystore_dir).load(name, pw)


def resolve_address(st: CliState, who: str) -> str:
    """An address given directly, or the address of a keystore account by name."""
    from web3 import Web3

    from dlis_market.chain.accounts import Keystore
    from dlis_market.chain.errors import AccountError

    if Web3.is_address(who):
        return str(Web3.to_checksum_address(who))
    match = [e for e in Keystore(st.settings.keystore_dir).list() if e.name == who]
    if not match:
        raise AccountError(f"{who!r} is neither an address nor an account in {st.settings.keystore_dir}")
    return match[0].address


def show_address(ctx: typer.Context, who: str, as_json: bool, read: Callable[[ChainClient, str], Shown]) -> None:
    """A command that only reads the chain about one address (``who``: an address or an account
    name): ``read`` answers, for the resolved address, what to print."""
    from dlis_market.chain.client import ChainClient

    st = state(ctx)
    with handle_errors(as_json):
        address = resolve_address(st, who)
        data, human = read(ChainClient(st.settings), address)
        emit(data, as_json, human)


def parse_amount(amount: str) -> int:
    """A DLIS amount typed by a user ("12.5") as exact token units, or a preflight error."""
    from dlis_market.chain.dlis_token import to_units
    from dlis_market.chain.errors import PreflightError

    try:
        return to_units(amount)
    except ValueError as exc:
        raise PreflightError(f"{exc}; give a DLIS amount such as 1000 or 12.5") from exc


def broker_url_of(st: CliState, url: str | None) -> str:
    s = st.settings.broker
    return (url or f"http://{s.host}:{s.port}").rstrip("/")


def call_broker(method: str, url: str, **kw: Any) -> Any:
    """One request to a broker's API; its refusal (RFC 9457 ``detail``) or silence as a BrokerError."""
    import httpx

    from dlis_market.errors import BrokerError

    try:
        res = httpx.request(method, url, timeout=600, **kw)
    except httpx.HTTPError as exc:
        raise BrokerError(f"broker at {url} did not answer ({exc}); start it with `dlis broker start`") from exc
    if res.status_code >= 400:
        try:
            detail = res.json().get("detail", res.text)
        except ValueError:
            detail = res.text
        raise BrokerError(f"broker refused ({res.status_code}): {detail}")
    return res.json()


@contextmanager
def working(first: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr naming the step under way (for commands with steps that can take more
    than a couple of seconds: imports, loading, converting); a step that took 2 s or more leaves a
    line with its time. Yields a callable that names the next step. ``quiet`` (e.g. under --json)
    shows nothing."""
    if quiet:
        yield lambda _step: None
        return
    current: list[Any] = [first, time.monotonic()]

    def done() -> None:
        elapsed = time.monotonic() - current[1]
        if elapsed >= 2:  # what took long stays on screen
            err_console.print(f"[dim]{current[0]}: {elapsed:.1f} s[/dim]")

    with err_console.status(first) as status:

        def step(text: str) -> None:
            done()
            current[:] = [text, time.monotonic()]
            status.update(text)

        yield step
        done()


def transfer_progress() -> Progress:
    """A bar for bytes moved (publish, fetch), on stderr: done, total, speed, time left."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
