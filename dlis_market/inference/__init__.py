"""Inference core: import a model, plan and export layer-range shards, run them as stages.

Entry points (import from the submodules; this package imports nothing heavy by itself):

- ``importer.import_model(source, models_dir, cache_dir)`` -> HF folder; ``importer.list_models``
- ``planner.model_profile(config, dtype)``, ``planner.plan_partition(profile, devices)`` -> ``Plan``
- ``shard_export.export_shards(model_dir, out_dir, ranges|stages, dtype, compress)`` -> ``Manifest``
- ``manifest.load_manifest(shard_dir)`` (verified), ``Manifest``
- ``stage.Stage.load(shard_dir, layers|index)``: ``open_session``, ``forward(StageInput)``,
  ``close_session``; ``messages.encode/decode`` for ``StageInput``/``StageOutput`` on the wire
- ``pipeline.LocalPipeline.load(shard_dir).generate_ids(prompts, max_new_tokens, sampling)``
- ``families``: one module per architecture (Llama, GPT-2, Gemma3)
"""
