"""Shard formats and loaders: everything between shards on disk and a training Batch."""
