"""Shard formats. Each module holds one format's writer, index and reader side by side."""
