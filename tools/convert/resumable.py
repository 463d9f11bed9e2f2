"""What the resumable tools share (make-shards, caption-shards, attach-captions): their usage error,
the command-line pieces all of them have, the plan file a run records and a rerun is checked
against, and the clearing of what a killed run left half-written.

A run records its plan (`plan.json`, beside its per-shard completion records): the arguments
that decide its output and the identities of its inputs (tools/convert/input_identity.py). A rerun
onto a folder that holds a plan must bring the same arguments, and a `--resume` the same inputs:
else the finished shards of one run would be kept beside the new shards of another.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pipelines.formats.base import remove_partial_writes, write_json_atomic
from tools.convert import input_identity

PLAN_FILE = "plan.json"


class UsageError(Exception):
    """A bad invocation: one line naming the problem and the fix, exit code 2."""


class ToolParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


def tool_parser(prog: str, doc: str) -> ToolParser:
    """The parser of the tool `prog`: the first paragraph of its module docstring `doc` describes
    it, --help shows the defaults, a bad argument is a UsageError."""
    return ToolParser(prog=prog, description=doc.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_run_options(p: argparse.ArgumentParser, *, resume: str | None = None, overwrite: str | None = None) -> None:
    """--resume and --overwrite (for a tool that gives their help: what they keep and replace of
    its output), then --quiet."""
    if resume:
        p.add_argument("--resume", action="store_true", help=resume)
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help=overwrite)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def error_exit(prog: str, e: Exception) -> int:
    """Report an error the user can fix (a bad argument or input) as one line; the exit code."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def read_plan(path: str, defaults: dict | None = None) -> tuple[dict | None, dict | None]:
    """(the plan recorded at `path` less its inputs' identities, those identities, None in a plan
    written before they were recorded); (None, None) where there is no plan. `defaults`: the
    values of options added since, which older plans lack."""
    if not os.path.exists(path):
        return None, None
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    for key, value in (defaults or {}).items():
        previous.setdefault(key, value)
    return previous, previous.pop("inputs", None)


def check_same_plan(plan: dict, previous: dict, *, where: str, other: str, fix: str) -> None:
    """Refuse `where` when the plan recorded there is not this run's: the error names `other` (what
    the folder holds then), the arguments that differ and `fix`."""
    if previous != plan:
        diff = sorted(k for k in plan if plan[k] != previous.get(k))
        raise UsageError(f"{where} holds {other} (differs in {', '.join(diff)}); {fix}")


def check_resume(tool: str, plan_path: str, recorded: dict | None, inputs: dict[str, str | None], *,
                 unchecked: str, where: str, since: str) -> dict | None:
    """A resumable tool's --resume onto a plan: the inputs' identities now, checked against the
    ones the plan recorded. A plan from before they were recorded warns (`unchecked` names the
    inputs) and resumes; a changed input is a UsageError naming `where`, what changed, `since`
    (since when, and what the finished parts hold) and the way out. None when nothing was checked."""
    if recorded is None:
        print(f"{tool}: warning: {plan_path} was written before {tool} recorded its inputs' identity: resuming "
              f"without checking that {unchecked} are unchanged since (if they changed, pass --overwrite instead)",
              file=sys.stderr)
        return None
    differ, now = input_identity.compare(recorded, inputs)
    if differ:
        raise UsageError(f"{where}: {'; '.join(differ)} {since}: pass --overwrite instead of --resume, or choose "
                         "another --out")
    return now


def resume_plan(tool: str, plan_path: str, plan: dict, inputs: dict[str, str | None], resume: bool, *,
                where: str, other: str, fix: str, this: str, unchecked: str, since: str,
                defaults: dict | None = None) -> dict | None:
    """A run of make-shards or caption-shards onto `where`, whose plan is at `plan_path`: the same
    arguments (else `check_same_plan` refuses), --resume (else an error saying `where` `this`, and how
    to finish or redo it) and unchanged inputs (`check_resume`). Returns the inputs' identities
    checked, None when the plan recorded none."""
    previous, recorded = read_plan(plan_path, defaults)
    check_same_plan(plan, previous, where=where, other=other, fix=fix)
    if not resume:
        raise UsageError(f"{where} {this}; pass --resume to finish it or --overwrite to redo it")
    return check_resume(tool, plan_path, recorded, inputs, unchecked=unchecked, where=where, since=since)


def write_plan(path: str, plan: dict, inputs: dict | None) -> None:
    """Record the plan, with its inputs' identities when the tool has inputs to identify."""
    write_json_atomic(path, plan if inputs is None else {**plan, "inputs": inputs})


def clear_leftovers(records: str, *folders: str) -> None:
    """Make the records' folder; remove what a killed run was writing there and in `folders`
    (temporary files that the atomic writes had not yet renamed)."""
    os.makedirs(records, exist_ok=True)
    for folder in (*folders, records):
        remove_partial_writes(folder)
