"""Sharing a GliderT5 on the Hugging Face Hub: the model card, and pushing a saved folder or a model in one commit.

A pushed repo holds everything both loading paths need: the weights (safetensors only), `config.json` with
`auto_map` and the custom `text2text-generation` pipeline, the model's code (flat, for `trust_remote_code=True`),
the tokenizer, and a model card rendered from `hub_cards/glider_t5.md`.

Evaluation results for the card come as JSON (a file, or the same structure in memory):

    {
      "source": {"name": "glider-t5 benchmark", "url": "https://..."},          (optional)
      "results": [
        {"task": "Held-in tasks", "dataset": "glider-mini/held-in", "dataset_name": "glider-mini held-in",
         "split": "test", "metric": "accuracy", "metric_name": "Average accuracy", "value": 0.81}
      ]
    }

`dataset`, `metric` and `value` are required; `task`, `task_type` (default `text2text-generation`),
`dataset_name`, `dataset_config`, `split` and `metric_name` are optional. They become the card's `model-index`.
"""

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HTTPError

from configuration_glider import GliderConfig
from hub_cards import card_template

from .packaging import code_files

CARD = "README.md"
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # never uploaded: safetensors only
HUB_MODEL_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
EVAL_KEYS = {
    "task": "task_name",
    "task_type": "task_type",
    "dataset": "dataset_type",
    "dataset_name": "dataset_name",
    "dataset_config": "dataset_config",
    "split": "dataset_split",
    "metric": "metric_type",
    "metric_name": "metric_name",
    "value": "metric_value",
}
TAGS = ["glider", "glider_t5", "t5", "lora", "mixture-of-experts", "text2text-generation"]


def load_eval_results(source: str | os.PathLike | dict | list) -> list[EvalResult]:
    """Evaluation results in the format of this module's docstring (a JSON file, a dict, or its `results` list,
    whose entries may also be `EvalResult`s)."""
    where = "evaluation results"
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"Cannot read evaluation results from {where}: {error}") from None
    if isinstance(source, dict):
        origin, entries = source.get("source") or {}, source.get("results")
    else:
        origin, entries = {}, source
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: expected a non-empty 'results' list.")
    if origin and not (isinstance(origin, dict) and origin.get("name") and origin.get("url")):
        raise ValueError(f"{where}: 'source' must be {{'name': ..., 'url': ...}}, got {origin!r}.")
    results = []
    for index, entry in enumerate(entries):
        if isinstance(entry, EvalResult):
            results.append(entry)
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: result #{index} must be an object, got {entry!r}.")
        unknown = sorted(set(entry) - set(EVAL_KEYS))
        missing = [key for key in ("dataset", "metric", "value") if entry.get(key) is None]
        if unknown or missing:
            raise ValueError(
                f"{where}: result #{index} has unknown keys {unknown} / lacks {missing}; keys: {list(EVAL_KEYS)}."
            )
        fields = {EVAL_KEYS[key]: value for key, value in entry.items()}
        fields.setdefault("task_type", "text2text-generation")
        fields.setdefault("dataset_name", fields["dataset_type"])
        results.append(EvalResult(**fields, source_name=origin.get("name"), source_url=origin.get("url")))
    return results


def _cell(value) -> str:
    """Text for one markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|") if value not in (None, "") else "-"


def render_model_card(
    config: GliderConfig,
    repo_id: str,
    *,
    eval_results: str | os.PathLike | dict | list | None = None,
    license: str | None = "apache-2.0",
    tags: list[str] | None = None,
) -> ModelCard:
    """The model card of a GliderT5 pushed to `repo_id`, rendered from `hub_cards/glider_t5.md`."""
    model_name = repo_id.split("/")[-1]
    results = load_eval_results(eval_results) if eval_results is not None else None
    base = config.base_model_name_or_path
    card_data = ModelCardData(
        base_model=base if base and HUB_MODEL_ID.match(base) and not os.path.exists(base) else None,
        library_name="transformers",
        pipeline_tag="text2text-generation",
        license=license,
        tags=TAGS + list(tags or []),
        model_name=model_name,
        eval_results=results,
    )
    experts = []
    for expert in config.experts:
        rank = str(expert["r"])
        if expert["rank_pattern"]:
            rank += " (" + ", ".join(f"{k}: {v}" for k, v in expert["rank_pattern"].items()) + ")"
        experts.append({key: _cell(value) for key, value in {**expert, "rank": rank}.items()})
    if config.local_router == "arrow":
        local = f"Arrow: |x . v_e| / T, T = {config.arrow_temperature}"
    else:
        local = "Phatgoose: LN(x) . LN(v_e) / sqrt(d_in)"
    if config.instruction_embedding_dim:
        embedder = f"{config.instruction_embedding_model or 'unnamed model'}, width {config.instruction_embedding_dim}"
    else:
        embedder = "none (local routing only)"
    routing = [
        ("Local router (`local_router`)", local),
        ("Experts kept per token (`router_top_k`)", config.router_top_k),
        ("Top-p (`router_top_p`)", config.router_top_p if config.router_top_p is not None else "off"),
        ("Candidate experts per query (`router_candidates`)", config.router_candidates or "every expert"),
        ("Global routing scale alpha (`global_routing_scale`)", config.global_routing_scale),
        ("alpha policy (`global_routing_policy`)", _alpha_policy(config)),
        ("Instruction embeddings", embedder),
        ("Expert descriptor (`global_routing_descriptor`)", _descriptor(config)),
        ("Routing computation (`routing_compatibility`)", _compatibility(config)),
    ]
    evaluation = [
        {
            "task": _cell(r.task_name or r.task_type),
            "dataset": _cell(r.dataset_name),
            "split": _cell(r.dataset_split),
            "metric": _cell(r.metric_name or r.metric_type),
            "value": _cell(f"{r.metric_value:.4g}" if isinstance(r.metric_value, float) else r.metric_value),
        }
        for r in results or []
    ]
    source = results[0].source_name and f"[{results[0].source_name}]({results[0].source_url})" if results else None
    license_text = (
        f"`{license}`. The base model and each expert keep their own licenses; check them before use."
        if license
        else "Not stated: check the licenses of the base model and of every expert before use."
    )
    with card_template() as template:
        return ModelCard.from_template(
            card_data,
            template_path=str(template),
            model_title=model_name,
            repo_id=repo_id,
            base_model=base,
            experts=experts,
            routing=[(name, _cell(value)) for name, value in routing],
            evaluation=evaluation,
            evaluation_source=source,
            embedding_dim=config.instruction_embedding_dim,
            embedding_model=config.instruction_embedding_model,
            license_text=license_text,
        )


def _compatibility(config: GliderConfig) -> str:
    if config.routing_compatibility == "reference":
        return (
            "reference: as the GLIDER authors' code (last embedding value dropped on both sides, top-p over all "
            "experts ignoring top-k, top-k renormalised with +1e-6)"
        )
    return "glider"


def _descriptor(config: GliderConfig) -> str:
    with_samples = sum(1 for e in config.experts if e["samples"])
    samples = f"{with_samples} of {len(config.experts)} experts carry embedded samples of their inputs"
    descriptor = {
        "instruction": "instruction: cos(u, instruction embedding)",
        "samples": "samples: cos(u, descriptor fitted to the embedded samples)",
        "both": "both: mean of the instruction and fitted-descriptor cosines",
    }[config.global_routing_descriptor]
    return f"{descriptor}; {samples}"


def _alpha_policy(config: GliderConfig) -> str:
    if config.global_routing_policy == "threshold":
        return (
            f"threshold: alpha = {config.global_routing_scale} when a query's best cosine similarity reaches "
            f"{config.global_routing_threshold}, else {config.global_routing_scale_unmatched}"
        )
    return "fixed"


def _folder_operations(folder: Path) -> tuple[GliderConfig, list[CommitOperationAdd]]:
    """The folder's config, and one upload per file a GliderT5 repo needs, checked before anything is sent."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a saved GliderT5: no config.json (save it with save_pretrained).")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{config_file} is not a valid config ({error}).") from None
    if model_type != GliderConfig.model_type:
        raise ValueError(f"{folder} holds a {model_type!r} model, not a GliderT5 ({GliderConfig.model_type!r}).")
    config = GliderConfig.from_pretrained(folder)  # every routing setting checked before anything is sent
    if (folder / WEIGHTS_INDEX).is_file():
        shards = set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values())
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            raise FileNotFoundError(f"{folder}: {WEIGHTS_INDEX} lists shards that are missing: {missing}.")
    elif not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} (GliderT5 repos hold safetensors weights only).")

    skipped = []
    operations = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name == CARD:
            continue  # the card is rendered (or given); hidden files are local state
        if path.is_dir() or path.suffix in PICKLE_SUFFIXES:
            skipped.append(path.name)
        elif path.is_file():
            operations[path.name] = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=path)
    for source in code_files():  # a folder saved without its code (e.g. by T5's save_pretrained) gets this version's
        operations.setdefault(source.name, CommitOperationAdd(path_in_repo=source.name, path_or_fileobj=source))
    if skipped:
        warnings.warn(
            f"Not uploading {skipped} from {folder}: a GliderT5 repo holds top-level files and safetensors only.",
            stacklevel=3,
        )
    if not any(name.startswith("tokenizer") or name == "spiece.model" for name in operations):
        warnings.warn(
            "Pushing no tokenizer (pass tokenizer= or save one into the folder): pipeline() needs one.", stacklevel=3
        )
    return config, list(operations.values())


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    eval_results: str | os.PathLike | dict | list | None = None,
    license: str | None = "apache-2.0",
    tags: list[str] | None = None,
    model_card: str | None = None,
) -> CommitInfo:
    """Push a folder saved by `GliderT5ForConditionalGeneration.save_pretrained` (and the tokenizer's) to `repo_id`
    as one commit, with a model card rendered from the config (or `model_card`, the text of your own card).

    Nothing local is written: the card is uploaded from memory. The commit is atomic on the Hub, so a failed push
    leaves the repo as it was. `revision` must be an existing branch.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No such folder: {folder}")
    config, operations = _folder_operations(folder)
    if eval_results is not None:
        eval_results = load_eval_results(eval_results)  # bad input fails before the repo is created
    api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        if model_card is None:
            model_card = str(render_model_card(config, repo_id, eval_results=eval_results, license=license, tags=tags))
        operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=model_card.encode()))
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or "Upload GliderT5",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
    except HfHubHTTPError as error:
        hint = ""
        if error.response is not None and error.response.status_code == 401:
            hint = " The Hub refused the token: pass token=, set HF_TOKEN or run `hf auth login`."
        error.append_to_message(f"\n\nPushing to {repo_id} failed; no local file was changed.{hint}")
        raise
    except HTTPError as error:  # no answer: connection refused, timeouts, DNS
        raise ConnectionError(
            f"Pushing to {repo_id} at {api.endpoint} failed ({type(error).__name__}: {error}); no local file was changed."
        ) from error


def push_model(
    model,
    repo_id: str,
    *,
    tokenizer=None,
    max_shard_size: int | str = "50GB",
    **push_kwargs,
) -> CommitInfo:
    """Save `model` (and `tokenizer`) into a temporary folder and push it with `push_folder`."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return push_folder(folder, repo_id, **push_kwargs)
