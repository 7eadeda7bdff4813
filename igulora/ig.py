"""Parameter-space Integrated Gradients of the adapters (method.md, sections 2 and 4).

Two ways to evaluate the path integral ``IG = theta * int_0^1 dL/dtheta(alpha theta) d alpha``:

- :func:`integrated_gradients` evaluates the quadrature nodes one by one (the reference; also the
  user-facing attribution API with a completeness check);
- :func:`batched_ig_loss` stacks node copies of an IG sub-batch next to the training batch, so
  one forward/backward yields the training gradient (in ``.grad``) and the IG estimate (in each
  layer's ``ig_buffers``).

On the path every adapter output is scaled by ``alpha^3``; autograd through that forward returns
``alpha * g(alpha)``, so node j contributes ``(w_j / alpha_j) * autograd_j``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from igulora.layer import IGULoraLinear, RowPlan
from igulora.quadrature import Quadrature, quadrature

Batch = Mapping[str, torch.Tensor]
RowLossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]

ADAPTER_PARAMS = ("lora_A", "lora_E", "lora_B")


def adapter_layers(model: nn.Module) -> dict[str, IGULoraLinear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IGULoraLinear)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no IGULoraLinear adapters; call get_igu_model")
    return layers


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters keyed as in ``model.named_parameters()``."""
    return {
        f"{name}.{p}": getattr(layer, p)
        for name, layer in adapter_layers(model).items()
        for p in ADAPTER_PARAMS
    }


@contextlib.contextmanager
def path_point(model: nn.Module, alpha: float) -> Iterator[None]:
    """Evaluate the model at ``alpha * theta``: every adapter output scaled by alpha^3."""
    layers = adapter_layers(model).values()
    for layer in layers:
        layer.node_scale = alpha**3
    try:
        yield
    finally:
        for layer in layers:
            layer.node_scale = 1.0


@dataclass
class IGResult:
    attributions: dict[str, torch.Tensor]
    loss: float  # L(theta)
    baseline_loss: float  # L(0), the base model
    delta: float  # sum(attributions) - (loss - baseline_loss): the completeness residual

    @property
    def total(self) -> float:
        return float(sum(a.sum() for a in self.attributions.values()))


def integrated_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    batch: Batch,
    *,
    steps: int,
    rule: str = "gauss_legendre",
    seed: int = 0,
    grid: int = 20,
) -> IGResult:
    """IG of every adapter parameter along ``alpha * theta`` from the zero adapter.

    ``loss_fn(model, batch)`` returns a scalar. Nodes are evaluated one by one; ``.grad`` is not
    touched. ``seed`` and ``grid`` only matter for ``rule="stochastic"``.
    """
    params = adapter_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    quad = quadrature(rule, steps, grid=grid, generator=generator)
    with torch.no_grad():
        loss = float(loss_fn(model, batch))
        with path_point(model, 0.0):
            baseline_loss = float(loss_fn(model, batch))
    path_grad = {name: torch.zeros_like(p) for name, p in params.items()}
    for alpha, weight in quad:
        with path_point(model, alpha):  # backward too: a checkpointed block recomputes its forward
            grads = _gradients(model, loss_fn(model, batch), list(params.values()))
        for acc, g in zip(path_grad.values(), grads):
            if g is not None:
                acc.add_(g, alpha=weight / alpha)
    attributions = {name: (params[name] * acc).detach() for name, acc in path_grad.items()}
    result = IGResult(attributions, loss, baseline_loss, delta=0.0)
    result.delta = result.total - (loss - baseline_loss)
    return result


def _gradients(model: nn.Module, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``d loss / d params`` by ``backward()``, every ``.grad`` of ``model`` left as it was.

    Not ``torch.autograd.grad``: it cannot see into reentrant checkpointed blocks (it would
    return None for their adapters).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in trainable]
    for p in trainable:
        p.grad = None
    try:
        loss.backward()
        return [p.grad for p in params]
    finally:
        for p, grad in zip(trainable, saved):
            p.grad = grad


# ----------------------------------------------------------------------------------------------
# Batched node evaluation


@dataclass
class NodeBatch:
    """A training batch stacked with node copies of an IG sub-batch.

    ``batch`` holds the stacked inputs: rows [0, n_train) are the training batch (alpha = 1),
    then one block of ``len(ig_index)`` rows per node in ``nodes`` (those with alpha < 1; the
    alpha = 1 node is evaluated on the full training batch). ``groups`` numbers each row's loss
    group: 0 = training, j = node j.
    """

    batch: dict[str, torch.Tensor]
    plan: RowPlan
    groups: torch.Tensor
    ig_index: torch.Tensor
    quadrature: Quadrature


# Per-token inputs and their rank when their dim 1 is the sequence (a 4-D attention mask is a
# custom mask, labels may be per example): these must agree on the sequence length.
TOKEN_DIMS = {"input_ids": 2, "inputs_embeds": 3, "attention_mask": 2, "token_type_ids": 2}


def batch_rows(batch: Batch) -> int:
    """The number of rows of a training batch, with an error naming what is wrong with it: not a
    mapping, a key holding a list (not a tensor), no tensor, tensors of different lengths or token
    inputs of different sequence lengths (TOKEN_DIMS), no row. Other non-tensor values (flags such
    as ``use_cache``) are passed to the model as they are."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of model inputs (a dict), got {type(batch).__name__}")
    for key, value in batch.items():
        if isinstance(value, (list, tuple)):
            raise TypeError(
                f"batch[{key!r}] is a {type(value).__name__}; pass tensors (e.g. tokenizer(..., "
                "return_tensors='pt') or a DataCollator's output)"
            )
    sizes = {k: v.shape[0] if v.dim() else None for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if not sizes:
        raise ValueError(f"batch holds no tensors (keys: {sorted(batch)})")
    if len(set(sizes.values())) > 1 or None in sizes.values():
        raise ValueError(f"batch tensors disagree on the batch size (dim 0): {sizes}")
    tokens = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == TOKEN_DIMS.get(k)}
    lengths = {k: v.shape[1] for k, v in tokens.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"batch tensors disagree on the sequence length (dim 1): {lengths}")
    rows = next(iter(sizes.values()))
    if rows == 0:
        raise ValueError(f"batch is empty: its tensors have 0 rows ({sorted(sizes)})")
    return rows


def ig_row_count(ig_fraction: float, n_train: int) -> int:
    """Rows of the IG sub-batch of a batch of ``n_train``: ``ig_fraction`` of it, half rounding
    up, at least one."""
    return max(1, math.floor(ig_fraction * n_train + 0.5))


def build_node_batch(
    batch: Batch, quad: Quadrature, ig_fraction: float, generator: torch.Generator | None = None
) -> NodeBatch:
    """Stack ``batch`` with node copies of a random ``ig_fraction`` sub-batch."""
    n_train = batch_rows(batch)
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    device = next(iter(tensors.values())).device
    n_ig = ig_row_count(ig_fraction, n_train)
    ig_index = torch.randperm(n_train, generator=generator)[:n_ig].sort().values.to(device)
    inner = [(a, w) for a, w in quad if a < 1.0]
    stacked = {k: torch.cat([v] + [v[ig_index]] * len(inner)) for k, v in tensors.items()}
    stacked.update({k: v for k, v in batch.items() if k not in tensors})  # flags, as they are
    n_rows = n_train + n_ig * len(inner)
    scale = torch.ones(n_rows, dtype=torch.float64)
    ig_coef = torch.full((n_rows,), quad.weight_at_one(), dtype=torch.float64)
    train_coef = torch.zeros(n_rows, dtype=torch.float64)
    train_coef[:n_train] = 1.0
    groups = torch.zeros(n_rows, dtype=torch.long)
    for j, (alpha, weight) in enumerate(inner):
        rows = slice(n_train + j * n_ig, n_train + (j + 1) * n_ig)
        scale[rows], ig_coef[rows], groups[rows] = alpha**3, weight / alpha, j + 1
    plan = RowPlan(scale.to(device), train_coef.to(device), ig_coef.to(device))
    return NodeBatch(stacked, plan, groups.to(device), ig_index, quad)


def set_row_plan(model: nn.Module, plan: RowPlan | None) -> None:
    """Route every adapter through the batched IG op with ``plan`` (None: the plain op again).

    The plan must stay in place until backward is done: gradient checkpointing recomputes the
    forward during backward, and the recomputed rows must carry the same node scales.
    """
    for layer in adapter_layers(model).values():
        layer.row_plan = plan


def ensure_ig_buffers(model: nn.Module) -> None:
    """Give every adapter zeroed IG accumulators (they add up over micro-batches).

    Plain full-shape tensors even for sharded (FSDP2 DTensor) parameters: backward sees the
    unsharded parameters, and each rank's IG is averaged over ranks before scoring.
    """
    for layer in adapter_layers(model).values():
        if layer.ig_buffers is None:
            params = [getattr(layer, p) for p in ADAPTER_PARAMS]
            layer.ig_buffers = tuple(torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params)


def group_mean_losses(row_loss: torch.Tensor, row_count: torch.Tensor, groups: torch.Tensor):
    """Per-group mean losses: sum of row losses over sum of row counts in each group."""
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups, dtype=row_loss.dtype, device=row_loss.device)
    counts = torch.zeros(n_groups, dtype=row_count.dtype, device=row_count.device)
    sums = sums.index_add(0, groups, row_loss)
    counts = counts.index_add(0, groups, row_count)
    return sums / counts.clamp_min(1).to(sums.dtype)


def batched_ig_loss(
    model: nn.Module, row_loss_fn: RowLossFn, node_batch: NodeBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the stacked batch; returns (loss to backpropagate, training-group loss).

    The backpropagated loss is the SUM of per-group mean losses, so each row's output gradient
    is the one of its own group (method.md, section 4). Backward fills ``.grad`` with the
    training gradient and adds the IG estimate to every layer's ``ig_buffers``. The row plan
    stays installed for that backward; ``set_row_plan(model, None)`` removes it (``IGUModel``
    does so in ``update_and_allocate``, the next ``training_loss`` and ``eval()``).
    """
    ensure_ig_buffers(model)
    set_row_plan(model, node_batch.plan)
    row_loss, row_count = row_loss_fn(model, node_batch.batch)
    group_losses = group_mean_losses(row_loss, row_count, node_batch.groups)
    correction = node_gradient_of_other_parameters(model, group_losses[1:].sum())
    return group_losses.sum() - correction, group_losses[0]


@torch.no_grad()
def loss_gap(module: nn.Module, row_loss_fn: RowLossFn, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    """``L(theta) - L(0)`` on ``batch[rows]``: two no-grad forwards, at theta and with every
    adapter off, that draw the same random numbers (dropout masks), so that dropout noise cancels
    in the difference as it does in the path integral; the run's random state is left as it was.
    (With ``lora_dropout > 0`` the adapters' own draws shift the later masks.)"""
    sub = {k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    devices = [rows.device] if rows.device.type == "cuda" else []
    means = []
    with torch.random.fork_rng(devices=devices):
        start = [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices]
        for alpha in (1.0, 0.0):
            torch.set_rng_state(start[0])
            for device, state in zip(devices, start[1:]):
                torch.cuda.set_rng_state(state, device)
            with path_point(module, alpha):
                row_loss, row_count = row_loss_fn(module, sub)
            means.append(row_loss.sum() / row_count.sum())
    return means[0] - means[1]


def node_gradient_of_other_parameters(model: nn.Module, node_loss: torch.Tensor) -> torch.Tensor | float:
    """A zero-valued term whose gradient is the node groups' gradient of every trainable
    non-adapter parameter (a task head, ``modules_to_save``): subtracted from the summed loss, it
    leaves those parameters the training group's gradient alone, as in a plain step. Only the
    adapters' row-wise backward keeps nodes out of ``.grad`` by itself."""
    adapters = {id(p) for p in adapter_parameters(model).values()}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in adapters]
    if not others or not node_loss.requires_grad:
        return 0.0
    if _is_fully_sharded(model):
        names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
        raise NotImplementedError(
            f"trainable non-adapter parameters {names[:4]} (modules_to_save) under FSDP2: igulora "
            "cannot keep the IG node rows out of their gradient when they are sharded; train them "
            "in a separate run or without fully_shard (DDP works)"
        )
    grads = torch.autograd.grad(node_loss, others, retain_graph=True, allow_unused=True)
    reached = [(p, g) for p, g in zip(others, grads) if g is not None]
    if len(reached) < len(others) and _has_reentrant_checkpoint(node_loss):
        missing = {id(p) for p, g in zip(others, grads) if g is None}
        names = [n for n, p in model.named_parameters() if id(p) in missing]
        raise RuntimeError(
            f"trainable non-adapter parameters {names[:4]} are unreachable through a reentrant "
            "checkpoint (use_reentrant=True) on a scoring step: train them outside checkpointed "
            'blocks or use gradient_checkpointing_kwargs={"use_reentrant": False}'
        )
    if not reached:
        return 0.0
    term = sum((p * g).sum() for p, g in reached)
    return term - term.detach()


def _is_fully_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _has_reentrant_checkpoint(loss: torch.Tensor) -> bool:
    """Whether the graph behind ``loss`` holds a reentrant ``torch.utils.checkpoint`` node."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


# ----------------------------------------------------------------------------------------------
# Built-in per-row losses: (sum of the row's loss terms, number of terms) for each row.


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits on ``batch`` without its labels, upcast to at least fp32."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out.logits if hasattr(out, "logits") else out
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def sequence_classification_row_loss(model: nn.Module, batch: Batch):
    """Cross-entropy (or MSE for one output) per example; ``batch["labels"]`` holds targets."""
    if "labels" not in batch:
        raise ValueError(
            f"sequence_classification_row_loss: batch['labels'] is missing (keys: {sorted(batch)}); "
            "a causal LM takes causal_lm_row_loss"
        )
    logits = _logits(model, batch)
    labels = batch["labels"]
    if logits.shape[-1] == 1:
        loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="none")
    else:
        loss = F.cross_entropy(logits, labels, reduction="none")
    return loss, torch.ones_like(loss)


def causal_lm_row_loss(model: nn.Module, batch: Batch):
    """Next-token cross-entropy per sequence: (summed over tokens, number of tokens).

    Labels default to ``input_ids``; positions labelled -100 (and padding) are ignored. Group
    means then equal Hugging Face's token-mean loss.
    """
    if "labels" not in batch and "input_ids" not in batch:
        raise ValueError(
            "causal_lm_row_loss: the batch has neither labels nor input_ids to take them from "
            f"(keys: {sorted(batch)}); with inputs_embeds, pass labels"
        )
    logits = _logits(model, batch)
    labels = batch["labels"] if "labels" in batch else batch["input_ids"]
    if "attention_mask" in batch and "labels" not in batch:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    logits, labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    return token_loss.sum(1), (labels != -100).sum(1).to(token_loss.dtype)


def mean_loss(row_loss_fn: RowLossFn) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """Scalar loss (mean over all terms) from a per-row loss, for :func:`integrated_gradients`."""

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        row_loss, row_count = row_loss_fn(model, batch)
        return row_loss.sum() / row_count.sum()

    return loss_fn


__all__ = [
    "IGResult",
    "NodeBatch",
    "adapter_layers",
    "adapter_parameters",
    "loss_gap",
    "batched_ig_loss",
    "build_node_batch",
    "causal_lm_row_loss",
    "integrated_gradients",
    "mean_loss",
    "path_point",
    "sequence_classification_row_loss",
    "set_row_plan",
]
