"""The `glider` command line. Each subcommand lives with the code it drives; this file only wires them up."""

import argparse
import json
import sys
from pathlib import Path

from .embedding import DEFAULT_EMBEDDING_MODEL


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out)
    return 0


def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise SystemExit(f"glider: {option} takes NAME=VALUE, got {value!r}.")
        pairs[name] = rest
    return pairs


def _describe_experts(args: argparse.Namespace) -> int:
    from .describe import describe_experts, read_samples

    instructions = json.loads(Path(args.instructions).read_text()) if args.instructions else {}
    instructions.update(_pairs(args.instruction, "--instruction"))
    data = {name: read_samples(path) for name, path in _pairs(args.data, "--data").items()}
    written = describe_experts(
        args.experts, instructions=instructions, data=data, generator=args.generator, embedder=args.embedder, k=args.k,
        seed=args.seed,
    )  # fmt: skip
    for name, instruction in written.items():
        print(f"{name}: {instruction}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from transformers import pipeline  # importing this package registered glider_t5 and the pipeline task

    generator = None if args.generator == "none" else args.generator
    pipe = pipeline(
        "text2text-generation", model=args.model, instruction_generator=generator, instruction_embedder=args.embedder
    )
    outputs = pipe(
        args.queries, instruction=args.instruction, return_experts=True, max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
    )  # fmt: skip
    for query, (output,) in zip(args.queries, outputs):
        experts = ", ".join(f"{e['name']} {e['weight']:.0%}" for e in output["experts"] if e["weight"] >= 0.005)
        print(f"{query!r} -> {output['generated_text']!r}")
        print(f"    instruction: {output['instruction']!r}    experts: {experts}")
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

    describe = commands.add_parser(
        "describe-experts",
        help="Give experts task instructions (human-written or written by an LLM from samples) and embed them.",
    )
    describe.add_argument("experts", nargs="+", help="Expert directories.")
    describe.add_argument("--instructions", help="JSON file {expert name: instruction} of human-written instructions.")
    describe.add_argument("--instruction", action="append", metavar="NAME=TEXT", help="One expert's instruction.")
    describe.add_argument("--data", action="append", metavar="NAME=FILE", help="JSONL samples of an expert's task.")
    describe.add_argument(
        "--generator", help="Writes instructions from samples: an OpenAI-compatible URL (URL#model) or a local model."
    )
    describe.add_argument("--embedder", default=DEFAULT_EMBEDDING_MODEL, help="Embedding model (default: %(default)s).")
    describe.add_argument("-k", type=int, default=3, help="Samples shown per expert (default: %(default)s).")
    describe.add_argument("--seed", type=int, default=0, help="Seed of the sample choice (default: %(default)s).")
    describe.set_defaults(run=_describe_experts)

    generate = commands.add_parser("generate", help="Answer queries with a saved GliderT5 and show the experts used.")
    generate.add_argument("model", help="A GliderT5 folder or Hub id.")
    generate.add_argument("queries", nargs="+", help="Queries.")
    generate.add_argument("--instruction", help="The task instruction to route by, instead of generating one.")
    generate.add_argument(
        "--generator",
        default="query",
        help="'query' (the query is its instruction), 'none', an OpenAI-compatible URL (URL#model) or a local model.",
    )
    generate.add_argument("--embedder", help="Embedding model (default: the one the experts were embedded with).")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--num-beams", type=int, default=1)
    generate.set_defaults(run=_generate)

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
