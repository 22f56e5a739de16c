"""Data: shard formats and manifests, validation, labels→text, synthetic world, tokenizer, Ray Data pipeline.

Submodules are imported on demand; only `scalelab.data.pipeline` imports Ray, so the rest of this
package (writing, reading, validating shards) loads without it.
"""
