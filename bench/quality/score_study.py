"""The SNR score's scale invariance, against product and stable_magnitude (docs/results-details.md).

    python bench/quality/score_study.py --seeds 5 --json bench/results/<date>-score-study.json

1. Closed form: importance sequences ``c * x_t`` with one steady and one noisy shape ``x_t``, for
   scales c from 1e-4 to 1, through the library's score update (igu_kernels.reference): SNR gives
   every scale the same score, product grows as c^2, stable_magnitude as c.
2. The planted-rank demo (``igulora demo``; the right allocation is known): per score, the share of
   the planted rank recovered, and the contrast each EMA and score draws between planted and
   unplanted modules when pruning begins (the allocator's EMAs at its first pruning, every triplet
   alive): median Ibar, Ubar and score of the planted modules' elements over the unplanted ones'.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from igu_kernels import reference  # noqa: E402
from igu_kernels.reference import SCORES  # noqa: E402
from igulora.allocator import RankAllocator  # noqa: E402
from igulora.demo import PLANTED, run_demo  # noqa: E402

SCALES = (1e-4, 1e-2, 1.0)
BETA, EPS, UPDATES = 0.85, 1e-12, 60


def closed_form() -> list[dict]:
    """Score of a steady (5% jitter) and a noisy (|N(1, 1)|) importance sequence at each scale."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "steady": 1 + 0.05 * torch.randn(UPDATES, generator=g, dtype=torch.float64),
        "noisy": (1 + torch.randn(UPDATES, generator=g, dtype=torch.float64)).abs(),
    }
    rows = []
    for shape, x in shapes.items():
        for c in SCALES:
            row = {"sequence": shape, "scale": c}
            for score in SCORES:
                ibar, ubar = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
                for value in c * x:
                    out = reference.score_update(
                        value.view(1), ibar, ubar, beta1=BETA, beta2=BETA, score=score, eps=EPS
                    )
                row[score] = float(out)
            rows.append(row)
    return rows


def contrast(ibar: dict[str, torch.Tensor], ubar: dict[str, torch.Tensor]) -> dict[str, float]:
    """Median over the planted modules' elements / median over the others', of Ibar, Ubar and
    each score computed from them."""
    values = {"ibar": ibar, "ubar": ubar}
    for score in SCORES:
        values[score] = {k: reference.element_score(ibar[k], ubar[k], score=score, eps=EPS) for k in ibar}
    out = {}
    for what, tensors in values.items():
        groups = {True: [], False: []}
        for key, tensor in tensors.items():
            groups[key.rsplit(".", 1)[0] in PLANTED].append(tensor.flatten())
        planted, others = (float(torch.cat(groups[flag]).median()) for flag in (True, False))
        out[what] = planted / others
    return out


@contextlib.contextmanager
def first_pruning_emas() -> Iterator[dict]:
    """Capture the allocator's EMAs at its first pruning (every triplet still alive)."""
    captured: dict = {}
    original = RankAllocator.update_and_allocate

    def spy(self, *args, **kwargs):
        pattern = original(self, *args, **kwargs)
        if pattern is not None and not captured:
            captured.update(ibar={k: v.clone() for k, v in self.ibar.items()})
            captured.update(ubar={k: v.clone() for k, v in self.ubar.items()})
        return pattern

    RankAllocator.update_and_allocate = spy
    try:
        yield captured
    finally:
        RankAllocator.update_and_allocate = original


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = closed_form()
    print(f"{'sequence':<8} {'scale':>7} " + " ".join(f"{s:>17}" for s in SCORES))
    for row in rows:
        print(f"{row['sequence']:<8} {row['scale']:>7g} " + " ".join(f"{row[s]:>17.4g}" for s in SCORES))
    demo = []
    for score in SCORES:
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as out, first_pruning_emas() as emas:
                result = run_demo(out, seed=seed, progress=False, overrides={"score": score})
            record = {"score": score, "seed": seed, "recovery": result.recovery}
            record["planted_over_unplanted"] = contrast(emas["ibar"], emas["ubar"])
            demo.append(record)
        mine = [r for r in demo if r["score"] == score]
        ratios = {
            k: statistics.median(r["planted_over_unplanted"][k] for r in mine)
            for k in mine[0]["planted_over_unplanted"]
        }
        recovered = ", ".join(f"{r['recovery']:.2f}" for r in mine)
        print(
            f"demo, score={score}: recovery {recovered} "
            f"(mean {statistics.mean(r['recovery'] for r in mine):.3f}); planted / unplanted medians: "
            + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
        )
    if args.json:
        meta = {
            "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv),
            "torch": torch.__version__,
        }
        args.json.write_text(json.dumps({"meta": meta, "closed_form": rows, "demo": demo}, indent=2) + "\n")


if __name__ == "__main__":
    main()
