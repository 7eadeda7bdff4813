"""get_igu_model: adapter injection and the IGUModel wrapper (training, allocation, saving)."""

from __future__ import annotations

import functools
import inspect
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function

from igulora.allocator import RankAllocator, target_budget
from igulora.attach import ForgottenAllocationGuard, StepAttachment, found_inf
from igulora.compaction import rebuild_ddp, unknown_optimizer
from igulora.config import IGULoraConfig
from igulora.config_view import BaseConfigView
from igulora.distributed import all_reduce_mean, full_tensor, is_main_process
from igulora.host import all_finite, read_back, read_back_each
from igulora.ig import (
    ADAPTER_PARAMS,
    Batch,
    RowLossFn,
    adapter_layers,
    batch_rows,
    batched_ig_loss,
    build_node_batch,
    causal_lm_row_loss,
    loss_gap,
    mean_loss,
    sequence_classification_row_loss,
    set_row_plan,
)
from igulora.io import write_json, write_safetensors
from igulora.layer import IGULoraLinear, linear_features, quantization
from igulora.node_budget import Completeness, NodeBudget
from igulora.quadrature import quadrature
from igulora.save_format import (
    FORMAT_VERSION,
    IGU_CONFIG,
    IGU_STATE,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    check_modules,
    check_ranks,
    check_saved_modules,
    read_meta,
    read_state,
)
from igulora.targets import (
    find_targets,
    modules_to_save,
    name_matches,
    refuse_adapted,
    refuse_overlap,
    replace_module,
)

ORTHOGONALITY_RANGE = "igulora.orthogonality_loss"  # its range in torch's profiler


class IGUModel(nn.Module):
    """A model with IGU-LoRA adapters, their rank allocator, and PEFT-style saving.

    Training loop (one optimizer step per batch)::

        loss = igu.training_loss(batch)        # batched IG on scoring steps, + orth. regulariser
        loss.backward()
        optimizer.step()
        igu.update_and_allocate(step, optimizer=optimizer)  # scores, prunes, compacts
        optimizer.zero_grad()

    or ``igu.attach(optimizer)`` once, and the allocation runs after every real optimizer step.

    To the rest of the ecosystem it looks like the model it wraps (as PEFT's ``PeftModel``):
    ``config`` is the base model's config, and attributes it lacks (``generate``,
    ``get_input_embeddings``, ``can_generate``, ``name_or_path``, ...) are the base model's. The
    IGU-LoRA config is ``igu_config``.
    """

    # Trainer: the loss is a per-micro-batch mean (Trainer divides it by the accumulation steps,
    # as igulora's IG accumulation assumes), and adapters are attached (not a "purely quantized
    # model" when the base is 4-bit).
    accepts_loss_kwargs = False
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: IGULoraConfig) -> None:
        super().__init__()
        if isinstance(model, IGUModel):
            raise ValueError("get_igu_model: the model is an IGUModel already; keep training it")
        refuse_adapted(model)
        targets = find_targets(model, config)
        saved_modules = modules_to_save(model, config)
        refuse_overlap(targets, list(saved_modules))
        features = [linear_features(model.get_submodule(name)) for name in targets]
        if target_budget(config, features) < 1:
            raise ValueError(
                f"IGULoraConfig.target_r={config.target_r}: over {len(targets)} adapters it keeps no "
                f"{config.budget_unit.rstrip('s')} at all, so every adapter would be pruned; raise target_r"
            )
        # every check is done: only now is the model changed
        model.requires_grad_(False)
        for name in targets:
            replace_module(
                model,
                name,
                IGULoraLinear(
                    model.get_submodule(name),
                    r=config.init_r,
                    lora_alpha=config.lora_alpha,
                    lora_dropout=config.lora_dropout,
                    init=config.init,
                    hard_mask=config.prune_mode == "mask",
                ),
            )
        for module in saved_modules.values():
            module.requires_grad_(True)
        self.model = model
        self.igu_config = config  # PEFT keeps its adapter config beside the model's, as here
        self.saved_module_names = sorted(saved_modules)
        self.allocator = RankAllocator(model, config)
        self.step = 0  # optimizer steps taken: update_and_allocate(step) sets it to step + 1
        self.last_loss: torch.Tensor | None = None
        self._node_generator = torch.Generator().manual_seed(config.seed)
        self._allocation_calls = 0
        tinit = config.tinit if isinstance(config.tinit, int) else 0  # a fraction of an unknown total
        first = next(iter(self.adapters.values())).lora_A
        self._guard = ForgottenAllocationGuard(self, first, tinit + config.delta_t + 1)
        self._ddp: nn.parallel.DistributedDataParallel | None = None  # seen by training_loss
        self._compaction_off: str | None = None  # why compaction stopped for this run
        # ig_steps="auto": the node count; checks: this step's L(theta) - L(0) per micro-batch
        self.node_budget = NodeBudget(config.ig_tolerance, config.ig_max_steps)
        self._loss_gaps: list[torch.Tensor] = []
        self.last_check: Completeness | None = None
        self._scored = False  # whether a training_loss built IG rows since the last allocation
        self._attachment: StepAttachment | None = None  # attach(): the optimizer hook
        self.row_loss_fn: RowLossFn = default_row_loss(model)
        self.train(model.training)
        # Advertise the wrapped model's forward signature (Trainer keeps only the batch columns
        # that forward accepts).
        self.forward = functools.partial(IGUModel.forward, self)
        self.forward.__signature__ = inspect.signature(model.forward)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- the wrapped model's face -----------------------------------------------------------

    @property
    def config(self):
        """The base model's config (what Trainer, TRL and generation read). IGU-LoRA fields read
        through it still work, with a ``DeprecationWarning``: use :attr:`igu_config`."""
        base = getattr(self.model, "config", None)
        if base is None:  # a plain nn.Module has no config of its own
            warnings.warn(
                "IGUModel.config: use IGUModel.igu_config for the IGU-LoRA config",
                DeprecationWarning,
                stacklevel=2,
            )
            return self.igu_config
        return BaseConfigView(base, self.igu_config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name == "model" or name.startswith("__"):
                raise
            return getattr(self.model, name)

    def set_total_step(self, total_step: int) -> None:
        """Fix ``total_step`` (and fractional ``tinit`` / ``tfinal``) of a config that left it
        unset; the Trainer integrations call this with the run's ``max_steps``."""
        self.igu_config = self.allocator.config = self.igu_config.resolved(total_step)

    def _require_total_step(self) -> None:
        if self.igu_config.total_step is None:
            raise RuntimeError(
                "IGULoraConfig.total_step is None: pass total_step=<optimizer steps>, call "
                "igu.set_total_step(n), or train with a Trainer integration (it uses max_steps)"
            )

    # -- the allocation step nobody can forget ----------------------------------------------

    def attach(
        self, optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Run :meth:`update_and_allocate` after every optimizer step that really runs.

        ``Optimizer.register_step_post_hook`` fires only when the step runs: Accelerate's
        micro-batches that do not sync gradients and a step a ``GradScaler`` skips never reach it.
        Accelerate's ``AcceleratedOptimizer`` is unwrapped and its scaler used. With a scaler
        (fp16), the IG is unscaled by the scale of this step's backward, and a step with inf/NaN
        gradients drops its IG and counts as a skipped score update, whether the scaler skipped
        the optimizer or a fused optimizer skipped its update inside (:mod:`igulora.attach`).
        Attaching again replaces the previous attachment.
        """
        self.detach()
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate.AcceleratedOptimizer
        scaler = grad_scaler if grad_scaler is not None else getattr(optimizer, "scaler", None)
        scaler = scaler if scaler is not None and scaler.is_enabled() else None

        def allocate(opt: torch.optim.Optimizer, loss_scale: float, step_skipped: bool) -> None:
            self._allocate(self.step, optimizer=opt, loss_scale=loss_scale, step_skipped=step_skipped)

        self._attachment = StepAttachment(inner, scaler, allocate)

    def detach(self) -> None:
        """Remove what :meth:`attach` installed."""
        if self._attachment is not None:
            self._attachment.remove()
            self._attachment = None

    def train(self, mode: bool = True) -> IGUModel:
        if not mode:
            set_row_plan(self.model, None)  # an evaluation forward is never a scoring step's
        return super().train(mode)

    # -- the Hugging Face model methods the Trainer calls -----------------------------------

    def _hf_method(self, *names: str):
        for name in names:
            method = getattr(self.model, name, None)
            if callable(method):
                return method
        raise TypeError(
            f"{type(self.model).__name__} has no {' or '.join(names)}; wrap its blocks in "
            "torch.utils.checkpoint.checkpoint yourself (igulora's steps are exact under it)"
        )

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """Gradient (activation) checkpointing of the wrapped Hugging Face model, reentrant or not.

        The batched IG rows are recomputed with their node scales, so ``.grad`` and the IG buffers
        equal a step without checkpointing. The input embeddings' output is made to require grad,
        which reentrant checkpointing of a frozen base needs.
        """
        enable = self._hf_method("activation_checkpointing_enable", "gradient_checkpointing_enable")
        enable(activation_checkpointing_kwargs, **kwargs)
        self.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """transformers' former name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self._hf_method("activation_checkpointing_disable", "gradient_checkpointing_disable")()

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            if hasattr(type(self.model), name):
                return bool(getattr(self.model, name))
        return False

    is_gradient_checkpointing = is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        self._hf_method("enable_input_require_grads")()

    def disable_input_require_grads(self) -> None:
        self._hf_method("disable_input_require_grads")()

    @property
    def adapters(self) -> dict[str, IGULoraLinear]:
        return self.allocator.layers

    @property
    def module_shapes(self) -> dict[str, list[int]]:
        """``[in_features, out_features, init_r]`` of every adapter, as a save records them."""
        return {
            n: [layer.in_features, layer.out_features, layer.init_r] for n, layer in self.adapters.items()
        }

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        return self.allocator.rank_pattern

    @property
    def active_ranks(self) -> dict[str, int]:
        ranks = read_back(layer.rank_mask.sum() for layer in self.adapters.values())
        return dict(zip(self.adapters, ranks))

    def orthogonality_loss(self) -> torch.Tensor:
        """``mean over adapters of ||A A^T - I||_F + ||B^T B - I||_F`` (method.md, section 1); of
        the whole matrices under FSDP2 (gathered, differentiably: every rank computes the same).

        ``orth_reg_ranks="live"``: over the kept ranks only, as ``||(mA)(mA)^T - diag(m)||_F``
        with the rank mask ``m``, which is the term of the kept rows of A (columns of B) alone:
        pruned ranks get no gradient from it, and a compacted adapter gives the same value."""
        live = self.igu_config.orth_reg_ranks == "live"
        total = 0.0
        for layer in self.adapters.values():
            A, B = full_tensor(layer.lora_A), full_tensor(layer.lora_B)
            if live:
                m = layer.rank_mask.to(A.dtype)
                A, B = A * m[:, None], B * m
                total = total + _frobenius(A @ A.t() - torch.diag(m)) + _frobenius(B.t() @ B - torch.diag(m))
            else:
                eye = torch.eye(layer.r, dtype=A.dtype, device=A.device)
                total = (
                    total
                    + torch.linalg.matrix_norm(A @ A.t() - eye)
                    + torch.linalg.matrix_norm(B.t() @ B - eye)
                )
        return total / len(self.adapters)

    @property
    def ig_nodes(self) -> int:
        """Quadrature nodes of the next scoring step (``ig_steps``, or the ``auto`` count)."""
        return self.node_budget.nodes if self.igu_config.ig_steps == "auto" else self.igu_config.ig_steps

    def is_scoring_step(self) -> bool:
        """Whether this forward evaluates the IG nodes: on a scoring step (:meth:`scores_at`)
        with grad enabled."""
        return torch.is_grad_enabled() and self.scores_at(self.step)

    def scores_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` evaluates IG (:meth:`IGULoraConfig.scores_at`)."""
        return self.igu_config.scores_at(step)

    def training_loss(
        self,
        batch: Batch,
        row_loss_fn: RowLossFn | None = None,
        module: nn.Module | None = None,
    ) -> torch.Tensor:
        """The loss to backpropagate for one (micro-)batch.

        On scoring steps the batch is stacked with IG node rows (see :mod:`igulora.ig`) and the
        loss backpropagates the sum of per-group mean losses while its value is the training
        group's; otherwise it is the plain mean loss. The
        orthogonality regulariser is added. ``self.last_loss`` holds the training-group loss.
        ``module`` is what ``row_loss_fn`` calls: this model (default) or a wrapper of it (DDP).
        ``row_loss_fn`` defaults to :attr:`row_loss_fn` (causal LM for models that generate,
        sequence classification otherwise).
        """
        self._require_total_step()
        batch_rows(batch)  # a clear error for a batch that cannot be one
        row_loss_fn = self.row_loss_fn if row_loss_fn is None else row_loss_fn
        module = self if module is None else module
        self._ddp = module if isinstance(module, nn.parallel.DistributedDataParallel) else None
        set_row_plan(self.model, None)  # the previous scoring step's backward is done
        if self.is_scoring_step():
            c = self.igu_config
            quad = quadrature(
                c.ig_rule, self.ig_nodes, grid=c.stochastic_grid, generator=self._node_generator
            )
            node_batch = build_node_batch(batch, quad, c.ig_fraction, self._node_generator)
            if c.tracks_completeness:  # before the row plan is installed for the batched backward
                self._loss_gaps.append(loss_gap(module, row_loss_fn, batch, node_batch.ig_index))
            loss, train_loss = batched_ig_loss(module, row_loss_fn, node_batch)
            self._scored = True
            # The value the user sees (logs, the Trainer's loss) is the training loss; the
            # gradient stays the batched one.
            loss = loss - (loss - train_loss).detach()
        else:
            loss = train_loss = mean_loss(row_loss_fn)(module, batch)
        self.last_loss = train_loss.detach()
        if self.igu_config.orth_reg_weight > 0 and self.step >= self.igu_config.orth_reg_from:
            with record_function(ORTHOGONALITY_RANGE):
                loss = loss + self.igu_config.orth_reg_weight * self.orthogonality_loss()
        return loss

    def finite_step(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` and every trainable gradient are finite. When not, skip the optimizer
        step (the allocator skips the matching score update by itself). One read back in all."""
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        return all_finite([loss, *grads])

    def update_and_allocate(
        self,
        step: int,
        grad_scaler: torch.amp.GradScaler | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        loss_scale: float = 1.0,
        step_skipped: bool = False,
    ) -> dict[str, list[bool]] | None:
        """Call after ``optimizer.step()`` with the 0-based optimizer step.

        ``optimizer``: the optimizer stepping the adapters; with it, pruned ranks are compacted
        away (``IGULoraConfig.compact``), its per-parameter state sliced with them. With fp16 and
        a ``torch.amp.GradScaler``, pass it and call this after ``scaler.step(optimizer)`` and
        before ``scaler.update()``: the IG buffers carry the loss scale as ``.grad`` does and are
        unscaled by it, and a step the scaler skips (inf/NaN) skips the score update too.
        ``loss_scale`` / ``step_skipped`` say the same for loops that read them elsewhere.
        After :meth:`attach` the hook calls it; calling it as well raises.
        """
        if self._attachment is not None:
            raise RuntimeError(
                "update_and_allocate: igu.attach(optimizer) already allocates after every optimizer "
                "step; remove this call (or igu.detach() first)"
            )
        if grad_scaler is not None:
            loss_scale, step_skipped = scaler_state(grad_scaler)
        return self._allocate(step, optimizer, loss_scale, step_skipped)

    def _allocate(
        self,
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
        loss_scale: float = 1.0,
        step_skipped: bool = False,
    ) -> dict[str, list[bool]] | None:
        self._require_total_step()
        if not step_skipped:
            self._check_scored(step)
        self._scored = False
        set_row_plan(self.model, None)
        self._allocation_calls += 1
        self._guard.remove()  # allocation runs: nothing left to guard
        self.step = step + 1
        self._check_completeness(step, loss_scale, step_skipped)
        pattern = self.allocator.update_and_allocate(step, loss_scale, step_skipped)
        if pattern is not None:
            self.compact(optimizer)
        return pattern

    def _check_scored(self, step: int) -> None:
        """Fail loudly when a scoring step's gradients did not come from :meth:`training_loss`
        (a Trainer or loop that calls ``model(**batch)`` itself): the scores would never move."""
        if not self.scores_at(step) or self._scored or step != self.step:
            return
        if any(p.grad is not None for layer in self.adapters.values() for p in layer.parameters()):
            raise RuntimeError(
                f"IGU-LoRA: optimizer step {step} is a scoring step, but its gradients did not come "
                "from igu.training_loss(batch): the IG scores would never move. Compute the loss "
                "with igu.training_loss, or train with IGUTrainer, igu_trainer(YourTrainer) or "
                "IGUSFTTrainer (igulora.integrations)"
            )

    def _check_completeness(self, step: int, loss_scale: float, step_skipped: bool) -> None:
        """The scoring step's completeness residual (before the allocator consumes the IG), and
        the ``auto`` node count it implies. With gradient accumulation each micro-batch's loss is
        taken to be backpropagated divided by their number (HF Trainer, Accelerate)."""
        gaps, self._loss_gaps = self._loss_gaps, []
        if not gaps or step_skipped:  # most steps: nothing was checked
            return
        layers = list(self.adapters.values())
        if any(layer.ig_buffers is None for layer in layers):
            return
        totals = [buf.sum(dtype=torch.float64) for layer in layers for buf in layer.ig_buffers]
        check = torch.stack([torch.stack(totals).sum() / loss_scale, torch.stack(gaps).double().mean()])
        all_reduce_mean([check])  # every rank decides on the same numbers
        self.last_check = Completeness(step, self.ig_nodes, *check.tolist())
        if self.igu_config.ig_steps == "auto":
            self.node_budget.observe(self.last_check)

    # -- compaction -------------------------------------------------------------------------

    def _compaction_blocker(self, optimizer, restoring: bool) -> tuple[str | None, bool]:
        """(why compaction cannot run now, whether to warn about it), None when it can."""
        c = self.igu_config
        explicit = c.compact is True
        if c.compact is False:
            return "compact=False", False
        if c.prune_mode != "mask":
            return "prune_mode='zero' lets pruned triplets return", explicit
        if c.orth_reg_weight > 0 and c.orth_reg_ranks == "all":
            return "the orthogonality term reaches every rank, pruned or not (orth_reg_ranks='all')", explicit
        if optimizer is None and not restoring:
            return "update_and_allocate was given no optimizer= to slice the state of", explicit
        if any(hasattr(layer.lora_A, "full_tensor") for layer in self.adapters.values()):
            return "FSDP2 shards the adapters (a DTensor cannot be sliced in place)", True
        if restoring:
            return None, False
        why = unknown_optimizer(optimizer)
        return (why, True) if why else (None, False)

    def compact(self, optimizer=None, restoring: bool = False) -> None:
        """Remove pruned triplets from every adapter now, slicing ``optimizer``'s state with them
        (what ``update_and_allocate`` does after each allocation; exact in mask mode, docs/design.md).
        ``restoring``: no optimizer state exists yet (a model being loaded)."""
        if self._compaction_off:
            return
        why, warn = self._compaction_blocker(optimizer, restoring)
        if why:
            if warn:
                warnings.warn(
                    f"IGU-LoRA: pruned ranks stay masked, not compacted, for this run: {why}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._compaction_off = why
            return
        keeps = self._kept_ranks()
        for name, keep in keeps.items():
            keep = keep.to(self.adapters[name].rank_mask.device)
            self.allocator.take_ranks(name, keep)
            self.adapters[name].compact_(keep, optimizer)
        if keeps and self._ddp is not None:
            rebuild_ddp(self._ddp)

    def _kept_ranks(self) -> dict[str, torch.Tensor]:
        """The physical ranks to keep of every adapter with pruned ranks, read from the masks in
        one device-to-host copy and sent back in one host-to-device copy."""
        masks = read_back_each(layer.rank_mask for layer in self.adapters.values())
        keeps = {
            name: [i for i, kept in enumerate(mask) if kept]
            for name, mask in zip(self.adapters, masks)
            if not all(mask)
        }
        if not keeps:
            return {}
        device = next(iter(self.adapters.values())).rank_mask.device
        index = torch.tensor([i for keep in keeps.values() for i in keep], dtype=torch.long, device=device)
        return dict(zip(keeps, index.split([len(keep) for keep in keeps.values()])))

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Merge every adapter's kept ranks into its base weight and return the plain model
        (PEFT's ``merge_and_unload``; this IGUModel is spent afterwards). Refuses, changing
        nothing, when a base layer is quantized."""
        for name, layer in self.adapters.items():
            kind = quantization(layer.base_layer)
            if kind is not None:
                raise RuntimeError(
                    f"merge_and_unload: module {name!r} has a quantized base ({kind}); save the adapter "
                    "with save_pretrained and merge it into the unquantized model (PEFT loads it)"
                )
        shared = _shared_parameters(self.model)
        for name, layer in self.adapters.items():
            weight = layer.base_layer.weight
            if len(shared.get(id(weight), ())) > 1:  # tied (lm_head and the input embeddings)
                self._untie(name, layer, shared[id(weight)])
            layer.merge()
            replace_module(self.model, name, layer.base_layer)
        return self.model

    def _untie(self, name: str, layer: IGULoraLinear, names: list[str]) -> None:
        """Give ``layer``'s base its own copy of a weight it shares, so that the merge changes it
        alone, as PEFT's adapter on it does; the config stops tying word embeddings."""
        weight = layer.base_layer.weight
        layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        others = [n for n in names if n != f"{name}.base_layer.weight"]
        config = getattr(self.model, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
        warnings.warn(
            f"merge_and_unload: {name}'s weight was tied to {others}; it gets its own copy so that "
            "the merge changes it alone (as PEFT's adapter does), and tie_word_embeddings is off",
            UserWarning,
            stacklevel=3,
        )

    # -- saving -----------------------------------------------------------------------------

    def peft_export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """A plain-LoRA ``adapter_config.json`` dict and weights with pruned ranks removed.

        ``s B diag(E m) A`` becomes ``B' A'`` with ``A' = E[k] A[k]``, ``B' = s B[:, k]`` and LoRA
        scale 1 (``lora_alpha = r`` per module). Modules pruned to rank 0 are left out.
        """
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        with torch.no_grad():
            for name, layer in self.adapters.items():
                keep = layer.rank_mask.nonzero().flatten()
                if keep.numel() == 0:
                    continue
                ranks[name] = keep.numel()
                prefix = f"base_model.model.{name}"
                A, E, B = (full_tensor(getattr(layer, p)) for p in ADAPTER_PARAMS)
                tensors[f"{prefix}.lora_A.weight"] = (E[keep, None] * A[keep]).float()
                tensors[f"{prefix}.lora_B.weight"] = (layer.scaling * B[:, keep]).float()
            for name in self.saved_module_names:
                for pname, p in self._saved_module_state(name).items():
                    tensors[f"base_model.model.{name}.{pname}"] = p
        if not ranks:
            raise RuntimeError("IGUModel.peft_export: every adapter is pruned to rank 0; nothing to export")
        r = max(ranks.values())
        config = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": self._base_model_name(),
            "r": r,
            "lora_alpha": r,
            "rank_pattern": ranks,
            "alpha_pattern": dict(ranks),
            "target_modules": sorted(ranks),
            "modules_to_save": self.igu_config.modules_to_save,
            "fan_in_fan_out": any(layer.fan_in_fan_out for layer in self.adapters.values()),
            "lora_dropout": self.igu_config.lora_dropout,
            "bias": "none",
            "use_rslora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        return config, tensors

    def _base_model_name(self) -> str | None:
        if self.igu_config.base_model_name_or_path:
            return self.igu_config.base_model_name_or_path
        return getattr(getattr(self.model, "config", None), "_name_or_path", None) or None

    def _saved_module_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: full_tensor(v) for k, v in self.model.get_submodule(name).state_dict().items()}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the PEFT pair (adapter_config.json + adapter_model.safetensors) and igulora's
        own full state (unpruned adapters, masks, allocator EMAs, step, the IG node generator).
        Every file is written atomically.

        Distributed: the main process (rank 0) writes. Under FSDP2 call it on every rank: the
        sharded adapters are gathered into full tensors first.
        """
        directory = Path(directory)
        peft_config, peft_tensors = self.peft_export()
        state = {}
        for name, layer in self.adapters.items():
            for key, value in layer.full_state().items():
                state[f"adapter.{name}.{key}"] = value
        alloc = self.allocator.state_dict()
        state.update({f"ibar.{k}": v for k, v in alloc["ibar"].items()})
        state.update({f"ubar.{k}": v for k, v in alloc["ubar"].items()})
        for name in self.saved_module_names:
            for pname, p in self._saved_module_state(name).items():
                state[f"saved.{name}.{pname}"] = p
        state["node_generator"] = self._node_generator.get_state()  # the IG rows and nodes to come
        if not is_main_process():
            return
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.igu_config.to_dict(),
            "step": self.step,
            "allocator": {k: alloc[k] for k in ("num_updates", "skipped_updates", "budget")},
            "modules": self.module_shapes,
            "compacted": any(layer.r < layer.init_r for layer in self.adapters.values()),
            "node_budget": self.node_budget.state_dict(),
        }
        write_safetensors(directory / IGU_STATE, state)
        write_json(directory / IGU_CONFIG, meta)
        write_safetensors(directory / PEFT_WEIGHTS, peft_tensors)
        write_json(directory / PEFT_CONFIG, peft_config)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> IGUModel:
        """Inject adapters into ``model`` and restore weights, masks and allocator state."""
        meta, path = read_meta(directory)
        config = IGULoraConfig.from_dict(meta["config"])
        check_modules(model, meta["modules"], path)
        check_ranks(meta["modules"], config.init_r, path)
        targets = find_targets(model, config)
        if sorted(targets) != sorted(meta["modules"]):
            raise ValueError(
                f"{path}: the config selects {sorted(targets)} in this model but the save holds "
                f"{sorted(meta['modules'])}"
            )
        state = read_state(Path(directory) / IGU_STATE, meta["modules"])
        check_saved_modules(modules_to_save(model, config), state, path)
        igu = cls(model, config)  # every check is done: only now is the model changed
        igu._restore(meta, state)
        return igu

    def load_state(self, directory: str | Path) -> None:
        """Restore adapters, masks, allocator EMAs, step and node generator from a save of this
        same model and config (a Trainer checkpoint, say). Every check comes before any change:
        another model, other modules or another config raise an error naming the difference."""
        meta, path = read_meta(directory)
        saved_config = IGULoraConfig.from_dict(meta["config"])
        config = self.igu_config
        if config.total_step is None and saved_config.total_step is not None:  # a Trainer resuming
            config = config.resolved(saved_config.total_step)
        saved, ours = saved_config.to_dict(), config.to_dict()
        differ = {k: (saved[k], ours[k]) for k in ours if saved[k] != ours[k]}
        if differ:
            details = ", ".join(f"{k}: saved {a!r}, this model {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"{path}: saved with another IGULoraConfig ({details})")
        modules = self.module_shapes
        saved_modules = meta["modules"]
        if saved_modules != modules:
            missing = sorted(set(modules) - set(saved_modules))
            extra = sorted(set(saved_modules) - set(modules))
            shapes = sorted(n for n in set(modules) & set(saved_modules) if modules[n] != saved_modules[n])
            raise ValueError(
                f"{path}: saved for other modules (not in the save: {missing[:4]}, not in this model: "
                f"{extra[:4]}, other in/out/r: {shapes[:4]}); another base model?"
            )
        state = read_state(Path(directory) / IGU_STATE, meta["modules"])
        check_saved_modules({n: self.model.get_submodule(n) for n in self.saved_module_names}, state, path)
        if config is not self.igu_config:
            self.set_total_step(config.total_step)
        self._restore(meta, state)

    @torch.no_grad()
    def _restore(self, meta: dict, state: dict[str, torch.Tensor]) -> None:
        """Load a save (in the ``init_r`` layout) and compact as the saved run had."""
        for name, layer in self.adapters.items():
            layer.expand_()
            for key in (*ADAPTER_PARAMS, "rank_mask"):
                getattr(layer, key).copy_(state[f"adapter.{name}.{key}"])
        for name in self.saved_module_names:
            module = self.model.get_submodule(name)
            module.load_state_dict({k: state[f"saved.{name}.{k}"] for k in module.state_dict()})
        alloc = dict(meta["allocator"])
        alloc["ibar"] = {k[5:]: v for k, v in state.items() if k.startswith("ibar.")}
        alloc["ubar"] = {k[5:]: v for k, v in state.items() if k.startswith("ubar.")}
        self.allocator.load_state_dict(alloc)
        self.step = int(meta["step"])
        self._allocation_calls = self.step
        if self.step:  # a run that allocated already
            self._guard.remove()
        if "node_generator" in state:
            self._node_generator.set_state(state["node_generator"])
        if "node_budget" in meta:
            self.node_budget.load_state_dict(meta["node_budget"])
        self._compaction_off = None
        if meta.get("compacted"):  # as the saved run was, so that its optimizer state fits
            self.compact(restoring=True)


def scaler_state(grad_scaler: torch.amp.GradScaler) -> tuple[float, bool]:
    """(loss scale of this step's backward, whether ``scaler.step`` skipped the optimizer step).

    Read between ``scaler.step(optimizer)`` and ``scaler.update()``: ``update()`` changes the
    scale and forgets what ``step()`` found.
    """
    if not grad_scaler.is_enabled():
        return 1.0, False
    skipped = found_inf(grad_scaler)
    if skipped is None:
        raise RuntimeError(
            "update_and_allocate(grad_scaler=...) must be called after scaler.step(optimizer) and "
            "before scaler.update(): the scaler has no record of this step's inf/NaN check"
        )
    return grad_scaler.get_scale(), skipped


def _frobenius(x: torch.Tensor) -> torch.Tensor:
    """``||x||_F`` with a zero gradient at ``x = 0`` (an adapter with every rank pruned), where
    the norm's own gradient is 0 / 0."""
    square = (x * x).sum()
    nonzero = square > 0
    return torch.where(nonzero, torch.where(nonzero, square, 1.0).sqrt(), 0.0)


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> every name it has in ``model`` (more than one when tied)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def default_row_loss(model: nn.Module) -> RowLossFn:
    """Next-token loss for a model that generates (``can_generate()``), per-example
    classification loss otherwise."""
    can_generate = getattr(model, "can_generate", None)
    generates = callable(can_generate) and can_generate()
    return causal_lm_row_loss if generates else sequence_classification_row_loss


def get_igu_model(model: nn.Module, config: IGULoraConfig) -> IGUModel:
    """Inject IGU-LoRA adapters into ``model`` (in place) and wrap it (PEFT's get_peft_model)."""
    return IGUModel(model, config)


__all__ = ["IGUModel", "adapter_layers", "find_targets", "get_igu_model", "name_matches"]
