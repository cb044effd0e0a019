"""Expert directories, the interchange unit of a GLIDER library, and building a GliderT5 from them.

An expert directory holds:
- `adapter_config.json` and `adapter_model.safetensors`: a plain PEFT LoRA adapter as `PeftModel.save_pretrained`
  writes it, so every expert stays usable by PEFT alone;
- `glider_expert.json`: `{"name": ..., "instruction": ...}` (optionally `"embedding_model"`: the sentence
  embedder of `instruction_embedding`; `"embedding_prefix"`: the text it put before the instruction, absent for none;
  and `"weights_sha256"`: that of the `glider_expert.safetensors` written with it);
- `glider_expert.safetensors`: `gate.<module path>` -> `[d_in]` for every adapted linear (Phatgoose gates), and
  optionally `instruction_embedding` -> `[D]` and `sample_embeddings` -> `[n, D]` (embedded inputs of the expert's
  training data, same embedder: what the global router's fitted descriptors learn from).

Module paths are those of `T5ForConditionalGeneration`, e.g. `encoder.block.0.layer.0.SelfAttention.q`. Every
check runs before anything is built, and errors name the expert, file and module at fault.
"""

import difflib
import hashlib
import json
import os
import re
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import T5ForConditionalGeneration
from transformers.initialization import no_init_weights

from .routing import GliderGlobalRouter, GliderLinear
from .staging import staging_file

try:  # a flat folder (save_pretrained, the Hub) holds both files side by side
    from .configuration_glider import GliderConfig, check_lora_fields
except ImportError:  # the installed packages
    from configuration_glider import GliderConfig, check_lora_fields

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPERT_CONFIG = "glider_expert.json"
EXPERT_WEIGHTS = "glider_expert.safetensors"
EXPERT_FILES = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_CONFIG, EXPERT_WEIGHTS]
WEIGHTS_SHA256 = "weights_sha256"  # in glider_expert.json: the sha256 of the glider_expert.safetensors written with it
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
LORA_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<matrix>[AB])\.weight$")
# adapter_config.json entries that make an adapter something other than plain LoRA (W + s B A on the unchanged base
# weight W), with their plain values
PLAIN_LORA = {
    "use_dora": (False, None),
    "use_qalora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "target_parameters": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "loftq_config": (None, {}),
    "megatron_config": (None, {}),
    "use_bdlora": (None, {}),
    "arrow_config": (None, {}),
    "kasa_config": (None, {}),
}
# `init_lora_weights` values after which a saved adapter still means W + s B A on the original base. PiSSA, OLoRA,
# CorDA, LoftQ and LoRA-GA subtract their initial B A from (or quantise) the base weight, so an adapter saved without
# converting it back is relative to another W (PEFT rewrites the base again on load, except for LoRA-GA).
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")


def check_name(name, who: str) -> str:
    """`name` when it is usable as one folder name: a non-empty string that is not `.` or `..` and holds no path
    separator, NUL or surrounding whitespace. Expert names become folders (`glider convert`, exported libraries), so a
    name read from a file or the command line must never reach outside the folder it is written into."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{who}: the name {name!r} is not a non-empty string.")
    if name != name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(
            f"{who}: the name {name!r} cannot be a folder name (no '/', '\\', NUL, surrounding spaces, '.' or '..')."
        )
    return name


def check_adapter_config(adapter_config: dict, who: str) -> None:
    """Refuse an `adapter_config.json` whose adapter does not mean `W + s B A` with PEFT's scaling, or whose numbers
    are not valid, naming the entry."""
    where = f"{who}: {ADAPTER_CONFIG}"
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: adapter is {adapter_config.get('peft_type')!r}; only plain LoRA experts can be routed."
        )
    for key, plain_values in PLAIN_LORA.items():
        if adapter_config.get(key) not in plain_values:
            raise ValueError(f"{where} sets {key}={adapter_config[key]!r}; only plain LoRA experts can be routed.")
    init = adapter_config.get("init_lora_weights", True)
    if not any(init is plain or (isinstance(init, str) and init == plain) for plain in PLAIN_INITS):
        raise ValueError(
            f"{where} sets init_lora_weights={init!r}: an adapter initialised this way and saved without conversion "
            "is relative to a rewritten base weight, not W + s B A on the base. Save it with PEFT's "
            "`path_initial_model_for_weight_conversion` (which makes it a plain LoRA) and use that."
        )
    check_lora_fields({"r": 8, "lora_alpha": 8, "use_rslora": False} | adapter_config, where)  # PEFT's defaults


@dataclass
class Expert:
    """One expert directory, read and checked for self-consistency (not yet against a base model)."""

    name: str
    instruction: str
    source: str
    adapter_config: dict
    lora_A: dict[str, torch.Tensor]  # module path -> [r, d_in]
    lora_B: dict[str, torch.Tensor]  # module path -> [d_out, r]
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> [d_in]
    instruction_embedding: torch.Tensor | None = None
    sample_embeddings: torch.Tensor | None = None  # [n, D]
    embedding_model: str | None = None
    embedding_prefix: str = ""  # put before the instruction (and its samples) when they were embedded
    directory: Path | None = None  # where its files are: a build reads the tensors of an expert read as a header here

    @property
    def module_paths(self) -> list[str]:
        return sorted(self.lora_A)


def read_json_object(path: Path, who: str) -> dict:
    """The JSON object in `path`; errors name `who` and the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{who}: missing {path.name} (looked for {path}).")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{who}: {path} is not valid JSON ({error}).") from None
    if not isinstance(content, dict):
        raise ValueError(f"{who}: {path} must hold a JSON object.")
    return content


def read_expert_meta(directory: Path, who: str) -> dict:
    """An expert's `glider_expert.json`, which must name it."""
    meta = read_json_object(directory / EXPERT_CONFIG, who)
    check_name(meta.get("name"), f"{who}: {EXPERT_CONFIG} 'name'")
    for key in ("instruction", "embedding_model", "embedding_prefix", "source"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ValueError(f"{who}: {EXPERT_CONFIG} '{key}' must be a string, got {meta[key]!r}.")
    return meta


def _read_safetensors(path: Path, who: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{who}: missing {path.name} (looked for {path}).")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{who}: {path} is not a readable safetensors file (corrupt or truncated?): {error}") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{who}: tensor {key!r} in {path.name} holds NaN or inf values.")
    return tensors


def _read_safetensors_header(path: Path, who: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors (shape and dtype, no data): only its header is read."""
    if not path.is_file():
        raise FileNotFoundError(f"{who}: missing {path.name} (looked for {path}).")
    try:
        with safe_open(path, "pt") as file:
            return {
                key: torch.empty(
                    file.get_slice(key).get_shape(),
                    dtype=SAFETENSORS_DTYPES.get(file.get_slice(key).get_dtype(), torch.float32),
                    device="meta",
                )
                for key in file.keys()
            }
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{who}: {path} is not a readable safetensors file (corrupt or truncated?): {error}") from None


def _read_tensor(file, key: str, header: torch.Tensor, path: Path, who: str) -> torch.Tensor:
    """Tensor `key` of the open safetensors `file` at `path`, checked against its `header` (meta tensor) and for NaN."""
    try:
        tensor = file.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{who}: {path} is not a readable safetensors file (corrupt or truncated?): {error}") from None
    if tensor.shape != header.shape:
        raise ValueError(
            f"{who}: tensor {key!r} in {path.name} has shape {tuple(tensor.shape)}, but {tuple(header.shape)} when the "
            "expert was checked: the file changed while the model was built."
        )
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{who}: tensor {key!r} in {path.name} holds NaN or inf values.")
    return tensor


def resolve_expert_dir(spec: str | os.PathLike) -> Path:
    """The local directory of an expert: `spec` itself when it exists (or is a path), otherwise a Hub repo id,
    `org/name` or `org/name@revision`, whose expert files are downloaded into the Hugging Face cache."""
    if isinstance(spec, os.PathLike) or Path(spec).exists() or not HUB_REPO_ID.match(spec):
        return Path(spec)
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=EXPERT_FILES))
    except (OSError, ValueError) as error:  # every Hub, network and offline error of huggingface_hub
        raise FileNotFoundError(
            f"Expert {spec!r}: no such local directory, and fetching it from the Hub failed: {error}"
        ) from error
    missing = [name for name in EXPERT_FILES[:2] if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Expert {spec!r}: the Hub repo has no {missing}; an expert repo is a PEFT LoRA adapter plus "
            f"{EXPERT_CONFIG} (and {EXPERT_WEIGHTS} for Phatgoose gates)."
        )
    return directory


def load_expert(spec: str | os.PathLike, *, name: str | None = None) -> Expert:
    """Read and check one expert: a directory, or the id of a Hub repo holding one (see `resolve_expert_dir`). With
    `name`, a plain PEFT adapter (no `glider_expert.json`) is read as an expert of that name with no instruction."""
    return _read_expert(spec, name, tensors=True)


def read_expert_header(spec: str | os.PathLike) -> Expert:
    """`load_expert` without the LoRA weights and gates: those are meta tensors (shape and dtype) read from the files'
    headers, checked like the tensors themselves. A build checks every expert this way first, then reads each
    expert's tensors once, straight into the model (`_fill_expert`)."""
    return _read_expert(spec, None, tensors=False)


def _read_expert(spec: str | os.PathLike, name: str | None, tensors: bool) -> Expert:
    directory = resolve_expert_dir(spec)
    who = f"Expert at {spec}"
    if not directory.is_dir():
        raise FileNotFoundError(f"{who}: no such directory.")
    if name is not None and not (directory / EXPERT_CONFIG).exists():
        meta = {"name": check_name(name, who)}
    else:
        meta = read_expert_meta(directory, who)
    name = meta["name"]
    who = f"Expert {name!r} ({spec})"
    check_weights_sha256(directory, meta, who)

    adapter_config = read_json_object(directory / ADAPTER_CONFIG, who)
    check_adapter_config(adapter_config, who)

    lora_A, lora_B = {}, {}
    read = _read_safetensors if tensors else _read_safetensors_header
    for key, tensor in read(directory / ADAPTER_WEIGHTS, who).items():
        match = LORA_KEY.match(key)
        if match is None:
            raise ValueError(
                f"{who}: unexpected tensor {key!r} in {ADAPTER_WEIGHTS}; only plain LoRA A/B weights can be routed."
            )
        (lora_A if match["matrix"] == "A" else lora_B)[match["path"]] = tensor
    if not lora_A:
        raise ValueError(f"{who}: {ADAPTER_WEIGHTS} holds no LoRA weights.")
    for path in sorted(set(lora_A) ^ set(lora_B)):
        raise ValueError(f"{who}: module {path!r} has only one of lora_A / lora_B.")
    for path in lora_A:
        if lora_A[path].dim() != 2 or lora_B[path].dim() != 2 or lora_A[path].shape[0] != lora_B[path].shape[1]:
            raise ValueError(
                f"{who}: module {path!r} has inconsistent LoRA shapes A {tuple(lora_A[path].shape)}, B {tuple(lora_B[path].shape)}."
            )

    gates, instruction_embedding, sample_embeddings = {}, None, None
    if (directory / EXPERT_WEIGHTS).exists():
        for key, tensor in _read_safetensors(directory / EXPERT_WEIGHTS, who).items():
            if key == "instruction_embedding":
                if tensor.dim() != 1 and tuple(tensor.shape[:-1]) != (1,):
                    raise ValueError(
                        f"{who}: instruction_embedding in {EXPERT_WEIGHTS} must be one vector [D], got "
                        f"{tuple(tensor.shape)}."
                    )
                instruction_embedding = tensor.float().flatten()
            elif key == "sample_embeddings":
                sample_embeddings = tensor.float()
                check_sample_embeddings(sample_embeddings, f"{who}, {EXPERT_WEIGHTS}")
            elif key.startswith("gate.") and key[5:] in lora_A:
                gates[key[5:]] = tensor.flatten() if tensors else tensor.to("meta")  # a header: its shape
            else:
                raise ValueError(
                    f"{who}: unexpected tensor {key!r} in {EXPERT_WEIGHTS} (gates are 'gate.<adapted module path>')."
                )
    return Expert(
        name=name,
        instruction=str(meta.get("instruction") or ""),
        source=str(meta.get("source") or spec),
        adapter_config=adapter_config,
        lora_A=lora_A,
        lora_B=lora_B,
        gates=gates,
        instruction_embedding=instruction_embedding,
        sample_embeddings=sample_embeddings,
        embedding_model=meta.get("embedding_model"),
        embedding_prefix=meta.get("embedding_prefix") or "",
        directory=directory,
    )


def save_expert_files(
    directory: str | os.PathLike,
    name: str,
    instruction: str = "",
    gates: dict[str, torch.Tensor] | None = None,
    instruction_embedding: torch.Tensor | None = None,
    embedding_model: str | None = None,
    sample_embeddings: torch.Tensor | None = None,
    embedding_prefix: str = "",
) -> None:
    """Write `glider_expert.json` and `glider_expert.safetensors` next to a PEFT adapter (see `write_expert_files`)."""
    directory = Path(directory)
    tensors = {f"gate.{path}": gate.detach().float().cpu().contiguous() for path, gate in (gates or {}).items()}
    if instruction_embedding is not None:
        tensors["instruction_embedding"] = instruction_embedding.detach().float().cpu().flatten().contiguous()
    if sample_embeddings is not None:
        tensors["sample_embeddings"] = sample_embeddings.detach().float().cpu().contiguous()
    meta = {"name": name, "instruction": instruction}
    if embedding_model is not None:
        meta["embedding_model"] = embedding_model
    if embedding_prefix:
        meta["embedding_prefix"] = embedding_prefix
    write_expert_files(directory, meta, tensors)


def write_expert_files(directory: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write `meta` as `glider_expert.json` and `tensors` as `glider_expert.safetensors` into an expert directory.

    Both files are written in full beside their targets (`stage_expert_files`), then renamed over them, the JSON
    first (`replace_expert_files`). Each rename is atomic, the pair is not: a kill between the two leaves the new
    JSON with the old tensors. The JSON therefore records the sha256 of the tensor file it was written with
    (`weights_sha256`), and `load_expert` refuses a pair that does not match, naming the file. On an error nothing
    changes and no staged file is left.
    """
    staged = stage_expert_files(directory, meta, tensors)
    try:
        replace_expert_files(staged)
    finally:
        for source, _ in staged:
            source.unlink(missing_ok=True)


def stage_expert_files(directory: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> list[tuple[Path, Path]]:
    """The new `glider_expert.json` and `glider_expert.safetensors` of an expert, written beside the old ones;
    returns (staged file, target) pairs in the order they are to replace the targets (the JSON first)."""
    weights, config = staging_file(directory / EXPERT_WEIGHTS), staging_file(directory / EXPERT_CONFIG)
    try:
        save_file(tensors, weights, metadata={"format": "pt"})
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        config.write_text(json.dumps({**meta, WEIGHTS_SHA256: digest}, indent=2) + "\n")
    except BaseException:
        weights.unlink(missing_ok=True)
        config.unlink(missing_ok=True)
        raise
    return [(config, directory / EXPERT_CONFIG), (weights, directory / EXPERT_WEIGHTS)]


def replace_expert_files(staged: list[tuple[Path, Path]]) -> None:
    """Rename staged files over their targets, in order."""
    for source, target in staged:
        os.replace(source, target)


def check_weights_sha256(directory: Path, meta: dict, who: str) -> None:
    """Refuse a `glider_expert.safetensors` other than the one `glider_expert.json` was written with (see
    `write_expert_files`). A JSON without `weights_sha256` (written by hand, or by PEFT users) is not checked."""
    if WEIGHTS_SHA256 not in meta:
        return
    path = directory / EXPERT_WEIGHTS
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    if digest != meta[WEIGHTS_SHA256]:
        raise ValueError(
            f"{who}: {path} is not the file its {EXPERT_CONFIG} was written with ({WEIGHTS_SHA256} differs): an "
            f"update of the expert was interrupted, or one file was replaced by hand. Write the expert again (e.g. "
            f"`glider describe-experts` or `glider train-gates`), or remove '{WEIGHTS_SHA256}' from {EXPERT_CONFIG} "
            "to accept the pair as it is."
        )


def load_base(base: T5ForConditionalGeneration | str | os.PathLike) -> T5ForConditionalGeneration:
    """`base` itself, or the T5 at that name or path."""
    if isinstance(base, (str, os.PathLike)):
        base = T5ForConditionalGeneration.from_pretrained(base)
    if not isinstance(base, T5ForConditionalGeneration):
        raise TypeError(f"base must be a T5ForConditionalGeneration or its name/path, got {type(base).__name__}.")
    return base


def routable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears of a T5's encoder and decoder blocks: the modules experts may adapt."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(("encoder.block.", "decoder.block."))
    }


def compact_target_modules(adapted: set[str], linears: list[str]) -> list[str]:
    """PEFT-style `target_modules` naming exactly `adapted`: a leaf name ("q", "wo") where every linear of that name
    is adapted, full paths otherwise."""
    entries = []
    for leaf in sorted({path.rsplit(".", 1)[-1] for path in adapted}):
        with_leaf = {path for path in linears if path.rsplit(".", 1)[-1] == leaf}
        entries += [leaf] if with_leaf <= adapted else sorted(with_leaf & adapted)
    return entries


def _check_against_base(expert: Expert, linears: dict[str, nn.Linear], base_name: str) -> None:
    who = f"Expert {expert.name!r} ({expert.source})"
    for path in expert.module_paths:
        if path not in linears:
            raise ValueError(
                f"{who}: adapts {path!r}, which is not a linear of the base model's encoder/decoder blocks "
                "(was it made for another base model?)."
            )
        linear, A, B = linears[path], expert.lora_A[path], expert.lora_B[path]
        if A.shape[1] != linear.in_features or B.shape[0] != linear.out_features:
            raise ValueError(
                f"{who}: {path} has LoRA A {tuple(A.shape)} and B {tuple(B.shape)}, but the base linear maps "
                f"{linear.in_features} -> {linear.out_features} (was it made for another base model?)."
            )
    expected = expert.adapter_config.get("base_model_name_or_path")
    if expected and base_name and Path(expected).name != Path(base_name).name:
        warnings.warn(
            f"{who} was trained on base {expected!r}, but the base model is {base_name!r}; the shapes match, so it is used.",
            stacklevel=3,
        )


def _config_entry(expert: Expert, linears: dict[str, nn.Linear]) -> dict:
    adapter = expert.adapter_config
    return {
        "name": expert.name,
        "instruction": expert.instruction,
        "source": expert.source,
        "target_modules": compact_target_modules(set(expert.module_paths), list(linears)),
        "r": adapter.get("r", 8),
        "lora_alpha": adapter.get("lora_alpha", 8),
        "use_rslora": adapter.get("use_rslora", False),
        "rank_pattern": adapter.get("rank_pattern") or {},
        "alpha_pattern": adapter.get("alpha_pattern") or {},
        "samples": 0 if expert.sample_embeddings is None else len(expert.sample_embeddings),
    }


def _lora_scalings(expert: Expert, entry: dict, config: GliderConfig) -> dict[str, float]:
    """Module path -> the expert's LoRA scaling there; checks each rank against what adapter_config.json implies."""
    scalings = {}
    for path in expert.module_paths:
        rank, scalings[path] = config.expert_rank_and_scaling(entry, path)
        if rank != expert.lora_A[path].shape[0]:
            raise ValueError(
                f"Expert {expert.name!r} ({expert.source}): {path} has rank {expert.lora_A[path].shape[0]} but "
                f"adapter_config.json implies {rank}."
            )
    return scalings


def expert_lora_scalings(expert: Expert, linears: dict[str, nn.Linear]) -> dict[str, float]:
    """Module path -> the LoRA scaling of `expert` there, as PEFT computes it (alpha/r, or alpha/sqrt(r) with rslora;
    rank and alpha patterns honoured)."""
    config = GliderConfig(experts=[_config_entry(expert, linears)], router_top_k=1)
    return _lora_scalings(expert, config.experts[0], config)


def _check_router_gates(expert: Expert, entry: dict, config: GliderConfig, linears: dict[str, nn.Linear]) -> None:
    """Check every rank against adapter_config.json, and that a Phatgoose library has a gate of the right width for
    every linear the expert adapts (shapes only: `expert` may be a header)."""
    who = f"Expert {expert.name!r} ({expert.source})"
    _lora_scalings(expert, entry, config)
    if config.local_router == "arrow":
        return
    for path in expert.module_paths:
        if path not in expert.gates:
            raise ValueError(
                f"{who}: no Phatgoose gate for {path} in {EXPERT_WEIGHTS}. Train the gates (`glider train-gates`) "
                "or build with local_router='arrow', which needs none."
            )
        if expert.gates[path].numel() != linears[path].in_features:
            raise ValueError(
                f"{who}: gate for {path} has {expert.gates[path].numel()} values, expected {linears[path].in_features}."
            )


def _router_gates(expert: Expert, entry: dict, config: GliderConfig, linears: dict[str, nn.Linear]) -> dict:
    """Module path -> what the local router scores this expert by there: its Phatgoose gate, or its Arrow prototype."""
    _check_router_gates(expert, entry, config, linears)
    if config.local_router == "arrow":
        return {path: arrow_prototype(expert.lora_A[path], expert.lora_B[path]) for path in expert.module_paths}
    return {path: expert.gates[path] for path in expert.module_paths}


def arrow_prototype(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """Arrow's prototype: the top right singular vector of B A (`[d_in]`), computed in the rank-r subspace without
    forming the d_out x d_in product.

    A singular vector is defined up to sign. Arrow scores `|v . x|`, so the sign cannot change routing; it is still
    fixed (largest-magnitude entry positive) so that prototypes do not depend on the LAPACK build.
    """
    Q, R = torch.linalg.qr(lora_A.double().T)  # A = R^T Q^T, Q [d_in, r] orthonormal
    _, _, Vh = torch.linalg.svd(lora_B.double() @ R.T, full_matrices=False)
    prototype = Q @ Vh[0]
    return (prototype * prototype[prototype.abs().argmax()].sign()).float()


def _check_embeddings(experts: list[Expert]) -> tuple[int | None, str | None, str]:
    """The width, embedding model and prefix of the experts' instruction embeddings: all experts have one, or none
    has."""
    with_embedding = [e.name for e in experts if e.instruction_embedding is not None]
    if not with_embedding:
        for expert in experts:
            _check_samples(expert, None)  # samples without a global router would be dropped silently
        return None, None, ""
    if len(with_embedding) != len(experts):
        missing = [e.name for e in experts if e.instruction_embedding is None]
        raise ValueError(
            f"Experts {missing} have no instruction_embedding while {with_embedding} do: give all or none."
        )
    widths = {e.name: e.instruction_embedding.numel() for e in experts}
    if len(set(widths.values())) > 1:
        raise ValueError(f"Experts' instruction embeddings differ in width: {widths}.")
    for expert in experts:
        _check_samples(expert, widths[expert.name])
    models = {e.embedding_model for e in experts}
    if len(models) > 1:
        raise ValueError(f"Experts' instructions were embedded with different models: {sorted(map(str, models))}.")
    prefixes = {e.name: e.embedding_prefix for e in experts}
    if len(set(prefixes.values())) > 1:  # the same model with another prefix embeds into another space
        raise ValueError(f"Experts' instructions were embedded with different prefixes (embedding_prefix): {prefixes}.")
    return widths[experts[0].name], models.pop(), prefixes[experts[0].name]


def check_sample_embeddings(rows, who: str, width: int | None = None) -> None:
    """Embedded samples: a float tensor `[samples >= 1, D]` (D = `width` if given) of finite rows, none all zero."""
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point() or rows.dim() != 2 or 0 in rows.shape:
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"{who}: sample_embeddings must be a float tensor [samples, D], got {shape}.")
    if width is not None and rows.shape[1] != width:
        raise ValueError(
            f"{who}: sample_embeddings are {rows.shape[1]} wide, the instruction_embedding {width}: both must come "
            "from one embedder."
        )
    if not torch.isfinite(rows).all() or not rows.any(dim=-1).all():
        raise ValueError(f"{who}: sample_embeddings hold NaN, inf or rows of zeros.")


def _check_samples(expert: Expert, width: int | None) -> None:
    """Embedded samples need the expert's instruction embedding, and its width (one embedder for both)."""
    if expert.sample_embeddings is None:
        return
    if width is None:
        raise ValueError(
            f"Expert {expert.name!r} ({expert.source}) has sample_embeddings but no instruction_embedding: the "
            "global router needs both (glider describe-experts writes both)."
        )
    check_sample_embeddings(expert.sample_embeddings, f"Expert {expert.name!r} ({expert.source})", width)


def _check_base_names(experts: list[Expert]) -> None:
    """Warn when the experts' adapters name different base models (shapes are checked against the base itself)."""
    claimed = {e.name: e.adapter_config.get("base_model_name_or_path") for e in experts}
    claimed = {name: base for name, base in claimed.items() if base}
    if len({Path(base).name for base in claimed.values()}) > 1:
        warnings.warn(f"The experts' adapters name different base models: {claimed}.", stacklevel=3)


# GliderConfig fields a build derives from the experts' files, which no keyword may override
DERIVED_FIELDS = ("experts", "instruction_embedding_dim")
BUILDER_ARGUMENTS = ("top_k", "global_routing_scale")


def check_config_overrides(overrides: dict, caller: str) -> None:
    """Refuse keywords that are not `GliderConfig` fields (a typo would otherwise be kept as an unused attribute),
    suggesting the closest name, and fields a build derives from the experts."""
    known = [f.name for f in fields(GliderConfig)]
    for key in overrides:
        if key in ("expert_offload", "expert_cache_size"):
            raise TypeError(
                f"{caller}() cannot set {key!r}: offloading is a loading option. Save the model, then "
                f"from_pretrained(folder, {key}=...)."
            )
        if key in DERIVED_FIELDS:
            raise TypeError(f"{caller}() cannot set {key!r}: it is derived from the experts' files.")
        if key not in known:
            close = difflib.get_close_matches(key, [*BUILDER_ARGUMENTS, *known], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; keywords are GliderConfig fields."
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}{hint}")


BUILD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: torch.dtype | str | None, who: str = "from_experts(dtype=...)") -> torch.dtype | None:
    """`dtype` as a torch dtype: None (the base's dtypes), or float32, bfloat16 or float16 (a dtype or its name)."""
    if dtype is None or dtype in BUILD_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in BUILD_DTYPES:
        return BUILD_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"{who}: dtype must be one of {list(BUILD_DTYPES)} (or the torch dtype), got {dtype!r}.")


def build_glider_model(cls, base, expert_dirs: list, dtype: torch.dtype | str | None = None, **config_fields):
    """See `GliderT5ForConditionalGeneration.from_experts`.

    Memory: every expert is first checked from its files' headers (shapes, no tensor data), the model is made on the
    meta device, and each expert's tensors are then read once, straight into their slots of the stacked expert
    tensors; so the build holds the model and at most one expert's tensors besides. A base given by name is loaded
    here and its tensors become the model's (cast one at a time); a base given as a model is copied (it stays the
    caller's).
    """
    check_config_overrides(config_fields, "from_experts")
    dtype = check_dtype(dtype)
    if isinstance(expert_dirs, (str, os.PathLike)) or not expert_dirs:
        raise ValueError("experts must be a non-empty list of expert directories.")
    experts = [read_expert_header(d) for d in expert_dirs]
    names = [e.name for e in experts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        sources = {n: [str(e.source) for e in experts if e.name == n] for n in duplicates}
        raise ValueError(f"Duplicate expert names {duplicates}: {sources}. Every expert needs its own name.")

    owned = isinstance(base, (str, os.PathLike))
    base = load_base(base)
    linears = routable_linears(base)
    base_name = base.config.name_or_path
    for expert in experts:
        _check_against_base(expert, linears, base_name)
    _check_base_names(experts)

    embedding_dim, embedding_model, embedding_prefix = _check_embeddings(experts)

    base_config = base.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
        base_config.pop(key, None)
    # The experts were trained on the base as it is, and their instructions embedded by the model their files name.
    fixed = {**base_config, "instruction_embedding_model": embedding_model}
    for key, value in config_fields.items():
        if key in fixed and None not in (value, fixed[key]) and value != fixed[key]:
            raise ValueError(
                f"from_experts() cannot set {key}={value!r}: the experts were made with {key}={fixed[key]!r} (the "
                "base model's config, or the experts' files)."
            )
    # Experts that record no prefix (converted or hand-made ones) take the one given; recorded ones are fixed.
    given_prefix = config_fields.get("instruction_embedding_prefix", embedding_prefix) or ""
    if embedding_prefix and given_prefix != embedding_prefix:
        raise ValueError(
            f"from_experts() cannot set instruction_embedding_prefix={config_fields['instruction_embedding_prefix']!r}"
            f": the experts' instructions were embedded with the prefix {embedding_prefix!r} (their embedding_prefix)."
        )

    if dtype is not None:
        base_config["dtype"] = str(dtype).removeprefix("torch.")
    config = GliderConfig(
        **{
            **base_config,
            "experts": [_config_entry(e, linears) for e in experts],
            "instruction_embedding_dim": embedding_dim,
            "instruction_embedding_model": embedding_model,
            "instruction_embedding_prefix": embedding_prefix or None,
            "base_model_name_or_path": base_name or None,
            **config_fields,
        }
    )
    for expert, entry in zip(experts, config.experts):
        _check_router_gates(expert, entry, config, linears)

    with torch.device("meta"), no_init_weights():
        model = cls(config)
    _install_base_weights(model, base, dtype, share=owned)
    modules = {path: m for path, m in model.named_modules() if isinstance(m, GliderLinear) and m.num_experts}
    with torch.no_grad():
        for index, expert in enumerate(tqdm(experts, desc="Reading experts", disable=len(experts) < 8)):
            _fill_expert(modules, index, expert, arrow=config.local_router == "arrow")
    if model.global_router is not None:
        embeddings = torch.stack([e.instruction_embedding for e in experts])
        model.global_router.set_experts(embeddings, [e.sample_embeddings for e in experts])
    return model.train(base.training)


def _install_base_weights(model, base: T5ForConditionalGeneration, dtype: torch.dtype | None, share: bool) -> None:
    """Give `model`, made on the meta device, the base's weights and zero expert tensors.

    Each base tensor is cast to `dtype` (None: kept as it is; modules Transformers keeps in fp32 at that dtype, such as
    T5's `wo` in fp16 and the global router, are fp32), and is the base's own tensor where `share` allows and no cast
    is needed, a copy otherwise; tied weights stay tied. Every routed linear then allocates its expert tensors,
    zero, in its weight's dtype (the experts take their linear's dtype), and its config-derived buffers.
    """
    fp32_modules = set()  # as `PreTrainedModel.from_pretrained(..., dtype=dtype)` keeps them
    if dtype in (torch.float16, torch.bfloat16):
        fp32_modules |= set(model._keep_in_fp32_modules_strict or ())
    if dtype == torch.float16:
        fp32_modules |= set(model._keep_in_fp32_modules or ())
    base_tensors = base.state_dict(keep_vars=True)
    made, used, mismatched = {}, set(), []
    for module_path, module in model.named_modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                key = f"{module_path}.{name}" if module_path else name
                if tensor is None or key not in base_tensors:
                    continue
                source = base_tensors[key]
                used.add(key)
                if source.shape != tensor.shape:
                    mismatched.append(key)
                    continue
                if id(source) not in made:  # a tied weight is made once, and stays one object
                    value = source.detach()
                    target = torch.float32 if fp32_modules & set(key.split(".")) else dtype
                    if target is not None and value.is_floating_point():
                        value = value.to(target)
                    if not share and value.data_ptr() == source.data_ptr():
                        value = value.clone()
                    elif share:
                        source.data = value  # the base is ours: a tensor it no longer needs is freed now
                    if isinstance(source, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=source.requires_grad)
                    made[id(source)] = value
                tensors[name] = made[id(source)]
    for module in model.modules():
        if isinstance(module, GliderLinear):
            module.set_experts()
    if model.global_router is not None:
        model.global_router.expert_embeddings = torch.zeros(model.global_router.expert_embeddings.shape)
        model.global_router.register_samples(model.config.max_samples)  # off the meta device too; filled later
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    unexpected = sorted(set(base_tensors) - used)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The base model does not fit a GliderT5: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"mismatched shapes {mismatched[:5]}."
        )


def _fill_expert(modules: dict[str, GliderLinear], index: int, expert: Expert, arrow: bool) -> None:
    """Read expert `index`'s LoRA weights and gates (`expert` is its header), one linear at a time, into its slot of
    every routed linear it adapts (the rest of each slot stays zero: rank padding). Arrow prototypes are computed
    from the tensors as read, before any cast to the model's dtype."""
    who = f"Expert {expert.name!r} ({expert.source})"
    adapter_path, gates_path = expert.directory / ADAPTER_WEIGHTS, expert.directory / EXPERT_WEIGHTS
    try:
        with safe_open(adapter_path, "pt") as adapter, nullcontext() if arrow else safe_open(gates_path, "pt") as gates:
            for path in expert.module_paths:
                A = _read_tensor(
                    adapter, f"base_model.model.{path}.lora_A.weight", expert.lora_A[path], adapter_path, who
                )
                B = _read_tensor(
                    adapter, f"base_model.model.{path}.lora_B.weight", expert.lora_B[path], adapter_path, who
                )
                if arrow:
                    gate = arrow_prototype(A, B)
                else:
                    gate = _read_tensor(gates, f"gate.{path}", expert.gates[path], gates_path, who).flatten()
                module, rank = modules[path], A.shape[0]
                slot = module.expert_ids.index(index)
                module.lora_A[slot, :rank] = A
                module.lora_B[slot, :, :rank] = B
                module.router_gate[slot] = gate
    except (SafetensorError, OSError) as error:  # opening a file that was checked before: it changed since
        raise ValueError(f"{who}: its files changed while the model was built ({error}).") from None


# Growing and shrinking a built library in place. Each check runs before anything changes; then the config's expert
# list changes and every routed linear re-derives its experts from it, exactly as a build from scratch would.


def add_expert(model, directory: str | os.PathLike) -> None:
    """See `GliderT5ForConditionalGeneration.add_expert`."""
    expert = load_expert(directory)
    config = model.config
    who = f"Expert {expert.name!r} ({expert.source})"
    if expert.name in config.expert_names:
        raise ValueError(
            f"{who}: the library already has an expert named {expert.name!r}; every expert needs its own name."
        )
    linears = routable_linears(model)
    _check_against_base(expert, linears, config.base_model_name_or_path or "")
    if (model.global_router is None) != (expert.instruction_embedding is None):
        has = "has" if expert.instruction_embedding is not None else "has no"
        library = "has none" if model.global_router is None else "has one for every expert"
        raise ValueError(f"{who} {has} instruction_embedding, but the library {library}: give all experts one or none.")
    if expert.instruction_embedding is None:
        _check_samples(expert, None)  # samples without a global router would be dropped silently
    else:
        if expert.instruction_embedding.numel() != config.instruction_embedding_dim:
            raise ValueError(
                f"{who}: instruction_embedding has {expert.instruction_embedding.numel()} values, the library's "
                f"have {config.instruction_embedding_dim}."
            )
        _check_samples(expert, config.instruction_embedding_dim)
        if expert.embedding_model != config.instruction_embedding_model:
            raise ValueError(
                f"{who}: instruction embedded with {expert.embedding_model!r}, the library's with "
                f"{config.instruction_embedding_model!r}."
            )
        if expert.embedding_prefix != (config.instruction_embedding_prefix or ""):
            raise ValueError(
                f"{who}: instruction embedded with the prefix {expert.embedding_prefix!r} (embedding_prefix), the "
                f"library's with {config.instruction_embedding_prefix or ''!r} (instruction_embedding_prefix)."
            )
    entry = GliderConfig._normalise_expert(len(config.experts), _config_entry(expert, linears))
    gates = _router_gates(expert, entry, config, linears)

    new_id = len(config.experts)
    tensors = {}
    for path, module in model.named_modules():
        if isinstance(module, GliderLinear):
            tensors[path] = module.expert_tensors()
            if path in gates:
                tensors[path][new_id] = (expert.lora_A[path], expert.lora_B[path], gates[path])
    embeddings = None
    if model.global_router is not None:
        old = model.global_router.expert_embeddings
        embeddings = torch.cat([old, expert.instruction_embedding.to(old)[None]])
        embeddings = (embeddings, [*model.global_router.expert_sample_rows(), expert.sample_embeddings])
    _set_library(model, [*config.experts, entry], tensors, embeddings)


def remove_expert(model, name: str) -> None:
    """See `GliderT5ForConditionalGeneration.remove_expert`."""
    config = model.config
    if name not in config.expert_names:
        raise ValueError(f"No expert named {name!r} in the library; its experts are {config.expert_names}.")
    if len(config.experts) == 1:
        raise ValueError(f"Expert {name!r} is the library's only expert; a GliderT5 needs at least one.")
    if config.router_top_k > len(config.experts) - 1:
        raise ValueError(
            f"Removing expert {name!r} would leave {len(config.experts) - 1} experts, fewer than router_top_k "
            f"= {config.router_top_k}; lower model.config.router_top_k first."
        )
    if config.router_candidates is not None and config.router_candidates > len(config.experts) - 1:
        raise ValueError(
            f"Removing expert {name!r} would leave {len(config.experts) - 1} experts, fewer than router_candidates "
            f"= {config.router_candidates}; lower model.config.router_candidates first."
        )
    removed = config.expert_names.index(name)
    tensors = {}
    for path, module in model.named_modules():
        if isinstance(module, GliderLinear):
            kept = {i: t for i, t in module.expert_tensors().items() if i != removed}
            tensors[path] = {(i if i < removed else i - 1): t for i, t in kept.items()}
    embeddings = None
    if model.global_router is not None:
        old, samples = model.global_router.expert_embeddings, model.global_router.expert_sample_rows()
        embeddings = (torch.cat([old[:removed], old[removed + 1 :]]), samples[:removed] + samples[removed + 1 :])
    _set_library(model, [e for e in config.experts if e["name"] != name], tensors, embeddings)


def _set_library(model, experts: list[dict], tensors: dict, embeddings: tuple | None) -> None:
    """Install a new expert list: in the model's config and its encoder's and decoder's copies, in every routed
    linear (`tensors`: module path -> expert id -> unpadded A, B, gate) and in the global router (`embeddings`: the
    instruction embeddings and each expert's embedded samples; its descriptors are fitted anew). All or nothing: if
    anything fails on the way (memory, an interrupt), every module and config is put back as it was."""
    configs = (model.config, model.encoder.config, model.decoder.config)
    modules = [m for m in model.modules() if isinstance(m, (GliderLinear, GliderGlobalRouter))]
    saved_configs = [c.experts for c in configs]
    saved_modules = [{**m.__dict__, "_parameters": dict(m._parameters), "_buffers": dict(m._buffers)} for m in modules]
    try:
        for config in configs:
            config.describe_model(experts)
        with torch.no_grad():
            for path, module in model.named_modules():
                if isinstance(module, GliderLinear):
                    module.set_experts(tensors[path])
            if embeddings is not None:
                model.global_router.set_experts(*embeddings)
    except BaseException:
        for config, saved in zip(configs, saved_configs):
            config.describe_model(saved)
        for module, saved in zip(modules, saved_modules):
            module.__dict__.clear()
            module.__dict__.update(saved)
        raise
