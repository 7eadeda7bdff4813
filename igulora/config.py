"""IGULoraConfig: every knob of IGU-LoRA in one validated dataclass (PEFT style)."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from igu_kernels.reference import SCORES
from igulora.quadrature import RULES

BUDGET_UNITS = ("triplets", "parameters")
PRUNE_MODES = ("mask", "zero")
INITS = ("adalora", "lora")
ORTH_RANKS = ("all", "live")

Accepts = Callable[[Any], bool]


def _integer(ge: int, lt: int | None = None) -> Accepts:
    """An int (a bool is not one) in ``[ge, lt)``."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= ge and (lt is None or v < lt)


def _number(
    *,
    gt: float = -math.inf,
    ge: float = -sys.float_info.max,
    lt: float = math.inf,
    le: float = sys.float_info.max,
) -> Accepts:
    """An int or float (a bool is not one) in the bounds given, finite as a float: infinities and
    ints too large for a float fail the default bounds, NaN every comparison."""
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and gt < v < lt and ge <= v <= le


def _choice(*options: str) -> Accepts:
    return lambda v: isinstance(v, str) and v in options


def _constant(*values: Any) -> Accepts:
    """One of ``values`` itself (None, True, False: ``0`` is not ``False``)."""
    return lambda v: any(v is c for c in values)


def _names(min_size: int = 0) -> Accepts:
    """A list or tuple of module names."""
    return lambda v: (
        isinstance(v, (list, tuple)) and len(v) >= min_size and all(isinstance(n, str) for n in v)
    )


def _regex(v: Any) -> bool:
    """A non-empty string that compiles (matched against full module names)."""
    if not isinstance(v, str) or not v:
        return False
    try:
        re.compile(v)
    except re.error:
        return False
    return True


def _either(*alternatives: Accepts) -> Accepts:
    return lambda v: any(accepts(v) for accepts in alternatives)


_NONE = _constant(None)
_STEPS_OR_FRACTION = (
    _either(_integer(0), _number(ge=0, lt=1)),
    "a step count (an integer >= 0) or a fraction of total_step in [0, 1)",
)
_BETA = (_number(gt=0, lt=1), "a number in (0, 1)")
_AT_LEAST_ONE = (_integer(1), "an integer >= 1")
# Every field of IGULoraConfig: what it accepts, and how the error says so. Checked one by one
# before the checks that tie fields together; a bool is never a number, an int is a float.
FIELD_RULES: dict[str, tuple[Accepts, str]] = {
    "target_modules": (
        _either(_names(1), _regex),
        "a non-empty list of module names, a regex or 'all-linear'",
    ),
    "exclude_modules": (_either(_NONE, _names(), _regex), "None, a list of module names or a regex"),
    "modules_to_save": (
        _either(_NONE, _names()),
        "None or a list of module names such as ['classifier'] (a bare string is not read as one name)",
    ),
    "init_r": _AT_LEAST_ONE,
    "target_r": (_number(gt=0), "a number > 0 (an average rank per layer; 0 would prune every adapter)"),
    "lora_alpha": (_number(gt=0), "a number > 0"),
    "lora_dropout": (_number(ge=0, lt=1), "a number in [0, 1)"),
    "init": (_choice(*INITS), f"one of {INITS}"),
    "prune_mode": (_choice(*PRUNE_MODES), f"one of {PRUNE_MODES}"),
    "compact": (_constant(None, True, False), "None (on where exact), True or False"),
    "total_step": (
        _either(_NONE, _integer(1)),
        "the optimizer steps (an integer >= 1), or None for a Trainer to set",
    ),
    "tinit": _STEPS_OR_FRACTION,
    "tfinal": _STEPS_OR_FRACTION,
    "delta_t": _AT_LEAST_ONE,
    "budget_unit": (_choice(*BUDGET_UNITS), f"one of {BUDGET_UNITS}"),
    "beta1": _BETA,
    "beta2": _BETA,
    "score": (_choice(*SCORES), f"one of {SCORES}"),
    "score_eps": (_number(ge=0), "a number >= 0"),
    "orth_reg_weight": (_number(ge=0), "a number >= 0"),
    "orth_reg_start": (
        _either(_integer(0), _choice("tinit")),
        "an optimizer step (an integer >= 0) or 'tinit'",
    ),
    "orth_reg_ranks": (_choice(*ORTH_RANKS), f"one of {ORTH_RANKS}"),
    "ig_rule": (_choice(*RULES), f"one of {RULES}"),
    "ig_steps": (_either(_integer(1), _choice("auto")), "an integer >= 1 or 'auto'"),
    "ig_tolerance": (_number(gt=0), "a number > 0"),
    "ig_max_steps": _AT_LEAST_ONE,
    "ig_residual": (_constant(True, False), "True or False"),
    "ig_every": _AT_LEAST_ONE,
    "ig_window": (_either(_NONE, _integer(1)), "None or an integer >= 1 (optimizer steps)"),
    "ig_fraction": (_number(gt=0, le=1), "a number in (0, 1]"),
    "stochastic_grid": _AT_LEAST_ONE,
    "seed": (_integer(0, 2**64), "an integer in [0, 2**64) (a torch.Generator seed)"),
    "base_model_name_or_path": (_either(_NONE, lambda v: isinstance(v, str)), "None or a string"),
}


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
    batch (``stochastic`` draws its nodes from a ``stochastic_grid``-interval trapezoid grid);
    ``ig_window=k`` keeps only the scoring steps among the last ``k`` score updates before each
    reallocation (:meth:`scores_at`), since the allocation reads the EMAs only there.
    ``ig_steps="auto"`` (Gauss-Legendre) raises or lowers the node count between scoring steps,
    up to ``ig_max_steps``, to keep the relative completeness residual under ``ig_tolerance``
    (:mod:`igulora.node_budget`); ``ig_residual=True`` computes and logs that residual with a
    fixed count too.

    ``prune_mode="mask"`` multiplies E by a rank mask (pruned triplets get no gradient and never
    return); ``"zero"`` zeroes pruned singular values in place like AdaLoRA (they may grow back).
    ``compact``: remove pruned triplets from the parameters, the optimizer state and the EMAs
    after each allocation, so that steps get cheaper as the budget falls. ``None`` (default): on
    where it is exact (mask mode, no orthogonality term over pruned ranks, an optimizer passed to
    ``update_and_allocate`` whose state is elementwise, no FSDP2), masking otherwise; ``True``:
    the same, with a warning when it cannot; ``False``: always mask.
    ``init="adalora"``: E = 0, A, B ~ N(0, 0.02); ``"lora"``: B = 0, A Kaiming-uniform, E = 1.
    ``orth_reg_weight`` (default 0.25, by the rule of docs/results-details.md on four tasks; 0 turns it
    off and lets ``compact`` run) adds AdaLoRA's orthogonality term (method.md) from optimizer step
    ``orth_reg_start`` on (``"tinit"``: once the initial phase has grown E; from step 0 its gradient
    alone fills Adam's second moments of A and B while E = 0, docs/results-details.md), over the kept ranks
    only (``orth_reg_ranks="live"``, the default since issue #35's rule: pruned rows of A and
    columns of B leave the term, so ``compact`` stays exact with it on) or over every rank
    (``"all"``, AdaLoRA's, which keeps compaction off).

    Each field is checked on construction (and by :meth:`from_dict`, for a JSON save) against its
    entry of ``FIELD_RULES``, its type (a bool is not a number, an int is a float) and range, then
    against the fields it depends on; a bad value raises ``ValueError`` with a message starting
    ``IGULoraConfig.<field>=<value>:``.
    """

    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_r: int = 12
    target_r: float = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    init: str = "adalora"  # the LoRA-like start is unstable at 6 ranks (docs/results-details.md)
    prune_mode: str = "mask"
    compact: bool | None = None
    total_step: int | None = None  # None: set by a Trainer integration from max_steps
    tinit: int | float = 0  # a float in [0, 1): a fraction of total_step
    tfinal: int | float = 0
    delta_t: int = 1
    budget_unit: str = "triplets"
    beta1: float = 0.85
    beta2: float = 0.85
    # snr until 2026-12-02; switched by the rule fixed before the score study (docs/results-details.md)
    score: str = "stable_magnitude"
    score_eps: float = 1e-12
    # On since issue #20's rule on four tasks (docs/results-details.md); at small learning rates its early
    # gradient slows learning (orth_reg_start). method.md's per-adapter mean: PEFT's w per matrix
    # is igulora's w / 2, so 0.25 is PEFT AdaLoRA's 0.5.
    orth_reg_weight: float = 0.25
    orth_reg_start: int | str = 0  # an optimizer step, or "tinit"
    # "live" since issue #35.1's non-inferiority rule on four tasks (docs/results-details.md): the term over
    # the kept ranks, which compaction keeps exact; "all" is AdaLoRA's
    orth_reg_ranks: str = "live"
    ig_rule: str = "gauss_legendre"  # defaults from docs/results-details.md (IG accuracy study)
    ig_steps: int | str = 3  # or "auto"
    ig_tolerance: float = 0.09  # 3 nodes' residual in the IG accuracy study (docs/results-details.md)
    ig_max_steps: int = 8
    ig_residual: bool = False
    ig_every: int = 1  # with ig_window and ig_fraction: the IG cost, see docs/results-details.md
    ig_window: int | None = 2  # score only on the last ig_window steps before a reallocation
    ig_fraction: float = 0.125
    stochastic_grid: int = 20
    seed: int = 0
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"IGULoraConfig.{name}={getattr(self, name)!r}: {why}")

        for name, (accepts, what) in FIELD_RULES.items():  # each field alone: its type and range
            if not accepts(getattr(self, name)):
                fail(name, f"must be {what}")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(getattr(self, name), tuple):  # a list, as to_dict / JSON give back
                setattr(self, name, list(getattr(self, name)))
        # then the fields that depend on one another
        if self.target_r > self.init_r:
            fail("target_r", f"must be at most init_r={self.init_r} (an average rank per layer)")
        total = self.total_step
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, float) and total is not None:  # a fraction, resolved once total is known
                setattr(self, name, round(value * total))
        if total is not None and self.tinit + self.tfinal >= total:
            fail(
                "tfinal",
                f"tinit + tfinal = {self.tinit + self.tfinal} leaves no budget phase before "
                f"total_step={total}",
            )
        if self.ig_steps == "auto" and self.ig_rule != "gauss_legendre":
            fail("ig_steps", f"'auto' chooses Gauss-Legendre node counts; ig_rule={self.ig_rule!r}")
        if self.ig_residual and self.ig_rule not in ("gauss_legendre", "riemann_middle"):
            fail(
                "ig_residual",
                f"needs every node on the IG rows (gauss_legendre, riemann_middle); ig_rule="
                f"{self.ig_rule!r} evaluates its alpha = 1 node on the training batch",
            )
        if self.orth_reg_weight > 0 and total is not None and self.orth_reg_from >= total:
            fail(
                "orth_reg_start",
                f"starts the orthogonality term at step {self.orth_reg_from}, at or past "
                f"total_step={self.total_step}: it would never apply",
            )

    def resolved(self, total_step: int) -> IGULoraConfig:
        """This config with ``total_step`` set (fractional ``tinit`` / ``tfinal`` become steps);
        a config that set it already must agree."""
        if self.total_step is not None and self.total_step != total_step:
            raise ValueError(
                f"IGULoraConfig.total_step={self.total_step} is set already; the run has {total_step} steps"
            )
        return replace(self, total_step=total_step)

    def scores_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` evaluates IG (of a resolved config): every ``ig_every``
        steps of the initial and budget phases (masks are frozen in the final phase), never with
        the gradient rule; with ``ig_window``, only among the last ``ig_window`` score updates
        before a reallocation: a multiple of ``delta_t`` past ``tinit``, whose own update counts,
        or the final phase's start, whose last update is the step before."""
        final_start = self.total_step - self.tfinal
        if self.ig_rule == "gradient" or step % self.ig_every or step >= final_start:
            return False
        if self.ig_window is None:
            return True
        reallocation = -(-step // self.delta_t) * self.delta_t  # the next multiple, at or after step
        before_reallocation = self.tinit < reallocation < final_start and reallocation - step < self.ig_window
        return before_reallocation or final_start - 1 - step < self.ig_window

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
    def from_dict(cls, data: Mapping[str, Any]) -> IGULoraConfig:
        """The config of ``to_dict`` (an ``igulora_config.json``): unknown fields and values of the
        wrong type or range raise the constructor's errors, each naming its field."""
        if not isinstance(data, Mapping):
            raise ValueError(
                f"IGULoraConfig.from_dict: expected a mapping of fields, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"IGULoraConfig: unknown fields {unknown}")
        return cls(**data)
