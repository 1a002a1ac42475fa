"""Progress for people: a rich bar on a terminal, a plain line on stderr every so often elsewhere, nothing when
turned off; and switching third-party bars and chatter off with ours.

``progress`` settings mean the same everywhere:

- ``True``: a live bar when stderr is a terminal (or a notebook), otherwise a plain line every
  :data:`LINE_INTERVAL_S` seconds (a background run's log shows it is alive);
- ``None`` (the library default of :class:`~nabla.TestTimeTrainer`): the bar on a terminal, nothing elsewhere;
- ``False``: nothing, including transformers' and Lightning's bars (see :func:`silence_third_party`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

Mode = Literal["bar", "lines", "off"]
#: seconds between two plain progress lines
LINE_INTERVAL_S = 20.0

_console: Any = None
_quiet = False


def console() -> Any:
    """The one rich console on stderr that every nabla bar shares (nested bars then stack instead of fighting);
    it follows ``sys.stderr`` when that is redirected."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    return _console


def interactive() -> bool:
    """Whether stderr shows a live display: a terminal or a notebook."""
    shared = console()
    return bool(shared.is_terminal or shared.is_jupyter)


def mode(progress: bool | None) -> Mode:
    """What ``progress`` (``True`` / ``None`` / ``False``, see the module docstring) shows here."""
    if progress is False or _quiet:
        return "off"
    if interactive():
        return "bar"
    return "lines" if progress else "off"


def note(message: str) -> None:
    """One line on stderr, unless progress is silenced."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


class Lines:
    """Prints ``status()`` on stderr as one plain line now, then every ``interval`` seconds from a background
    thread, and once more at :meth:`stop` (with ``final`` when given)."""

    def __init__(self, status: Callable[[], str], interval: float = LINE_INTERVAL_S) -> None:
        self.status, self.interval = status, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Lines:
        self._print()
        self._thread = threading.Thread(target=self._run, name="nabla-progress", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._print()

    def _print(self, text: str | None = None) -> None:
        try:
            line = text if text is not None else self.status()
        except Exception:  # a status read mid-update: skip this line rather than break the run
            return
        print(line, file=sys.stderr, flush=True)

    def stop(self, final: str | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
            self._print(final)


class Counter:
    """Progress over ``total`` items, as :func:`mode` shows it: a rich bar with ``label``, ``done/total`` and a
    note on a terminal, a plain line every :data:`LINE_INTERVAL_S` seconds elsewhere, or nothing. A context
    manager; :meth:`advance` counts finished items and may change the note."""

    def __init__(self, label: str, total: int, done: int = 0, progress: bool | None = True, note: str = "") -> None:
        self.label, self.total, self.done, self.note = label, total, done, note
        self.shown = mode(progress)
        self.started = 0.0
        self._bar: Any = None
        self._lines: Lines | None = None

    def __enter__(self) -> Counter:
        self.started = time.monotonic()
        if self.shown == "lines":
            self._lines = Lines(self.status).start()
        elif self.shown == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                console=console(),
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, note=self._shown_note())
        return self

    def _shown_note(self) -> str:
        return f"· {self.note}" if self.note else ""

    def status(self) -> str:
        """The plain line: ``label: done/total · note · elapsed``."""
        parts = [f"{self.label}: {self.done}/{self.total}", self.note, elapsed_since(self.started)]
        return " · ".join(part for part in parts if part)

    def advance(self, count: int = 1, note: str | None = None) -> None:
        self.done += count
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.update(self._task, advance=count, note=self._shown_note())

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._lines is not None:
            self._lines.stop()


def lightning_progress(progress: bool | None, label: str) -> tuple[bool, list[Any]]:
    """``(enable_progress_bar, callbacks)`` for a ``lightning.Trainer`` that shows progress as the rest of nabla
    does: Lightning's rich bar on a terminal; elsewhere a plain line on stderr every :data:`LINE_INTERVAL_S`
    seconds (step, epoch, the last logged training loss), where Lightning's own bar would print nothing readable;
    nothing when off."""
    shown = mode(progress)
    if shown == "bar":
        from lightning.pytorch.callbacks import RichProgressBar

        return True, [RichProgressBar()]
    if shown == "lines":
        return False, [_training_lines(label)]
    return False, []


def _training_lines(label: str) -> Any:
    import lightning as L

    class TrainingLines(L.Callback):
        """Plain progress lines of a Lightning fit (see :func:`lightning_progress`)."""

        def __init__(self) -> None:
            self.trainer: Any = None
            self.total: float = float("inf")
            self.lines: Lines | None = None
            self.started = 0.0

        def status(self) -> str:
            trainer, total = self.trainer, self.total
            parts = [f"{label}: step {trainer.global_step}/{total if total != float('inf') else '?'}"]
            if trainer.max_epochs and trainer.max_epochs > 0:
                parts.append(f"epoch {min(trainer.current_epoch + 1, trainer.max_epochs)}/{trainer.max_epochs}")
            loss = next((v for k, v in trainer.callback_metrics.items() if "loss" in k and "val" not in k), None)
            if loss is not None:
                parts.append(f"loss {float(loss):.4f}")
            parts.append(elapsed_since(self.started))
            return " · ".join(parts)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.trainer, self.started = trainer, time.monotonic()
            self.total = trainer.estimated_stepping_batches  # once: it may read the dataloader
            self.lines = Lines(self.status).start()

        def _stop(self, ending: str) -> None:
            if self.lines is not None:
                self.lines.stop(f"{self.status()} · {ending}")
                self.lines = None

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._stop("done")

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self._stop("stopped")

    return TrainingLines()


@contextlib.contextmanager
def activity(message: str, progress: bool | None = True) -> Iterator[None]:
    """A transient spinner with ``message`` on a terminal, the message as one line elsewhere, or nothing."""
    shown = mode(progress)
    if shown == "bar":
        with console().status(message):
            yield
    else:
        if shown == "lines":
            note(message)
        yield


@contextlib.contextmanager
def silenced(enabled: bool = True) -> Iterator[None]:
    """Progress off inside the block: nabla's own bars and lines, transformers' and huggingface_hub's bars, tqdm
    bars created inside (``TQDM_DISABLE``, also for child processes) and Lightning's info chatter. Everything is
    restored on exit."""
    global _quiet
    if not enabled:
        yield
        return
    saved_env = {key: os.environ.get(key) for key in _QUIET_ENV}
    saved_levels = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    hf_bars = _hf_progress_bars(None)
    previous, _quiet = _quiet, True
    os.environ.update(_QUIET_ENV)
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        _quiet = previous
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        _hf_progress_bars(hf_bars)


_QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


def _hf_progress_bars(enabled: bool | None) -> bool:
    """Set transformers' progress bars on or off (``None``: off); returns whether they were on."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if enabled is None or not enabled:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()
    return was


@contextlib.contextmanager
def loading_quietly() -> Iterator[None]:
    """transformers' "Loading weights" bars off while models load (the caller's own progress covers loading)."""
    was = _hf_progress_bars(None)
    try:
        yield
    finally:
        _hf_progress_bars(was)


def quiet() -> bool:
    """Whether progress is silenced (inside :func:`silenced`)."""
    return _quiet


@contextlib.contextmanager
def muted_stderr(enabled: bool = True) -> Iterator[None]:
    """Swallow what third-party code writes to stderr inside the block (tqdm bars that were created with their
    settings fixed at import); errors still propagate as exceptions."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def elapsed_since(start: float) -> str:
    return format_seconds(time.monotonic() - start)
