"""open_clip's own trainer (`open_clip_train.main`) as bench-train's end-to-end peer, unedited:
this module registers the model configs of one folder with open_clip (`add_model_config`, the
registry open_clip offers for configs outside its wheel), applies the one fix its webdataset
stage needs, then hands the rest of the command line to open_clip_train.

    python -m tools.bench.open_clip_run CONFIG_DIR --train-data ... --model lip-tiny ...

Kept free of the project's own imports (pipelines, train): the peer's start-up is open_clip's.
"""
from __future__ import annotations

import sys


def patch_tar_stage(oc_data) -> None:
    """open_clip 3.3's tar stage predates webdataset 0.2.96's end-of-shard `{}` markers and dies on
    them (KeyError 'fname', open_clip#935); this is the fix given there: no markers."""
    def tarfile_to_samples_nothrow(src, handler=oc_data.log_and_continue):
        files = oc_data.tar_file_expander(oc_data.url_opener(src, handler=handler), handler=handler,
                                          eof_value=None)
        return oc_data.group_by_keys_nothrow(files, handler=handler)
    oc_data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m tools.bench.open_clip_run CONFIG_DIR [open_clip_train.main arguments]",
              file=sys.stderr)
        return 2
    import open_clip
    import open_clip_train.data as oc_data
    from open_clip_train.main import main as open_clip_main

    open_clip.add_model_config(argv[0])
    patch_tar_stage(oc_data)
    open_clip_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
