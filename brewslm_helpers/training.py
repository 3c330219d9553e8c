"""A plain training loop shared by lessons that train a model with a loss they define."""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm


def require_trl(tested: str, compares: str, module: str) -> None:
    """Fail loudly if the installed TRL is not ``tested``: ``module``'s checks against TRL were
    written for that version. ``compares`` says what they compare, with ``{tested}`` in it."""
    import trl

    if trl.__version__ != tested:
        raise RuntimeError(
            f"{compares.format(tested=tested)}, but trl {trl.__version__} is installed: run `make setup` "
            f"(pyproject.toml pins it), or re-check {module} against the new TRL and update TRL_TESTED")


def train_loop(model: torch.nn.Module, batches: Iterable[dict],
               loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor], steps: int,
               lr: float = 1e-4, weight_decay: float = 0.0, desc: str = "train",
               seed: int = 0) -> list[float]:
    """Run ``steps`` AdamW steps of ``loss_fn(model, batch)`` over ``batches`` (cycled).

    ``loss_fn`` returns a scalar tensor; the loop owns the optimiser, the progress bar and the
    loss history it returns (one float per step). The model is left in eval mode.
    """
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    history = []
    batch_iter = itertools.cycle(batches)
    for _ in tqdm(range(steps), desc=desc):
        loss = loss_fn(model, next(batch_iter))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append(float(loss.detach()))
    model.eval()
    return history
