"""Format name -> module, so callers pick a format by the name the CLI and manifests use."""
from __future__ import annotations

from types import ModuleType

from pipelines.formats import arrow, recordio, wds

FORMATS: dict[str, ModuleType] = {"wds": wds, "arrow": arrow, "rec": recordio}
WRITERS = {"wds": wds.WdsWriter, "arrow": arrow.ArrowWriter, "rec": recordio.RecordIOWriter}
DATA_SUFFIX = {name: cls.suffixes[0] for name, cls in WRITERS.items()}


def get_format(name: str) -> ModuleType:
    if name not in FORMATS:
        raise ValueError(f"unknown shard format {name!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[name]
