"""A wall-clock training budget for the one trainer: the step count is fitted to the time.

``TimeBudget(seconds, most_steps, config)`` gives the trainer an ``on_step`` hook and a
``should_stop`` check. After ``WARMUP_STEPS`` (kernel compilation, allocator warm-up) it measures
the step rate and sets ``config.total_steps`` (the trainer reads it every step, so the cosine
schedule then ends at the budget), and fits it again every ``REFIT_STEPS``: the rate changes when
the GPU is shared or the clocks settle. The budget counts training time from ``start()``.
Used by personality fine-tuning (Train Avatar's minutes) and ``train --minutes`` on shards.
"""
from __future__ import annotations

import time

WARMUP_STEPS = 10
REFIT_STEPS = 25


class TimeBudget:
    def __init__(self, seconds: float | None, most_steps: int, config) -> None:
        self.seconds = seconds
        self.most_steps = int(most_steps)
        self.config = config  # the trainer's TrainerConfig (total_steps, warmup_steps are updated)
        self.started = time.perf_counter()
        self.first_step = 0
        self._clock: tuple[int, float] | None = None

    def start(self, first_step: int = 0) -> None:
        """Start the clock; ``first_step``: the step a resumed run starts from (its budget counts
        its own steps)."""
        self.started = time.perf_counter()
        self.first_step = int(first_step)
        self._clock = None

    def on_step(self, step: int) -> None:
        if self.seconds is None:
            return
        done = step - self.first_step
        if done == WARMUP_STEPS:
            self._clock = (step, time.perf_counter())
        elif self._clock is not None and done % REFIT_STEPS == 0:
            clock_step, clock_time = self._clock
            now = time.perf_counter()
            seconds_per_step = (now - clock_time) / (step - clock_step)
            remaining = max(0.0, self.seconds - (now - self.started))
            self.config.total_steps = max(step + 1, min(self.most_steps, step + int(remaining / seconds_per_step)))
            if done == REFIT_STEPS and self.first_step == 0:  # warm-up stays a tenth of the run, decided once
                self.config.warmup_steps = min(self.config.warmup_steps, max(1, self.config.total_steps // 10))

    def spent(self, step: int) -> bool:
        """True once the budget is used up (never before the first step)."""
        return self.seconds is not None and step > self.first_step and time.perf_counter() - self.started > self.seconds
