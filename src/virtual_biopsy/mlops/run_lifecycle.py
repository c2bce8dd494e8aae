"""How runs end: no run stays RUNNING.

    A stage run and its nested runs end FINISHED when their block completes, FAILED when it
    raises, KILLED when the process is stopped: while a run is open, SIGTERM, SIGINT and SIGHUP
    raise :class:`Interrupted` (a KeyboardInterrupt) in the main thread, so every ``with`` block
    closes its run, and once they are closed the signal is handed to the handler that was there
    before (SIGTERM still kills the process, so DVC and torchrun see it die of the signal). Only
    the main thread of the process that opened the run reacts: torchrun ranks other than 0 open
    no run (NullRun) and keep their handlers; forked DataLoader workers get the previous handlers
    back at the fork. Runs of a process that could not react (SIGKILL, the OOM killer, a crash, a
    rank SIGKILLed by torchrun while blocked in a collective) carry the tag ``process`` (host, PID
    namespace, PID, start time); the next stage on that host marks them KILLED.

    The parent is RUNNING while one of its stages runs and ended otherwise: each stage reopens it
    when it starts and, when it ends, closes it if no stage run under it is still RUNNING (the last
    stage to end sees every other one ended, so the parent is never left RUNNING). Its status is
    then the pipeline's so far, judged by the latest attempt of each stage (run name): FAILED if
    one failed, else KILLED if one was killed, else FINISHED; its end time is the end of the latest
    stage, so its duration spans the whole pipeline run. This holds for an implicit parent (a bare
    ``dvc repro``) and for a pinned one; ``vbiopsy pipeline finish`` closes a pinned parent for
    good with the headline metrics.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROCESS_TAG = "process"  # host/pid-namespace:pid:start-ticks of the process that holds the run open
KILLED_BY_TAG = "killed_by"  # SIGTERM, SIGINT, ... or "process gone"


SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
FORCE_AFTER_S = 3.0  # a repeat of the signal later than this no longer waits for the runs to close


class Interrupted(KeyboardInterrupt):
    """A termination signal raised as an exception (``signum`` says which), so ``with`` blocks,
    ``finally`` clauses and every ``except KeyboardInterrupt`` (Optuna's trial FAIL) run."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _SignalState:
    depth = 0  # nesting of signals_as_exceptions (main thread only)
    previous: dict[int, Any] = {}
    owner_pid: int | None = None
    defer = 0  # nesting of deferred_signals
    pending: int | None = None
    fired_at: float | None = None


_signals = _SignalState()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _hand_to_previous(signum: int, frame: Any = None) -> None:
    """Do with ``signum`` what the process would have done had we not been installed."""
    previous = _signals.previous.get(signum, signal.SIG_DFL)
    if previous == signal.SIG_IGN:
        return
    if callable(previous):
        previous(signum, frame)  # Python's SIGINT handler raises KeyboardInterrupt
        return
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)  # default action: the process ends, killed by this signal


def _on_signal(signum: int, frame: Any) -> None:
    state = _signals
    # A process forked while we were installed (a DataLoader worker) inherits this handler; it
    # owns no run, so it reacts as it would have without us.
    if os.getpid() != state.owner_pid or state.depth == 0:
        _hand_to_previous(signum, frame)
        return
    if state.fired_at is not None:
        if time.monotonic() - state.fired_at < FORCE_AFTER_S:
            return  # a repeat (the terminal and a supervisor both sent it): the runs are being closed
        _restore_handlers()
        _hand_to_previous(signum, frame)  # asked again while closing hangs: give up on the runs
        return
    if state.defer:
        state.pending = state.pending or signum
        return
    state.fired_at = time.monotonic()
    raise Interrupted(signum)


def _restore_handlers() -> None:
    for signum, previous in _signals.previous.items():
        if signal.getsignal(signum) is _on_signal:  # replaced by someone since: leave theirs
            signal.signal(signum, previous)


_fork_masks = threading.local()


def _block_before_fork() -> None:
    # A signal that reaches a forked child before CPython re-initialises its signal state there is
    # dropped (the child's pending flags are cleared), so a worker forked a moment before a
    # Ctrl-C or killpg would survive it. Blocked across the fork, the signal waits in the kernel
    # and reaches the child once its handlers are back to the previous ones (_restore_in_child).
    _fork_masks.mask = None
    if _signals.depth and _signals.previous and os.getpid() == _signals.owner_pid:
        _fork_masks.mask = signal.pthread_sigmask(signal.SIG_BLOCK, list(_signals.previous))


def _unblock_after_fork() -> None:
    mask, _fork_masks.mask = getattr(_fork_masks, "mask", None), None
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _restore_in_child() -> None:
    """A forked child (a DataLoader worker) owns no run: it gets the handlers it would have had.

    A signal that arrived since the fork is pending: one with the default disposition kills the
    child when it is unblocked, as it would have without us; one for a Python handler (SIGINT's
    KeyboardInterrupt) is dropped, as CPython drops every signal that reaches a child before its
    signal state is reset (raised here, inside the fork hook, it would be swallowed anyway).
    """
    if getattr(_fork_masks, "mask", None) is not None:
        for signum, previous in _signals.previous.items():
            signal.signal(signum, previous)
        if hasattr(signal, "sigtimedwait"):
            for signum in signal.sigpending() & {s for s, h in _signals.previous.items() if callable(h)}:
                signal.sigtimedwait([signum], 0)
    _signals.depth, _signals.owner_pid, _signals.pending, _signals.fired_at = 0, None, None, None
    _signals.defer = 0
    _unblock_after_fork()


_fork_hooks: list[bool] = []


def _register_fork_hooks() -> None:
    if not _fork_hooks and hasattr(os, "register_at_fork") and hasattr(signal, "pthread_sigmask"):
        os.register_at_fork(before=_block_before_fork, after_in_parent=_unblock_after_fork,
                            after_in_child=_restore_in_child)
        _fork_hooks.append(True)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Inside this block SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` in the main thread.

    Nested blocks share one installation. Leaving the outermost restores the previous handlers
    and, when it is left by an :class:`Interrupted`, hands the signal to the previous handler
    (default SIGTERM: the process dies of it now; Python's SIGINT: KeyboardInterrupt goes on up).
    A signal that was ignored (``nohup``, a background job) stays ignored; a handler set outside
    Python is left alone; in other threads this is a no-op. Processes forked inside the block
    start with the previous handlers.
    """
    state = _signals
    if not _main_thread():
        yield
        return
    if state.depth == 0:
        _register_fork_hooks()
        state.owner_pid, state.previous, state.pending, state.fired_at = os.getpid(), {}, None, None
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN or previous is None:
                continue
            state.previous[signum] = previous
            signal.signal(signum, _on_signal)
    state.depth += 1
    owner = state.owner_pid
    left = False
    try:
        yield
    except Interrupted as exc:
        left = True
        if os.getpid() == owner and state.owner_pid == owner:  # not a forked child unwinding our frames
            state.depth -= 1
            if state.depth == 0:
                _restore_handlers()
                state.pending = None
                _hand_to_previous(exc.signum)
        raise
    finally:
        if not left and os.getpid() == owner and state.owner_pid == owner:
            state.depth -= 1
            if state.depth == 0:
                _restore_handlers()
                pending, state.pending = state.pending, None
                if pending is not None:  # held by a deferral that outlived the block: never lose it
                    _hand_to_previous(pending)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold a signal that arrives in this block (short bookkeeping: create or close a run) and
    raise it as :class:`Interrupted` when the block is left."""
    state = _signals
    if not _main_thread():
        yield
        return
    state.defer += 1
    try:
        yield
    finally:
        state.defer = max(0, state.defer - 1)  # a forked child starts at 0 (_restore_in_child)
        if state.defer == 0 and state.pending is not None and state.depth > 0 and os.getpid() == state.owner_pid:
            signum, state.pending = state.pending, None
            state.fired_at = time.monotonic()
            raise Interrupted(signum)


def run_ending(exc: BaseException) -> tuple[str, str | None]:
    """(MLflow status, what killed it) of a run whose block raised ``exc``."""
    if isinstance(exc, Interrupted):
        return "KILLED", signal.Signals(exc.signum).name
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", "KeyboardInterrupt"
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return "FINISHED", None
    return "FAILED", None


# ---------------------------------------------------------------------------------------------
# Which process holds a run open (to close the runs of processes that died without a word)
# ---------------------------------------------------------------------------------------------
def host_scope() -> str | None:
    """This host and PID namespace (PIDs mean something only there); None off Linux."""
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def process_identity(pid: int | None = None) -> str | None:
    """``host/pidns:pid:start-ticks`` of a live process (a reused PID has another start time)."""
    scope = host_scope()
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if scope is None:
        return None
    return f"{scope}:{pid}:{stat.rsplit(')', 1)[1].split()[19]}"


def reap_orphans(client, exp_id: str) -> None:
    """Mark KILLED the RUNNING runs of processes of this host that are gone (SIGKILL, OOM, crash)."""
    scope = host_scope()
    if scope is None:
        return
    found = client.search_runs([exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.{PROCESS_TAG} LIKE '{scope}:%'",
                               max_results=1000)
    for run in found:
        owner = run.data.tags.get(PROCESS_TAG, "")
        if not owner.startswith(f"{scope}:"):
            continue
        pid = owner[len(scope) + 1:].split(":", 1)[0]
        if pid.isdigit() and process_identity(int(pid)) != owner:
            client.set_tag(run.info.run_id, KILLED_BY_TAG, "process gone")
            client.set_terminated(run.info.run_id, status="KILLED")


def best_effort(what: str, call, *args: Any) -> Any:
    """Parent bookkeeping never fails a stage: say what went wrong and go on."""
    try:
        return call(*args)
    except Exception as exc:
        print(f"tracking: {what} failed: {exc}", file=sys.stderr)
        return None
