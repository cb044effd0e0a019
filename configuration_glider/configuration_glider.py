"""GliderT5 configuration: a T5 config plus every routing knob and the description of the expert library."""

import copy
import json
import math
import re
import sys

from huggingface_hub.dataclasses import strict
from transformers import T5Config

# Written into every saved config.json so that a folder or Hub repo loads without this package
# (`trust_remote_code=True`): the code files are saved flat beside the weights.
AUTO_MAP = {
    "AutoConfig": "configuration_glider.GliderConfig",
    "AutoModel": "modeling_glider.GliderT5ForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_glider.GliderT5ForConditionalGeneration",
}
CUSTOM_PIPELINES = {
    "text2text-generation": {
        "impl": "pipeline_glider.Text2TextGenerationPipeline",
        "pt": ["AutoModelForSeq2SeqLM"],
    }
}
LOCAL_ROUTERS = ("phatgoose", "arrow")
GLOBAL_ROUTING_POLICIES = ("fixed", "threshold")
GLOBAL_ROUTING_DESCRIPTORS = ("instruction", "samples", "both")
LORA_IMPLEMENTATIONS = ("auto", "dense", "gather", "grouped")
ROUTING_COMPATIBILITIES = ("glider", "reference")
# Routing knobs may change at any time (each assignment is checked); the library fields describe the tensors of a
# built model and are fixed on it.
ROUTING_KNOBS = (
    "router_top_k",
    "router_top_p",
    "router_candidates",
    "global_routing_scale",
    "global_routing_policy",
    "global_routing_threshold",
    "global_routing_scale_unmatched",
    "global_routing_descriptor",
    "arrow_temperature",
    "lora_implementation",
    "routing_compatibility",
)
LIBRARY_FIELDS = (
    "experts",
    "local_router",
    "instruction_embedding_dim",
    "instruction_embedding_model",
    "instruction_embedding_prefix",
    "instruction_embedding_truncate_dim",
    "instruction_embedding_trust_remote_code",
)
# How a loaded model serves its experts (see `expert_offload`): fixed on a built model, and not saved with it.
SERVING_FIELDS = ("expert_offload", "expert_cache_size")
EXPERT_OFFLOADS = ("cpu", "disk")
_UNSET = object()
EXPERT_KEYS = (
    "name",
    "instruction",
    "source",
    "target_modules",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "samples",
)


def is_positive_number(value, integer: bool = False) -> bool:
    """A finite number > 0 (an int if `integer`); never a bool."""
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and 0 < value < math.inf


class ExpertEntry(dict):
    """An expert's description in the config. What fixes its tensors and scalings (name, target modules, ranks,
    alphas) cannot change in place; its `instruction` and `source` texts may."""

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "An expert's name, target modules, ranks and alphas cannot change in place (the model's tensors were made "
            "from them); use add_expert / remove_expert, or build a new model."
        )

    def __setitem__(self, key, value):
        if key not in ("instruction", "source") or not isinstance(value, str):
            self._refuse()
        super().__setitem__(key, value)

    __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self):
        return type(self), (dict(self),)

    def __deepcopy__(self, memo):
        return type(self)(copy.deepcopy(dict(self), memo))


class ReadOnlyDict(ExpertEntry):
    """A rank or alpha pattern of an expert: read-only."""

    __setitem__ = ExpertEntry._refuse


class ReadOnlyList(list):
    """A config's expert list, or an expert's target modules: read-only, like `ExpertEntry` (reordering the experts in
    place would give each expert's tensors another expert's name and scalings)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "The expert list and an expert's target modules cannot change in place (the model's tensors were made "
            "from them); use add_expert / remove_expert, or build a new model."
        )

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self):
        return type(self), (list(self),)

    def __deepcopy__(self, memo):
        return type(self)(copy.deepcopy(list(self), memo))


def check_lora_fields(fields: dict, who: str) -> None:
    """Refuse LoRA fields that PEFT would not read as ranks and scalings: `r` and the `rank_pattern` values positive
    integers, `lora_alpha` and the `alpha_pattern` values finite numbers > 0, `use_rslora` true or false, the patterns'
    keys regular expressions. `fields` holds each (defaults applied); `who` names the expert."""
    if not is_positive_number(fields["r"], integer=True):
        raise ValueError(f"{who}: 'r' must be a positive integer, got {fields['r']!r}.")
    if not is_positive_number(fields["lora_alpha"]):
        raise ValueError(f"{who}: 'lora_alpha' must be a finite number > 0, got {fields['lora_alpha']!r}.")
    if not isinstance(fields["use_rslora"], bool):
        raise ValueError(f"{who}: 'use_rslora' must be true or false, got {fields['use_rslora']!r}.")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = fields.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{who}: '{key}' must be an object, got {pattern!r}.")
        for module, value in pattern.items():
            try:
                re.compile(module)  # PEFT reads each key as a regular expression
            except re.error as error:
                raise ValueError(f"{who}: {key} key {module!r} is not a valid regular expression ({error}).") from None
            if not is_positive_number(value, integer):
                kind = "a positive integer" if integer else "a finite number > 0"
                raise ValueError(f"{who}: {key}[{module!r}] must be {kind}, got {value!r}.")


def matches_pattern(pattern: str, module_path: str) -> bool:
    """PEFT's rule for `target_modules` names and `rank_pattern`/`alpha_pattern` keys: the pattern matches the
    whole path or a dotted suffix of it."""
    return module_path == pattern or re.match(rf"(.*\.)?({pattern})$", module_path) is not None


@strict
class GliderConfig(T5Config):
    r"""
    Configuration of a [`GliderT5ForConditionalGeneration`]: the base T5's fields plus the expert library and the
    routing knobs of GLIDER (local Phatgoose/Arrow routers biased by a global instruction router).

    experts (`list[dict]`):
        One entry per expert, in routing order: `name`, `instruction`, `source`, `target_modules` (PEFT semantics:
        module names or dotted suffixes of `T5ForConditionalGeneration` module paths), `r`, `lora_alpha`,
        `use_rslora`, `rank_pattern`, `alpha_pattern` (PEFT semantics), `samples` (how many embedded inputs of the
        expert's training data the global router holds, 0 if none). These fix every LoRA shape and scaling.
    router_top_k (`int`, defaults to 2):
        Experts kept per token and per routed linear after the softmax; their weights are renormalised.
    router_top_p (`float`, *optional*):
        If set, also drop the kept experts outside the smallest set whose probability reaches `router_top_p`
        (the best expert is always kept). With `router_top_k` = number of experts this is pure top-p routing.
    router_candidates (`int`, *optional*):
        If set to m, each query with a global term keeps its m best experts by the global logits
        `alpha * cos(u, G_e)` (ties broken as `torch.topk` does) as its candidates, and at every routed linear the
        local routers choose among the candidates that adapt that linear only: the local logits are computed against
        those m gates, so the per-token routing cost no longer grows with the number of experts. The softmax, top-k
        and top-p are over the candidates (top-p over the candidates' probability mass); where fewer than
        `router_top_k` candidates adapt a linear, the missing slots get weight 0, and a linear none of them adapts
        adds nothing. A query whose global term is zero (no instruction, a zero row, or alpha = 0) keeps every
        expert. `None` (default): every expert is a candidate, as in the paper. Must lie between `router_top_k` and
        the number of experts; not combined with `routing_compatibility="reference"` (the authors' computation).
        Exactness: Phatgoose's local logit `LN(x) . LN(v) / sqrt(d_in)` lies in `[-sqrt(d_in), sqrt(d_in)]` (a
        LayerNorm without affine parameters has norm at most `sqrt(d_in)`), so a query's top-k at a linear is the
        paper's whenever `alpha * (c_(k) - c_(m+1)) > 2 sqrt(d_in)` for the largest `d_in` of the routed linears, with
        `c_(j)` its j-th best cosine similarity (`routing.candidates_are_exact`). Arrow's local logits `|x . v| / T`
        have no such bound.
    global_routing_scale (`float`, defaults to 100.0):
        alpha in `logits_e = local_e + alpha * cos(u, G_e)`; with the threshold policy, the alpha of a query that
        matches a known expert.
    global_routing_policy (`str`, defaults to `"fixed"`):
        How alpha is chosen per query. `"fixed"`: always `global_routing_scale`. `"threshold"`:
        `global_routing_scale` when the query's best cosine similarity to an expert instruction reaches
        `global_routing_threshold` (it matches a known task), `global_routing_scale_unmatched` otherwise (an unseen
        task, where the local routers should lead).
    global_routing_descriptor (`str`, defaults to `"instruction"`):
        What describes expert e to the global router, the G_e of `alpha * cos(u, G_e)`. `"instruction"`: the
        embedding of its instruction (the paper). `"samples"`: a descriptor fitted to the embedded samples of the
        experts' training inputs (a cosine classifier over the library, `fit_expert_descriptors`; an expert without
        samples keeps its instruction embedding). `"both"`: the mean of the two cosines. The score stays in [-1, 1].
    global_routing_threshold (`float`, defaults to 0.3):
        Best score (cosine similarity with the descriptor) from which a query counts as matching a known expert (threshold policy only).
    global_routing_scale_unmatched (`float`, defaults to 3.0):
        alpha for a query that matches no known expert (threshold policy only).
    local_router (`str`, defaults to `"phatgoose"`):
        `"phatgoose"`: `LN(x) . LN(v_e) / sqrt(d_in)`; `"arrow"`: `|x . v_e| / arrow_temperature`. Says what the
        `router_gate` tensors hold (Phatgoose gates or Arrow prototypes), so, like `experts`,
        `instruction_embedding_dim` and `instruction_embedding_model`, it is fixed once a model is built from the
        config; the routing knobs may change at any time, and every assignment is checked.
    arrow_temperature (`float`, defaults to 10.0):
        Temperature T of Arrow's local logits.
    instruction_embedding_dim (`int`, *optional*):
        Width D of the instruction embeddings; `None` means the library has no global router.
    instruction_embedding_model (`str`, *optional*):
        Name of the sentence-embedding model the expert instructions were embedded with.
    instruction_embedding_prefix (`str`, *optional*):
        Text put before every instruction before it is embedded, as some models require (e.g. nomic-embed-text's
        `"search_query: "`); queries are embedded with the same prefix. A build takes it from the experts' files
        (`embedding_prefix`, as `glider describe-experts --embedding-prefix` records it).
    instruction_embedding_truncate_dim (`int`, *optional*):
        The embeddings keep the first this many values of the model's output, renormalised (Matryoshka models such as
        nomic-embed-text); equals `instruction_embedding_dim` when set.
    instruction_embedding_trust_remote_code (`bool`, defaults to `False`):
        Whether the embedding model runs code from its repository (nomic-embed-text does); the pipeline loads it so.
        These three, like the model's name, say what the stored expert embeddings mean, so they are fixed on a model.
    base_model_name_or_path (`str`, *optional*):
        The T5 the experts were fine-tuned from.
    lora_implementation (`str`, defaults to `"auto"`):
        How a routed linear computes `sum_e w_e s_e B_e A_e x`; every choice gives the same result up to rounding.
        `"dense"`: over all experts, unselected ones with weight 0 (the readable reference; cost grows with E).
        `"gather"`: gathers each token's k experts and uses batched matmuls: no loop, for few tokens (on CPU, from 8
        rows on, each expert once where rows share them, as beams do).
        `"grouped"`: groups tokens by expert, one matmul pair per expert in use (for many tokens).
        `"auto"`: `"gather"` for calls on up to 64 tokens (the decoding steps of up to 64 rows), `"grouped"` above.
    expert_offload (`str`, *optional*):
        Where a loaded model keeps its experts' LoRA weights and gates, a loading option
        (`from_pretrained(folder, expert_offload="disk", expert_cache_size=64)`): `None` (default) on the model's
        devices; `"disk"` in the model's safetensors files, each expert read when a call first needs it; `"cpu"` in
        CPU memory (for accelerators smaller than the library). The devices then hold the base, the global router and
        a cache of `expert_cache_size` experts; a call leases the experts it may use (with `router_candidates` set,
        its queries' candidates; otherwise every expert), reading the missing ones in place of the least recently
        used. Routing is unchanged. Fixed once the model is built, and not saved (`save_pretrained`, `add_expert`
        and gate training need the experts in memory: load the model without it for those).
    expert_cache_size (`int`, *optional*):
        How many experts the cache of an offloaded model holds (default: all of them, read as first needed). Must
        be at least `router_candidates` (or, without candidates, the number of experts, since every call may then
        use every expert); a call whose queries need more experts than this is refused.
    routing_compatibility (`str`, defaults to `"glider"`):
        `"glider"`: the routing described above. `"reference"`: the computation of the GLIDER authors' code
        (UNITES-Lab/glider), to reproduce the paper from its released checkpoints: the last value of every
        instruction embedding, expert and query side, is dropped before the cosine (their `bias_routing_dim = -1`);
        with `router_top_p` set (below 1), the smallest set of experts whose probability reaches it over all experts
        is kept and `router_top_k` is ignored; top-k weights are renormalised as `w / (sum(w) + 1e-6)`. The stored
        expert embeddings are the full vectors in both modes (the truncation is part of the comparison), so the
        switch is a routing knob.
    """

    model_type = "glider_t5"

    experts: list | None = None
    router_top_k: int = 2
    router_top_p: float | int | None = None
    router_candidates: int | None = None
    global_routing_scale: float | int = 100.0
    global_routing_policy: str = "fixed"
    global_routing_threshold: float | int = 0.3
    global_routing_scale_unmatched: float | int = 3.0
    global_routing_descriptor: str = "instruction"
    local_router: str = "phatgoose"
    arrow_temperature: float | int = 10.0
    instruction_embedding_dim: int | None = None
    instruction_embedding_model: str | None = None
    instruction_embedding_prefix: str | None = None
    instruction_embedding_truncate_dim: int | None = None
    instruction_embedding_trust_remote_code: bool = False
    base_model_name_or_path: str | None = None
    lora_implementation: str = "auto"
    routing_compatibility: str = "glider"
    expert_offload: str | None = None
    expert_cache_size: int | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("custom_pipelines", None)  # a constant of this class, see `custom_pipelines`
        kwargs.pop("auto_map", None)
        self.experts = self.normalise_experts(self.experts or [])
        self.check_routing_knobs()
        if self.local_router not in LOCAL_ROUTERS:
            raise ValueError(f"local_router must be one of {LOCAL_ROUTERS}, got {self.local_router!r}.")
        if self.instruction_embedding_dim is not None and self.instruction_embedding_dim < 1:
            raise ValueError(f"instruction_embedding_dim must be >= 1, got {self.instruction_embedding_dim!r}.")
        if self.instruction_embedding_prefix is not None and not isinstance(self.instruction_embedding_prefix, str):
            raise ValueError(
                f"instruction_embedding_prefix must be a string, got {self.instruction_embedding_prefix!r}."
            )
        truncate_dim = self.instruction_embedding_truncate_dim
        if truncate_dim is not None and truncate_dim != self.instruction_embedding_dim:
            raise ValueError(
                f"instruction_embedding_truncate_dim = {truncate_dim} must equal instruction_embedding_dim "
                f"({self.instruction_embedding_dim}): the embeddings are truncated to the experts' width."
            )
        super().__post_init__(**kwargs)
        self.auto_map = AUTO_MAP

    def check_routing_knobs(self) -> None:
        """Refuse routing knobs that cannot give a right answer; runs at construction and on every assignment."""
        if isinstance(self.router_top_k, bool) or not isinstance(self.router_top_k, int) or self.router_top_k < 1:
            raise ValueError(f"router_top_k (top_k) must be an integer >= 1, got {self.router_top_k!r}.")
        if self.experts and self.router_top_k > len(self.experts):
            raise ValueError(
                f"router_top_k (top_k) = {self.router_top_k} exceeds the number of experts ({len(self.experts)})."
            )
        if self.router_top_p is not None and not 0.0 < self.router_top_p <= 1.0:  # NaN fails too
            raise ValueError(f"router_top_p (top_p) must be in (0, 1], got {self.router_top_p!r}.")
        self.check_router_candidates(len(self.experts) if self.experts else None)
        self.check_expert_offload(against_library=self.__dict__.get("_describes_model", False))
        for name in ("global_routing_scale", "global_routing_scale_unmatched", "global_routing_threshold"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}.")
        if self.global_routing_policy not in GLOBAL_ROUTING_POLICIES:
            raise ValueError(
                f"global_routing_policy must be one of {GLOBAL_ROUTING_POLICIES}, got {self.global_routing_policy!r}."
            )
        if self.global_routing_descriptor not in GLOBAL_ROUTING_DESCRIPTORS:
            raise ValueError(
                f"global_routing_descriptor must be one of {GLOBAL_ROUTING_DESCRIPTORS}, got "
                f"{self.global_routing_descriptor!r}."
            )
        if self.global_routing_descriptor != "instruction" and self.experts and not self.max_samples:
            raise ValueError(
                f"global_routing_descriptor={self.global_routing_descriptor!r} needs experts with embedded samples, "
                "and no expert of this library has any (experts[*].samples; `glider describe-experts --samples N`)."
            )
        if self.global_routing_descriptor != "instruction" and self.routing_compatibility == "reference":
            raise ValueError(
                "routing_compatibility='reference' reproduces the authors' instruction-only global router: set "
                "global_routing_descriptor='instruction'."
            )
        if not -1.0 <= self.global_routing_threshold <= 1.0:
            raise ValueError(
                f"global_routing_threshold is a cosine similarity in [-1, 1], got {self.global_routing_threshold!r}."
            )
        if self.lora_implementation not in LORA_IMPLEMENTATIONS:
            raise ValueError(
                f"lora_implementation must be one of {LORA_IMPLEMENTATIONS}, got {self.lora_implementation!r}."
            )
        if self.routing_compatibility not in ROUTING_COMPATIBILITIES:
            raise ValueError(
                f"routing_compatibility must be one of {ROUTING_COMPATIBILITIES}, got {self.routing_compatibility!r}."
            )
        if self.routing_compatibility == "reference" and self.instruction_embedding_dim == 1:
            raise ValueError(
                "routing_compatibility='reference' drops the last value of every instruction embedding, but they are "
                "1 wide (instruction_embedding_dim = 1): nothing would be left to compare."
            )
        if not (0 < self.arrow_temperature < math.inf):
            raise ValueError(f"arrow_temperature must be > 0 and finite, got {self.arrow_temperature!r}.")

    def check_router_candidates(self, num_experts: int | None) -> None:
        m = self.router_candidates
        if m is None:
            return
        if isinstance(m, bool) or not isinstance(m, int) or m < self.router_top_k:
            raise ValueError(
                f"router_candidates must be None or an integer >= router_top_k ({self.router_top_k}), got {m!r}."
            )
        if num_experts is not None and m > num_experts:
            raise ValueError(f"router_candidates = {m} exceeds the number of experts ({num_experts}).")
        if self.routing_compatibility == "reference":
            raise ValueError(
                "router_candidates cannot be combined with routing_compatibility='reference' (the authors' "
                "computation, where every expert is a candidate); set router_candidates=None."
            )

    def check_expert_offload(self, against_library: bool = True) -> None:
        """Refuse serving fields out of range; `against_library`: also those that cannot serve a query of this library
        and routing knobs (checked once a model is built, as `from_pretrained` sets its keywords one by one)."""
        offload, size = self.expert_offload, self.expert_cache_size
        if offload is not None and offload not in EXPERT_OFFLOADS:
            raise ValueError(f"expert_offload must be None or one of {EXPERT_OFFLOADS}, got {offload!r}.")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"expert_cache_size must be an integer >= 1, got {size!r}.")
        if not against_library or size is None:
            return
        if offload is None:
            raise ValueError(f"expert_cache_size = {size!r} was given without expert_offload ('cpu' or 'disk').")
        if self.experts and size < min(self.router_candidates or len(self.experts), len(self.experts)):
            raise ValueError(
                f"expert_cache_size = {size} is below the experts one query may use: "
                + (
                    f"router_candidates = {self.router_candidates}."
                    if self.router_candidates
                    else f"all {len(self.experts)} of them, as router_candidates is not set (set it, e.g. to 4, or "
                    "make the cache hold every expert)."
                )
            )

    @property
    def expert_cache_capacity(self) -> int:
        """How many experts the cache of an offloaded model holds: `expert_cache_size`, at most the library."""
        return min(self.expert_cache_size or len(self.experts), len(self.experts))

    def __setattr__(self, name, value):
        # A built model's tensors were made for its library fields: changing one would route silently wrong.
        if name in LIBRARY_FIELDS and self.__dict__.get("_describes_model") and value != getattr(self, name):
            raise ValueError(
                f"{name} describes the tensors of a built GliderT5 and cannot change on it (from "
                f"{getattr(self, name)!r} to {value!r}). Use add_expert / remove_expert, or build a new model "
                f"with from_experts(..., {name}=...)."
            )
        if name in SERVING_FIELDS and self.__dict__.get("_describes_model") and value != getattr(self, name):
            raise ValueError(
                f"{name} says how a loaded GliderT5 holds its experts and cannot change on it (from "
                f"{getattr(self, name)!r} to {value!r}): load it again with from_pretrained(..., {name}=...)."
            )
        previous = self.__dict__.get(name, _UNSET)
        super().__setattr__(name, value)
        if name in (*ROUTING_KNOBS, *SERVING_FIELDS) and self.__dict__.get("_post_init_done"):  # set later: check it
            try:
                self.check_routing_knobs()
            except ValueError:
                super().__setattr__(name, previous)
                raise

    def describe_model(self, experts: list[dict] | None = None) -> None:
        """Mark this config as the description of a built model's tensors (its library fields are then fixed), or
        install a new expert list on it (how `add_expert` / `remove_expert` change the library)."""
        if experts is not None:
            previous, self.__dict__["experts"] = self.experts, self.normalise_experts(experts)
            try:
                self.check_routing_knobs()  # e.g. top_k above the new number of experts
            except ValueError:
                self.__dict__["experts"] = previous
                raise
        self.__dict__["_describes_model"] = True

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`PretrainedConfig.from_dict`, refusing overrides of the fields the saved tensors were made for (e.g.
        `from_pretrained(dir, local_router="arrow")` on a model whose gates are Phatgoose gates)."""
        for name in LIBRARY_FIELDS:
            if name in kwargs:
                saved = config_dict.get(name, cls.__dataclass_fields__[name].default)
                given = cls.normalise_experts(kwargs[name]) if name == "experts" else kwargs[name]
                if given != (cls.normalise_experts(saved or []) if name == "experts" else saved):
                    raise ValueError(
                        f"{name}={kwargs[name]!r} was given, but the saved model's tensors were made with "
                        f"{name}={saved!r}. Build a new model with from_experts(..., {name}=...) instead."
                    )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def normalise_experts(cls, experts: list) -> list:
        if not isinstance(experts, list):
            raise ValueError(f"experts must be a list of expert descriptions, got {type(experts).__name__}.")
        experts = ReadOnlyList(cls._normalise_expert(i, e) for i, e in enumerate(experts))
        names = [e["name"] for e in experts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Duplicate expert names: {duplicates}. Every expert needs its own name.")
        return experts

    @staticmethod
    def _normalise_expert(index: int, expert: dict) -> dict:
        if not isinstance(expert, dict) or not isinstance(expert.get("name"), str) or not expert["name"].strip():
            raise ValueError(f"Expert #{index} needs a non-empty string 'name', got {expert!r}.")
        name = expert["name"]
        unknown = set(expert) - set(EXPERT_KEYS)
        if unknown:
            raise ValueError(f"Expert {name!r}: unknown keys {sorted(unknown)}; allowed: {list(EXPERT_KEYS)}.")
        targets = expert.get("target_modules")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"Expert {name!r}: 'target_modules' must be a non-empty list of module names.")
        for target in targets:
            try:
                re.compile(target)  # PEFT reads each as a regular expression
            except re.error as error:
                raise ValueError(
                    f"Expert {name!r}: target_modules entry {target!r} is not a valid regular expression ({error})."
                ) from None
        r = expert.get("r")
        lora = {"r": r, "lora_alpha": expert.get("lora_alpha", r), "use_rslora": expert.get("use_rslora", False)}
        lora |= {key: expert.get(key) for key in ("rank_pattern", "alpha_pattern")}
        check_lora_fields(lora, f"Expert {name!r}")
        normalised = ExpertEntry(
            name=name,
            instruction=expert.get("instruction") or "",
            source=expert.get("source") or "",
            target_modules=ReadOnlyList(sorted(targets)),
            r=r,
            lora_alpha=lora["lora_alpha"],
            use_rslora=lora["use_rslora"],
            rank_pattern=ReadOnlyDict(lora["rank_pattern"] or {}),
            alpha_pattern=ReadOnlyDict(lora["alpha_pattern"] or {}),
            samples=expert.get("samples", 0),
        )
        samples = normalised["samples"]
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"Expert {name!r}: 'samples' must be an integer >= 0, got {samples!r}.")
        if not isinstance(normalised["instruction"], str) or not isinstance(normalised["source"], str):
            raise ValueError(f"Expert {name!r}: 'instruction' and 'source' must be strings.")
        return normalised

    @property
    def expert_names(self) -> list[str]:
        return [e["name"] for e in self.experts]

    @property
    def custom_pipelines(self) -> dict:
        # Without this package, `pipeline(..., trust_remote_code=True)` finds the saved pipeline through this
        # entry. Once the package (or the saved modeling code) has registered the task in this process, the
        # entry must vanish: transformers would otherwise demand `trust_remote_code` for a registered pipeline.
        pipelines = sys.modules.get("transformers.pipelines")
        if pipelines is not None and "text2text-generation" in pipelines.PIPELINE_REGISTRY.supported_tasks:
            return {}
        return copy.deepcopy(CUSTOM_PIPELINES)  # `pipeline()` rewrites the entry it is given in place

    @custom_pipelines.setter
    def custom_pipelines(self, value):
        pass  # loaded configs carry the constant entry; nothing to keep

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop("_describes_model", None)
        for name in SERVING_FIELDS:  # how one process served the model, not what the model is
            output.pop(name, None)
        output["experts"] = json.loads(json.dumps(output["experts"]))  # plain dicts
        output["custom_pipelines"] = copy.deepcopy(CUSTOM_PIPELINES)
        return output

    @property
    def max_samples(self) -> int:
        """Rows per expert of the global router's `expert_samples` (the most samples any expert has)."""
        return max((e["samples"] for e in self.experts), default=0)

    def expert_adapts(self, expert: dict, module_path: str) -> bool:
        return any(matches_pattern(t, module_path) for t in expert["target_modules"])

    def expert_rank_and_scaling(self, expert: dict, module_path: str) -> tuple[int, float]:
        """The LoRA rank and scaling (alpha/r, or alpha/sqrt(r) with rslora) of `expert` at `module_path`."""
        r = next((v for k, v in expert["rank_pattern"].items() if matches_pattern(k, module_path)), expert["r"])
        alpha = next(
            (v for k, v in expert["alpha_pattern"].items() if matches_pattern(k, module_path)), expert["lora_alpha"]
        )
        return int(r), float(alpha) / (math.sqrt(r) if expert["use_rslora"] else r)

    def module_experts(self, module_path: str) -> list[tuple[int, int, float]]:
        """(expert index, rank, scaling) of every expert that adapts the linear at `module_path`."""
        return [
            (i, *self.expert_rank_and_scaling(e, module_path))
            for i, e in enumerate(self.experts)
            if self.expert_adapts(e, module_path)
        ]


__all__ = ["GliderConfig"]
