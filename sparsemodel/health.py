"""Routing health: the experts each MoE layer starves or floods, over each log interval.

An expert is dead when it got under 10% of the balanced load (1/E of the layer's
assignments) over the interval, overloaded when it got over 300%. The train loop logs both
counts per layer at the end of every interval of train.log_every steps, and prints one
line when a layer has had dead or overloaded experts for moe.health_intervals intervals in
a row (again every moe.health_intervals intervals while it lasts). Streaks start afresh
when a run resumes.
"""

from __future__ import annotations

import numpy as np

DEAD, OVERLOADED = 0.1, 3.0  # multiples of the balanced load


def unbalanced_experts(load_le: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the experts under DEAD and over OVERLOADED times the balanced load:
    load_le [L, E], fractions of each layer's assignments -> (dead [L], overloaded [L])."""
    load_le = np.asarray(load_le)
    relative = load_le * load_le.shape[-1]  # 1 = balanced
    return (relative < DEAD).sum(-1), (relative > OVERLOADED).sum(-1)


class RoutingHealth:
    """Accumulates the per-layer loads of each log interval; see the module docstring."""

    def __init__(self, every: int, patience: int):
        self.every, self.patience = every, patience
        self._load_sum: np.ndarray | None = None  # [L, E] summed over the interval's steps
        self._steps = 0
        self._streak: np.ndarray | None = None  # [L] intervals in a row with unbalanced experts

    def add(self, step: int, load_le) -> tuple[dict, str | None]:
        """Adds one step's loads [L, E]. At the end of an interval (step % every == 0):
        the counts to log (dead_experts, overloaded_experts: one per layer) and the warning
        line or None; otherwise ({}, None)."""
        load_le = np.asarray(load_le, np.float64)
        self._load_sum = load_le if self._load_sum is None else self._load_sum + load_le
        self._steps += 1
        if step % self.every:
            return {}, None
        dead, overloaded = unbalanced_experts(self._load_sum / self._steps)
        self._load_sum, self._steps = None, 0
        unhealthy = (dead + overloaded) > 0
        streak = np.zeros(len(dead), int) if self._streak is None else self._streak
        self._streak = np.where(unhealthy, streak + 1, 0)
        counts = {"dead_experts": dead.tolist(), "overloaded_experts": overloaded.tolist()}
        return counts, self._warning(step, dead, overloaded)

    def _warning(self, step: int, dead, overloaded) -> str | None:
        due = np.flatnonzero((self._streak > 0) & (self._streak % self.patience == 0))
        if not len(due):
            return None
        layers = "; ".join(
            f"layer {i}: {dead[i]} dead, {overloaded[i]} overloaded ({self._streak[i]} intervals)"
            for i in due
        )
        return (
            f"warning: step {step}: MoE experts dead (under {DEAD:.0%} of the balanced load) "
            f"or overloaded (over {OVERLOADED:.0%}) for {self.patience}+ log intervals in a "
            f"row: {layers}"
        )
