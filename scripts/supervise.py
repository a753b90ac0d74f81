"""Run a Procfile's processes and keep them running (``make run`` does, through
``scripts.run``; alone: ``python -m scripts.supervise [-f Procfile]``).

Each line runs as ``sh -c COMMAND`` in a process group of its own, its output printed
line by line behind its name, as honcho prints it. A process that exits, whatever the
reason (a crash, a ``kill -9``, a worker shut down from Flower), is started again after
a backoff: 1 s, doubling up to 30 s, back to 1 s once it stayed up a minute; what it
left behind in its group is killed first. The supervisor says which process exited,
with which code or signal, and when it starts again. Only SIGINT (Ctrl-C), SIGTERM or SIGHUP
stops everything: SIGTERM to every group, SIGKILL to what is left after
``stop_timeout`` (at once on a second signal).

Standard library and honcho's Procfile parser and printer only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from honcho.colour import get_colours
from honcho.environ import parse_procfile
from honcho.printer import Message, Printer

#: The name the supervisor's own lines are printed under.
SYSTEM = "system"


@dataclass(frozen=True)
class Backoff:
    """How long a process that exited waits before it starts again."""

    #: The first restart's delay; each quick exit after it doubles the delay...
    first: float = 1.0
    #: ... up to this.
    cap: float = 30.0
    #: A process that stayed up this long exited for a reason of its own: its next
    #: restart waits ``first`` again.
    stable_after: float = 60.0

    def delay(self, quick_exits: int) -> float:
        """The delay after this many exits in a row that came too soon (0 for the first)."""
        return float(min(self.cap, self.first * 2**quick_exits))


@dataclass
class Program:
    """One Procfile line and the process that runs it now."""

    name: str
    command: str
    colour: str | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    #: Exits in a row that came before ``Backoff.stable_after``.
    quick_exits: int = 0
    restarts: int = 0
    #: When to start it again (monotonic), while it waits after an exit.
    start_at: float | None = 0.0
    reader: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Starts the programs, restarts each one that exits, stops them all on a signal."""

    def __init__(
        self,
        programs: Mapping[str, str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        backoff: Backoff = Backoff(),
        stop_timeout: float = 10.0,
        output: IO[str] = sys.stdout,
    ) -> None:
        colours = get_colours()
        self.programs = [Program(name, cmd, next(colours)) for name, cmd in programs.items()]
        self.env = {"PYTHONUNBUFFERED": "1", **(os.environ if env is None else env)}
        self.cwd = cwd
        self.backoff = backoff
        self.stop_timeout = stop_timeout
        self.printer = Printer(output, width=max(len(SYSTEM), *map(len, programs)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._received: list[int] = []

    @classmethod
    def from_procfile(cls, path: Path, **options: Any) -> Supervisor:
        """A supervisor of every line of the Procfile at ``path``."""
        processes = parse_procfile(path.read_text()).processes
        if not processes:
            raise ValueError(f"{path}: no processes")
        return cls(dict(processes), **options)

    def say(self, text: str, name: str = SYSTEM, colour: str | None = None) -> None:
        """Print one line behind ``name``."""
        message = Message("line", text, datetime.datetime.now(), name, colour)
        with self._lock:
            self.printer.write(message)

    def run(self) -> int:
        """Supervise until SIGINT, SIGTERM or SIGHUP (the terminal closed); then stop
        everything and return 0."""
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for program in self.programs:
                    if program.process is not None and program.process.poll() is not None:
                        self._exited(program, now)
                    if program.start_at is not None and program.start_at <= now:
                        self._start(program)
                self._stop.wait(0.1)
            self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # No printing here: the main thread may be printing (and hold the lock).
        self._received.append(signum)
        self._stop.set()
        if len(self._received) > 1:  # a second Ctrl-C: no more waiting
            for program in self.programs:
                _signal_group(program, signal.SIGKILL)

    def _start(self, program: Program) -> None:
        program.start_at = None
        program.started_at = time.monotonic()
        try:
            process = subprocess.Popen(
                ["/bin/sh", "-c", program.command],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self.say(f"{program.name} could not start: {exc}")
            self._schedule(program, time.monotonic(), quick=True)
            return
        program.process = process
        again = f", restart {program.restarts}" if program.restarts else ""
        self.say(f"{program.name} started (pid={process.pid}{again})")
        program.reader = threading.Thread(
            target=self._relay, args=(program, process), name=f"output-{program.name}", daemon=True
        )
        program.reader.start()

    def _relay(self, program: Program, process: subprocess.Popen[bytes]) -> None:
        """Print the process's output line by line until every writer is gone."""
        assert process.stdout is not None
        for line in iter(process.stdout.readline, b""):
            self.say(line.decode("utf-8", "replace").rstrip("\n"), program.name, program.colour)
        process.stdout.close()

    def _exited(self, program: Program, now: float) -> None:
        process = program.process
        assert process is not None
        program.process = None
        # What it left in its group (a worker's pool, a shell's children) goes with it.
        _kill_group(process.pid, signal.SIGKILL)
        uptime = now - program.started_at
        delay = self._schedule(program, now, quick=uptime < self.backoff.stable_after)
        at = datetime.datetime.now() + datetime.timedelta(seconds=delay)
        self.say(
            f"{program.name} (pid={process.pid}) {_how(process.returncode)} after {uptime:.1f} s;"
            f" restart {program.restarts} in {delay:g} s, at {at:%H:%M:%S}"
        )

    def _schedule(self, program: Program, now: float, *, quick: bool) -> float:
        if not quick:
            program.quick_exits = 0
        delay = self.backoff.delay(program.quick_exits)
        program.quick_exits += 1
        program.restarts += 1
        program.start_at = now + delay
        return delay

    def _stop_all(self) -> None:
        """SIGTERM every group, wait, SIGKILL what is left; wait for the output."""
        self.say(f"{signal.Signals(self._received[0]).name} received: stopping every process")
        running = [p for p in self.programs if p.process is not None]
        for program in running:
            assert program.process is not None
            self.say(f"sending SIGTERM to {program.name} (pid={program.process.pid})")
            _signal_group(program, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for program in running:
            assert program.process is not None
            try:
                program.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{program.name} still runs: sending SIGKILL")
            # The rest of its group (a leader that exited before its children).
            _kill_group(program.process.pid, signal.SIGKILL)
            code = program.process.wait()
            self.say(f"{program.name} (pid={program.process.pid}) {_how(code)}")
        for program in running:
            if program.reader is not None:
                program.reader.join(5)


def _signal_group(program: Program, sig: signal.Signals) -> None:
    if program.process is not None and program.process.poll() is None:
        _kill_group(program.process.pid, sig)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left in it
        os.killpg(pgid, sig)


def _how(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def main(argv: list[str] | None = None) -> int:
    """Supervise a Procfile in this directory."""
    parser = argparse.ArgumentParser(prog="python -m scripts.supervise", description=__doc__)
    parser.add_argument("-f", "--procfile", type=Path, default=Path("Procfile"))
    parser.add_argument("--backoff", type=float, default=Backoff.first, help="first delay (s)")
    parser.add_argument("--backoff-max", type=float, default=Backoff.cap, help="longest (s)")
    parser.add_argument(
        "--stable-after", type=float, default=Backoff.stable_after, help="uptime that resets it"
    )
    parser.add_argument("--stop-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    supervisor = Supervisor.from_procfile(
        args.procfile,
        backoff=Backoff(args.backoff, args.backoff_max, args.stable_after),
        stop_timeout=args.stop_timeout,
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
