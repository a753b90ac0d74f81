"""``bench.run --profile``: where each process group's CPU goes, sampled with py-spy.

py-spy attaches to a running process from outside (no change to the code under test) and
samples its Python stacks; ``--nonblocking`` never pauses it, and only threads on a CPU
are sampled (idle ones are left out), so the samples share out the group's CPU time.
Each group's samples are summed two ways: by the package whose code was running (the
innermost frame: ``sqlalchemy``, ``celery``, ``logging``, ``orders``...), and by function,
both self (the innermost frame) and inclusive (anywhere on the stack) for our own code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

#: Samples per second and process.
RATE = 97
#: Our packages: their functions are listed inclusively too.
OURS = ("orders", "sagas", "workers", "config")
#: A py-spy raw frame: ``function (path:line)``.
_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class GroupProfile:
    """One process group's samples, summed."""

    samples: int = 0
    by_package: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)
    ours_inclusive: Counter[str] = field(default_factory=Counter)

    def top(self, counter: Counter[str], n: int) -> list[tuple[str, float]]:
        """The ``n`` largest entries, as shares of the group's samples."""
        total = max(1, self.samples)
        return [(key, count / total) for key, count in counter.most_common(n)]


def package_of(path: str) -> str:
    """The package a source file belongs to. py-spy names a file relative to the entry of
    ``sys.path`` it was found under (``sqlalchemy/engine/default.py``, ``threading.py``,
    ``sagas/runner.py``): the first part is the package, or the module of a lone file.
    An absolute path is read the same way after ``site-packages`` or ``pythonX.Y``."""
    parts = Path(path).parts
    if Path(path).is_absolute():
        marks = [
            i
            for i, part in enumerate(parts)
            if part in ("site-packages", "dist-packages") or part.startswith("python3")
        ]
        if marks:
            parts = parts[marks[-1] + 1 :]
        for ours in OURS:
            if ours in parts:
                return ours
    if not parts:
        return path
    return parts[0].removesuffix(".py")


def _frame(raw: str) -> tuple[str, str]:
    match = _FRAME.match(raw.strip())
    if not match:
        return raw.strip(), ""
    return match["func"], match["path"]


def summarise(raw_files: list[Path]) -> GroupProfile:
    """Sum py-spy's raw (collapsed stack) output files."""
    profile = GroupProfile()
    for path in raw_files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_frame(f) for f in stack.split(";") if f]
            # py-spy puts "process ..." and "thread ..." pseudo-frames first
            frames = [(func, src) for func, src in frames if src]
            if not frames:
                continue
            profile.samples += count
            func, src = frames[-1]
            package = package_of(src)
            profile.by_package[package] += count
            profile.self_time[f"{package}: {func}"] += count
            seen = set()
            for func, src in frames:
                package = package_of(src)
                if package in OURS:
                    name = f"{Path(src).stem}.{func}"
                    if name not in seen:
                        seen.add(name)
                        profile.ours_inclusive[name] += count
    return profile


class Profiler:
    """py-spy on the root process of each Python group, children included."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.running: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        exe = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
        self.exe = exe

    def start(self, groups: dict[str, list[psutil.Process]], duration: float) -> None:
        """Sample every Python group for ``duration`` seconds."""
        self.base.mkdir(parents=True, exist_ok=True)
        for group, procs in groups.items():
            if group in ("postgres", "redis", "load generator"):
                continue
            pids = {p.pid for p in procs}
            for proc in procs:
                try:
                    if proc.ppid() in pids:
                        continue  # a child: sampled through its root
                except psutil.Error:
                    continue
                out = self.base / f"{group}-{proc.pid}.txt"
                command = [
                    self.exe,
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--subprocesses",
                    "--nonblocking",
                    "--rate",
                    str(RATE),
                    "--duration",
                    str(max(1, int(duration))),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ]
                popen = subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                self.running.append((group, out, popen))

    def stop(self) -> dict[str, GroupProfile]:
        """Wait for the samplers and sum each group's samples."""
        files: dict[str, list[Path]] = {}
        for group, out, popen in self.running:
            try:
                popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                popen.terminate()
                popen.wait()
            files.setdefault(group, []).append(out)
        self.running = []
        return {group: summarise(paths) for group, paths in sorted(files.items())}


def report(profiles: dict[str, GroupProfile], cpu_ms: dict[str, float], n: int = 12) -> str:
    """Markdown: per group, its CPU per saga shared out by package, then the top
    functions (self) and our own functions (inclusive)."""
    lines = [
        "## Profile (py-spy, CPU samples of each group's processes)",
        "",
        "Shares are of the group's samples; ms per saga = share x the group's CPU per saga.",
        "",
    ]
    for group, profile in profiles.items():
        ms = cpu_ms.get(group, 0.0)
        lines += [f"### {group}: {ms:.2f} ms CPU per saga, {profile.samples} samples", ""]
        lines += ["| package (innermost frame) | share | ms per saga |", "|---|---|---|"]
        for key, share in profile.top(profile.by_package, n):
            lines.append(f"| {key} | {share:.1%} | {share * ms:.2f} |")
        lines += ["", "| function (self) | share |", "|---|---|"]
        for key, share in profile.top(profile.self_time, n):
            lines.append(f"| `{key}` | {share:.1%} |")
        lines += ["", "| our function (inclusive) | share | ms per saga |", "|---|---|---|"]
        for key, share in profile.top(profile.ours_inclusive, n):
            lines.append(f"| `{key}` | {share:.1%} | {share * ms:.2f} |")
        lines.append("")
    return "\n".join(lines)
