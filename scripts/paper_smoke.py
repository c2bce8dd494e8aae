"""`make paper-smoke`: the whole pipeline at the paper's sizes, with every count capped, in a copy.

    .venv/bin/python scripts/paper_smoke.py [--dir DIR] [--profile profiles/paper-smoke.yaml]

1. copies this checkout's working tree (tracked files and untracked ones git does not ignore, so
   uncommitted changes are tested too) into a new folder under $TMPDIR, a git repository of its
   own; nothing in this checkout is written;
2. applies the profile (default profiles/paper-smoke.yaml: profiles/paper.yaml plus the smoke
   caps) to the copy's params.yaml, as `vbiopsy profile` would, and prints every key it changes;
3. synthesises the copy's data/raw at the profile's sizes and records it in the copy's data.dvc;
4. runs `dvc repro` there (every stage, the gate last) under one parent MLflow run, in the copy's
   own MLflow store (mlruns/ of the copy; MLFLOW_TRACKING_URI is ignored), printing DVC's
   progress with the elapsed time;
5. prints the wall time (total and per stage), the peak RSS (the largest single process, and the
   whole process tree at its fullest, sampled every second), the gate's decisions, the copy's disk
   use and where it is. The copy is kept for inspection; remove it when done.

The code that runs is the copy's (scripts/python.sh puts the copy's src/ first); the interpreter
is this venv's (the one running this script), not a reinstall. Exit status 0 when every stage ran
and nothing is left stale, 1 otherwise (the failing step named). The gate rejecting the noise
models of a smoke run is a normal outcome, not a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROFILE = REPO / "profiles" / "paper-smoke.yaml"
BUDGET_S = 30 * 60  # issue 15: on 2 cores in 30 minutes or less
SAMPLE_EVERY_S = 1.0
# Environment of the outer shell that would send the copy's runs elsewhere.
FOREIGN_ENV = ("MLFLOW_TRACKING_URI", "VBIOPSY_PARENT_RUN_ID", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
               "MLFLOW_EXPERIMENT_NAME")
GIT_IDENTITY = ["-c", "user.name=paper-smoke", "-c", "user.email=paper-smoke@localhost"]
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


class SmokeError(RuntimeError):
    """A step of the smoke run failed; the message names the step."""


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def gib(kib: float) -> str:
    return f"{kib / 2**20:.2f} GiB"


# --- the copy --------------------------------------------------------------------------------------
def working_tree_files(repo: Path) -> list[str]:
    """Paths (relative) of the files of the working tree: tracked, plus untracked that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=repo, check=True, capture_output=True).stdout.decode()
    return sorted({p for p in listed.split("\0") if p and (repo / p).is_file()})  # a deleted file is skipped


def git(copy: Path, *args: str) -> None:
    subprocess.run(["git", *GIT_IDENTITY, *args], cwd=copy, check=True, capture_output=True)


def copy_working_tree(repo: Path, dest: Path) -> str:
    """``repo``'s working tree copied into ``dest`` as a fresh one-commit git repository; returns its description."""
    for relative in working_tree_files(repo):
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / relative, target, follow_symlinks=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=repo,
                           capture_output=True, text=True).stdout.strip()
    described = f"{head or 'no commit'}{' + uncommitted changes' if dirty else ''}"
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", f"paper-smoke: working tree of {repo} at {described}")
    return described


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``dotted`` = "a.b.c" (as `dvc exp run -S a.b.c=value` sets it)."""
    *sections, key = dotted.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[key] = value


def apply_profile(copy: Path, profile: Path) -> dict[str, tuple[Any, Any]]:
    """Lay ``profile`` over the copy's params.yaml; returns key -> (params.yaml value, applied value) of what changed."""
    from virtual_biopsy.cli.profile import profile_overrides, profile_params
    from virtual_biopsy.core.config import flatten, load_params, read_yaml

    params_file = copy / "params.yaml"
    before = flatten(load_params(params_file))
    overrides = profile_overrides(profile, params_file)  # refuses an unknown key or a bad value, naming the profile
    tree = read_yaml(params_file.read_text())
    for dotted, value in overrides.items():
        set_dotted(tree, dotted, value)
    params_file.write_text(
        f"# params.yaml of {REPO.name} with {profile.name} applied (scripts/paper_smoke.py)\n"
        + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    applied = load_params(params_file)
    if applied != profile_params(profile, copy / "params.yaml"):
        raise SmokeError(f"{params_file}: the written params differ from {profile} applied to params.yaml")
    after = flatten(applied)
    return {key: (before.get(key), after[key]) for key in sorted(after) if before.get(key) != after[key]}


# --- running commands in the copy -------------------------------------------------------------------
def copy_env() -> dict[str, str]:
    """The environment of every command in the copy: this venv, the copy's own MLflow store."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env["VIRTUAL_ENV"] = sys.prefix  # scripts/python.sh's first choice: this venv, no reinstall
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("NPY_DISABLE_CPU_FEATURES", "X86_V4")  # as the Makefile (scripts/python.sh says why)
    return env


def stage_threads(copy: Path, env: dict[str, str]) -> str:
    """Torch threads of the stages that run no fold job: the caller's OMP_NUM_THREADS, else the fold jobs' count.

    scripts/python.sh pins one thread for reproducible numbers; a smoke run wants speed, and its
    fold jobs already run on ``executor.cpus_per_job`` threads.
    """
    from virtual_biopsy.core.config import load_params

    env.setdefault("OMP_NUM_THREADS", str(load_params(copy / "params.yaml").executor.cpus_per_job))
    return env["OMP_NUM_THREADS"]


def project_command(*args: str) -> list[str]:
    """A command run as the copy's stages run: `sh scripts/python.sh -m ...` (the copy's src/ first)."""
    return ["sh", "scripts/python.sh", "-m", *args]


def run_step(what: str, command: list[str], copy: Path, env: dict[str, str]) -> str:
    """Run one preparation command in the copy; its stdout, or SmokeError with its output."""
    done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SmokeError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")
    return done.stdout


# --- memory of the process tree ----------------------------------------------------------------------
def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, resident KiB) of every process readable in /proc."""
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/statm") as statm:
                resident = int(statm.read().split()[1]) * page_kib
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        table[int(entry.name)] = (int(fields[1]), resident)
    return table


def tree_rss_kib(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants together (KiB)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += table.get(pid, (0, 0))[1]
        stack.extend(children.get(pid, ()))
    return total


@dataclass
class StageClock:
    """Start time and peak tree RSS of every stage DVC announced, in order."""
    started: dict[str, float] = field(default_factory=dict)
    peak_kib: dict[str, int] = field(default_factory=dict)
    current: str | None = None
    tree_peak_kib: int = 0

    def begin(self, stage: str, at: float) -> None:
        self.started[stage] = at
        self.peak_kib[stage] = 0
        self.current = stage

    def sample(self, kib: int) -> None:
        self.tree_peak_kib = max(self.tree_peak_kib, kib)
        if self.current is not None:
            self.peak_kib[self.current] = max(self.peak_kib[self.current], kib)

    def durations(self, end: float) -> list[tuple[str, float, int]]:
        names = list(self.started)
        ends = [self.started[n] for n in names[1:]] + [end]
        return [(n, e - self.started[n], self.peak_kib[n]) for n, e in zip(names, ends)]


@dataclass
class ReproResult:
    returncode: int
    wall_s: float
    ended_at: float  # time.monotonic() when dvc repro ended
    max_process_kib: int  # ru_maxrss of the reaped tree: the largest single process
    clock: StageClock


def run_repro(copy: Path, env: dict[str, str]) -> ReproResult:
    """`dvc repro` in the copy, its output streamed with the elapsed time, its memory measured."""
    clock = StageClock()
    start = time.monotonic()
    proc = subprocess.Popen(project_command("dvc", "repro"), cwd=copy, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    done = threading.Event()

    def stream() -> None:
        for line in proc.stdout:
            now = time.monotonic()
            match = STAGE_LINE.match(line)
            if match:
                clock.begin(match.group(1), now)
            print(f"[{minutes(now - start)}] {line}", end="", flush=True)

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY_S):
            clock.sample(tree_rss_kib(proc.pid))

    threads = [threading.Thread(target=stream, daemon=True), threading.Thread(target=sample, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)  # the stages end their MLflow runs as KILLED
        os.wait4(proc.pid, 0)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    end = time.monotonic()
    done.set()
    threads[0].join(timeout=10)
    return ReproResult(proc.returncode, end - start, end, usage.ru_maxrss, clock)


# --- the report ---------------------------------------------------------------------------------------
def disk_use_bytes(folder: Path) -> int:
    """Bytes on disk under ``folder``, each hard-linked file once (DVC's cache may link to the outputs)."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def gate_decisions(copy: Path) -> list[str]:
    gate_file = copy / "reports" / "gate.json"
    if not gate_file.exists():
        return ["no reports/gate.json"]
    report = json.loads(gate_file.read_text())
    return [f"{arch}: {entry.get('decision')} ({'; '.join(entry.get('reasons') or []) or 'every check passed'})"
            for arch, entry in report.items()]


def print_report(copy: Path, profile: Path, described: str, changed: dict, prepare_s: float,
                 repro: ReproResult, total_s: float, failure: str | None) -> None:
    print()
    say(f"paper-smoke {'FAILED: ' + failure if failure else 'passed: every stage ran, through the gate'}")
    print(f"  profile      {profile} applied to params.yaml of {described} ({len(changed)} keys changed)")
    budget = "within" if total_s <= BUDGET_S else "OVER"
    print(f"  wall time    {minutes(total_s)} in all ({budget} the {BUDGET_S // 60}-minute budget on 2 cores): "
          f"copy + synth {minutes(prepare_s)}, dvc repro {minutes(repro.wall_s)}")
    print(f"  peak RSS     {gib(repro.max_process_kib)} the largest single process (ru_maxrss of dvc repro's tree); "
          f"{gib(repro.clock.tree_peak_kib)} the whole tree at its fullest (sampled every {SAMPLE_EVERY_S:g} s)")
    print("  per stage    (time, peak RSS of the whole tree while it ran)")
    for name, seconds, kib in repro.clock.durations(repro.ended_at):
        print(f"    {name:<40} {minutes(seconds):>7}  {gib(kib):>10}")
    if not failure:
        print("  gate         " + "\n               ".join(gate_decisions(copy)))
    print(f"  copy         {copy} ({disk_use_bytes(copy) / 2**30:.1f} GiB; remove it with: rm -rf {copy})")
    print(f"  MLflow UI    {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri "
          f"sqlite:///{copy / 'mlruns' / 'mlflow.db'} --port 5000")


# --- the whole run ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the copy goes (must not exist or be empty; default: a new folder under $TMPDIR)")
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE,
                        help="profile to apply (default: profiles/paper-smoke.yaml)")
    return parser.parse_args(argv)


def make_copy_dir(requested: Path | None) -> Path:
    if requested is None:
        return Path(tempfile.mkdtemp(prefix="vbiopsy-paper-smoke-"))
    if requested.exists() and any(requested.iterdir()):
        raise SmokeError(f"{requested}: exists and is not empty; name a new folder with --dir")
    requested.mkdir(parents=True, exist_ok=True)
    return requested.resolve()


def prepare(copy: Path, profile: Path, env: dict[str, str]) -> tuple[str, dict]:
    """Copy, apply the profile, synthesise and record the dataset; returns (what was copied, changed keys)."""
    say(f"Copying the working tree of {REPO} into {copy}")
    described = copy_working_tree(REPO, copy)
    say(f"Applying {profile.name} to the copy's params.yaml (key: params.yaml -> applied)")
    changed = apply_profile(copy, profile)
    for key, (before, after) in changed.items():
        print(f"    {key}: {before!r} -> {after!r}")
    say("Synthesising the copy's data/raw at the profile's synth sizes, recording it in its data.dvc")
    run_step("vbiopsy synth", project_command("virtual_biopsy.cli", "synth", "--out", "data/raw"), copy, env)
    run_step("dvc commit data.dvc", project_command("dvc", "commit", "-q", "-f", "data.dvc"), copy, env)
    git(copy, "add", "params.yaml", "data.dvc")
    git(copy, "commit", "-q", "-m", f"paper-smoke: {profile.name} applied, its dataset recorded")
    return described, changed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = args.profile.resolve()
    start = time.monotonic()
    copy: Path | None = None
    try:
        copy = make_copy_dir(args.dir)
        env = copy_env()
        described, changed = prepare(copy, profile, env)
        threads = stage_threads(copy, env)
        say(f"Every stage computes on {threads} torch thread(s) (OMP_NUM_THREADS; fold jobs: executor.cpus_per_job)")
        prepare_s = time.monotonic() - start
        parent = run_step("vbiopsy pipeline start", project_command("virtual_biopsy.cli", "pipeline", "start"),
                          copy, env).strip()
        env["VBIOPSY_PARENT_RUN_ID"] = parent
        say("dvc repro in the copy (every stage, the gate last)")
        try:
            repro = run_repro(copy, env)
        except KeyboardInterrupt:
            run_step("vbiopsy pipeline finish", project_command("virtual_biopsy.cli", "pipeline", "finish",
                                                                "--aborted", parent), copy, env)
            raise
        failure = None
        if repro.returncode != 0:
            stage = list(repro.clock.started)[-1] if repro.clock.started else "before the first stage"
            failure = f"dvc repro exited {repro.returncode} (last stage started: {stage})"
        else:
            stale = subprocess.run(project_command("dvc", "status", "--quiet"), cwd=copy, env=env)
            if stale.returncode != 0:
                failure = "pipeline outputs are out of date after dvc repro (dvc status in the copy shows which)"
        finish = ["pipeline", "finish", parent] if failure is None else ["pipeline", "finish", "--aborted", parent]
        run_step("vbiopsy pipeline finish", project_command("virtual_biopsy.cli", *finish), copy, env)
        print_report(copy, profile, described, changed, prepare_s, repro, time.monotonic() - start, failure)
        return 0 if failure is None else 1
    except SmokeError as exc:
        print(f"paper-smoke: {exc}", file=sys.stderr)
        if copy is not None:
            print(f"paper-smoke: the copy is at {copy}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\npaper-smoke: interrupted; the copy is at {copy}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
