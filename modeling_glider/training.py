"""Training for an expert library, on the Transformers `Trainer` (so `accelerate launch` spreads it over devices as it
is): Phatgoose gates for an existing LoRA expert (`train_gates`), and new LoRA experts with their gates
(`train_expert`).

Training data is a JSONL file of `{"input": ..., "target": ...}` objects, a list of such dicts, or a
`datasets.Dataset` with `input` and `target` string columns. The tokenizer is the base model's (taken from its path)
unless one is passed.
"""

import json
import os
import re
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5ForConditionalGeneration,
)

from configuration_glider import is_positive_number
from configuration_glider.configuration_glider import matches_pattern

from .experts import (
    EXPERT_CONFIG,
    _check_against_base,
    check_name,
    check_sample_embeddings,
    expert_lora_scalings,
    load_base,
    load_expert,
    read_expert_meta,
    routable_linears,
    save_expert_files,
    write_expert_files,
)
from .staging import staged_folder

ALL_T5_LINEARS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
TrainingData = str | os.PathLike | list | datasets.Dataset


class PhatgooseGatedLinear(nn.Module):
    """Phatgoose's gate-training layer: a frozen linear W and LoRA expert (A, B, scaling s) whose LoRA path is gated
    per token by a trainable vector v, `y = W x + sigmoid(v . x) * s * B A x`. v starts at 0: the gate half open."""

    def __init__(self, linear: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
        super().__init__()
        self.linear = linear
        self.scaling = scaling
        # Frozen, and not part of any checkpoint: buffers follow the model to its device.
        self.register_buffer("lora_A", lora_A.detach().to(linear.weight), persistent=False)
        self.register_buffer("lora_B", lora_B.detach().to(linear.weight), persistent=False)
        self.gate = nn.Parameter(torch.zeros(linear.in_features, device=linear.weight.device))

    @property
    def weight(self) -> torch.Tensor:  # T5 reads `wo.weight.dtype`
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(x.float() @ self.gate.float())[..., None]  # per token, in fp32
        lora = (x @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T
        return self.linear(x) + (gate * self.scaling).to(x.dtype) * lora


# Data


def load_pairs(data: TrainingData) -> datasets.Dataset:
    """`{"input", "target"}` string pairs from a JSONL path, a list of dicts or a `datasets.Dataset`, checked; errors
    name the file and line (or item) at fault."""
    if isinstance(data, datasets.Dataset):
        missing = {"input", "target"} - set(data.column_names)
        if missing:
            raise ValueError(f"Training dataset has no {sorted(missing)} column(s); its columns: {data.column_names}.")
        for column in ("input", "target"):
            if getattr(data.features[column], "dtype", None) != "string":
                raise ValueError(f"Training dataset column {column!r} must hold strings, not {data.features[column]}.")
        if len(data) == 0:
            raise ValueError("Training dataset holds no examples.")
        return data.select_columns(["input", "target"])
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"Training data {path}: no such file.")
        rows, source = [], str(path)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}, line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"Training data {path}, line {number}: not valid JSON ({error}).") from None
    elif isinstance(data, (list, tuple)):
        rows, source = [(f"item {i}", row) for i, row in enumerate(data)], "list"
    else:
        raise TypeError(f"Training data must be a JSONL path, a list of dicts or a datasets.Dataset, not {type(data)}.")
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("target"), str):
            raise ValueError(
                f"Training data {where}: expected an object with string 'input' and 'target', got {row!r}."
            )
    if not rows:
        raise ValueError(f"Training data {source} holds no examples.")
    return datasets.Dataset.from_dict(
        {"input": [r["input"] for _, r in rows], "target": [r["target"] for _, r in rows]}
    )


def _tokenize(
    pairs: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_source_length: int, max_target_length: int
) -> datasets.Dataset:
    def encode(batch):
        features = tokenizer(batch["input"], max_length=max_source_length, truncation=True)
        targets = tokenizer(text_target=batch["target"], max_length=max_target_length, truncation=True)
        return {**features, "labels": targets["input_ids"]}

    return pairs.map(encode, batched=True, remove_columns=pairs.column_names, desc="Tokenizing")


def _base_and_tokenizer(base, tokenizer) -> tuple[T5ForConditionalGeneration, PreTrainedTokenizerBase]:
    base = load_base(base)
    if tokenizer is None:
        tokenizer = base.config.name_or_path or None  # the path the base was loaded from
    if tokenizer is None:
        raise ValueError(
            "Pass tokenizer=: the base model was given as an object with no path to take a tokenizer from."
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return base, tokenizer


def _check_positive(**values) -> None:
    """Refuse a non-positive, non-finite or non-numeric argument, naming it."""
    for name, value in values.items():
        if not is_positive_number(value):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


# Seq2SeqTrainingArguments that the training functions set from their own arguments (or, for output_dir, to a scratch
# folder that is removed): `trainer_args` may not set them a second time.
OWN_TRAINER_ARGS = {
    "output_dir": "the trainer's scratch folder, which is not kept",
    "max_steps": "steps",
    "learning_rate": "learning_rate",
    "per_device_train_batch_size": "batch_size",
    "seed": "seed",
    "bf16": "bf16",
    "warmup_steps": "warmup_ratio",
}


def _check_training_options(seed, bf16, trainer_args) -> None:
    """Refuse a seed, bf16 flag or `trainer_args` that the Trainer would misread or that contradict the arguments."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    if not isinstance(bf16, bool):
        raise ValueError(f"bf16 must be True or False, got {bf16!r}.")
    if trainer_args is not None and not isinstance(trainer_args, dict):
        raise TypeError(f"trainer_args must be a dict of Seq2SeqTrainingArguments, got {type(trainer_args).__name__}.")
    for key in trainer_args or {}:
        if key in OWN_TRAINER_ARGS:
            raise ValueError(f"trainer_args sets {key!r}, which is set by {OWN_TRAINER_ARGS[key]}.")


def _check_counts(**values) -> None:
    """Refuse a count (steps, sizes, lengths) that is not an integer >= 1, naming it."""
    for name, value in values.items():
        if not is_positive_number(value, integer=True):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


# Training


def _fit(model: nn.Module, dataset, tokenizer, *, steps: int, learning_rate: float, batch_size: int, seed: int,
         warmup: float, bf16: bool, trainer_args: dict | None, description: str) -> None:  # fmt: skip
    """`Seq2SeqTrainer` on the model's trainable parameters: AdamW, constant rate after a linear warm-up."""
    with tempfile.TemporaryDirectory(prefix="glider-train-") as scratch:  # the Trainer wants a folder; nothing is kept
        args = {
            "output_dir": scratch,
            "run_name": description,
            "max_steps": steps,
            "learning_rate": learning_rate,
            "per_device_train_batch_size": batch_size,
            "lr_scheduler_type": "constant_with_warmup",
            "warmup_steps": warmup,
            "weight_decay": 0.0,
            "logging_steps": max(1, steps // 10),
            "save_strategy": "no",
            "report_to": "none",
            "seed": seed,
            "bf16": bf16,
            "remove_unused_columns": False,
            "dataloader_pin_memory": torch.cuda.is_available(),
            "ddp_find_unused_parameters": False,  # every trainable tensor is used at every step
            # T5's loss is a mean over its own tokens, blind to `num_items_in_batch`: scaled by the process count for
            # that, it would make the gradients of an N-process run N times too large (clipped at 1/N of the norm)
            "average_tokens_across_devices": False,
            **(trainer_args or {}),
        }
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        Seq2SeqTrainer(
            model=model, args=Seq2SeqTrainingArguments(**args), train_dataset=dataset, data_collator=collator
        ).train()


@contextmanager
def _left_as_it_was(model: nn.Module):
    """Give the model back its `requires_grad` flags, train/eval mode and device on exit (the Trainer changes them)."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    training, device = model.training, next(model.parameters()).device
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(training)
        if next(model.parameters()).device != device:
            model.to(device)


def _swap_modules(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each module at its path in `model`; return the modules it replaced."""
    replaced = {}
    for path, module in modules.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        replaced[path] = getattr(parent, leaf)
        setattr(parent, leaf, module)
    return replaced


def _train_gates_on(
    base: T5ForConditionalGeneration, lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]], dataset, tokenizer,
    **fit_kwargs,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Phatgoose gates for one LoRA expert (module path -> (A, B, scaling)) on its task data; the base model is left
    as it was (modules, `requires_grad` flags, train/eval mode)."""
    gated = {path: PhatgooseGatedLinear(base.get_submodule(path), A, B, s) for path, (A, B, s) in lora.items()}
    with _left_as_it_was(base):
        base.requires_grad_(False)
        replaced = _swap_modules(base, gated)
        try:
            _fit(base, dataset, tokenizer, warmup=0, description="phatgoose-gates", **fit_kwargs)
        finally:
            _swap_modules(base, replaced)
    return {path: module.gate.detach().float().cpu() for path, module in gated.items()}


def train_gates(
    base: T5ForConditionalGeneration | str | os.PathLike,
    expert_dir: str | os.PathLike,
    data: TrainingData,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    name: str | None = None,
    instruction: str | None = None,
    steps: int = 100,
    learning_rate: float = 5e-3,
    batch_size: int = 8,
    max_source_length: int = 512,
    max_target_length: int = 128,
    seed: int = 42,
    bf16: bool = False,
    trainer_args: dict | None = None,
) -> Path:
    """Train Phatgoose gates for the LoRA expert in `expert_dir` on its own task `data`, and write them.

    The recipe of Phatgoose and GLIDER: the base model and the LoRA weights stay frozen; every adapted linear gets one
    gate vector v, zero at start, and computes `y = W x + sigmoid(v . x) * s * B A x`; AdamW trains only the gates
    (default 100 steps at learning rate 5e-3, constant). `glider_expert.safetensors` is then replaced by one holding
    `gate.<module path>` for every adapted linear and the expert's `instruction_embedding` and `sample_embeddings` if it
    had them, and
    `glider_expert.json` by one recording it (see `experts.write_expert_files`): on an error, neither changes.

    `expert_dir` may be a plain PEFT LoRA adapter folder: `glider_expert.json` is then written too, with `name`
    (default: the folder's name) and `instruction`. An existing `glider_expert.json` keeps its name; `instruction`,
    when given, replaces its instruction. `batch_size` is per device; `trainer_args` go to
    `Seq2SeqTrainingArguments`. `base` is left as it was. Returns `expert_dir`.
    """
    expert_dir = Path(expert_dir)
    if not expert_dir.is_dir():  # never a Hub id: the gates are written into the folder
        raise FileNotFoundError(f"Expert {expert_dir}: no such directory.")
    has_metadata = (expert_dir / EXPERT_CONFIG).is_file()
    expert = load_expert(expert_dir, name=name or expert_dir.name)
    if has_metadata and name is not None and name != expert.name:
        raise ValueError(f"Expert {expert.name!r} ({expert_dir}) is already named {expert.name!r}, not {name!r}.")
    _check_counts(steps=steps, batch_size=batch_size, max_source_length=max_source_length,
                  max_target_length=max_target_length)  # fmt: skip
    _check_positive(learning_rate=learning_rate)
    _check_training_options(seed, bf16, trainer_args)
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string, got {type(instruction).__name__}.")
    base, tokenizer = _base_and_tokenizer(base, tokenizer)
    linears = routable_linears(base)
    _check_against_base(expert, linears, base.config.name_or_path)
    scalings = expert_lora_scalings(expert, linears)
    dataset = _tokenize(load_pairs(data), tokenizer, max_source_length, max_target_length)

    lora = {path: (expert.lora_A[path], expert.lora_B[path], scalings[path]) for path in expert.module_paths}
    gates = _train_gates_on(
        base, lora, dataset, tokenizer, steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
        bf16=bf16, trainer_args=trainer_args,
    )  # fmt: skip

    state = PartialState()
    if state.is_main_process:
        tensors = {f"gate.{path}": gate.contiguous() for path, gate in gates.items()}
        if expert.instruction_embedding is not None:
            tensors["instruction_embedding"] = expert.instruction_embedding
        if expert.sample_embeddings is not None:
            tensors["sample_embeddings"] = expert.sample_embeddings
        meta = read_expert_meta(expert_dir, f"Expert at {expert_dir}") if has_metadata else {"name": expert.name}
        meta["instruction"] = instruction if instruction is not None else meta.get("instruction", "")
        write_expert_files(expert_dir, meta, tensors)
    state.wait_for_everyone()
    return expert_dir


def train_expert(
    base: T5ForConditionalGeneration | str | os.PathLike,
    data: TrainingData,
    output_dir: str | os.PathLike,
    *,
    name: str,
    instruction: str = "",
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    r: int = 16,
    lora_alpha: float = 1.0,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = ALL_T5_LINEARS,
    steps: int = 1000,
    learning_rate: float = 5e-3,
    warmup_ratio: float = 0.06,
    batch_size: int = 8,
    max_source_length: int = 512,
    max_target_length: int = 128,
    seed: int = 42,
    bf16: bool = False,
    train_gates_after: bool = True,
    gate_steps: int = 100,
    gate_learning_rate: float = 5e-3,
    instruction_embedding: torch.Tensor | None = None,
    embedding_model: str | None = None,
    sample_embeddings: torch.Tensor | None = None,
    trainer_args: dict | None = None,
) -> Path:
    """Train a new LoRA expert on one task with PEFT and `Seq2SeqTrainer`, then (by default) its Phatgoose gates on the
    same data, and write a complete expert directory at `output_dir`: PEFT adapter, `glider_expert.json` and
    `glider_expert.safetensors` (gates, and `instruction_embedding` and `sample_embeddings` `[n, D]`, embedded inputs
    of `data` by the same embedder, when given).

    Defaults follow GLIDER's experts: rank 16, scaling 1/r (`lora_alpha=1`), every linear of every block, AdamW at
    5e-3, constant after 6% warm-up; 1000 steps (GLIDER's effective batch is 1024: raise `batch_size`, or pass
    `gradient_accumulation_steps` in `trainer_args`). `target_modules` follow PEFT (names or dotted suffixes of module
    paths); names the base lacks (`wi` in a gated T5) are skipped. `batch_size` is per device. `output_dir` must not
    exist or be empty; it appears complete or not at all. `base` is left as it was. Returns `output_dir`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"Expert {name!r}: {output_dir} already exists and is not an empty folder.")
    check_name(name, "train_expert: name")
    if not isinstance(instruction, str):
        raise TypeError(f"Expert {name!r}: instruction must be a string, got {type(instruction).__name__}.")
    _check_counts(r=r, steps=steps, batch_size=batch_size, max_source_length=max_source_length,
                  max_target_length=max_target_length)  # fmt: skip
    _check_positive(lora_alpha=lora_alpha, learning_rate=learning_rate)
    _check_training_options(seed, bf16, trainer_args)
    if isinstance(target_modules, str):  # PEFT would read one string as a regular expression to match in full
        raise TypeError(f"target_modules must be a list of module names, got the string {target_modules!r}.")
    if instruction_embedding is not None:
        if not isinstance(instruction_embedding, torch.Tensor) or not instruction_embedding.is_floating_point():
            raise TypeError(f"instruction_embedding must be a float tensor [D], got {instruction_embedding!r}.")
        if instruction_embedding.squeeze(0).dim() != 1 or not torch.isfinite(instruction_embedding).all():
            raise ValueError(
                f"instruction_embedding must be one finite vector [D], got {tuple(instruction_embedding.shape)} "
                "values that are not."
            )
    if embedding_model is not None and not isinstance(embedding_model, str):
        raise TypeError(f"embedding_model must be a string, got {embedding_model!r}.")
    if sample_embeddings is not None:
        if instruction_embedding is None:
            raise ValueError(f"Expert {name!r}: sample_embeddings need an instruction_embedding of the same embedder.")
        check_sample_embeddings(sample_embeddings, f"Expert {name!r}", instruction_embedding.numel())
    for option, value in (("warmup_ratio", warmup_ratio), ("lora_dropout", lora_dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{option} must be in [0, 1), got {value!r}.")
    if train_gates_after:
        _check_counts(gate_steps=gate_steps)
        _check_positive(gate_learning_rate=gate_learning_rate)
    for target in target_modules:
        try:
            re.compile(target)  # PEFT reads each as a regular expression
        except (re.error, TypeError) as error:
            raise ValueError(f"target_modules entry {target!r} is not a valid regular expression ({error}).") from None
    base, tokenizer = _base_and_tokenizer(base, tokenizer)
    linears = list(routable_linears(base))
    targets = [t for t in target_modules if any(matches_pattern(t, path) for path in linears)]
    if not targets:
        leaves = sorted({path.rsplit(".", 1)[-1] for path in linears})
        raise ValueError(f"target_modules {list(target_modules)} match no linear of the base; its linears: {leaves}.")
    dataset = _tokenize(load_pairs(data), tokenizer, max_source_length, max_target_length)
    fit_kwargs = {"batch_size": batch_size, "seed": seed, "bf16": bf16, "trainer_args": trainer_args}

    # The main process writes the expert into a folder beside `output_dir`, renamed to it once complete.
    with ExitStack() as stack:
        with _left_as_it_was(base):
            with torch.random.fork_rng(devices=[]):  # `seed` fixes the LoRA initialisation too
                torch.manual_seed(seed)
                peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                             target_modules=targets))  # fmt: skip
            try:
                _fit(peft_model, dataset, tokenizer, steps=steps, learning_rate=learning_rate, warmup=warmup_ratio,
                     description=f"expert-{name}", **fit_kwargs)  # fmt: skip
                lora = {
                    path: (layer.lora_A["default"].weight.detach().clone(),
                           layer.lora_B["default"].weight.detach().clone(), layer.scaling["default"])
                    for path, layer in peft_model.base_model.model.named_modules()
                    if isinstance(layer, LoraLayer)
                }  # fmt: skip
                # Asked only now that the Trainer has set up accelerate's state: made earlier with the defaults, it
                # misses a torchrun launch on CPUs, and every process would write the expert.
                staging = stack.enter_context(staged_folder(output_dir)) if PartialState().is_main_process else None
                if staging is not None:
                    peft_model.save_pretrained(staging)
            finally:
                peft_model.unload()  # puts the base's own linears back

        gates = None
        if train_gates_after:
            gates = _train_gates_on(
                base, lora, dataset, tokenizer, steps=gate_steps, learning_rate=gate_learning_rate, **fit_kwargs
            )
        if staging is not None:
            save_expert_files(
                staging, name, instruction, gates, instruction_embedding, embedding_model, sample_embeddings
            )
    PartialState().wait_for_everyone()
    return output_dir


__all__ = ["PhatgooseGatedLinear", "load_pairs", "train_expert", "train_gates"]
