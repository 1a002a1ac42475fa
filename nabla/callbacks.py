"""Callbacks of the test-time trainer, in Lightning's manner: subclass :class:`Callback`, override the hooks you
need, pass instances to ``TestTimeTrainer(callbacks=[...])``. Hooks fire from the trainer only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from nabla.optimizer import StepRecord
    from nabla.policy import Rollout
    from nabla.trainer import DecodingState, FitResult, Revision, TestTimeTrainer


class Callback:
    """Base class; every hook is a no-op."""

    def on_fit_start(self, trainer: TestTimeTrainer, state: DecodingState) -> None:
        """A prompt's decoding starts, before its first rollout (``state.rollout`` is still ``None``)."""

    def on_generate(self, trainer: TestTimeTrainer, state: DecodingState, tokens: int) -> None:
        """A rollout of this prompt has generated ``tokens`` tokens so far (called after every decoding step, for
        progress; it must not draw from ``state.generator``)."""

    def on_rollout(self, trainer: TestTimeTrainer, state: DecodingState, rollout: Rollout) -> None:
        """The loop adopted ``rollout`` (the first one, or an accepted proposal)."""

    def on_dto_step(self, trainer: TestTimeTrainer, state: DecodingState, record: StepRecord) -> None: ...

    def on_revision(self, trainer: TestTimeTrainer, state: DecodingState, revision: Revision) -> None:
        """DTO and resampling changed a token; a proposal was rolled out (acceptance not yet decided)."""

    def on_accept(self, trainer: TestTimeTrainer, state: DecodingState, revision: Revision) -> None: ...

    def on_reject(self, trainer: TestTimeTrainer, state: DecodingState, revision: Revision) -> None: ...

    def on_fit_end(self, trainer: TestTimeTrainer, result: FitResult) -> None: ...

    def on_exception(self, trainer: TestTimeTrainer, error: BaseException) -> None:
        """``fit`` / ``fit_batch`` is about to raise ``error`` (an interrupt included)."""


@dataclass
class _Fit:
    """What the progress display knows of one prompt's decoding."""

    budget: int
    committed: int = 0
    generating: int | None = None
    rollouts: int = 0
    rejections: int = 0
    dto: str | None = None
    done: bool = False


class ProgressBar(Callback):
    """Progress of each fit from its first token, without touching what is decoded.

    On a terminal (or a notebook): a rich bar over the response's committed tokens, with the rollout being
    generated or the DTO step under way, and the rollouts and rejections so far. Elsewhere (``mode="lines"``, or
    ``"auto"`` when stderr is not a terminal) a plain line on stderr every ``interval`` seconds. A ``fit_batch``
    shows one bar for the whole batch.

    Args:
        description: the label of the bar and of every line.
        mode: ``"bar"``, ``"lines"``, or ``"auto"`` (the bar on a terminal, lines elsewhere).
        interval: seconds between two plain lines.
    """

    def __init__(
        self, description: str = "∇-Reasoner", mode: Literal["auto", "bar", "lines"] = "auto", interval: float = 20.0
    ) -> None:
        if mode not in ("auto", "bar", "lines"):
            raise ValueError(f"mode must be auto, bar or lines (got {mode!r})")
        self.description, self.mode, self.interval = description, mode, interval
        self._fits: dict[int, _Fit] = {}
        self._display: Any = None
        self._task: Any = None
        self._started = 0.0

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, state) -> None:
        if self._fits and all(fit.done for fit in self._fits.values()):
            self._close()
        self._fits[id(state)] = _Fit(budget=trainer.sampler.max_new_tokens, generating=0, rollouts=1)
        if self._display is None:
            self._open()
        self._refresh()

    def on_generate(self, trainer, state, tokens) -> None:
        fit = self._fits.get(id(state))
        if fit is not None:
            if fit.generating is None:
                fit.rollouts = int(state.meter.rollouts) + 1
                fit.dto = None
            fit.generating = tokens
            self._refresh()

    def on_rollout(self, trainer, state, rollout) -> None:
        self._settle(state)

    def on_dto_step(self, trainer, state, record) -> None:
        fit = self._fits.get(id(state))
        if fit is not None:
            fit.generating = None
            fit.committed = len(state.committed)
            fit.dto = f"DTO at token {fit.committed}, step {record.step + 1}/{trainer.optimizer.steps}"
            self._refresh()

    def on_accept(self, trainer, state, revision) -> None:
        self._settle(state)

    def on_reject(self, trainer, state, revision) -> None:
        self._settle(state)

    def on_fit_end(self, trainer, result) -> None:
        for fit in self._fits.values():  # results end in the order their prompts started
            if not fit.done:
                fit.done = True
                fit.committed = len(result.token_ids)
                fit.rollouts = int(result.stats.get("rollouts", fit.rollouts))
                fit.rejections = int(result.stats.get("rejections", fit.rejections))
                fit.generating = fit.dto = None
                break
        if all(fit.done for fit in self._fits.values()):
            self._close()
        else:
            self._refresh()

    def on_exception(self, trainer, error) -> None:
        self._close(failed=True)

    # ------------------------------------------------------------------ display
    def _settle(self, state) -> None:
        fit = self._fits.get(id(state))
        if fit is None:
            return
        fit.generating = None
        fit.dto = "gradient pass"  # what comes next: the DTO gradient of the new rollout (or the final score)
        fit.rollouts = int(state.meter.rollouts)
        fit.rejections = int(state.meter.rejections)
        if state.rollout is not None:
            fit.committed = len(state.committed)
        self._refresh()

    def _totals(self) -> tuple[int, int, str]:
        fits = list(self._fits.values())
        committed = sum(fit.committed for fit in fits)
        budget = sum(fit.budget for fit in fits)
        rollouts = sum(fit.rollouts for fit in fits)
        rejections = sum(fit.rejections for fit in fits)
        active = [fit for fit in fits if not fit.done]
        doing = None
        if len(fits) > 1:
            doing = f"{len(fits) - len(active)}/{len(fits)} prompts done"
        elif active:
            fit = active[0]
            doing = f"rollout {fit.rollouts}: {fit.generating} tokens" if fit.generating is not None else fit.dto
        parts = [doing] if doing else []
        parts.append(f"{rollouts} rollout{'s' * (rollouts != 1)} · {rejections} rejected")
        return committed, budget, " · ".join(parts)

    def _status(self) -> str:
        from nabla.progress import elapsed_since

        committed, budget, detail = self._totals()
        return f"{self.description}: {committed}/{budget} tokens · {detail} · {elapsed_since(self._started)}"

    def _open(self) -> None:
        import time

        from nabla import progress

        self._started = time.monotonic()
        shown = {"auto": "bar" if progress.interactive() else "lines"}.get(self.mode, self.mode)
        if shown == "lines":
            self._display = progress.Lines(self._status, self.interval).start()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._display = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tokens · {task.fields[detail]}"),
            TimeElapsedColumn(),
            console=progress.console(),
            transient=True,
        )
        self._display.start()
        self._task = self._display.add_task(self.description, total=1, detail="starting")

    def _refresh(self) -> None:
        if self._task is None:
            return
        committed, budget, detail = self._totals()
        self._display.update(self._task, completed=committed, total=budget, detail=detail)

    def _close(self, failed: bool = False) -> None:
        display, self._display, self._task = self._display, None, None
        if display is not None:
            if hasattr(display, "add_task"):
                display.stop()
            else:
                from nabla.progress import elapsed_since

                committed, _, detail = self._totals()
                ending = "stopped after" if failed else "done in"
                display.stop(
                    f"{self.description}: {ending} {elapsed_since(self._started)} · {committed} tokens · {detail}"
                )
        self._fits = {}


class LoggerCallback(Callback):
    """Sends DTO steps and the fit's statistics to a Lightning logger (``lightning.pytorch.loggers.Logger``)."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.global_step = 0

    def on_dto_step(self, trainer, state, record) -> None:
        metrics = {"dto/loss": record.loss, "dto/lr": record.lr, "dto/update_norm": record.update_norm}
        if record.reward is not None:
            metrics["dto/reward"] = record.reward
        if record.log_likelihood is not None:
            metrics["dto/log_likelihood"] = record.log_likelihood
        self.logger.log_metrics(metrics, step=self.global_step)
        self.global_step += 1

    def on_fit_end(self, trainer, result) -> None:
        metrics = {f"fit/{key}": float(value) for key, value in result.stats.items()}
        if result.reward is not None:
            metrics["fit/reward"] = result.reward
        self.logger.log_metrics(metrics, step=self.global_step)
        self.logger.save()
