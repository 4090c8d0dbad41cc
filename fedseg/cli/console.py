"""Output for humans and scripts: rich progress bars on a terminal, plain log lines otherwise.

Library code never prints; commands hand it `Reporter.log` and `Reporter.progress` callbacks.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


PLAIN_LINE_SECONDS = 10.0


@dataclass
class Reporter:
    quiet: bool = False
    interactive: bool = field(default_factory=lambda: sys.stderr.isatty())

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """Yield `advance(n=1, info="")`: a progress bar on a terminal, occasional log lines otherwise."""
        if self.quiet:
            yield lambda *args, **kwargs: None
            return
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            ) as bar:
                task = bar.add_task(description, total=total, info="")

                def advance(n: int = 1, info: str = "") -> None:
                    bar.update(task, advance=n, info=info)

                yield advance
            return
        done = [0]
        start = time.monotonic()
        last_line = [start]
        # A log file gets about ten lines per task (every 10 % and the last step), or one every
        # PLAIN_LINE_SECONDS when the total is unknown, not one per iteration.
        step = max(1, total // 10) if total else None

        def advance_plain(n: int = 1, info: str = "") -> None:
            before, done[0] = done[0], done[0] + n
            now = time.monotonic()
            if step is not None:
                due = done[0] >= total or done[0] // step > before // step
            else:
                due = now - last_line[0] >= PLAIN_LINE_SECONDS
            if not due:
                return
            last_line[0] = now
            of = f"/{total}" if total else ""
            suffix = f" {info}" if info else ""
            print(f"{description}: {done[0]}{of} ({now - start:.1f}s){suffix}", file=sys.stderr, flush=True)

        yield advance_plain


def print_json(obj: object) -> None:
    import json

    print(json.dumps(obj, indent=2, default=str))
