"""`glider build`: LoRA adapters (expert directories or plain PEFT adapters; local folders or Hub repo ids) -> expert
directories -> a saved GliderT5."""

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5ForConditionalGeneration
from transformers.utils.hub import convert_file_size_to_int

from .experts import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPERT_CONFIG,
    check_config_overrides,
    check_dtype,
    check_name,
    resolve_expert_dir,
)
from .modeling_glider import GliderT5ForConditionalGeneration
from .staging import staged_folder


def expert_specs(specs: Sequence[str | os.PathLike], staging: Path) -> list[str | os.PathLike]:
    """What `from_experts` takes for each of `specs`: an expert (folder or Hub repo id) as it is; a plain PEFT LoRA
    adapter (no `glider_expert.json`) as a staged expert directory.

    A plain adapter becomes an expert named after its folder or repo, with no instruction and no gates (so it routes
    with `local_router="arrow"`, or after `glider train-gates`): its files are copied into `staging` beside a
    `glider_expert.json` that records where it came from.
    """
    resolved = []
    for spec in specs:
        directory = resolve_expert_dir(spec)
        if not (directory / EXPERT_CONFIG).exists() and (directory / ADAPTER_CONFIG).exists():
            name = check_name(Path(str(spec).partition("@")[0]).name, f"Adapter {spec}")
            expert = staging / str(len(resolved))  # the folder name is the index: two adapters may share a name
            expert.mkdir(parents=True)
            for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                if (directory / file).exists():
                    shutil.copyfile(directory / file, expert / file)
            (expert / EXPERT_CONFIG).write_text(json.dumps({"name": name, "instruction": "", "source": str(spec)}))
            spec = expert
        resolved.append(spec)
    return resolved


def build_library(
    base: T5ForConditionalGeneration | str | os.PathLike,
    experts: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    top_k: int = 2,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "50GB",
    **config_overrides,
) -> GliderT5ForConditionalGeneration:
    """Build a GliderT5 from `base` and `experts` (see `expert_specs`) and save it, with the base's tokenizer (or
    `tokenizer`) when there is one, at `output_dir`, which must not exist or be empty: the folder appears complete,
    or not at all. `dtype` stores base and experts in that dtype (see `from_experts`); weights larger than
    `max_shard_size` (bytes, or a size such as `"2GB"`) are saved as safetensors shards with an index.
    `config_overrides` are `GliderConfig` fields (`global_routing_scale`, `local_router`, ...)."""
    if "router_top_k" in config_overrides:
        raise TypeError("build_library() takes the number of experts per token as top_k=, not router_top_k=.")
    check_config_overrides(config_overrides, "build_library")
    dtype = check_dtype(dtype, "build_library(dtype=...)")
    check_shard_size(max_shard_size)
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} already exists and is not an empty folder.")
    if isinstance(experts, (str, os.PathLike)) or not experts:
        raise ValueError("experts must be a non-empty list of expert directories, PEFT adapters or Hub repo ids.")
    if tokenizer is None and isinstance(base, (str, os.PathLike)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(base)
        except (OSError, ValueError):
            tokenizer = None  # a base without a tokenizer: the model is saved alone
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    with tempfile.TemporaryDirectory(prefix="glider-adapters-") as staging:
        specs = expert_specs(experts, Path(staging))
        model = GliderT5ForConditionalGeneration.from_experts(base, specs, top_k=top_k, dtype=dtype, **config_overrides)

    with staged_folder(output_dir) as saving:
        model.save_pretrained(saving, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(saving)
    return model


def check_shard_size(size: int | str, who: str = "max_shard_size") -> int:
    """`size` in bytes: a positive integer, or a string such as "2GB", "500MB", "1GiB" (as `save_pretrained` reads it)."""
    try:
        value = convert_file_size_to_int(size) if isinstance(size, (int, str)) and not isinstance(size, bool) else 0
    except ValueError:
        value = 0
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{who} must be a size such as '2GB', '500MB' or '1GiB' (or bytes >= 1), got {size!r}.")
    return value


__all__ = ["build_library", "check_shard_size", "expert_specs"]
