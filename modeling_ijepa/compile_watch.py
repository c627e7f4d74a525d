# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""What `torch.compile` did during a run: graphs compiled, graphs compiled after warm-up, and whether dynamo hit its
recompile limit, past which the function it was compiling runs eagerly for the rest of the run (dynamo only logs it
once, deep in its own logs). `CompileWatch` is a `TrainerCallback`; `pretrain.py` adds it under `--torch_compile`."""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

# The logger of dynamo's frame conversion, which reports a hit recompile limit with a warning.
_DYNAMO_LOGGER = "torch._dynamo.convert_frame"


def dynamo_graph_count() -> int:
    """Graphs dynamo has compiled in this process since its counters were last cleared."""
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class _LimitHits(logging.Handler):
    """Collects dynamo's 'hit config.recompile_limit' warnings (the function names and the last reasons)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.messages.append(message)


class CompileWatch(TrainerCallback):
    """
    Watches dynamo during training. `graphs` / `graphs_after_warmup`: graphs compiled in all / after step
    `warmup_steps`; `limit_hits`: dynamo's recompile-limit warnings. Each hit is logged as a warning naming the
    fallback to eager; the end of training logs one summary line.
    """

    def __init__(self, warmup_steps: int = 10):
        self.warmup_steps = int(warmup_steps)
        self.graphs = 0
        self.graphs_after_warmup = 0
        self._graphs_at_warmup = None
        self._start = 0
        self._hits = _LimitHits()
        self._reported = 0

    @property
    def limit_hits(self) -> list[str]:
        return list(self._hits.messages)

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = dynamo_graph_count()
        logging.getLogger(_DYNAMO_LOGGER).addHandler(self._hits)

    def on_step_end(self, args, state, control, **kwargs):
        self.graphs = dynamo_graph_count() - self._start
        if state.global_step == self.warmup_steps:
            self._graphs_at_warmup = self.graphs
        if self._graphs_at_warmup is not None:
            self.graphs_after_warmup = self.graphs - self._graphs_at_warmup
        for message in self._hits.messages[self._reported :]:
            first_line = message.splitlines()[0]
            function = next((line.strip() for line in message.splitlines() if "function:" in line), "")
            logger.warning(
                "torch.compile fell back to eager at step %d: %s (%s); that function runs uncompiled from now on. "
                "Varying token counts under static shapes cause this: leave dynamic shapes on (the default) or pad "
                "the token counts to a few sizes (--compile_token_buckets true).",
                state.global_step,
                first_line,
                function,
            )
        self._reported = len(self._hits.messages)

    def on_train_end(self, args, state, control, **kwargs):
        logging.getLogger(_DYNAMO_LOGGER).removeHandler(self._hits)
        after = (
            f"{self.graphs_after_warmup} after step {self.warmup_steps}"
            if self._graphs_at_warmup is not None
            else f"run shorter than the {self.warmup_steps} warm-up steps"
        )
        logger.info(
            "torch.compile: %d graphs compiled (%s); recompile limit (%s) hit %d times",
            self.graphs,
            after,
            torch._dynamo.config.recompile_limit,
            len(self._hits.messages),
        )


__all__ = ["CompileWatch", "dynamo_graph_count"]
