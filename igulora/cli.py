"""The ``igulora`` console script."""

from __future__ import annotations

import argparse
import sys

from igulora.quadrature import RULES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igulora", description="IGU-LoRA adaptive-rank fine-tuning")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="recover planted low-rank updates in a tiny model (no downloads)")
    demo.add_argument("--output-dir", default="igulora-demo")
    demo.add_argument("--rule", choices=RULES, default="trapezoid", help="IG quadrature rule")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from igulora.demo import format_report, run_demo

        if args.steps < 10:
            print("igulora demo: error: --steps must be >= 10", file=sys.stderr)
            return 2
        result = run_demo(args.output_dir, rule=args.rule, steps=args.steps, seed=args.seed)
        print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
