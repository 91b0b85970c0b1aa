"""Typed chain errors. Contract reverts become :class:`ContractRevertError` subclasses named after
the Solidity custom error, with its arguments and a hint on what to do."""

from __future__ import annotations

from typing import Any

from dlis_market.errors import ChainError


class ChainUnavailableError(ChainError):
    """The JSON-RPC endpoint does not answer."""


class WrongChainError(ChainError):
    """Connected to a chain other than the one expected."""


class DeploymentNotFoundError(ChainError):
    """No deployment manifest for this chain."""


class AccountError(ChainError):
    """A keystore is missing, unreadable or the password is wrong."""


class DevKeyRefusedError(AccountError):
    """A well-known development key was offered on a non-development chain."""


class PreflightError(ChainError):
    """A check before sending a transaction failed; nothing was sent."""


class TransactionFailedError(ChainError):
    """A transaction was mined but reverted, or was not mined in time."""


class ContractRevertError(ChainError):
    """A contract call reverted with a custom error (decoded from the ABI)."""

    def __init__(self, contract: str, error: str, args: dict[str, Any], hint: str | None = None) -> None:
        self.contract = contract
        self.error = error
        self.error_args = args
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in args.items())
        message = f"{contract} reverted with {error}({shown})"
        if hint:
            message += f": {hint}"
        super().__init__(message)


def _fmt(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


# What to do about each revert, keyed by custom error name. Unlisted errors still decode.
REVERT_HINTS: dict[str, str] = {
    "StakingManagerInsufficientStake": "request at most your active stake (`dlis node status`)",
    "StakingManagerNothingUnbonding": "request an unstake first (`dlis node unstake AMOUNT`)",
    "StakingManagerStillUnbonding": "wait until the release time, then `dlis node withdraw` again",
    "StakingManagerEvidenceAlreadyUsed": "this evidence was already used for a slash",
    "StakingManagerNothingToClaim": "nothing credited to this account yet",
    "NodeRegistryOperatorNotStaked": "stake at least the minimum first (`dlis node stake AMOUNT`)",
    "NodeRegistryInvalidBinding": "the binding must be signed by the node key for this operator",
    "NodeRegistryBindingExpired": "sign a fresh binding (the deadline passed)",
    "NodeRegistryAlreadyRegistered": "deregister it first or use `dlis node register --update`",
    "NodeRegistryNotOperator": "only the node's operator account can change it",
    "JobMarketInsufficientEscrow": "the client must deposit more into escrow (`dlis job deposit`)",
    "JobMarketInvalidClientSignature": "the authorization was not signed by the client",
    "JobMarketJobAlreadySettled": "this job was settled before; it is never paid twice",
    "JobMarketNodeNotRoutable": "the receipt signer was never registered as a node (forged or foreign receipt)",
    "JobMarketSpenderCapExceeded": "the standing authorization's cap is spent; the client must raise it (setSpender)",
    "JobMarketSpenderExpired": "the standing authorization expired; the client must renew it (setSpender)",
    "JobMarketWithdrawalNotReady": "wait for the withdrawal delay to pass",
    "JobMarketWithdrawalExpired": "the request was not used within the withdraw window; request the withdrawal again",
    "JobMarketAuthorizationTooLong": (
        "the authorization's deadline lies further ahead than the market's maxAuthorizationLifetime; "
        "sign it with a nearer deadline"
    ),
    "JobMarketInvalidAuthorizationLifetime": "deploy with 0 < max_authorization_lifetime_s < withdraw_delay_s",
    "JobMarketInvalidWithdrawWindow": "deploy with withdraw_window_s of at least 1",
    "JobMarketSpenderChanged": "the spender drew from its cap meanwhile; read spenderOf again and set the cap anew",
    "JobMarketBatchAlreadySettled": "this broker already settled a batch with this id",
    "NodeRegistryLayerCountFixed": "a model's layer count is fixed by its first version; publish under a new name",
    "JobMarketNothingToClaim": "nothing credited to this account yet",
    "ERC20InsufficientBalance": "the account holds fewer tokens than needed",
    "ERC20InsufficientAllowance": "approve the contract to spend enough tokens first",
    "AccessControlUnauthorizedAccount": "this account lacks the role needed for the call",
    "StageProofRegistryAlreadyProven": "this receipt's proof is on record already; read it with proofOf",
    "StageProofRegistryUnknownCircuit": "the oracle must register the circuit's verifier (registerCircuit) first",
    "StageProofRegistryCircuitExists": "a verification key's verifier is registered once and never replaced",
    "StageProofRegistryClaimNotBound": (
        "the StageProof claim must be signed by the receipt's node, for this receipt, these instances and this key"
    ),
    "StageProofRegistryProofRejected": "the halo2 verifier refused the proof for these instances",
    "StageProofRegistryOutputNotSigned": "send the exact token ids whose sha256 the receipt's outputHash is",
    "StageProofRegistryTokenNotBest": "the billed token is not the best entry of its proven logits row",
    "StageProofRegistryInstanceCount": "a proof's instances are one input commitment, then one logits row per token",
}
