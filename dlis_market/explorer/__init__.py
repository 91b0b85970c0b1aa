"""Block-explorer core: JSON-RPC access, ABI-driven decoding and page models for the market
contracts. Pure Python (no web framework): the broker's dashboard routes render what it builds."""
