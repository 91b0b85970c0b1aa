"""Shard store: publish, pin, fetch and verify model shards on IPFS (Kubo).

Entry points for other components (import from the submodules named):

- ``shard_store.fetch_shards(settings, cid, out_dir, providers=[...], expected=...)`` and
  ``shard_store.publish_shards(settings, shard_dir, register=hook)``: the one-call versions of
  the two below, Kubo chosen and parameters taken from settings.
- ``session.kubo_session(settings)``: an async context giving a connected ``KuboClient`` to
  ``storage.kubo_api_url``, else the running embedded daemon of ``HOME/ipfs``, else one started
  for the duration of the block.
- ``publish.publish_model(client, shard_dir, part_size=..., register=hook) -> PublishResult``:
  ``result.manifest_cid`` (the publication index CID) and ``result.manifest_sha256`` go on chain.
- ``fetch.fetch_model(client, cid, out_dir, providers=[gateway URL or multiaddr...],
  expected=ExpectedManifest(sha256, cid), cache_dir=..., progress=cb) -> FetchResult``: verified
  shards in ``out_dir``; parts read from every provider's gateway at once
  (``gateway_client.GatewayClient``, each block checked against its CID, :mod:`.ipld`).
- ``daemon.EmbeddedDaemon(DaemonConfig(repo=...))``: ``start() -> DaemonInfo`` (``api_url``,
  ``gateway_url``, ``peer_id``, ``multiaddrs``), ``stop()``; ``daemon.run_daemon(config)`` runs one
  in the foreground (``dlis ipfs daemon``). The gateway (:mod:`.gateway`: read-only, trustless,
  NoFetch) is what a provider gives out; the RPC API stays on its machine.
- ``client.KuboClient(url)``: the Kubo RPC subset (add, cat, pin/add|ls|rm, id, swarm/connect|peers,
  version) for the embedded daemon or any real Kubo.

What is stored, and the trust chain from the on-chain manifest CID to each file, is described in
:mod:`dlis_market.storage.publication`; the manifest fields the store reads, in
:mod:`dlis_market.storage.manifest_files`. Errors are :class:`dlis_market.errors.StorageError`
subclasses from :mod:`dlis_market.storage.errors`.
"""
