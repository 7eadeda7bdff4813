"""IGULoraConfig: every knob of IGU-LoRA in one validated dataclass (PEFT style)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from igu_kernels.reference import SCORES
from igulora.quadrature import RULES

BUDGET_UNITS = ("triplets", "parameters")
PRUNE_MODES = ("mask", "zero")
INITS = ("adalora", "lora")


@dataclass
class IGULoraConfig:
    """Configuration of an IGU-LoRA model.

    Adapters: ``target_modules`` is a list of exact module names or ``.name`` suffixes, a string
    regex matched against the full module name, or ``"all-linear"`` (every Linear / Conv1D but the
    output head). ``exclude_modules`` uses the same syntax. ``modules_to_save`` stay trainable.
    Each adapter starts at ``init_r`` ranks with scale ``lora_alpha / init_r`` (never rescaled).

    Budget (AdaLoRA's cubic schedule): ``init_r`` per layer for ``tinit`` steps, down to an
    average of ``target_r`` per layer (a float: 0.5 keeps half as many triplets as layers) at step
    ``total_step - tfinal``, masks frozen for the last ``tfinal``
    steps; reallocation every ``delta_t`` steps. ``budget_unit`` counts triplets or parameters.
    ``total_step=None`` lets a Trainer integration set it from the run's ``max_steps``
    (``IGUModel.set_total_step`` elsewhere); ``tinit`` / ``tfinal`` may be fractions of it.

    Score: EMAs of |IG| (``beta1``) and of its deviation (``beta2``), combined as
    ``stable_magnitude`` (the default: ``Ibar^2 / (Ibar + Ubar)``, both magnitude and stability),
    ``snr`` (the IGU-LoRA paper's ``Ibar / Ubar``, blind to scale) or ``product`` (AdaLoRA's);
    ``igu_kernels.reference.element_score``. IG: ``ig_rule`` with
    ``ig_steps`` nodes, computed every ``ig_every`` optimizer steps on ``ig_fraction`` of the
    batch (``stochastic`` draws its nodes from a ``stochastic_grid``-interval trapezoid grid).
    ``ig_steps="auto"`` (Gauss-Legendre) raises or lowers the node count between scoring steps,
    up to ``ig_max_steps``, to keep the relative completeness residual under ``ig_tolerance``
    (:mod:`igulora.node_budget`); ``ig_residual=True`` computes and logs that residual with a
    fixed count too.

    ``prune_mode="mask"`` multiplies E by a rank mask (pruned triplets get no gradient and never
    return); ``"zero"`` zeroes pruned singular values in place like AdaLoRA (they may grow back).
    ``compact``: remove pruned triplets from the parameters, the optimizer state and the EMAs
    after each allocation, so that steps get cheaper as the budget falls. ``None`` (default): on
    where it is exact (mask mode, no orthogonality term, an optimizer passed to
    ``update_and_allocate`` whose state is elementwise, no FSDP2), masking otherwise; ``True``:
    the same, with a warning when it cannot; ``False``: always mask.
    ``init="adalora"``: E = 0, A, B ~ N(0, 0.02); ``"lora"``: B = 0, A Kaiming-uniform, E = 1.
    ``orth_reg_weight`` (default 0.25, by the rule of docs/results.md on four tasks; 0 turns it
    off and lets ``compact`` run) adds AdaLoRA's orthogonality term (method.md) from optimizer step
    ``orth_reg_start`` on (``"tinit"``: once the initial phase has grown E; from step 0 its gradient
    alone fills Adam's second moments of A and B while E = 0, docs/results.md).
    """

    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_r: int = 12
    target_r: float = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    init: str = "adalora"  # the LoRA-like start is unstable at 6 ranks (docs/results.md)
    prune_mode: str = "mask"
    compact: bool | None = None
    total_step: int | None = None  # None: set by a Trainer integration from max_steps
    tinit: int | float = 0  # a float in [0, 1): a fraction of total_step
    tfinal: int | float = 0
    delta_t: int = 1
    budget_unit: str = "triplets"
    beta1: float = 0.85
    beta2: float = 0.85
    # snr until 2026-12-02; switched by the rule fixed before the score study (docs/results.md)
    score: str = "stable_magnitude"
    score_eps: float = 1e-12
    # On since issue #20's rule on four tasks (docs/results.md); at small learning rates its early
    # gradient slows learning (orth_reg_start). method.md's per-adapter mean: PEFT's w per matrix
    # is igulora's w / 2, so 0.25 is PEFT AdaLoRA's 0.5.
    orth_reg_weight: float = 0.25
    orth_reg_start: int | str = 0  # an optimizer step, or "tinit"
    ig_rule: str = "gauss_legendre"  # defaults from docs/results.md (IG accuracy study)
    ig_steps: int | str = 3  # or "auto"
    ig_tolerance: float = 0.09  # 3 nodes' residual in the IG accuracy study (docs/results.md)
    ig_max_steps: int = 8
    ig_residual: bool = False
    ig_every: int = 2  # with ig_fraction: the IG cost, see docs/results.md (step cost)
    ig_fraction: float = 0.125
    stochastic_grid: int = 20
    seed: int = 0
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"IGULoraConfig.{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
                fail("target_modules", "must be a non-empty list of names, a regex or 'all-linear'")
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            fail("target_modules", "must be a non-empty list of names, a regex or 'all-linear'")
        if not isinstance(self.init_r, int) or self.init_r < 1:
            fail("init_r", "must be an integer >= 1")
        if isinstance(self.target_r, bool) or not isinstance(self.target_r, (int, float)):
            fail("target_r", f"must be a number in [0, init_r={self.init_r}]")
        if not 0 <= self.target_r <= self.init_r:
            fail("target_r", f"must be in [0, init_r={self.init_r}] (an average rank per layer)")
        if not self.lora_alpha > 0:
            fail("lora_alpha", "must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("lora_dropout", "must be in [0, 1)")
        for name, allowed in (
            ("init", INITS),
            ("prune_mode", PRUNE_MODES),
            ("budget_unit", BUDGET_UNITS),
            ("score", SCORES),
            ("ig_rule", RULES),
        ):
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {allowed}")
        total = self.total_step
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            fail("total_step", "must be the optimizer steps (an integer >= 1), or None for a Trainer to set")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, float) and 0.0 <= value < 1.0:
                if total is not None:  # a fraction of the run, resolved once total_step is known
                    setattr(self, name, round(value * total))
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, "must be a step count (an integer >= 0) or a fraction of total_step in [0, 1)")
        if total is not None and self.tinit + self.tfinal >= total:
            fail(
                "tfinal",
                f"tinit + tfinal = {self.tinit + self.tfinal} leaves no budget phase before "
                f"total_step={total}",
            )
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                fail(name, "must be in (0, 1)")
        auto = self.ig_steps == "auto"
        if not auto and (isinstance(self.ig_steps, bool) or not isinstance(self.ig_steps, int)):
            fail("ig_steps", "must be an integer >= 1 or 'auto'")
        for name in ("delta_t", "ig_every", "stochastic_grid", "ig_max_steps") + (
            () if auto else ("ig_steps",)
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be an integer >= 1")
        if auto and self.ig_rule != "gauss_legendre":
            fail("ig_steps", f"'auto' chooses Gauss-Legendre node counts; ig_rule={self.ig_rule!r}")
        if self.ig_residual and self.ig_rule not in ("gauss_legendre", "riemann_middle"):
            fail(
                "ig_residual",
                f"needs every node on the IG rows (gauss_legendre, riemann_middle); ig_rule="
                f"{self.ig_rule!r} evaluates its alpha = 1 node on the training batch",
            )
        if not self.ig_tolerance > 0:
            fail("ig_tolerance", "must be > 0")
        if not 0.0 < self.ig_fraction <= 1.0:
            fail("ig_fraction", "must be in (0, 1]")
        if self.score_eps < 0:
            fail("score_eps", "must be >= 0")
        if self.orth_reg_weight < 0:
            fail("orth_reg_weight", "must be >= 0")
        start = self.orth_reg_start
        if start != "tinit" and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            fail("orth_reg_start", "must be an optimizer step (an integer >= 0) or 'tinit'")
        if self.orth_reg_weight > 0 and total is not None and self.orth_reg_from >= total:
            fail(
                "orth_reg_start",
                f"starts the orthogonality term at step {self.orth_reg_from}, at or past "
                f"total_step={self.total_step}: it would never apply",
            )
        if self.compact not in (None, True, False):
            fail("compact", "must be None (on where exact), True or False")

    def resolved(self, total_step: int) -> IGULoraConfig:
        """This config with ``total_step`` set (fractional ``tinit`` / ``tfinal`` become steps);
        a config that set it already must agree."""
        if self.total_step is not None and self.total_step != total_step:
            raise ValueError(
                f"IGULoraConfig.total_step={self.total_step} is set already; the run has {total_step} steps"
            )
        return replace(self, total_step=total_step)

    @property
    def tracks_completeness(self) -> bool:
        """Whether scoring steps compute the completeness residual."""
        return self.ig_steps == "auto" or self.ig_residual

    @property
    def orth_reg_from(self) -> int:
        """The first optimizer step whose loss carries the orthogonality term."""
        return self.tinit if self.orth_reg_start == "tinit" else self.orth_reg_start

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.init_r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IGULoraConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"IGULoraConfig: unknown fields {unknown}")
        return cls(**data)
