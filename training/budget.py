"""A wall-clock training budget for the one trainer: the step count is fitted to the time.

``TimeBudget(seconds, most_steps, config)`` gives the trainer an ``on_step`` hook and a
``should_stop`` check. After ``WARMUP_STEPS`` (kernel compilation, allocator warm-up) it measures
the step rate and sets ``config.total_steps`` (the trainer reads it every step, so the cosine
schedule then ends at the budget), and fits it again every ``REFIT_STEPS``: the rate changes when
the GPU is shared or the clocks settle. The first fit also sets the warm-up to a tenth of the
fitted run (counted from step 0), once per schedule: ``fitted`` says it happened, and a caller
that keeps the schedule in a checkpoint keeps ``fitted`` with it, so a resumed run refits the
warm-up only when the killed run had not (killed in its first steps, its schedule still the step
limit's). The budget counts training time from ``start()``.
Used by personality fine-tuning (Train Avatar's minutes) and ``train --minutes`` on shards.
"""
from __future__ import annotations

import math
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
        self.spent_before = 0.0
        self.fitted = False
        self._clock: tuple[int, float] | None = None

    def start(self, first_step: int = 0, *, fitted: bool = False, spent_before: float = 0.0) -> None:
        """Start the clock. ``first_step``: the step a resumed run starts from (its budget,
        ``seconds``, counts its own steps). ``fitted``: ``config`` holds a schedule already fitted to
        this budget (restored from the killed run's checkpoint): its warm-up is kept. False (a fresh
        run, or one killed before its first fit): the first fit sets the warm-up too.
        ``spent_before``: training seconds the killed runs used (not part of ``seconds``), so that
        ``fraction_used`` is the whole job's."""
        self.started = time.perf_counter()
        self.first_step = int(first_step)
        self.fitted = bool(fitted)
        self.spent_before = float(spent_before)
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
            if not self.fitted:
                # Warm-up stays a tenth of the run, decided once per schedule: changing it later
                # would move the LR of steps already taken (a resumed fitted run keeps it).
                self.config.warmup_steps = min(self.config.warmup_steps, max(1, self.config.total_steps // 10))
                self.fitted = True

    def spent(self, step: int) -> bool:
        """True once the budget is used up (never before the first step)."""
        return self.seconds is not None and step > self.first_step and time.perf_counter() - self.started > self.seconds

    def fraction_used(self, step: int) -> float:
        """How far the job is at ``step``, 0..1: with a budget, the larger of the time used (the
        whole budget's, killed runs included) and the steps against ``config.total_steps`` (where the
        trainer stops, if that comes first); without one, the steps alone. Meaningful from the first
        step: it does not wait for the step count to be fitted."""
        by_steps = min(1.0, step / max(1, self.config.total_steps))
        if self.seconds is None:
            return by_steps
        whole = self.spent_before + self.seconds
        used = self.spent_before + (time.perf_counter() - self.started)
        return max(by_steps, min(1.0, used / whole) if whole > 0 else 1.0)

    def planned_steps(self, step: int) -> int:
        """The step count to report progress against at ``step``, so that step / planned_steps is
        ``fraction_used``: without a budget ``config.total_steps``; with one, the steps the run
        reaches at its average rate so far (never past ``config.total_steps``, and more than
        ``step`` until the time is up). Before the first fit ``config.total_steps`` is only the step
        limit (100000 for Train Avatar), which would show no progress at all."""
        fraction = self.fraction_used(step)
        if self.seconds is None or step <= 0 or fraction <= 0:
            return self.config.total_steps
        if fraction >= 1.0:
            return step
        return max(step + 1, min(self.config.total_steps, math.ceil(step / fraction)))
