"""`glider describe-experts`: give each expert a task instruction and its embedding (GLIDER's G_e), and optionally
embedded samples of its inputs.

An expert's instruction is human-written (given, or already in its `glider_expert.json`) or written by an
instruction generator from k random samples of the expert's data. All instructions are embedded by one
`InstructionEmbedder`, whose id and prefix go into `glider_expert.json` (`embedding_model`, and `embedding_prefix`
when the prefix is not empty) so that a GliderT5 built from the experts records them and embeds queries alike. With
`samples=N`, N random inputs of each expert's data are embedded by the same embedder (`sample_embeddings`), for the
global router's fitted descriptors (`global_routing_descriptor="samples"`).

Nothing is written unless every expert was read and checked in full and got its instruction and embedding. Then every
expert's new files are written beside the old ones, and only when all are written are they renamed over the old
ones. A failure up to that point (a corrupt expert, a full disk) changes nothing. Each rename is atomic, but the
renames across several experts are not one: a kill amid them (a short phase) leaves some experts described anew and
others as they were, each of them whole or, when killed between its two files, refused when read (see
`experts.write_expert_files`). Running the command again completes it.
"""

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from .embedding import DEFAULT_EMBEDDING_MODEL, InstructionEmbedder, load_embedder
from .experts import Expert, load_expert, read_expert_meta, replace_expert_files, stage_expert_files
from .instructions import InstructionGenerator, QueryInstructions, load_instruction_generator


def read_samples(path: str | os.PathLike) -> list[dict]:
    """Task samples from a JSONL file: one object per line with an `input` string (and optionally `target`)."""
    samples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error}).") from None
        if not isinstance(sample, dict) or not isinstance(sample.get("input"), str):
            raise ValueError(f"{path}, line {number}: each line must be an object with an 'input' string.")
        samples.append(sample)
    if not samples:
        raise ValueError(f"{path} holds no samples.")
    return samples


def describe_experts(
    expert_dirs: Sequence[str | os.PathLike],
    *,
    instructions: dict[str, str] | None = None,
    data: dict[str, Sequence[dict | str]] | None = None,
    generator: InstructionGenerator | str | None = None,
    embedder: InstructionEmbedder | str = DEFAULT_EMBEDDING_MODEL,
    embedding_prefix: str = "",
    k: int = 3,
    seed: int = 0,
    samples: int = 0,
) -> dict[str, str]:
    """Write each expert's instruction and instruction embedding into its directory; returns name -> instruction.

    Per expert, by name: `instructions[name]` if given; else, with `data[name]` (samples) and a `generator`, an
    instruction written from `k` random samples; else the instruction already in its `glider_expert.json`. With
    `samples` > 0, `samples` random inputs of `data[name]` (all of them if fewer) are embedded as its
    `sample_embeddings`; embedded samples an expert already has are kept if they come from the same embedder (model
    and prefix). `embedding_prefix` is put before every text an `embedder` given by name embeds (an
    `InstructionEmbedder` brings its own `prefix`); a prefix other than none is recorded as `embedding_prefix`.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an integer >= 0 (inputs to embed per expert), got {samples!r}.")
    if not isinstance(embedding_prefix, str):
        raise ValueError(f"embedding_prefix must be a text, got {embedding_prefix!r}.")
    if isinstance(embedder, InstructionEmbedder) and embedding_prefix and embedding_prefix != embedder.prefix:
        raise ValueError(
            f"embedding_prefix={embedding_prefix!r}, but the embedder given puts {embedder.prefix!r} before texts: "
            "give the prefix to one of them."
        )
    instructions, data = dict(instructions or {}), dict(data or {})
    for name, text in instructions.items():
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise ValueError(f"Expert {name!r}: the instruction given for it, {text!r}, is not a non-empty text.")
    generator = load_instruction_generator(generator)
    if isinstance(generator, QueryInstructions):
        raise ValueError("'query' mode writes no expert instructions: give a generator (URL or model) or instructions.")
    if data and generator is None and not samples:
        raise ValueError(
            f"Samples were given for {sorted(data)}, but no instruction generator to read them and no number of "
            "them to embed (samples)."
        )
    if samples and not data:
        raise ValueError(f"samples={samples} asks for embedded inputs, but no expert's data was given.")
    directories = [Path(d) for d in expert_dirs]
    metas, experts = {}, {}
    for directory in directories:
        meta = read_expert_meta(directory, f"Expert at {directory}")
        name = meta["name"]
        if name in metas:
            raise ValueError(f"Two experts are named {name!r} ({metas[name][0]} and {directory}).")
        metas[name] = (directory, meta)
        experts[name] = load_expert(directory)  # every file read and checked before anything is written
    unknown = sorted((set(instructions) | set(data)) - set(metas))
    if unknown:
        raise ValueError(f"Instructions or data given for unknown experts {unknown}; the experts are {sorted(metas)}.")
    for name, rows in data.items():
        if isinstance(rows, (str, dict)) or not rows:
            raise ValueError(f"Expert {name!r}: its data holds no inputs, got {rows!r}.")
        for row in rows:
            text = row if isinstance(row, str) else row.get("input") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(
                    f"Expert {name!r}: each sample of its data must be a text or a dict with an 'input' text, got "
                    f"{row!r}."
                )

    chosen = {name: instructions.get(name) for name in metas}
    to_write = [name for name in metas if chosen[name] is None and name in data and generator is not None]
    if to_write:
        rng = random.Random(seed)
        sample_sets = [rng.sample(list(data[name]), min(k, len(data[name]))) for name in to_write]
        for name, written in zip(to_write, generator.write(sample_sets)):
            if written is None:
                raise RuntimeError(f"Expert {name!r}: the instruction generator wrote no instruction; nothing written.")
            chosen[name] = written
    for name, (directory, meta) in metas.items():
        chosen[name] = chosen[name] or meta.get("instruction") or None
        if not isinstance(chosen[name], str) or not chosen[name].strip():
            raise ValueError(
                f"Expert {name!r} ({directory}) has no instruction: give one (instructions), or samples of its data "
                "and an instruction generator."
            )

    if not isinstance(embedder, InstructionEmbedder):
        embedder = load_embedder(str(embedder), prefix=embedding_prefix)
    sample_embeddings = {}
    for name, (directory, meta) in metas.items():
        if samples and name in data:
            inputs = [s if isinstance(s, str) else s["input"] for s in data[name]]
            sample_embeddings[name] = embedder.embed(
                random.Random(f"{seed}/{name}").sample(inputs, min(samples, len(inputs)))
            )
        elif experts[name].sample_embeddings is not None:
            made_with = (meta.get("embedding_model"), meta.get("embedding_prefix") or "")
            if made_with != (embedder.model_id, embedder.prefix):
                raise ValueError(
                    f"Expert {name!r} ({directory}) has sample_embeddings made with {_embedder_name(*made_with)}; "
                    f"give its data to embed them anew with {_embedder_name(embedder.model_id, embedder.prefix)}."
                )
            sample_embeddings[name] = experts[name].sample_embeddings
    embeddings = embedder.embed([chosen[name] for name in metas])
    for name, rows in sample_embeddings.items():
        if rows.shape[-1] != embeddings.shape[-1]:  # kept ones: the same model id, another width (truncation)
            raise ValueError(
                f"Expert {name!r} ({metas[name][0]}): its sample_embeddings are {rows.shape[-1]} wide, but "
                f"{embedder.model_id!r} embeds {embeddings.shape[-1]} wide; give its data to embed them anew."
            )
    staged = []
    try:
        for (name, (directory, meta)), embedding in zip(metas.items(), embeddings):
            new_meta = {**meta, "instruction": chosen[name], "embedding_model": embedder.model_id}
            new_meta.pop("embedding_prefix", None)  # absent means none: files without a prefix stay as they were
            if embedder.prefix:
                new_meta["embedding_prefix"] = embedder.prefix
            tensors = expert_tensors(experts[name], embedding, sample_embeddings.get(name))
            staged += stage_expert_files(directory, new_meta, tensors)
        replace_expert_files(staged)
    finally:
        for source, _ in staged:
            source.unlink(missing_ok=True)
    return chosen


def _embedder_name(model_id: str | None, prefix: str) -> str:
    return f"{model_id!r} with the prefix {prefix!r}" if prefix else repr(model_id)


def expert_tensors(
    expert: Expert, instruction_embedding: torch.Tensor, sample_embeddings: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """What `glider_expert.safetensors` holds for `expert` with a new `instruction_embedding` (and embedded samples):
    its gates as they are."""
    tensors = {f"gate.{path}": gate for path, gate in expert.gates.items()}
    tensors["instruction_embedding"] = instruction_embedding.detach().float().cpu().flatten().contiguous()
    if sample_embeddings is not None:
        tensors["sample_embeddings"] = sample_embeddings.detach().float().cpu().contiguous()
    return tensors
