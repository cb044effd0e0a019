"""The `text2text-generation` pipeline, which transformers 5 removed, rebuilt for GliderT5 and any seq2seq LM.

Each input may carry its own instruction embedding, so one call can route every query to its own experts.
"""

import torch
from transformers import AutoModelForSeq2SeqLM, GenerationConfig, Pipeline

TASK = "text2text-generation"


class Text2TextGenerationPipeline(Pipeline):
    """`pipeline("text2text-generation")`: text in, `[{"generated_text": ...}]` out.

    Inputs are strings or `{"text": str, "instruction_embedding": tensor [D]}` dicts. `instruction_embeddings`
    (`[D]` or `[1, D]` for every input, or `[len(inputs), D]` for a list) switches on the global router; generation
    parameters pass through to `generate`.
    """

    _pipeline_calls_generate = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __call__(self, inputs, instruction_embeddings: torch.Tensor | None = None, **kwargs):
        single = isinstance(inputs, (str, dict))
        items = [inputs] if single else list(inputs)
        if instruction_embeddings is not None:
            rows = instruction_embeddings.reshape(-1, instruction_embeddings.shape[-1])
            if len(rows) == 1:
                rows = rows.expand(len(items), -1)
            if len(rows) != len(items):
                raise ValueError(f"instruction_embeddings has {len(rows)} rows for {len(items)} inputs.")
            items = [{**self._as_dict(item), "instruction_embedding": row} for item, row in zip(items, rows)]
        outputs = super().__call__(items, **kwargs)
        return outputs[0] if single else outputs

    @staticmethod
    def _as_dict(item) -> dict:
        if isinstance(item, str):
            return {"text": item}
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            return item
        raise ValueError(f"Each input must be a string or a dict with a 'text' string, got {item!r}.")

    def _sanitize_parameters(self, truncation=None, skip_special_tokens=None, **generate_kwargs):
        preprocess_params = {} if truncation is None else {"truncation": truncation}
        postprocess_params = {} if skip_special_tokens is None else {"skip_special_tokens": skip_special_tokens}
        return preprocess_params, generate_kwargs, postprocess_params

    def preprocess(self, item, truncation: bool = False):
        item = self._as_dict(item)
        model_inputs = self.tokenizer(item["text"], return_tensors="pt", truncation=truncation)
        if item.get("instruction_embedding") is not None:
            model_inputs["instruction_embeddings"] = torch.as_tensor(item["instruction_embedding"]).reshape(1, -1)
        return model_inputs

    def _forward(self, model_inputs, **generate_kwargs):
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs, skip_special_tokens: bool = True):
        return [
            {"generated_text": self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)}
            for ids in model_outputs["output_ids"]
        ]


def register_text2text_generation_pipeline() -> None:
    """Make `pipeline("text2text-generation")` resolvable again in this process (transformers 5 lists the task as
    removed, which blocks even a registered pipeline of that name)."""
    from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

    REMOVED_TASKS.pop(TASK, None)
    if TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=Text2TextGenerationPipeline, pt_model=AutoModelForSeq2SeqLM
        )
