"""dlis_market: decentralized LLM inference with an on-chain marketplace."""

__version__ = "0.1.0"
