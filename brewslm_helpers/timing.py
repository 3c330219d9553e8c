"""Timing helpers: wall-clock stopwatches and per-token timestamps from ``generate``."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from transformers.generation.streamers import BaseStreamer


@contextmanager
def stopwatch(results: dict, key: str):
    """``with stopwatch(times, "train"): ...`` stores the elapsed seconds in ``times["train"]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        results[key] = time.perf_counter() - start


class TokenTimes(BaseStreamer):
    """A ``generate`` streamer that records ``time.perf_counter()`` as each new token arrives.

    ``generate`` first calls ``put`` with the prompt, then once per generated token.
    """

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def timed_generate(model, input_ids: torch.Tensor, max_new_tokens: int,
                   use_cache: bool = True) -> tuple[torch.Tensor, float, list[float]]:
    """Greedy ``generate`` for one prompt (``input_ids`` ``[1, T]``), exactly ``max_new_tokens``.

    Returns ``(output_ids [1, T + n], t_start, token_times)`` where ``t_start`` is the
    ``perf_counter`` time just before ``generate`` and ``token_times[i]`` when token ``i`` arrived
    (seconds). Token 0 arrives after the prefill; the rest are decode steps.
    """
    streamer = TokenTimes()
    t_start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=use_cache, streamer=streamer,
                         pad_token_id=model.config.eos_token_id)
    return out, t_start, streamer.times
