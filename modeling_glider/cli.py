"""The `glider` command line. Each subcommand lives with the code it drives; this file only wires them up."""

import argparse
import math
import re
import sys
from pathlib import Path

from huggingface_hub.errors import HTTPError, StrictDataclassError
from safetensors import SafetensorError

from .embedding import DEFAULT_EMBEDDING_MODEL

# What bad input, missing files and unreachable servers raise from this package and the libraries it drives: each is
# reported in one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,  # also json.JSONDecodeError, UnicodeDecodeError, huggingface_hub's validation errors
    TypeError,
    OSError,  # also FileNotFoundError, requests' errors, huggingface_hub's HTTP status errors
    KeyError,
    RuntimeError,
    ImportError,
    HTTPError,  # httpx2's connection and timeout errors, under huggingface_hub
    SafetensorError,
    StrictDataclassError,  # GliderConfig's field types
    re.error,
)


class ArgumentParser(argparse.ArgumentParser):
    """Parse errors in one line, `glider <command>: error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def count(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(text: str, low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False,
           what: str = "a finite number") -> float:  # fmt: skip
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def finite(text: str) -> float:
    return number(text)


def positive(text: str) -> float:
    return number(text, low=0, low_open=True, what="a finite number > 0")


def fraction(text: str) -> float:
    return number(text, low=0, high=1, low_open=True, what="a number in (0, 1]")


def ratio(text: str) -> float:
    return number(text, low=0, high=1, high_open=True, what="a number in [0, 1)")


def shard_size(text: str) -> int | str:
    """A size such as 2GB, 500MB or 1GiB, or a number of bytes."""
    from .library import check_shard_size

    size = int(text) if text.isdigit() else text
    try:
        check_shard_size(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 1GiB, got {text!r}") from None
    return size


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, model_dir=args.model)
    return 0


def _build(args: argparse.Namespace) -> int:
    from .library import build_library

    model = build_library(
        args.base, args.experts, args.out, tokenizer=args.tokenizer, top_k=args.top_k, local_router=args.local_router,
        arrow_temperature=args.arrow_temperature, global_routing_scale=args.global_routing_scale, router_top_p=args.top_p,
        dtype=args.dtype, max_shard_size=args.max_shard_size, global_routing_descriptor=args.global_routing_descriptor,
    )  # fmt: skip
    config = model.config
    global_router = (
        f"global router over {config.instruction_embedding_dim}-d embeddings"
        if model.global_router
        else "no global router"
    )
    print(f"Saved a GliderT5 with {len(config.experts)} experts {config.expert_names} to {args.out}")
    print(f"  local router {config.local_router}, top-k {config.router_top_k}, {global_router}.")
    return 0


def _print_once(message: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:  # under torchrun / accelerate launch every process runs this command
        print(message)


def _training_options(args: argparse.Namespace) -> dict:
    return {
        "tokenizer": args.tokenizer,
        "batch_size": args.batch_size,
        "max_source_length": args.max_source_length,
        "max_target_length": args.max_target_length,
        "seed": args.seed,
        "bf16": args.bf16,
        "trainer_args": {"gradient_accumulation_steps": args.gradient_accumulation_steps},
    }


def _train_gates(args: argparse.Namespace) -> int:
    from .training import train_gates

    directory = train_gates(
        args.base, args.expert, args.data, name=args.name, instruction=args.instruction, steps=args.steps,
        learning_rate=args.learning_rate, **_training_options(args),
    )  # fmt: skip
    _print_once(f"Wrote Phatgoose gates to {directory / 'glider_expert.safetensors'}")
    return 0


def _train_expert(args: argparse.Namespace) -> int:
    from .training import load_pairs, train_expert

    embedded = {}
    if args.samples:  # embedded before training: a bad embedder or instruction fails before the long part
        import random

        from .embedding import load_embedder

        if not args.instruction.strip():
            raise ValueError("--samples needs the expert's --instruction: the global router embeds both.")
        inputs = load_pairs(args.data)["input"]
        embedder = load_embedder(args.embedder)
        chosen = random.Random(args.seed).sample(inputs, min(args.samples, len(inputs)))
        embedded = {
            "instruction_embedding": embedder.embed([args.instruction])[0],
            "sample_embeddings": embedder.embed(chosen),
            "embedding_model": embedder.model_id,
        }
    directory = train_expert(
        args.base, args.data, args.out, name=args.name, instruction=args.instruction, r=args.r,
        lora_alpha=args.lora_alpha, target_modules=args.target_modules, steps=args.steps,
        learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio, train_gates_after=not args.no_gates,
        gate_steps=args.gate_steps, gate_learning_rate=args.gate_learning_rate, **embedded, **_training_options(args),
    )  # fmt: skip
    _print_once(f"Wrote expert {args.name!r} to {directory}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoints

    directories = convert_checkpoints(
        args.checkpoints, args.out, names=args.names, embeddings=args.embeddings, instructions=args.instructions,
        embedding_model=args.embedding_model, embedding_dim=args.embedding_dim, lora_alpha=args.lora_alpha,
        base=args.base, base_model_name_or_path=args.base_name, gates=not args.no_gates,
    )  # fmt: skip
    print(f"Converted {len(directories)} experts into {args.out}: {[d.name for d in directories]}")
    return 0


def _add_training_arguments(command: argparse.ArgumentParser, steps: int) -> None:
    command.add_argument("--base", required=True, help="The base T5: Hub id or folder.")
    command.add_argument("--data", required=True, help='JSONL file of {"input": ..., "target": ...} objects.')
    command.add_argument("--tokenizer", help="Tokenizer (default: the base's).")
    command.add_argument("--steps", type=count, default=steps, help="Optimizer steps (default: %(default)s).")
    command.add_argument(
        "--learning-rate", type=positive, default=5e-3, help="AdamW learning rate (default: %(default)s)."
    )
    command.add_argument(
        "--batch-size", type=count, default=8, help="Examples per device and step (default: %(default)s)."
    )
    command.add_argument("--gradient-accumulation-steps", type=count, default=1, help="(default: %(default)s)")
    command.add_argument("--max-source-length", type=count, default=512, help="(default: %(default)s)")
    command.add_argument("--max-target-length", type=count, default=128, help="(default: %(default)s)")
    command.add_argument("--seed", type=integer, default=42, help="(default: %(default)s)")
    command.add_argument("--bf16", action="store_true", help="bf16 mixed precision.")


def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise ValueError(f"{option} takes NAME=VALUE, got {value!r}.")
        if name in pairs:
            raise ValueError(f"{option} gives {name!r} twice.")
        pairs[name] = rest
    return pairs


def _describe_experts(args: argparse.Namespace) -> int:
    from .describe import describe_experts, read_samples
    from .experts import read_json_object

    instructions = read_json_object(Path(args.instructions), "--instructions") if args.instructions else {}
    instructions.update(_pairs(args.instruction, "--instruction"))
    data = {name: read_samples(path) for name, path in _pairs(args.data, "--data").items()}
    written = describe_experts(
        args.experts, instructions=instructions, data=data, generator=args.generator, embedder=args.embedder,
        embedding_prefix=args.embedding_prefix, k=args.k, seed=args.seed, samples=args.samples,
    )  # fmt: skip
    for name, instruction in written.items():
        print(f"{name}: {instruction}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    # importing this package registered glider_t5 and the pipeline task
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    # Loaded here, not by `pipeline`, whose error for a model that does not load holds the whole traceback.
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise ValueError(f"{args.model} holds no tokenizer that loads (save one beside the model): {error}") from None
    generator = None if args.generator == "none" else args.generator
    pipe = pipeline(
        "text2text-generation", model=model, tokenizer=tokenizer, instruction_generator=generator,
        instruction_embedder=args.embedder,
    )  # fmt: skip
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
    from .hub import push_folder

    commit = push_folder(  # Hub errors are OSErrors: `main` reports them
        args.folder,
        args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
        commit_message=args.message,
        eval_results=args.eval_results,
        license=args.license,
        model_card=None if args.card is None else _read_card(Path(args.card)),
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {commit.commit_url}")
    return 0


def _read_card(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--card {path}: not UTF-8 text ({error}).") from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="glider", description="GLIDER: one routed T5 from a library of LoRA experts.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="Answer queries with glider-mini, show which experts each used, and plot the routing per layer."
    )
    demo.add_argument("--out", default="glider-demo", help="Folder for the demo's outputs (default: %(default)s).")
    demo.add_argument("--model", default=None, help="A GliderT5 folder (default: the committed glider-mini).")
    demo.set_defaults(run=_demo)

    build = commands.add_parser("build", help="Build and save a GliderT5 from LoRA experts or PEFT adapters.")
    build.add_argument("--base", required=True, help="The base T5 the experts were trained from: Hub id or folder.")
    build.add_argument(
        "--experts", required=True, nargs="+", metavar="DIR_OR_HUB_ID",
        help="Expert directories or plain PEFT LoRA adapters: folders or Hub repo ids (owner/name[@revision]).",
    )  # fmt: skip
    build.add_argument("--out", required=True, help="Folder for the saved model (must not exist or be empty).")
    build.add_argument("--tokenizer", help="Tokenizer to save with the model (default: the base's, if it has one).")
    build.add_argument("--top-k", type=count, default=2, help="Experts per token and linear (default: %(default)s).")
    build.add_argument("--top-p", type=fraction, help="Also keep only the experts within this probability mass.")
    build.add_argument("--global-routing-scale", type=finite, help="alpha of the global router (default: 100).")
    build.add_argument("--global-routing-descriptor", choices=["instruction", "samples", "both"], default="instruction",
                       help="What describes an expert to the global router (default: %(default)s).")  # fmt: skip
    build.add_argument("--local-router", choices=["phatgoose", "arrow"], default="phatgoose",
                       help="Trained Phatgoose gates, or training-free Arrow prototypes (default: %(default)s).")  # fmt: skip
    build.add_argument("--arrow-temperature", type=positive, default=10.0, help="T of Arrow (default: %(default)s).")
    build.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="Store base and experts in this dtype (default: the base's); routing stays fp32.")  # fmt: skip
    build.add_argument("--max-shard-size", type=shard_size, default="50GB",
                       help="Largest safetensors file; larger models are sharded with an index (default: %(default)s).")  # fmt: skip
    build.set_defaults(run=_build)

    gates = commands.add_parser("train-gates", help="Train the Phatgoose gates of one LoRA expert on its task data.")
    _add_training_arguments(gates, steps=100)
    gates.add_argument("--expert", required=True, help="Expert directory or plain PEFT LoRA adapter folder.")
    gates.add_argument("--name", help="Name for a plain adapter (default: its folder's name).")
    gates.add_argument("--instruction", help="The expert's task instruction, written to glider_expert.json.")
    gates.set_defaults(run=_train_gates)

    expert = commands.add_parser("train-expert", help="Train a new LoRA expert (PEFT), then its gates.")
    _add_training_arguments(expert, steps=1000)
    expert.add_argument("--out", required=True, help="The new expert directory (must not exist or be empty).")
    expert.add_argument("--name", required=True, help="The expert's name.")
    expert.add_argument("--instruction", default="", help="The expert's task instruction.")
    expert.add_argument(  # torchrun takes --r as an abbreviation of its own options: --lora-r passes through it
        "--r", "--lora-r", dest="r", type=count, default=16, help="LoRA rank (default: %(default)s)."
    )
    expert.add_argument(
        "--lora-alpha", type=positive, default=1.0, help="LoRA alpha; scaling alpha/r (default: %(default)s)."
    )
    expert.add_argument("--target-modules", nargs="+", default=["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
                        help="PEFT target modules (default: every linear of every block).")  # fmt: skip
    expert.add_argument("--warmup-ratio", type=ratio, default=0.06, help="(default: %(default)s)")
    expert.add_argument("--no-gates", action="store_true", help="Skip gate training (Arrow needs none).")
    expert.add_argument("--gate-steps", type=count, default=100, help="(default: %(default)s)")
    expert.add_argument("--gate-learning-rate", type=positive, default=5e-3, help="(default: %(default)s)")
    expert.add_argument("--samples", type=count, default=0, metavar="N",
                        help="Embed the instruction and N random training inputs (global_routing_descriptor='samples').")  # fmt: skip
    expert.add_argument("--embedder", default=DEFAULT_EMBEDDING_MODEL, help="Embedding model (default: %(default)s).")
    expert.set_defaults(run=_train_expert)

    convert = commands.add_parser(
        "convert", help="Convert released GLIDER/Phatgoose/MoLoRA checkpoints to expert directories."
    )
    convert.add_argument(
        "checkpoints", nargs="+", help="<task>_best.pt files, Phatgoose checkpoints, or folders of them."
    )
    convert.add_argument("--out", required=True, help="Folder that receives one expert directory per expert.")
    convert.add_argument("--names", nargs="+", help="Expert names in order (needed for Phatgoose checkpoints).")
    convert.add_argument("--embeddings", help="torch.save'd {task: tensor} instruction embeddings.")
    convert.add_argument("--instructions", help="{task: text or [texts]}: JSON, or torch.save'd (.pt).")
    convert.add_argument("--embedding-model", help="Name of the model that embedded the instructions.")
    convert.add_argument("--embedding-dim", type=count, help="Keep only the first N embedding values (Matryoshka).")
    convert.add_argument("--lora-alpha", type=positive, default=1.0, help="1 reproduces their 1/r scaling (default).")
    convert.add_argument("--base", help="Base T5 (Hub id or folder; only its config is read) to check shapes against.")
    convert.add_argument("--base-name", help="base_model_name_or_path to record in the adapters.")
    convert.add_argument("--no-gates", action="store_true", help="Ignore the files' gates (e.g. Arrow checkpoints).")
    convert.set_defaults(run=_convert)

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
    describe.add_argument("--embedding-prefix", default="", metavar="TEXT",
                          help="Text put before every instruction and sample embedded, as some embedders need (e.g. "
                               "'search_query: '); recorded in glider_expert.json (default: none).")  # fmt: skip
    describe.add_argument("-k", type=count, default=3, help="Samples shown per expert (default: %(default)s).")
    describe.add_argument("--seed", type=integer, default=0, help="Seed of the sample choice (default: %(default)s).")
    describe.add_argument("--samples", type=count, default=0, metavar="N",
                          help="Also embed N random inputs of each --data file, for global_routing_descriptor='samples'.")  # fmt: skip
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
    generate.add_argument("--max-new-tokens", type=count, default=64)
    generate.add_argument("--num-beams", type=count, default=1)
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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a parse error already reported in one line
        return exit.code
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"glider {args.command}: error: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:  # the message names the culprit; one line, however the library wrote it
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        print(f"glider {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
