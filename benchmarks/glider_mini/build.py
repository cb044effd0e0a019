"""Build glider-mini end to end, in one command, on CPU:

    python -m benchmarks.glider_mini.build --out glider-mini            # the committed model
    python -m benchmarks.glider_mini.build --out /tmp/mini --smoke      # a few steps, tiny sizes (the tests)

Stages: (1) a sentencepiece tokenizer trained on the suite's text; (2) a small T5 v1.1 pretrained from scratch with
span corruption on unlabeled text made from the suite's training inputs; (3) the held-in experts' hand-written
instructions embedded with all-MiniLM-L6-v2; (4) one PEFT LoRA expert per held-in task (`Seq2SeqTrainer`), then its
Phatgoose gates; (5) `describe_experts` embeds `descriptor_samples` training inputs of each expert's task beside its
instruction (for the global router's fitted descriptors), and the GliderT5 is built from the experts, saved with its
tokenizer, `recipe.json` (every hyper-parameter, seed and package version) and `SHA256SUMS` (`sha256sum -c SHA256SUMS`
checks the files).

Each stage's result is kept in the work folder (default `<out>.work`, not part of the model); a rerun with the same
recipe reuses finished stages. `--reuse MODEL` fills the work folder's stages 1-4 from a glider-mini built before
(its tokenizer, base and experts, exported exactly), so that a recipe change of the last stage needs no retraining.
The model folder appears complete or not at all.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import T5ForConditionalGeneration, T5Tokenizer

from . import pretrain, suite

PACKAGES = ("torch", "transformers", "peft", "accelerate", "sentencepiece", "sentence-transformers", "datasets")


@dataclass(frozen=True)
class Recipe:
    """Every knob of the build. The defaults make the committed glider-mini."""

    seed: int = 0
    tasks: tuple[str, ...] = tuple(suite.HELD_IN)
    # tokenizer
    vocab_size: int = 512
    extra_ids: int = 32
    # base model: T5 v1.1 layout (gated-GELU feed-forward)
    d_model: int = 128
    d_ff: int = 512
    num_layers: int = 4
    num_heads: int = 4
    # span-corruption pretraining
    pretraining_texts_per_world: int = 4000
    pretraining_steps: int = 1000
    pretraining_batch_size: int = 64
    pretraining_learning_rate: float = 2e-3
    pretraining_warmup_steps: int = 100
    # experts: LoRA on every linear of every block, then Phatgoose gates on the same data
    expert_r: int = 8
    expert_lora_alpha: float = 8.0
    expert_steps: int = 400
    expert_batch_size: int = 32
    expert_learning_rate: float = 3e-3
    expert_warmup_ratio: float = 0.06
    gate_steps: int = 100
    gate_learning_rate: float = 5e-3
    # global router: the instructions' embedder; embedded training inputs per expert (its fitted descriptor's data)
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    descriptor_samples: int = 64
    # routing defaults saved in the model's config (only the last stage depends on them); the alpha policy is the one
    # the benchmark chose on the validation split (benchmarks/results/glider_mini/results.json, "policy")
    top_k: int = 2
    global_routing_policy: str = "fixed"
    global_routing_scale: float = 30.0
    global_routing_threshold: float = 0.3
    global_routing_scale_unmatched: float = 3.0
    global_routing_descriptor: str = "samples"
    # data for measuring the pretraining (span corruption on validation inputs, never trained on)
    pretraining_eval_examples: int = 500

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stages_dict(self) -> dict:
        """The fields the work folder's stages depend on (all but those of the last stage)."""
        return {k: v for k, v in self.as_dict().items() if k not in LAST_STAGE_FIELDS}


LAST_STAGE_FIELDS = (
    "top_k",
    "global_routing_policy",
    "global_routing_scale",
    "global_routing_threshold",
    "global_routing_scale_unmatched",
    "global_routing_descriptor",
    "descriptor_samples",
)


SMOKE = Recipe(
    tasks=("pick_animal", "story_who", "review_sentiment"),
    vocab_size=200,
    extra_ids=8,
    d_model=32,
    d_ff=64,
    num_layers=1,
    num_heads=2,
    pretraining_texts_per_world=100,
    pretraining_steps=4,
    pretraining_batch_size=8,
    pretraining_warmup_steps=1,
    expert_r=2,
    expert_lora_alpha=2.0,
    expert_steps=3,
    expert_batch_size=4,
    gate_steps=2,
    pretraining_eval_examples=16,
    descriptor_samples=4,
)


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Stages:
    """The build's stages over one work folder. A stage whose folder exists was finished by an earlier run with the
    same recipe (checked at start) and is reused."""

    def __init__(self, recipe: Recipe, work: Path):
        self.recipe = recipe
        self.work = work
        self.report: dict = {"seconds": {}}

    def run(self, name: str, build) -> Path:
        target = self.work / name
        if target.exists():
            print(f"[{name}] reusing {target}")
        else:
            print(f"[{name}] building {target}")
            start = time.perf_counter()
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.work))
            try:
                build(staging)
                seconds = round(time.perf_counter() - start, 1)
                (staging / "stage.json").write_text(json.dumps({"seconds": seconds}) + "\n")
                staging.chmod(0o755)  # mkdtemp makes it private
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            print(f"[{name}] done in {seconds:.0f} s")
        self.report["seconds"][name] = json.loads((target / "stage.json").read_text())["seconds"]
        return target

    # Stage 1
    def tokenizer(self, staging: Path) -> None:
        r = self.recipe
        texts = list(suite.tokenizer_text(seed=r.seed))
        pretrain.train_tokenizer(texts, staging, vocab_size=r.vocab_size, extra_ids=r.extra_ids)

    # Stage 2
    def base(self, staging: Path) -> None:
        r = self.recipe
        tokenizer = T5Tokenizer.from_pretrained(self.work / "tokenizer")
        config = pretrain.t5_config(tokenizer, r.d_model, r.d_ff, r.num_layers, r.num_heads)
        texts = suite.pretraining_text(r.pretraining_texts_per_world, seed=r.seed)
        per_task = max(1, r.pretraining_eval_examples // len(suite.HELD_IN))
        held_back = [e.input for name in suite.HELD_IN for e in suite.examples(name, "validation", per_task, r.seed)]
        eval_data = pretrain.span_corruption_data(held_back, tokenizer, r.pretraining_eval_examples, r.seed + 1)
        torch.manual_seed(r.seed)
        before = pretrain.span_corruption_metrics(T5ForConditionalGeneration(config), tokenizer, eval_data)
        model, history = pretrain.pretrain(
            tokenizer, texts, config,
            steps=r.pretraining_steps, batch_size=r.pretraining_batch_size,
            learning_rate=r.pretraining_learning_rate, warmup_steps=r.pretraining_warmup_steps,
            seed=r.seed, output_dir=staging / "trainer", logging_steps=max(1, r.pretraining_steps // 30),
        )  # fmt: skip
        shutil.rmtree(staging / "trainer", ignore_errors=True)
        after = pretrain.span_corruption_metrics(model, tokenizer, eval_data)
        print(f"[base] span corruption on held-back inputs: before {before}, after {after}")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        metrics = {
            "span_corruption_held_back": {"before": before, "after": after},
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_loss": [(h["step"], h["loss"]) for h in history if "loss" in h],
        }
        (staging / "pretraining_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    # Stage 3
    def embeddings(self, staging: Path) -> None:
        from safetensors.torch import save_file

        from modeling_glider.embedding import InstructionEmbedder

        embedder = InstructionEmbedder(self.recipe.embedding_model)
        instructions = [suite.TASKS[name].instruction for name in self.recipe.tasks]
        vectors = embedder.embed(instructions)
        save_file(
            {name: v.contiguous() for name, v in zip(self.recipe.tasks, vectors)}, staging / "embeddings.safetensors"
        )
        (staging / "embedding_model.json").write_text(json.dumps({"model_id": embedder.model_id}) + "\n")

    # Stage 4
    def experts(self, staging: Path) -> None:
        from safetensors.torch import load_file

        from modeling_glider.training import train_expert

        r = self.recipe
        embeddings = load_file(self.work / "embeddings" / "embeddings.safetensors")
        model_id = json.loads((self.work / "embeddings" / "embedding_model.json").read_text())["model_id"]
        base = T5ForConditionalGeneration.from_pretrained(self.work / "base")
        tokenizer = T5Tokenizer.from_pretrained(self.work / "base")
        seconds = {}
        for index, name in enumerate(r.tasks):
            start = time.perf_counter()
            data = [
                {"input": e.input, "target": e.target}
                for e in suite.examples(name, "train", r.expert_steps * r.expert_batch_size, r.seed)
            ]
            print(f"[experts] {index + 1}/{len(r.tasks)}: {name}")
            train_expert(
                base, data, staging / name, name=name, instruction=suite.TASKS[name].instruction, tokenizer=tokenizer,
                r=r.expert_r, lora_alpha=r.expert_lora_alpha, steps=r.expert_steps, learning_rate=r.expert_learning_rate,
                warmup_ratio=r.expert_warmup_ratio, batch_size=r.expert_batch_size, seed=r.seed + index,
                gate_steps=r.gate_steps, gate_learning_rate=r.gate_learning_rate,
                instruction_embedding=embeddings[name], embedding_model=model_id,
            )  # fmt: skip
            seconds[name] = round(time.perf_counter() - start, 1)
        (staging / "seconds_per_expert.json").write_text(json.dumps(seconds, indent=2) + "\n")

    # Stage 5
    def assemble(self, out: Path, command: list[str]) -> None:
        from modeling_glider import GliderT5ForConditionalGeneration
        from modeling_glider.describe import describe_experts
        from modeling_glider.packaging import code_files

        r = self.recipe
        base = T5ForConditionalGeneration.from_pretrained(self.work / "base")
        with tempfile.TemporaryDirectory() as scratch:  # the stage's experts stay as they are
            experts = [shutil.copytree(self.work / "experts" / name, Path(scratch) / name) for name in r.tasks]
            if r.descriptor_samples:
                inputs = {
                    name: [e.input for e in suite.examples(name, "train", r.descriptor_samples, r.seed)]
                    for name in r.tasks
                }
                describe_experts(
                    experts, data=inputs, samples=r.descriptor_samples, embedder=r.embedding_model, seed=r.seed
                )
            model = GliderT5ForConditionalGeneration.from_experts(
                base, experts, top_k=r.top_k,
                global_routing_scale=r.global_routing_scale, global_routing_policy=r.global_routing_policy,
                global_routing_threshold=r.global_routing_threshold,
                global_routing_scale_unmatched=r.global_routing_scale_unmatched,
                global_routing_descriptor=r.global_routing_descriptor, base_model_name_or_path="glider-mini-base",
            )  # fmt: skip
        for expert in model.config.experts:  # the work folder's path would mean nothing on another machine
            expert["source"] = f"glider-mini build: experts/{expert['name']}"
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            model.save_pretrained(staging)
            for source in code_files():  # loaded through the package: a copy of its code here would go stale
                (staging / source.name).unlink()
            T5Tokenizer.from_pretrained(self.work / "base").save_pretrained(staging)
            pretraining = json.loads((self.work / "base" / "pretraining_metrics.json").read_text())
            recipe = {"command": command, "recipe": r.as_dict(), "versions": package_versions()}
            (staging / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
            per_expert = self.work / "experts" / "seconds_per_expert.json"
            report = {
                **self.report,
                "seconds_per_expert": json.loads(per_expert.read_text()) if per_expert.exists() else None,
                "pretraining": pretraining,
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(),
                },
            }
            (staging / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
            write_sha256sums(staging)
            staging.chmod(0o755)  # mkdtemp makes it private
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def write_sha256sums(directory: Path) -> None:
    """`SHA256SUMS` for every file in `directory`, in `sha256sum -c` format."""
    lines = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(directory).as_posix()}")
    (directory / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def reuse_stages(model_dir: Path, work: Path) -> None:
    """Fill the stages 1-4 of `work` from a glider-mini built before: its tokenizer, base and experts (exported with
    their tensors as they are), and each stage's time as its build report gives it."""
    from modeling_glider import GliderT5ForConditionalGeneration

    from .library import base_model, export_experts

    model = GliderT5ForConditionalGeneration.from_pretrained(model_dir)
    tokenizer = T5Tokenizer.from_pretrained(model_dir)
    report = json.loads((model_dir / "build_report.json").read_text())
    for stage in ("tokenizer", "base", "embeddings", "experts"):
        staging = Path(tempfile.mkdtemp(prefix=f".{stage}.", dir=work))
        if stage in ("tokenizer", "base"):
            tokenizer.save_pretrained(staging)
        if stage == "base":
            base_model(model).save_pretrained(staging)
            (staging / "pretraining_metrics.json").write_text(json.dumps(report["pretraining"], indent=2) + "\n")
        if stage == "experts":
            export_experts(model, staging)
        (staging / "stage.json").write_text(
            json.dumps({"seconds": report["seconds"][stage], "reused": str(model_dir)}) + "\n"
        )
        staging.chmod(0o755)
        os.replace(staging, work / stage)


def build(
    out: str | Path,
    recipe: Recipe = Recipe(),
    work: str | Path | None = None,
    command: list[str] | None = None,
    reuse: str | Path | None = None,
) -> Path:
    """Build glider-mini into `out` following `recipe` (stages 1-4 taken from the glider-mini at `reuse`, if given);
    returns `out`."""
    out = Path(out).resolve()
    work = Path(work).resolve() if work is not None else out.with_name(out.name + ".work")
    unknown = [name for name in recipe.tasks if name not in suite.HELD_IN]
    if unknown:
        raise ValueError(f"Recipe tasks {unknown} are not held-in tasks of the suite ({suite.HELD_IN}).")
    work.mkdir(parents=True, exist_ok=True)
    recorded = work / "recipe.json"
    expected = json.loads(json.dumps(recipe.stages_dict()))
    if recorded.exists():
        found = json.loads(recorded.read_text())
        differ = sorted(k for k in expected if found.get(k) != expected[k])
        if differ:
            raise ValueError(
                f"The work folder {work} holds stages built with another recipe (differing in {differ}); remove it or "
                "pick another work folder."
            )
    recorded.write_text(json.dumps(expected, indent=2) + "\n")
    if reuse is not None:
        reused = json.loads((Path(reuse) / "recipe.json").read_text())["recipe"]
        differ = sorted(k for k in expected if k in reused and json.dumps(reused[k]) != json.dumps(expected[k]))
        if differ or any((work / stage).exists() for stage in ("tokenizer", "base", "embeddings", "experts")):
            raise ValueError(
                f"--reuse needs an empty work folder and a model built with this recipe (differing in {differ})."
            )
        reuse_stages(Path(reuse).resolve(), work)
    torch.manual_seed(recipe.seed)
    stages = Stages(recipe, work)
    stages.run("tokenizer", stages.tokenizer)
    stages.run("base", stages.base)
    stages.run("embeddings", stages.embeddings)
    stages.run("experts", stages.experts)
    start = time.perf_counter()
    stages.assemble(out, command or [])
    print(f"[assemble] {out} in {time.perf_counter() - start:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="glider-mini", help="Folder of the built model (default: %(default)s).")
    parser.add_argument("--work", default=None, help="Folder for the stages' results (default: <out>.work).")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes and a few steps: checks the pipeline only.")
    parser.add_argument(
        "--reuse", help="A glider-mini built before: take its tokenizer, base and experts (stages 1-4)."
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's); 1 is faster on a busy machine."
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = SMOKE if args.smoke else Recipe()
    command = ["python", "-m", "benchmarks.glider_mini.build", *(argv or sys.argv[1:])]
    build(args.out, recipe, args.work, command=command, reuse=args.reuse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
