"""Kill anywhere, rerun, compare: the offline tools' guarantee, run as a test and by hand.

Every scenario runs one tool on a small input built to catch mislabelling (twelve images in `a/` and
`b/` under the same 9-digit names, each raw caption and synthetic caption naming its own image):
1. once uninterrupted, with the fault hooks logging every point the run passes (tools/fault_hooks.py:
   each atomic metadata write before and after its rename, each upload, each shard's start) and the
   time it passed it: the reference output and the list of kill points;
2. then once per kill point: the tool is started again on a fresh output, SIGKILLed at that point
   (the whole run: its main process and the process that reached the point), or at a random time
   between the first and the last point, and rerun the way docs/converting.md says (make-shards and
   caption-shards with --resume, attach-captions as it was); the final output must equal the
   reference byte for byte (every file of the output folders, or every object under the s3://
   prefix; stats.json without its timings and reuse counts), and every sample's image bytes, raw
   text and synthetic captions must be its own image's.

    python -m tests.kill_harness                     # every scenario: 3 kill points + 1 random kill each
    python -m tests.kill_harness --points 200 --random 10 --seed 1
    python -m tests.kill_harness --scenarios make-shards/pool/local,attach-captions/out --json out.json

It prints one row per scenario: the points the run passes, the runs killed at a point, the random
kills that landed mid-run, and the reruns that matched. The killed runs are subprocesses (a Ray
scenario's starts its own local Ray); uninterrupted runs and reruns run in the harness's process,
Ray scenarios' on the local pool (a conversion begun on Ray may be finished there). s3 scenarios
use the loopback server (tests/s3_server.py, moto), started inside the harness and stopped with it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:  # run as `python -m tests.kill_harness`: s3_server lives here
    sys.path.insert(0, str(TESTS))

from tools.fault_hooks import FAULT_DIR_ENV, LOG_FILE, MAIN_PID_ENV, point_id  # noqa: E402

TIMINGS = ("seconds", "samples_per_second", "images_per_second", "shards_reused")
RUN_MARK = "LIP_KILL_HARNESS_RUN"  # in the environment of every process a killed run started
LAUNCH = ("import os, runpy, sys; os.environ[%r] = str(os.getpid()); sys.argv = sys.argv[1:]; "
          "runpy.run_module(sys.argv[0], run_name='__main__')" % MAIN_PID_ENV)
RUN, STORE = "<RUN>", "<STORE>"  # placeholders of a run's folder and s3:// prefix in point names
WAIT_GONE_S = 30


# --- the input ----------------------------------------------------------------------------------

@dataclass
class TwinData:
    root: Path
    images: Path
    names: list[str]  # identities, in input order
    table: Path
    sidecar: Path  # make-shards --synthetic-captions, by identity, most images
    attach: Path  # attach-captions --captions, by identity, other images

    def make_shards_args(self) -> list[str]:
        return ["--source", "table", "--input", str(self.table), "--images-root", str(self.images),
                "--image-column", "image", "--caption-column", "caption",
                "--synthetic-captions", str(self.sidecar)]


def twin_dataset(root: Path, pairs: int = 6) -> TwinData:
    """`pairs` images in a/ and as many in b/ under the same names (`a/000000001.jpg` and
    `b/000000001.jpg` are different pictures), listed a/ and b/ alternately, so sample keys (input
    positions) are also other images' file stems. Every caption names its image."""
    from PIL import Image, ImageDraw

    images = root / "images"
    names = []
    for i in range(pairs):
        for folder in ("a", "b"):
            name = f"{folder}/{i:09d}.jpg"
            (images / folder).mkdir(parents=True, exist_ok=True)
            n = len(names)
            img = Image.new("RGB", (40, 32), ((37 * n) % 256, (91 * n) % 256, (53 * n + 128) % 256))
            ImageDraw.Draw(img).rectangle((n, 2, n + 6, 20), fill=(255 - n, n * 9 % 256, 0))
            img.save(images / name, quality=90)
            names.append(name)
    table = root / "table.jsonl"
    table.write_text("".join(json.dumps({"image": n, "caption": f"a photo named {n}"}) + "\n" for n in names))
    sidecar = root / "syn.jsonl"
    sidecar.write_text("".join(json.dumps({"image": n, "caption": [f"synthetic caption of {n}"]}) + "\n"
                               for i, n in enumerate(names) if i % 4 != 3))
    attach = root / "attach.jsonl"
    attach.write_text("".join(json.dumps({"image": n, "caption": [f"attached caption of {n}",
                                                                   f"another attached caption of {n}"]}) + "\n"
                              for i, n in enumerate(names) if i % 3 != 2))
    return TwinData(root, images, names, table, sidecar, attach)


def check_labels(folder: Path, data: TwinData) -> int:
    """Every sample of every format folder under `folder` carries its own image's bytes, raw text
    and synthetic captions. Returns the samples checked."""
    from pipelines.formats.registry import DATA_SUFFIX, get_format

    checked = 0
    for manifest_path in sorted(folder.rglob("manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        fmt = manifest["format"]
        for entry in manifest["files"]:
            if not entry["name"].endswith(DATA_SUFFIX[fmt]):
                continue
            for s in get_format(fmt).iter_samples(str(manifest_path.parent / entry["name"])):
                ident = s.meta["image"]
                where = f"{manifest_path.parent / entry['name']}: sample {s.key}"
                assert s.image == (data.images / ident).read_bytes(), f"{where}: not the image of {ident}"
                assert s.txt == f"a photo named {ident}", f"{where}: raw text {s.txt!r} is not {ident}'s"
                assert all(c.endswith(f" of {ident}") for c in s.syn), f"{where}: captions {s.syn} not {ident}'s"
                checked += 1
    assert checked, f"{folder}: no samples"
    return checked


# --- outputs ------------------------------------------------------------------------------------

def comparable(name: str, data: bytes) -> bytes:
    """stats.json without what legitimately differs between runs (timings, reuse counts)."""
    if name.endswith("stats.json"):
        stats = json.loads(data)
        return json.dumps({k: v for k, v in stats.items() if k not in TIMINGS}, sort_keys=True).encode()
    return data


def local_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (whatever the tools write there), by relative path."""
    return {str(p.relative_to(folder)): comparable(p.name, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def store_snapshot(url: str) -> dict[str, bytes]:
    """Every object under the s3:// prefix `url`, by relative key."""
    from pipelines.storage import remote as storage

    fs = storage.filesystem(url)
    root = url.split("://", 1)[1]
    return {p[len(root) + 1:]: comparable(p, fs.cat_file(p)) for p in sorted(fs.find(root))}


def differences(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    out = [f"missing {k}" for k in sorted(set(want) - set(got))]
    out += [f"extra {k}" for k in sorted(set(got) - set(want))]
    out += [f"differs {k} ({len(got[k])} vs {len(want[k])} bytes)" for k in sorted(set(got) & set(want))
            if got[k] != want[k]]
    return out


# --- scenarios ----------------------------------------------------------------------------------

@dataclass
class Scenario:
    """One tool in one configuration. `argv(run)` is its command line for the run folder `run`
    (and the s3 prefix `store`), `rerun` what finishes a killed run."""

    name: str
    module: str
    argv: Callable[[Path, str], list[str]]
    rerun_flags: list[str] = field(default_factory=list)
    prepare: Callable[[Path], None] = lambda run: None
    remote: bool = False
    ray: bool = False

    @property
    def tool(self) -> str:
        return self.name.split("/")[0]

    def output(self, run: Path, store: str) -> dict[str, bytes]:
        return store_snapshot(store) if self.remote else local_snapshot(run / "out")


MAKE_SHARDS_ARGS = ["--format", "wds,arrow,rec", "--tokenize", "--samples-per-shard", "3", "--quiet"]


def scenarios(data: TwinData, shards: Path | None, model: str | None) -> list[Scenario]:
    """Every tool and output kind. caption-shards and attach-captions run on `shards` (make-shards'
    output of `data`); caption-shards with the tiny captioner folder `model`."""

    def make_shards(distributor: str, remote: bool) -> Scenario:
        def argv(run: Path, store: str) -> list[str]:
            out = [store, "--staging", str(run / "staging")] if remote else [str(run / "out")]
            return [*data.make_shards_args(), *MAKE_SHARDS_ARGS, "--workers", "2", "--distributor", distributor,
                    "--out", *out]
        return Scenario(f"make-shards/{'ray' if distributor == 'ray' else 'pool'}/{'s3' if remote else 'local'}",
                        "tools.convert.make_shards", argv, ["--resume"], remote=remote, ray=distributor == "ray")

    found = [make_shards("local", False), make_shards("local", True), make_shards("ray", False),
             make_shards("ray", True)]
    if shards is not None and model is not None:
        found.append(Scenario(
            "caption-shards", "tools.captions.caption_shards",
            lambda run, store: ["--shards", str(shards), "--model", model, "--out", str(run / "out" / "captions.jsonl"),
                                "--num-captions", "2", "--num-beams", "2", "--max-new-tokens", "8",
                                "--batch-size", "3", "--workers", "0", "--threads", "1", "--quiet"],
            ["--resume"]))
    if shards is not None:
        def copy_shards(run: Path) -> None:
            shutil.copytree(shards, run / "out")

        found.append(Scenario(
            "attach-captions/in-place", "tools.captions.attach_captions",
            lambda run, store: ["--shards", str(run / "out"), "--captions", str(data.attach), "--in-place", "--quiet"],
            prepare=copy_shards))
        found.append(Scenario(
            "attach-captions/out", "tools.captions.attach_captions",
            lambda run, store: ["--shards", str(shards), "--captions", str(data.attach), "--out", str(run / "out"),
                                "--quiet"]))
    return found


# --- running ------------------------------------------------------------------------------------

def marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries `mark`: the killed run and everything it started."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and mark.encode() in (p / "environ").read_bytes().split(b"\0"):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


@dataclass
class Launched:
    returncode: int
    killed: bool  # SIGKILLed, by an armed point or by the harness


def launch(module: str, argv: list[str], faults: Path, kill_after: float | None = None,
           at: str | None = None, env: dict | None = None) -> Launched:
    """Run the tool `module` in a subprocess with the fault hooks on (`faults` as their folder),
    SIGKILLed at the point `at` if given, or `kill_after` s after it passed its first point
    (startup takes seconds on a busy machine; the work starts there). Returns once every process
    the run started is gone."""
    mark = uuid.uuid4().hex
    env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"}
    env.update({FAULT_DIR_ENV: str(faults), RUN_MARK: mark, "OMP_NUM_THREADS": "1"})
    faults.mkdir(parents=True, exist_ok=True)
    if at is not None:
        (faults / f"at-{point_id(at)}").touch()
    log = faults / LOG_FILE
    if kill_after is not None:
        log.touch()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, module, *argv], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is not None:
        while proc.poll() is None and not log.stat().st_size:
            time.sleep(0.01)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    deadline = time.monotonic() + WAIT_GONE_S
    while (left := marked_pids(f"{RUN_MARK}={mark}")) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # what the killed run started and nothing took down: not into the rerun
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{module} {' '.join(argv)}: exit {proc.returncode}: "
                             f"{err.decode(errors='replace')[-2000:]}")
    return Launched(proc.returncode, proc.returncode == -signal.SIGKILL)


def on_pool(argv: list[str]) -> list[str]:
    """The command on the local pool: how the harness runs Ray scenarios in its own process (a
    conversion begun on Ray may be finished on the pool: the plan does not name the distributor)."""
    argv = list(argv)
    if "--distributor" in argv:
        argv[argv.index("--distributor") + 1] = "local"
    return argv


def in_process(scenario: Scenario, argv: list[str], faults: Path | None = None) -> None:
    """Run the tool's main() here (warm imports: seconds saved per run), the fault hooks logging
    into `faults` if given (forked pool workers inherit them)."""
    import importlib

    main = importlib.import_module(scenario.module).main
    if faults is not None:
        os.environ[FAULT_DIR_ENV] = str(faults)
    try:
        rc = main(argv)
    finally:
        os.environ.pop(FAULT_DIR_ENV, None)
    assert rc == 0, f"{scenario.name}: {' '.join(argv)} exited {rc}"


@dataclass
class Reference:
    output: dict[str, bytes]
    points: list[str]  # in the order passed, with RUN/STORE placeholders
    span: float  # seconds from the first point to the last


def template(text: str, run: Path, store: str) -> str:
    text = text.replace(str(run), RUN)
    return text.replace(store, STORE) if store else text


def concrete(text: str, run: Path, store: str) -> str:
    return text.replace(RUN, str(run)).replace(STORE, store)


def kind(point: str) -> str:
    """What a point is, for spreading a few kills over different kinds (numbers folded)."""
    return re.sub(r"\d+", "N", point)


def spread(points: list[str], n: int, rng: random.Random) -> list[str]:
    """`n` points, taking kinds in turn (so a few kills still hit plan, record, manifest, ...)."""
    by_kind: dict[str, list[str]] = {}
    for p in points:
        by_kind.setdefault(kind(p), []).append(p)
    for group in by_kind.values():
        rng.shuffle(group)
    kinds = sorted(by_kind)
    rng.shuffle(kinds)
    chosen = []
    while len(chosen) < min(n, len(points)):
        for k in kinds:
            if by_kind[k] and len(chosen) < n:
                chosen.append(by_kind[k].pop())
    return chosen


@dataclass
class Tally:
    scenario: str
    points: int = 0  # distinct points an uninterrupted run passes
    killed_at_points: int = 0
    random_kills: int = 0  # random-time kills that landed mid-run
    random_finished: int = 0  # random kills that came after the run had ended
    reruns_equal: int = 0
    samples_checked: int = 0
    seconds: float = 0.0
    kinds: list[str] = field(default_factory=list)


class Harness:
    def __init__(self, work: Path, data: TwinData, store_base: str | None = None):
        self.work, self.data, self.store_base = work, data, store_base
        self.runs = 0
        self.references: dict[str, Reference] = {}

    def fresh(self, scenario: Scenario) -> tuple[Path, str, Path]:
        self.runs += 1
        run = self.work / f"{scenario.name.replace('/', '-')}-{self.runs}"
        faults = run.parent / (run.name + "-faults")
        run.mkdir(parents=True)
        faults.mkdir()
        store = f"{self.store_base}/{run.name}" if scenario.remote else ""
        scenario.prepare(run)
        return run, store, faults

    def reference(self, scenario: Scenario) -> Reference:
        """An uninterrupted run (in this process), logging its points. A Ray scenario's equals its
        local pool twin's (the same bytes; tested), whose run logs what Ray's workers would."""
        if scenario.ray:
            twin = scenario.name.replace("/ray/", "/pool/")
            if twin not in self.references:
                self.references[twin] = self.reference(replace(scenario, name=twin, ray=False))
            return self.references[twin]
        run, store, faults = self.fresh(scenario)
        (faults / LOG_FILE).touch()
        in_process(scenario, on_pool(scenario.argv(run, store)), faults)
        points: dict[str, float] = {}
        for line in (faults / LOG_FILE).read_text().splitlines():
            t, _, name = line.split(" ", 2)
            points.setdefault(template(name, run, store), float(t))
        output = scenario.output(run, store)
        self.check(scenario, run, output)
        times = sorted(points.values())
        ref = Reference(output, sorted(points, key=points.get), times[-1] - times[0])
        self.references[scenario.name] = ref
        return ref

    def check(self, scenario: Scenario, run: Path, output: dict[str, bytes]) -> int:
        """Every caption on its own image (caption-shards: every line names an image of the input)."""
        if scenario.tool == "caption-shards":
            names = set(self.data.names)
            lines = [json.loads(x) for x in (run / "out" / "captions.jsonl").read_text().splitlines()]
            assert lines and all(line["image"] in names for line in lines)
            return len(lines)
        if scenario.remote:  # the store's objects as a folder, to read them back
            folder = run / "from-store"
            for name, data in output.items():
                if not name.endswith("stats.json"):
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_bytes(data)
            return check_labels(folder, self.data)
        return check_labels(run / "out", self.data)

    def kill_and_rerun(self, scenario: Scenario, ref: Reference, tally: Tally, at: str | None = None,
                       after: float | None = None) -> None:
        """Kill a run at the point `at` or `after` s past its first point, finish it, compare.
        Every second rerun of an s3:// scenario, the first included, starts from a fresh staging
        folder (a resume on another machine): the store alone must be enough."""
        run, store, faults = self.fresh(scenario)
        done = launch(scenario.module, scenario.argv(run, store), faults, kill_after=after,
                      at=concrete(at, run, store) if at is not None else None)
        what = f"{scenario.name}: kill at {at}" if at else f"{scenario.name}: kill {after:.2f} s into the work"
        if at is not None:
            assert done.killed, f"{what}: the run never reached the point"
            tally.killed_at_points += 1
        elif done.killed:
            tally.random_kills += 1
        else:
            tally.random_finished += 1
        elsewhere = scenario.remote and tally.reruns_equal % 2 == 0
        argv = on_pool(scenario.argv(run / "elsewhere" if elsewhere else run, store))
        in_process(scenario, argv + scenario.rerun_flags)
        output = scenario.output(run, store)
        diff = differences(output, ref.output)
        assert not diff, f"{what}: the rerun's output differs from an uninterrupted run's: {diff[:8]}"
        tally.reruns_equal += 1
        tally.samples_checked += self.check(scenario, run, output)

    def sweep(self, scenario: Scenario, points: int, randoms: int, rng: random.Random) -> Tally:
        start = time.monotonic()
        tally = Tally(scenario.name)
        ref = self.reference(scenario)
        tally.points = len(ref.points)
        chosen = spread(ref.points, points, rng)
        tally.kinds = sorted({kind(p) for p in chosen})
        for p in chosen:
            self.kill_and_rerun(scenario, ref, tally, at=p)
        for _ in range(randoms):
            self.kill_and_rerun(scenario, ref, tally, after=rng.uniform(0, ref.span))
        tally.seconds = round(time.monotonic() - start, 1)
        return tally


# --- set-up shared by the test and the command line ----------------------------------------------

def build_inputs(root: Path, with_captioner: bool = True) -> tuple[TwinData, Path, str | None]:
    """The twin input, its shards (what caption-shards and attach-captions start from) and a tiny
    random captioner folder."""
    from tools.captions import caption_shards
    from tools.convert import make_shards

    data = twin_dataset(root / "input")
    shards = root / "shards"
    assert make_shards.main([*data.make_shards_args(), *MAKE_SHARDS_ARGS, "--workers", "1", "--out", str(shards)]) == 0
    model = caption_shards.init_tiny(str(root / "tiny-blip")) if with_captioner else None
    return data, shards, model


@contextlib.contextmanager
def loopback_store(needed: bool):
    """The loopback S3 server while the context is open (when `needed`); yields a prefix in it."""
    if not needed:
        yield None
        return
    from s3_server import s3_server

    with s3_server(proxy=False) as server:
        yield server.url("kill")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.kill_harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=3, help="kill points per scenario (spread over kinds)")
    p.add_argument("--random", type=int, default=1, help="random-time kills per scenario")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios", help="comma-separated names (default: all); e.g. make-shards/pool/local")
    p.add_argument("--work", help="folder for the runs (default: a temporary folder, removed after)")
    p.add_argument("--json", help="write the tallies here")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        data, shards, model = build_inputs(work)
        chosen = scenarios(data, shards, model)
        if args.scenarios:
            wanted = set(args.scenarios.split(","))
            chosen = [s for s in chosen if s.name in wanted]
        store = stack.enter_context(loopback_store(any(s.remote for s in chosen)))
        harness = Harness(work / "runs", data, store)
        tallies = []
        print(f"{'scenario':28} {'points':>6} {'killed at':>9} {'random':>6} {'equal':>5} {'samples':>7} {'s':>6}")
        for scenario in chosen:
            t = harness.sweep(scenario, args.points, args.random, rng)
            tallies.append(t)
            print(f"{t.scenario:28} {t.points:6} {t.killed_at_points:9} {t.random_kills:6} {t.reruns_equal:5} "
                  f"{t.samples_checked:7} {t.seconds:6}", flush=True)
        per_tool: dict[str, int] = {}
        for t in tallies:
            tool = t.scenario.split("/")[0]
            per_tool[tool] = per_tool.get(tool, 0) + t.killed_at_points + t.random_kills
        print("kills exercised per tool: " + ", ".join(f"{k} {v}" for k, v in per_tool.items()))
        if args.json:
            Path(args.json).write_text(json.dumps([t.__dict__ for t in tallies], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
