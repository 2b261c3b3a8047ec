"""What a training run reports while it runs, and how it is asked to stop.

:class:`RunLog` writes one line per optimizer step to ``metrics.jsonl`` and drives the progress
bar (both on rank 0 only); :class:`StopRequest` turns the first SIGINT/SIGTERM into a request to
stop after the current step.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "StopRequest"]


class StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks to stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            # Second Ctrl-C: the user insists; stop now (the step is rolled back).
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handler for the duration of the ``with`` block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # handlers can only be set from the main thread; KeyboardInterrupt still works
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old.clear()


class RunLog:
    """The progress bar and ``metrics.jsonl`` of a run, and the tokens it has trained on.

    Parameters
    ----------
    metrics_path : path-like or None
        ``metrics.jsonl`` to append to; None writes no metrics (ranks other than 0).
    total, initial : int
        Steps of the run and steps already done, for the progress bar.
    progress : bool
        Show the progress bar.
    """

    def __init__(
        self, metrics_path: Path | None, *, total: int, initial: int, progress: bool
    ) -> None:
        self.tokens = 0
        self.bar = _progress_bar(total=total, initial=initial, enabled=progress)
        self.metrics = (
            open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115
            if metrics_path is not None
            else None
        )

    def record(
        self,
        *,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens: int,
        seconds: float,
        epoch: float,
    ) -> None:
        """Count ``tokens``; write the step's metrics line and advance the bar.

        Parameters
        ----------
        step : int
            Optimizer steps done, this one included.
        loss, lr, grad_norm : float
            The step's loss (averaged over ranks), learning rate and gradient norm.
        tokens : int
            Tokens of the step over all ranks.
        seconds : float
            Wall time of the step.
        epoch : float
            Passes over the data so far.
        """
        self.tokens += tokens
        if self.metrics is not None:
            line = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / seconds,
                "epoch": round(epoch, 4),
            }
            self.metrics.write(json.dumps(line) + "\n")
            self.metrics.flush()
        if self.bar is not None:
            # the update below redraws at the bar's own rate (not every step)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:,.0f}", lr=f"{lr:.2e}", refresh=False
            )
            self.bar.update(1)

    def close(self) -> None:
        """Close the bar and the metrics file."""
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


class _LineWriter:
    """A stream for tqdm that writes each redraw as its own line: in a log file the bar then
    reads as periodic plain lines instead of one line of carriage returns."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _progress_bar(*, total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    kw: dict[str, Any] = {"total": total, "initial": initial, "unit": "step", "desc": "train"}
    if sys.stderr.isatty():
        return tqdm(dynamic_ncols=True, **kw)
    # not a terminal (a log file, CI): a plain line every 30 s at most
    return tqdm(file=_LineWriter(sys.stderr), mininterval=30.0, ncols=100, **kw)
