"""Where shard files come from: object storage and the node's cache of it.

- `remote.py`: urls (`s3://bucket/prefix` or a local folder), listing and transfers with retries,
  sizes and the defaults of the cache settings.
- `shard_cache.py`: one node's bounded cache of the shards of one version of a remote folder,
  fetched ahead of the epoch plan; one owner process per node, the other loaders ask it.
- `cached_files.py`: the cache's folders (per dataset version, per host on shared filesystems) and
  how a cached file is recognised as the object it copies; small files fetched once per node.
- `cache_locks.py`: the liveness records (flock-held files) readers and owners leave in the cache.
- `node_budget.py`: one `cache_limit` shared by every cache under one cache root.
"""
