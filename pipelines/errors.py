"""What the loader raises, in one place: a caller (lip-train, lip-eval, verify-shards, the tests)
imports these names from here, whichever module raises them. Every message names the shard,
sample, index or url at fault and, where there is one, the fix.

- `ShardError`: a shard folder that cannot be used as it is (no such folder, no shards of the
  format, a damaged shard, a manifest without what the loader needs). verify-shards raises it too,
  for the first way a folder differs from its manifest.
- `FolderIndexError`: a file that is not a folder index (`index.bin`) of this version, or one
  replaced after a loader opened it. The loader rebuilds a damaged index where it can, so most of
  these are caught and logged; a `ValueError`, not a `ShardError`, because the sites that turn
  `ShardError` into a one-line exit (lip-train, lip-eval) never did so for an index.
- `SampleReadError`: a sample whose stored bytes cannot be read (a record cut short, a bad
  header); `gid` names it. It is a bad sample, as an undecodable image is: the loader's fault
  policy handles it, it is not shown to users as such.
- `SampleError`: a bad sample under `on_error="raise"`, or too many in a row under "skip".
- `StorageError`: a transfer or listing of object storage that failed for good. Never a bad sample.
"""
from __future__ import annotations


class ShardError(ValueError):
    """A shard folder that cannot be used as it is: names the folder or shard (and sample)."""


class FolderIndexError(ValueError):
    """A file that is not a folder index of this version: names it and the fix."""


class SampleReadError(ValueError):
    """A sample whose stored bytes cannot be read (a record cut short, a bad header): that sample
    is bad, as an undecodable image is; `gid` names it. Never raised for a storage failure."""

    def __init__(self, message: str, gid: int = -1):
        super().__init__(message)
        self.gid = gid


class SampleError(ValueError):
    """An image that does not decode (or too many in a row): names the shard and the key."""


class StorageError(RuntimeError):
    """A transfer or listing that failed for good: names the url and what to check."""
