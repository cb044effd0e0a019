"""The parts of a saved GliderT5 the baselines need, recovered from its weights alone: the base T5, each expert as a
plain PEFT LoRA adapter directory, and the uniform merge of all experts."""

import json
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

from configuration_glider import GliderConfig
from modeling_glider import GliderLinear, GliderT5ForConditionalGeneration, save_expert_files
from modeling_glider.experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# config entries a plain T5 must not receive: the routing fields GliderConfig adds, and what saving adds
NOT_T5_KEYS = (*GliderConfig.__annotations__, "custom_pipelines", "auto_map", "model_type", "architectures")


def glider_linears(model: GliderT5ForConditionalGeneration) -> dict[str, GliderLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, GliderLinear) and m.num_experts}


def base_model(model: GliderT5ForConditionalGeneration) -> T5ForConditionalGeneration:
    """The plain T5 inside a GliderT5: its own weights, no expert."""
    fields = {k: v for k, v in model.config.to_dict().items() if k not in NOT_T5_KEYS}
    base = T5ForConditionalGeneration(T5Config(**fields))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B", "router_gate"))}
    state = {k: v for k, v in state.items() if not k.startswith("global_router.")}
    base.load_state_dict(state, strict=True)
    base.config.name_or_path = model.config.base_model_name_or_path or ""  # the experts' base, as they record it
    return base.eval()


def export_experts(model: GliderT5ForConditionalGeneration, directory: str | Path) -> list[Path]:
    """Write every expert of `model` as an expert directory (PEFT LoRA adapter + glider files) under `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    router = model.global_router
    embeddings = router.expert_embeddings if router is not None else None
    samples = router.expert_sample_rows() if router is not None else [None] * len(model.config.experts)
    per_linear = {path: linear.expert_tensors() for path, linear in glider_linears(model).items()}
    dirs = []
    for index, expert in enumerate(model.config.experts):
        target = directory / expert["name"]
        target.mkdir(parents=True, exist_ok=True)
        own = {path: tensors[index] for path, tensors in per_linear.items() if index in tensors}  # (A, B, gate)
        tensors = {}
        for path, (A, B, _) in own.items():
            tensors[f"base_model.model.{path}.lora_A.weight"] = A.detach().contiguous()
            tensors[f"base_model.model.{path}.lora_B.weight"] = B.detach().contiguous()
        save_file(tensors, target / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "SEQ_2_SEQ_LM",
            "base_model_name_or_path": model.config.base_model_name_or_path,
            "r": expert["r"],
            "lora_alpha": expert["lora_alpha"],
            "use_rslora": expert["use_rslora"],
            "rank_pattern": expert["rank_pattern"],
            "alpha_pattern": expert["alpha_pattern"],
            "target_modules": expert["target_modules"],
            "lora_dropout": 0.0,
            "bias": "none",
        }
        (target / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_expert_files(
            target,
            expert["name"],
            expert["instruction"],
            {path: gate.detach() for path, (_, _, gate) in own.items()},
            None if embeddings is None else embeddings[index],
            model.config.instruction_embedding_model,
            samples[index],
            model.config.instruction_embedding_prefix or "",
        )
        dirs.append(target)
    return dirs


@torch.no_grad()
def merged_model(
    model: GliderT5ForConditionalGeneration, weights: list[float] | None = None
) -> T5ForConditionalGeneration:
    """A plain T5 whose every adapted linear is `W + sum_e w_e s_e B_e A_e` (default: the uniform average)."""
    num_experts = len(model.config.experts)
    weights = weights if weights is not None else [1.0 / num_experts] * num_experts
    merged = base_model(model)
    for path, linear in glider_linears(model).items():
        delta = torch.zeros_like(linear.weight, dtype=torch.float32)
        for (index, (A, B, _)), scaling in zip(linear.expert_tensors().items(), linear.expert_scalings):
            delta += weights[index] * scaling * (B.float() @ A.float())
        target = merged.get_submodule(path)
        target.weight += delta.to(target.weight.dtype)
    return merged
