"""Continuous batching of prompt coroutines.

Each prompt's work is a coroutine (a generator) that yields what it needs from the models (a rollout, an objective
evaluation, a batch of samples) and returns its result. A :class:`PromptPool` keeps ``size`` of them running: every
round, one ``serve`` call answers all pending requests together (so requests of different prompts share passes),
and a finished prompt's slot is refilled from the queue at once, its first request joining the next round.

A prompt's result does not depend on the pool: each coroutine draws from its own generator and sees only its own
answers, so what changes with the pool is which rows share a batch, not what any row computes.

Wall time is apportioned so that the prompts' shares add up to the run's time: the time a coroutine spends in its
own code (between two requests) is its own, and each round's serving time is split equally among the prompts
it served.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from nabla.errors import ConfigurationError

Coroutine = Generator[Any, Any, Any]
Serve = Callable[[dict[int, Any]], dict[int, Any]]


@dataclass
class Finished:
    """A prompt done: its index in the queue, what its coroutine returned (or the error that ended it, of a type
    the pool was told to catch) and its share of the wall time."""

    index: int
    result: Any
    wall_time_s: float
    error: BaseException | None = None


class PromptPool:
    """Runs prompt coroutines ``size`` at a time, all pending requests of a round answered by one ``serve`` call.

    Args:
        serve: answers ``{index: request}`` with ``{index: answer}`` for every index it was given.
        size: how many prompts run at once (``None``: all of them).
        catch: errors that end one prompt rather than the run: raised by a prompt's coroutine, they finish that
            prompt with :attr:`Finished.error`; raised by ``serve`` for a round of several prompts, the round is
            served again one request at a time (answers do not depend on the batch), so that only the prompts
            whose own request fails are ended.
    """

    def __init__(self, serve: Serve, size: int | None = None, catch: tuple[type[BaseException], ...] = ()) -> None:
        if size is not None and size < 1:
            raise ConfigurationError(f"the pool size must be >= 1 or null (got {size}); 1 is one prompt at a time")
        self.serve = serve
        self.size = size
        self.catch = catch
        #: prompts served together in each round (for throughput reports and tests)
        self.round_sizes: list[int] = []

    def run(self, count: int, start: Callable[[int], Coroutine]) -> Iterator[Finished]:
        """Start ``start(0)``, ``start(1)``, ... up to ``count`` as slots free up; yield each as it finishes.

        Prompts finish in any order; ``Finished.index`` says which one it is.
        """
        capacity = count if self.size is None else self.size
        queue = iter(range(count))
        running: dict[int, Coroutine] = {}
        pending: dict[int, Any] = {}
        elapsed: dict[int, float] = {}
        done: list[Finished] = []

        def end(index: int, result: Any, error: BaseException | None, extra: float) -> None:
            pending.pop(index, None)
            running.pop(index).close()
            done.append(Finished(index, result, elapsed.pop(index) + extra, error))

        def step(index: int, advance: Callable[[], Any]) -> None:
            """Run prompt ``index`` to its next request (or its end), the time spent counted as its own."""
            started = time.perf_counter()
            try:
                pending[index] = advance()
            except StopIteration as stop:
                end(index, stop.value, None, time.perf_counter() - started)
                return
            except self.catch as error:
                end(index, None, error, time.perf_counter() - started)
                return
            elapsed[index] += time.perf_counter() - started

        def refill() -> None:
            while len(running) < capacity:
                index = next(queue, None)
                if index is None:
                    return
                started = time.perf_counter()
                running[index] = start(index)
                elapsed[index] = time.perf_counter() - started
                step(index, running[index].__next__)

        refill()
        yield from _drain(done)
        while pending:
            requests = dict(pending)
            started = time.perf_counter()
            answers, errors = self._answer(requests)
            share = (time.perf_counter() - started) / len(requests)
            self.round_sizes.append(len(requests))
            for index in sorted(requests):
                elapsed[index] += share
                if index in errors:
                    end(index, None, errors[index], 0.0)
                else:
                    step(index, functools.partial(running[index].send, answers[index]))
                yield from _drain(done)
                refill()
                yield from _drain(done)

    def _answer(self, requests: dict[int, Any]) -> tuple[dict[int, Any], dict[int, BaseException]]:
        """``serve(requests)``; with a caught error, each request alone, to find whose it is."""
        try:
            answers = self.serve(requests)
        except self.catch as error:
            if len(requests) == 1:
                return {}, {index: error for index in requests}
            answers, errors = {}, {}
            for index, request in requests.items():
                try:
                    answers.update(self.serve({index: request}))
                except self.catch as alone:
                    errors[index] = alone
            return answers, errors
        if set(answers) != set(requests):
            raise RuntimeError(f"serve answered {sorted(answers)} for requests {sorted(requests)}")
        return answers, {}


def _drain(done: list[Finished]) -> Iterator[Finished]:
    while done:
        yield done.pop(0)
