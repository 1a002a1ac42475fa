"""Callbacks of the test-time trainer, in Lightning's manner: subclass :class:`Callback`, override the hooks you
need, pass instances to ``TestTimeTrainer(callbacks=[...])``. Hooks fire from the trainer only."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nabla.optimizer import StepRecord
    from nabla.policy import Rollout
    from nabla.trainer import DecodingState, FitResult, Revision, TestTimeTrainer


class Callback:
    """Base class; every hook is a no-op."""

    def on_fit_start(self, trainer: TestTimeTrainer, state: DecodingState) -> None: ...

    def on_rollout(self, trainer: TestTimeTrainer, state: DecodingState, rollout: Rollout) -> None: ...

    def on_dto_step(self, trainer: TestTimeTrainer, state: DecodingState, record: StepRecord) -> None: ...

    def on_revision(self, trainer: TestTimeTrainer, state: DecodingState, revision: Revision) -> None:
        """DTO and resampling changed a token; a proposal was rolled out (acceptance not yet decided)."""

    def on_accept(self, trainer: TestTimeTrainer, state: DecodingState, revision: Revision) -> None: ...

    def on_reject(self, trainer: TestTimeTrainer, state: DecodingState, revision: Revision) -> None: ...

    def on_fit_end(self, trainer: TestTimeTrainer, result: FitResult) -> None: ...


class ProgressBar(Callback):
    """A rich progress bar per prompt over its response's tokens, with rollouts and rejections so far."""

    def __init__(self, description: str = "∇-Reasoner") -> None:
        self.description = description
        self._progress: Any = None
        self._tasks: dict[int, Any] = {}
        self._open = 0

    def on_fit_start(self, trainer, state) -> None:
        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tokens · {task.fields[rollouts]} rollouts · {task.fields[rejections]} rejected"),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
                transient=True,
            )
            self._progress.start()
        self._open += 1
        self._tasks[id(state)] = self._progress.add_task(
            self.description, total=trainer.sampler.max_new_tokens, rollouts=0, rejections=0
        )

    def _refresh(self, trainer, state) -> None:
        task = self._tasks.get(id(state))
        if self._progress is None or task is None:
            return
        stats = state.meter.snapshot()
        self._progress.update(
            task, completed=len(state.committed), rollouts=int(stats["rollouts"]), rejections=int(stats["rejections"])
        )

    def on_rollout(self, trainer, state, rollout) -> None:
        self._refresh(trainer, state)

    def on_accept(self, trainer, state, revision) -> None:
        self._refresh(trainer, state)

    def on_reject(self, trainer, state, revision) -> None:
        self._refresh(trainer, state)

    def on_dto_step(self, trainer, state, record) -> None:
        if record.step == 0:
            self._refresh(trainer, state)

    def on_fit_end(self, trainer, result) -> None:
        self._open -= 1
        if self._open <= 0 and self._progress is not None:
            self._progress.stop()
            self._progress, self._tasks, self._open = None, {}, 0


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
