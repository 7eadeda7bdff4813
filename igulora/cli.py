"""The ``igulora`` console script: ``demo``, ``finetune`` and ``bench``."""

from __future__ import annotations

import argparse
import runpy
import sys
from dataclasses import fields
from pathlib import Path

from igulora.quadrature import RULES

# FinetuneArgs fields that take an integer or a word: the words
WORDS = {"ig_steps": ("auto",), "orth_reg_start": ("tinit",)}
BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igulora", description="IGU-LoRA adaptive-rank fine-tuning")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="recover planted low-rank updates in a tiny model (no downloads)")
    demo.add_argument("--output-dir", default="igulora-demo")
    demo.add_argument("--rule", choices=RULES, default="gauss_legendre", help="IG quadrature rule")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)

    tune = commands.add_parser("finetune", help="fine-tune a local Hugging Face model on local data")
    tune.add_argument(
        "--model", required=True, help="a Hugging Face model folder (model and tokenizer), or a .gguf file"
    )
    tune.add_argument("--data", required=True, help="training data: .jsonl, .csv, .tsv or label-text lines")
    tune.add_argument("--task", required=True, help="classification or causal-lm")
    tune.add_argument("--output-dir", required=True)
    tune.add_argument("--max-steps", type=int, required=True)
    tune.add_argument("--eval-data", help="evaluation data, same format")
    tune.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint-* in --output-dir"
    )
    tune.add_argument("--no-progress", dest="progress", action="store_false")
    tune.add_argument("--group-by-length", action="store_true", help="batch examples of similar length")
    tune.add_argument(
        "--ig-residual", action="store_true", help="log the completeness residual with a fixed --ig-steps"
    )
    from igulora.finetune import FinetuneArgs

    given = {
        "model",
        "data",
        "task",
        "output_dir",
        "max_steps",
        "eval_data",
        "resume",
        "progress",
        "group_by_length",
        "ig_residual",
    }
    for f in fields(FinetuneArgs):
        if f.name not in given:
            plain = {"float": float, "int": int}.get(f.type, str)
            kind = _int_or(*WORDS[f.name]) if f.name in WORDS else plain
            tune.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)

    bench = commands.add_parser("bench", help="run the benchmark harness (bench/run.py)")
    bench.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="arguments for bench/run.py, e.g. --json PATH"
    )
    return parser


def _demo(args) -> None:
    from igulora.demo import format_report, run_demo

    if args.steps < 10:
        raise CliError("--steps must be >= 10")
    print(format_report(run_demo(args.output_dir, rule=args.rule, steps=args.steps, seed=args.seed)))


def _finetune(args) -> None:
    from igulora.data import DataError
    from igulora.finetune import FinetuneArgs, FinetuneError, run_finetune

    values = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        final = run_finetune(FinetuneArgs(**values))
    except (DataError, FinetuneError, OSError, ValueError) as error:  # OSError: unwritable, disk full, ...
        raise CliError(" ".join(str(error).split())) from None  # one line, whatever the message holds
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))


def _bench(bench_args: list[str]) -> None:
    """Run bench/run.py with ``bench_args``; its --help lists them."""
    if not BENCH.is_file():
        raise CliError(f"{BENCH} not found: 'igulora bench' needs the source checkout (pip install -e .)")
    sys.argv = [str(BENCH), *bench_args]
    runpy.run_path(str(BENCH), run_name="__main__")


def _int_or(*words: str):
    """The type of an option that takes an integer or one of ``words``."""

    def parse(value: str) -> int | str:
        if value in words:
            return value
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is neither an integer nor one of {words}") from None

    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        command, args = "bench", argv[1:]  # everything after 'bench' belongs to bench/run.py
    else:
        args = build_parser().parse_args(argv)
        command = args.command
    try:
        {"demo": _demo, "finetune": _finetune, "bench": _bench}[command](args)
    except CliError as error:
        print(f"igulora {command}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # bench/run.py exits with its status
        return int(exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
