"""Errors raised by the inference core; all derive from :class:`~dlis_market.errors.InferenceError`.

Each message names what was wrong (file, numbers) and what to do about it.
"""

from __future__ import annotations

from dlis_market.errors import InferenceError


class ModelImportError(InferenceError):
    """A model could not be found, downloaded or converted into a local Hugging Face folder."""


class UnsupportedArchitectureError(InferenceError):
    """The model's architecture has no family module in ``dlis_market.inference.families``."""


class PlanError(InferenceError):
    """No partition of the model's layers fits the given devices."""


class ShardError(InferenceError):
    """Exporting shards failed (bad ranges, unknown dtype, unsupported quantization)."""


class ManifestError(InferenceError):
    """A shard manifest is missing, malformed or disagrees with the files or config next to it."""


class ShardIntegrityError(InferenceError):
    """A shard file is missing, truncated, corrupt or does not match its sha256."""


class StageMismatchError(InferenceError):
    """A shard or message does not belong to the stage it was given to."""


class SessionError(InferenceError):
    """A session is unknown, over its limits, or out of step with the stage's KV cache."""


class ContextLengthError(SessionError):
    """A prompt plus the tokens to generate do not fit the model's or session's context."""


class MessageError(InferenceError):
    """A serialised stage message is malformed, too large or of an unknown version."""


class AdapterError(InferenceError):
    """A LoRA adapter cannot be loaded, served or published (the root of the adapter errors)."""


class AdapterIntegrityError(AdapterError):
    """An adapter's files are missing, malformed, or do not hash to the adapter id asked for."""


class AdapterMismatchError(AdapterError):
    """An adapter was trained for another base model (shapes, target modules or layer indices)."""


class UnsupportedAdapterError(AdapterError):
    """An adapter uses a PEFT feature a stage cannot apply on the fly (DoRA, biases, patterns...)."""


class AdapterNotAttachedError(AdapterError):
    """A session names an adapter that is not attached to the stage serving it."""


class ZkStageError(InferenceError):
    """Proving a stage call with EZKL failed."""


class ZkSetupError(ZkStageError):
    """Exporting, calibrating, compiling or setting up a stage's circuit failed."""


class ZkProveError(ZkStageError):
    """A witness or proof for one stage call could not be made."""


class SecretSharingError(InferenceError):
    """Inputs a secret-shared computation cannot carry (overflow, mismatched shares)."""


class TensorParallelError(InferenceError):
    """A model or group that cannot be split k ways (heads or width not divisible, ranks missing)."""


class MoEError(InferenceError):
    """An MoE layer that cannot be served: no live replica of an expert, a placement without room."""


class ExpertUnavailableError(MoEError):
    """An expert worker did not answer (gone, overloaded): the router tries the next replica."""
