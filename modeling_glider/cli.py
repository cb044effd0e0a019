"""The `glider` command line. Each subcommand lives with the code it drives; this file only wires them up."""

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glider", description="GLIDER: one routed T5 from a library of LoRA experts.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="Build a small GliderT5 and show which experts each query uses.")
    demo.add_argument("--out", default="glider-demo", help="Folder for the demo's outputs (default: %(default)s).")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
