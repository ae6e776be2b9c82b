"""Per-step timing of mechlib's decode loops, for the generation benchmark (issue 11's diagnosis).

Why: a decode step's wall time can be spent on the GPU or on the host (Python, dynamo guards,
launch overhead). With CUDA events recorded around each step, the event interval of a CUDA-graph
replay is the GPU's own time for the step (one launch, the kernels run back to back); for a step
that launches its kernels one by one from Python the interval also holds the host's launch gaps,
so there it approaches the wall time. Comparing the two per method is the diagnosis.

Off by default and nearly free then (one attribute read per step); on only inside
:meth:`StepTimer.recording`. The timer is mechlib's object; nothing is hung on the model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class StepTimes:
    """What one :meth:`StepTimer.recording` block saw: decode steps, their host wall time and CUDA-event times."""

    steps: int = 0
    wall_s: float = 0.0  # host time of the decode loops (first step issued -> loop done, device synced)
    event_ms: list[float] = field(default_factory=list)  # CUDA-event interval per step (CUDA only)
    _pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list, repr=False)

    @property
    def wall_ms_per_step(self) -> float | None:
        return 1000 * self.wall_s / self.steps if self.steps else None

    @property
    def event_ms_per_step(self) -> float | None:
        return sum(self.event_ms) / len(self.event_ms) if self.event_ms else None

    def settle(self) -> None:
        """Read the recorded events (needs a device sync; done once, after the loops)."""
        if self._pairs:
            torch.cuda.synchronize()
            self.event_ms += [a.elapsed_time(b) for a, b in self._pairs]
            self._pairs.clear()


class StepTimer:
    """Records per-step CUDA events and loop wall time while :meth:`recording` is active."""

    def __init__(self) -> None:
        self.active: StepTimes | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[StepTimes]:
        """Time every decode step inside the block; the result is complete when the block ends."""
        times = StepTimes()
        self.active = times
        try:
            yield times
        finally:
            self.active = None
            times.settle()

    def loop_start(self) -> float:
        return time.perf_counter()

    def loop_end(self, t0: float, steps: int, device: torch.device) -> None:
        times = self.active
        if times is None:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.wall_s += time.perf_counter() - t0
        times.steps += steps

    def begin(self, device: torch.device) -> torch.cuda.Event | None:
        """An event recorded before a step (None when not recording or not on CUDA)."""
        if self.active is None or device.type != "cuda":
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def end(self, start: torch.cuda.Event | None) -> None:
        if start is None or self.active is None:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.active._pairs.append((start, ev))


STEP_TIMER = StepTimer()  # the one mechlib's decode loops report to
