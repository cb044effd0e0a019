"""Converting the released GLIDER and Phatgoose checkpoints into expert directories.

The formats, as the public reference code (UNITES-Lab/glider, r-three/phatgoose) writes and reads them:

- GLIDER `<task>_best.pt` (e.g. MoE-UNC/p3-lora-checkpoints, MoE-UNC/flan-lora-checkpoints): one expert per file, the
  state dict of a PEFT model whose LoRA layers also carry a gate:
  `base_model.model.<module path>.lora_A.<adapter>.weight` `[r, d_in]`, `....lora_B.<adapter>.weight` `[d_out, r]`,
  `....lora_gate.<adapter>` `[d_in]`. Other entries (the base model's own weights) are ignored.
- Phatgoose's concatenated checkpoints: many experts in one state dict, expert i as
  `<module path>._addons.expert_lora.layer1__<i>` `[d_in, r]` (A transposed), `....layer2__<i>` `[r, d_out]`
  (B transposed) and `<module path>._addons.router.expert_embeddings__<i>` `[d_in]` (its gate). The experts' names
  are not in the file: give them in order.
- MoLoRA multi-expert state dicts (the authors' gathered model): expert i as
  `<module path>.lora_experts.<adapter>.<i>.lora_A.weight` `[r, d_in]` and `....lora_B.weight` `[d_out, r]`, the gates
  of all experts as the rows of `<module path>.lora_gate.<adapter>.weight` `[E, d_in]`; names as for Phatgoose.
- A single expert's Phatgoose checkpoint: the `__0` keys above, its gate possibly as
  `<module path>._addons.expert_lora.expert_input_gate` `[d_in]` (`expert_output_gate` is dropped, as Phatgoose's own
  concatenation drops it).
- Instruction embeddings: `{task: tensor [D]}` saved with `torch.save`, one file for the experts' side and one for
  the input side (e.g. MoE-UNC/gpt-generated-instruction-nomic-embeddings). Instructions: JSON, or a `torch.save`'d
  file, `{task: text}` or `{task: [text, ...]}`.

Both LoRA formats scale the LoRA product by 1/r (Phatgoose divides by the bottleneck width; GLIDER sets PEFT's
`lora_alpha=1`), hence `lora_alpha=1` by default. Every file is read with `torch.load(weights_only=True)`: tensors and
plain containers only, nothing is unpickled.
"""

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, T5ForConditionalGeneration

from configuration_glider import is_positive_number

from .experts import (
    ADAPTER_WEIGHTS,
    check_name,
    compact_target_modules,
    read_json_object,
    routable_linears,
    save_expert_files,
)
from .staging import discard, missing_parents, move_into, publish, staging_dir

GLIDER_KEY = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_gate)\.(?P<adapter>[^.]+)(\.weight)?$"
)
MOLORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_experts\.(?P<adapter>[^.]+)\.(?P<index>\d+)\.(?P<kind>lora_A|lora_B)"
    r"\.weight$"
)
MOLORA_GATE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_gate\.(?P<adapter>[^.]+)\.weight$")
PHATGOOSE_KEY = re.compile(
    r"^(?P<path>.+)\._addons\.(?P<kind>expert_lora\.layer1|expert_lora\.layer2|router\.expert_embeddings)__(?P<index>\d+)$"
)
# A single expert's Phatgoose training checkpoint: its gate, before `router.expert_embeddings__0` is made from it
PHATGOOSE_INPUT_GATE_KEY = re.compile(r"^(?P<path>.+)\._addons\.expert_lora\.expert_input_gate$")
# Dropped when Phatgoose concatenates experts (its scripts ignore the key); it plays no part in routed inference
PHATGOOSE_OUTPUT_GATE_KEY = re.compile(r"^.+\._addons\.expert_lora\.expert_output_gate$")


def load_torch_file(path: Path, what: str):
    """`torch.load(weights_only=True)` with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses pickled objects; a damaged file fails to unzip
        raise ValueError(
            f"{what} {path}: not a readable tensor file (corrupt, truncated, or pickled objects, which are never "
            f"loaded): {error}"
        ) from None


def load_task_embeddings(path: str | os.PathLike, what: str = "Instruction embeddings") -> dict[str, torch.Tensor]:
    """A `{task: tensor [D]}` file saved with `torch.save` (how the authors release the embeddings of the expert side
    and of the input side), read with `weights_only=True`: every entry a finite float vector, all of one width."""
    path = Path(path)
    table = load_torch_file(path, what)
    if not isinstance(table, dict) or not table or not all(isinstance(v, torch.Tensor) for v in table.values()):
        raise ValueError(f"{what} {path}: expected a dict {{task: tensor}}.")
    widths = {}
    for task, vector in table.items():
        if not isinstance(task, str):
            raise ValueError(f"{what} {path}: the key {task!r} is not a task name (a string).")
        if not vector.is_floating_point() or vector.squeeze().dim() != 1:
            raise ValueError(f"{what} {path}: the entry {task!r} is not a float vector (shape {tuple(vector.shape)}).")
        if not torch.isfinite(vector).all():
            raise ValueError(f"{what} {path}: {task!r} holds NaN or inf values.")
        widths.setdefault(vector.numel(), task)
    if len(widths) > 1:
        raise ValueError(f"{what} {path}: vectors differ in width, e.g. {sorted(widths.items())[:2]} (width, task).")
    return {task: vector.float().flatten() for task, vector in table.items()}


def load_task_instructions(path: str | os.PathLike) -> dict:
    """`{task: text or [texts]}` from a JSON file, or from a `torch.save`'d file (`.pt`, `.pth`, `.bin`)."""
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        table = load_torch_file(path, "Instructions")
        if not isinstance(table, dict):
            raise ValueError(f"Instructions {path}: expected a dict {{task: text or [texts]}}.")
        return table
    return read_json_object(path, "Instructions")


def _task_name(path: Path) -> str:
    return path.stem[: -len("_best")] if path.stem.endswith("_best") else path.stem


def _parse(path: Path, state) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Expert name -> module path -> {"A", "B", "gate"} from one checkpoint, in any known format, experts in order."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"Checkpoint {path}: expected a state dict (str -> tensor), got {type(state).__name__}.")
    if any(MOLORA_KEY.match(key) for key in state):
        return _parse_molora(path, state)
    glider, phatgoose, input_gates, adapters = {}, {}, {}, set()
    for key, value in state.items():
        if (match := GLIDER_KEY.match(key)) is not None:
            adapters.add(match["adapter"])
            kind = {"lora_A": "A", "lora_B": "B", "lora_gate": "gate"}[match["kind"]]
            glider.setdefault(match["path"], {})[kind] = value
        elif (match := PHATGOOSE_KEY.match(key)) is not None:
            kind = {"expert_lora.layer1": "A", "expert_lora.layer2": "B", "router.expert_embeddings": "gate"}[
                match["kind"]
            ]
            value = value.T if kind in ("A", "B") else value  # Phatgoose stores x @ layer1 @ layer2
            phatgoose.setdefault(int(match["index"]), {}).setdefault(match["path"], {})[kind] = value
        elif (match := PHATGOOSE_INPUT_GATE_KEY.match(key)) is not None:
            input_gates[match["path"]] = (key, value)
        elif PHATGOOSE_OUTPUT_GATE_KEY.match(key) is None and ("lora" in key.lower() or "_addons" in key):
            raise ValueError(
                f"Checkpoint {path}: unsupported entry {key!r}; only plain LoRA experts and gates convert."
            )
    if glider and phatgoose:
        raise ValueError(f"Checkpoint {path} mixes the GLIDER and Phatgoose formats.")
    if glider:
        if len(adapters) > 1:
            raise ValueError(f"Checkpoint {path} holds several adapters {sorted(adapters)}; expected one expert.")
        return {_task_name(path): glider}
    if input_gates:
        if set(phatgoose) != {0}:
            key = next(iter(input_gates.values()))[0]
            raise ValueError(
                f"Checkpoint {path}: {key!r} is a single expert's gate, but the file holds experts "
                f"{sorted(phatgoose)}; it cannot tell whose gate it is."
            )
        for module, (key, gate) in input_gates.items():
            tensors = phatgoose[0].setdefault(module, {})
            if "gate" in tensors and not torch.equal(tensors["gate"], gate):
                raise ValueError(f"Checkpoint {path}: {key!r} disagrees with the router gate of {module}.")
            tensors["gate"] = gate
    if phatgoose:
        return {f"{_task_name(path)}_{i}": phatgoose.get(i, {}) for i in range(max(phatgoose) + 1)}
    raise ValueError(
        f"Checkpoint {path} holds no LoRA weights in a known format (GLIDER `....lora_A.<adapter>.weight`, "
        "Phatgoose `..._addons.expert_lora.layer1__<i>` or MoLoRA `....lora_experts.<adapter>.<i>.lora_A.weight`)."
    )


def _parse_molora(path: Path, state: dict) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """A multi-expert MoLoRA state dict: expert i as `<module>.lora_experts.<adapter>.<i>.lora_A.weight` `[r, d_in]`
    and `....lora_B.weight` `[d_out, r]`; the gates of all experts as the rows of `<module>.lora_gate.<adapter>.weight`
    `[E, d_in]` (already layer-normed when the authors' code gathered them: normalising again changes them by ~1e-6)."""
    experts, gates, adapters = {}, {}, set()
    for key, value in state.items():
        if (match := MOLORA_KEY.match(key)) is not None:
            adapters.add(match["adapter"])
            kind = {"lora_A": "A", "lora_B": "B"}[match["kind"]]
            experts.setdefault(int(match["index"]), {}).setdefault(match["path"], {})[kind] = value
        elif (match := MOLORA_GATE_KEY.match(key)) is not None:
            adapters.add(match["adapter"])
            gates[match["path"]] = (key, value)
        elif "lora" in key.lower() or "_addons" in key:
            raise ValueError(f"Checkpoint {path}: unsupported entry {key!r} in a MoLoRA state dict.")
    if len(adapters) > 1:
        raise ValueError(f"Checkpoint {path} holds several adapters {sorted(adapters)}; expected one.")
    count = max(experts) + 1
    for module, (key, gate) in gates.items():
        if not isinstance(gate, torch.Tensor) or gate.dim() != 2 or gate.shape[0] != count:
            shape = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
            raise ValueError(
                f"Checkpoint {path}: {key!r} must hold one gate row per expert [{count}, d_in], got {shape}."
            )
        for index in range(count):
            experts.setdefault(index, {}).setdefault(module, {})["gate"] = gate[index]
    return {f"{_task_name(path)}_{i}": experts.get(i, {}) for i in range(count)}


def _check(name: str, source: Path, modules: dict, gates: bool, linears: dict | None) -> None:
    who = f"Expert {name!r} ({source})"
    if not modules:
        raise ValueError(f"{who}: no LoRA weights.")
    for path, tensors in sorted(modules.items()):
        if "A" not in tensors or "B" not in tensors:
            raise ValueError(f"{who}: module {path!r} has only {sorted(tensors)} of lora_A / lora_B.")
        for kind, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise ValueError(f"{who}: {path} {kind} is not a float tensor.")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{who}: {path} {kind} holds NaN or inf values.")
        A, B, gate = tensors["A"], tensors["B"], tensors.get("gate")
        if (
            A.dim() != 2
            or B.dim() != 2
            or A.shape[0] != B.shape[1]
            or (gate is not None and gate.numel() != A.shape[1])
        ):
            shapes = {kind: tuple(t.shape) for kind, t in tensors.items()}
            raise ValueError(f"{who}: module {path!r} has inconsistent shapes {shapes}.")
        if gates and gate is None:
            raise ValueError(
                f"{who}: no gate for {path}. Convert with gates=False (`--no-gates`) and train them "
                "(`glider train-gates`) or build with local_router='arrow'."
            )
        if linears is not None:
            if path not in linears:
                raise ValueError(f"{who}: adapts {path!r}, which is not a linear of the base model's blocks.")
            if (A.shape[1], B.shape[0]) != (linears[path].in_features, linears[path].out_features):
                raise ValueError(
                    f"{who}: {path} maps {A.shape[1]} -> {B.shape[0]}, but the base linear maps "
                    f"{linears[path].in_features} -> {linears[path].out_features}."
                )


def _instruction(instructions: dict, name: str, source) -> str:
    """The expert's instruction in `{task: text or [texts]}` (the first text), or "" when there is none."""
    instruction = _lookup(instructions, name)
    if isinstance(instruction, list):
        instruction = instruction[0] if instruction else None
    if instruction is not None and not isinstance(instruction, str):
        raise ValueError(f"Instructions {source}: the entry for {name!r} is not a text, got {instruction!r}.")
    return instruction or ""


def _lookup(table: dict, task: str):
    if task in table:
        return table[task]
    folded = {key.lower(): value for key, value in table.items()}
    return folded.get(task.lower())


def _base_linears(base) -> tuple[dict, str | None]:
    """The base's routable linears, built on the meta device from its config (no weights are read)."""
    if isinstance(base, T5ForConditionalGeneration):
        return routable_linears(base), base.config.name_or_path or None
    config = base if isinstance(base, PretrainedConfig) else AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    return routable_linears(model), None if isinstance(base, PretrainedConfig) else str(base)


def _write_expert(directory: Path, name: str, modules: dict, *, lora_alpha: float, linears: dict | None,
                  base_name: str | None, instruction: str, gates: bool, embedding, embedding_model) -> None:  # fmt: skip
    ranks = {path: tensors["A"].shape[0] for path, tensors in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    targets = sorted(modules) if linears is None else compact_target_modules(set(modules), list(linears))
    LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=targets,
        rank_pattern={path: rank for path, rank in ranks.items() if rank != r},
        lora_dropout=0.0,
        base_model_name_or_path=base_name,
    ).save_pretrained(directory)
    tensors = {}
    for path, t in modules.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = t["A"].contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = t["B"].contiguous()
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    gate_tensors = {path: t["gate"] for path, t in modules.items()} if gates else None
    save_expert_files(directory, name, instruction, gate_tensors, embedding, embedding_model)


def convert_checkpoints(
    checkpoints: Sequence[str | os.PathLike] | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    embeddings: str | os.PathLike | None = None,
    instructions: str | os.PathLike | dict | None = None,
    embedding_model: str | None = None,
    embedding_dim: int | None = None,
    lora_alpha: float = 1.0,
    base: T5ForConditionalGeneration | PretrainedConfig | str | os.PathLike | None = None,
    base_model_name_or_path: str | None = None,
    gates: bool = True,
) -> list[Path]:
    """Convert released GLIDER `<task>_best.pt` files or Phatgoose checkpoints into expert directories
    `output_dir/<name>`, one per expert, and return them in order.

    checkpoints: files, or folders whose `*_best.pt` (else `*.pt`) files are taken in name order. A GLIDER file's
        expert is named after its task (`p3socialiqa_best.pt` -> `p3socialiqa`) unless `names` says otherwise.
    names: one name per expert of all checkpoints, in order (needed for Phatgoose files, whose experts are otherwise
        named `<file stem>_<i>`).
    embeddings: a `{task: tensor}` file; every expert then gets `instruction_embedding` (the first `embedding_dim`
        values, if given: Matryoshka embeddings such as nomic's may be truncated), recorded as `embedding_model`.
    instructions: a JSON file or dict `{task: text or [texts]}` (the first text is kept).
    lora_alpha: PEFT's alpha for the written adapters; 1 reproduces both formats' 1/r scaling.
    base: optional T5 (model, config, name or path; only its config is read) to check every shape against and to
        write compact PEFT `target_modules`; without it they list full module paths.
    gates: write the checkpoints' gates as Phatgoose gates (set False for Arrow checkpoints, whose gate slots hold
        prototypes, or gateless files).

    Everything is read and checked before the experts appear: they are written to a staging folder beside them and
    moved into `output_dir` at the end (a new `output_dir` appears whole, by one rename); an existing expert folder
    there is an error. A failure leaves `output_dir` as it was.
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    if not checkpoints:
        raise ValueError("checkpoints is empty: give checkpoint files or folders of them.")
    files = []
    for checkpoint in map(Path, checkpoints):
        if checkpoint.is_dir():
            found = sorted(checkpoint.glob("*_best.pt")) or sorted(checkpoint.glob("*.pt"))
            if not found:
                raise FileNotFoundError(f"Checkpoint folder {checkpoint} holds no *_best.pt or *.pt files.")
            files += found
        elif checkpoint.is_file():
            files.append(checkpoint)
        else:
            raise FileNotFoundError(f"Checkpoint {checkpoint}: no such file or folder.")
    if embedding_dim is not None and (not isinstance(embedding_dim, int) or embedding_dim < 1):
        raise ValueError(f"embedding_dim must be an integer >= 1, got {embedding_dim!r}.")
    if not is_positive_number(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}.")
    if names is not None:
        if isinstance(names, str):
            raise TypeError(f"names must be a list of names, got the string {names!r}.")
        for name in names:
            check_name(name, "Expert name in names")
    linears, base_name = _base_linears(base) if base is not None else (None, None)
    base_name = base_model_name_or_path or base_name

    embedding_table = load_task_embeddings(embeddings) if embeddings is not None else None
    instructions_source = instructions if isinstance(instructions, (str, os.PathLike)) else "(dict)"
    if isinstance(instructions, (str, os.PathLike)):
        instructions = load_task_instructions(instructions)
    if instructions is not None and not isinstance(instructions, dict):
        raise ValueError("Instructions must be a JSON object {task: text or [texts]}.")

    output_dir = Path(output_dir)
    # A new output folder is staged whole beside its place; in an existing one the experts are staged inside it.
    made_parents = missing_parents(output_dir)
    new_folder = not output_dir.exists()
    staging = staging_dir(output_dir if new_folder else output_dir / "converting")
    written, name_index = [], 0
    try:
        for file in tqdm(files, desc="Converting checkpoints", disable=len(files) < 4):
            parsed = _parse(file, load_torch_file(file, "Checkpoint"))
            if names is not None:  # the next names, one per expert of this file
                given = list(names[name_index : name_index + len(parsed)])
                if len(given) != len(parsed):
                    raise ValueError(f"{len(names)} names were given, too few for the experts up to {file}.")
                parsed, name_index = dict(zip(given, parsed.values())), name_index + len(parsed)
            for name, modules in parsed.items():
                check_name(name, f"Expert name from {file}")
                if name in written:
                    raise ValueError(f"Expert name {name!r} occurs twice (again in {file}); give distinct names.")
                if (output_dir / name).exists():
                    raise FileExistsError(f"Expert {name!r}: {output_dir / name} already exists.")
                _check(name, file, modules, gates, linears)
                embedding = None
                if embedding_table is not None:
                    embedding = _lookup(embedding_table, name)
                    if embedding is None:
                        available = sorted(embedding_table)[:8]
                        raise ValueError(
                            f"Instruction embeddings {embeddings} have no entry for {name!r}; some entries: {available}."
                        )
                    if embedding_dim is not None and embedding_dim > embedding.numel():
                        raise ValueError(
                            f"Instruction embeddings {embeddings}: {name!r} has {embedding.numel()} values, fewer than "
                            f"embedding_dim = {embedding_dim}."
                        )
                    embedding = embedding[:embedding_dim]
                instruction = _instruction(instructions or {}, name, instructions_source)
                (staging / name).mkdir()
                _write_expert(
                    staging / name, name, modules, lora_alpha=lora_alpha, linears=linears, base_name=base_name,
                    instruction=instruction, gates=gates, embedding=embedding, embedding_model=embedding_model,
                )  # fmt: skip
                written.append(name)
        if names is not None and name_index != len(names):
            raise ValueError(f"{len(names)} names were given for {name_index} experts.")
        if new_folder:
            publish(staging, output_dir)
        else:
            move_into(staging, output_dir, written)
    finally:
        discard(staging, made_parents if not output_dir.exists() else [])
    return [output_dir / name for name in written]


__all__ = ["convert_checkpoints", "load_task_embeddings", "load_task_instructions", "load_torch_file"]
