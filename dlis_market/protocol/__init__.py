"""Wire types that node, broker and oracle share, below all three: signed span announcements
(:mod:`.spans`) and session tickets (:mod:`.tickets`). Each is an EIP-712 message defined once in
``dlis_market.chain.typed_data``; this package signs and checks them and knows nothing of
transports (hivemind, libp2p) or of the chain beyond the domain it signs under.
"""
