"""The `glider` command line. Each subcommand lives with the code it drives; this file only wires them up."""

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out)
    return 0


def _push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import push_folder

    try:
        commit = push_folder(
            args.folder,
            args.repo_id,
            token=args.token,
            private=args.private,
            revision=args.revision,
            commit_message=args.message,
            eval_results=args.eval_results,
            license=args.license,
            model_card=None if args.card is None else open(args.card, encoding="utf-8").read(),
        )
    except (HfHubHTTPError, OSError, ValueError) as error:
        print(f"glider push: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.folder} to {args.repo_id}: {commit.commit_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glider", description="GLIDER: one routed T5 from a library of LoRA experts.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="Build a small GliderT5 and show which experts each query uses.")
    demo.add_argument("--out", default="glider-demo", help="Folder for the demo's outputs (default: %(default)s).")
    demo.set_defaults(run=_demo)

    push = commands.add_parser("push", help="Push a saved GliderT5 folder to the Hub, with a generated model card.")
    push.add_argument("folder", help="Folder written by save_pretrained (model, and tokenizer for pipelines).")
    push.add_argument("repo_id", help="Hub repo, e.g. org/glider-t5 (created if needed).")
    push.add_argument("--eval-results", help="JSON of evaluation results for the card (see modeling_glider.hub).")
    push.add_argument("--card", help="Upload this model card instead of generating one.")
    push.add_argument("--license", default="apache-2.0", help="License for the card (default: %(default)s).")
    push.add_argument("--private", action="store_true", default=None, help="Create the repo private.")
    push.add_argument("--revision", help="Existing branch to commit to (default: main).")
    push.add_argument("--message", help="Commit message.")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login).")
    push.set_defaults(run=_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
