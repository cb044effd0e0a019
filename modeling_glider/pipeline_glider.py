"""The `text2text-generation` pipeline, which transformers 5 removed, rebuilt for GliderT5 and any seq2seq LM.

On a GliderT5 with a global router the pipeline routes by itself: for every input it writes a task instruction
(the instruction generator; "query" mode by default), embeds it with the experts' embedding model, and passes the
embeddings to `generate`, so one call routes every query to its own experts. A per-call `instruction=` replaces the
generator; `instruction_embeddings=` replaces both. `return_experts=True` adds the experts each query used.
"""

import torch
from transformers import AutoModelForSeq2SeqLM, GenerationConfig, Pipeline

from .embedding import InstructionEmbedder, check_embedder_matches, load_config_embedder
from .instructions import embed_query_instructions, load_instruction_generator

TASK = "text2text-generation"


class Text2TextGenerationPipeline(Pipeline):
    """`pipeline("text2text-generation")`: text in, `[{"generated_text": ...}]` out.

    Construction arguments (besides the usual ones):
        instruction_generator: how a query's instruction is written on a GliderT5: `"query"` (default: the query
            itself), a URL of an OpenAI-compatible endpoint (`URL#model-name`), a local Transformers model's name or
            folder, an `InstructionGenerator`, or None (no global routing unless an instruction is given).
        instruction_embedder: an `InstructionEmbedder` or a model name/path; defaults to the model the experts'
            instructions were embedded with (`config.instruction_embedding_model`). Another model is refused.

    Call arguments: inputs are strings or dicts `{"text", "instruction"?, "instruction_embedding"?}`;
    `instruction` (a string for every input, or one per input) replaces the generator; `instruction_embeddings`
    (`[D]` or `[1, D]` for every input, or `[len(inputs), D]`) replaces both; `return_experts=True` adds
    `"experts"` (each expert's mean routing weight over every routed linear and real token, largest first) and
    `"instruction"` (the text that was embedded; None for given embeddings and for queries routed locally only).
    Generation parameters pass through to `generate`.
    """

    _pipeline_calls_generate = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __init__(self, *args, instruction_generator="query", instruction_embedder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.instruction_generator = load_instruction_generator(instruction_generator)
        self._instruction_embedder = instruction_embedder
        if instruction_embedder is not None and self.routes_globally:
            self._instruction_embedder = self._load_instruction_embedder()  # a given one is checked now

    @property
    def routes_globally(self) -> bool:
        return getattr(self.model, "global_router", None) is not None

    @property
    def instruction_embedder(self) -> InstructionEmbedder:
        """The embedder of query instructions (by default the experts' own, loaded on first use)."""
        if not isinstance(self._instruction_embedder, InstructionEmbedder):
            self._instruction_embedder = self._load_instruction_embedder()
        return self._instruction_embedder

    def _load_instruction_embedder(self) -> InstructionEmbedder:
        embedder = self._instruction_embedder
        if not isinstance(embedder, InstructionEmbedder):
            name = embedder or self.model.config.instruction_embedding_model
            if name is None:
                raise ValueError(
                    "This GliderT5 does not record which model embedded its experts' instructions, so queries cannot "
                    "be embedded for it. Pass instruction_embedder=... (the experts' embedding model), "
                    "instruction_embeddings=..., or instruction_generator=None for local routing only."
                )
            embedder = load_config_embedder(self.model.config, str(name))
        check_embedder_matches(self.model.config, embedder)
        return embedder

    def __call__(self, inputs, instruction=None, instruction_embeddings: torch.Tensor | None = None, **kwargs):
        single = isinstance(inputs, (str, dict))
        if not single and not isinstance(inputs, (list, tuple)):
            raise ValueError(f"inputs must be a string, a dict or a list of them, got {type(inputs).__name__}.")
        items = [self._as_dict(item) for item in ([inputs] if single else inputs)]
        if instruction is not None:
            per_item = [instruction] * len(items) if isinstance(instruction, str) else list(instruction)
            if len(per_item) != len(items):
                raise ValueError(f"instruction has {len(per_item)} entries for {len(items)} inputs.")
            items = [{**item, "instruction": text} for item, text in zip(items, per_item)]
        if instruction_embeddings is not None:
            rows = torch.as_tensor(instruction_embeddings)
            if rows.dim() == 0:
                raise ValueError("instruction_embeddings must be [D], [1, D] or [len(inputs), D], got a scalar.")
            rows = rows.reshape(-1, rows.shape[-1])
            if len(rows) == 1:
                rows = rows.expand(len(items), -1)
            if len(rows) != len(items):
                raise ValueError(f"instruction_embeddings has {len(rows)} rows for {len(items)} inputs.")
            items = [{**item, "instruction_embedding": row} for item, row in zip(items, rows)]
        items = self._add_instruction_embeddings(items)
        outputs = super().__call__(items, **kwargs)
        if kwargs.get("return_experts", self._postprocess_params.get("return_experts")):
            for records, item in zip(outputs, items):
                for record in records:
                    record["instruction"] = item.get("instruction")
        return outputs[0] if single else outputs

    @staticmethod
    def _as_dict(item) -> dict:
        if isinstance(item, str):
            return {"text": item}
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            return item
        raise ValueError(f"Each input must be a string or a dict with a 'text' string, got {item!r}.")

    def _add_instruction_embeddings(self, items: list[dict]) -> list[dict]:
        """Give every input of a GliderT5 an instruction embedding: its own, else its instruction (given or written by
        the generator) embedded, else zeros, which mean "no global term" (local routing only)."""
        if not self.routes_globally:
            if any(item.get("instruction") is not None for item in items):
                raise ValueError("instruction= was given, but this model has no global router to use it.")
            return items
        items = [dict(item) for item in items]
        todo = [
            i
            for i, item in enumerate(items)
            if item.get("instruction_embedding") is None
            and (self.instruction_generator is not None or item.get("instruction") is not None)
        ]
        if todo:
            embeddings, instructions = embed_query_instructions(
                [items[i]["text"] for i in todo],
                self.instruction_embedder,
                self.instruction_generator,
                [items[i].get("instruction") for i in todo],
            )
            for i, embedding, instruction in zip(todo, embeddings, instructions):
                items[i].update(instruction_embedding=embedding, instruction=instruction)
        for item in items:
            if item.get("instruction_embedding") is None:
                item["instruction_embedding"] = torch.zeros(self.model.config.instruction_embedding_dim)
        return items

    def _sanitize_parameters(self, truncation=None, skip_special_tokens=None, return_experts=None, **generate_kwargs):
        preprocess_params = {} if truncation is None else {"truncation": truncation}
        postprocess_params = {} if skip_special_tokens is None else {"skip_special_tokens": skip_special_tokens}
        forward_params = generate_kwargs
        if return_experts is not None:
            forward_params["return_experts"] = postprocess_params["return_experts"] = return_experts
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, item, truncation: bool = False):
        item = self._as_dict(item)
        model_inputs = self.tokenizer(item["text"], return_tensors="pt", truncation=truncation)
        if item.get("instruction_embedding") is not None:
            model_inputs["instruction_embeddings"] = torch.as_tensor(item["instruction_embedding"]).reshape(1, -1)
        return model_inputs

    def _forward(self, model_inputs, return_experts: bool = False, **generate_kwargs):
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        batch_size = model_inputs["input_ids"].shape[0]
        if not return_experts:
            output_ids = self.model.generate(**model_inputs, **generate_kwargs)
            return {"output_ids": output_ids.reshape(batch_size, -1, output_ids.shape[-1])}
        if not hasattr(self.model, "global_router"):
            raise ValueError(f"return_experts=True needs a GliderT5, not a {type(self.model).__name__}.")
        generate_kwargs.update(output_routing=True, return_dict_in_generate=True)
        output = self.model.generate(**model_inputs, **generate_kwargs)
        return {
            "output_ids": output.sequences.reshape(batch_size, -1, output.sequences.shape[-1]),
            "expert_usage": output["routing"].expert_usage(len(self.model.config.experts), batch_size),
        }

    def postprocess(self, model_outputs, skip_special_tokens: bool = True, return_experts: bool = False):
        records = [
            {"generated_text": self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)}
            for ids in model_outputs["output_ids"][0]
        ]
        if return_experts:
            usage = model_outputs["expert_usage"][0].tolist()
            ranked = sorted(zip(self.model.config.expert_names, usage), key=lambda pair: -pair[1])
            experts = [{"name": name, "weight": weight} for name, weight in ranked if weight > 0]
            for record in records:
                record["experts"] = experts
        return records


def register_text2text_generation_pipeline() -> None:
    """Make `pipeline("text2text-generation")` resolvable again in this process (transformers 5 lists the task as
    removed, which blocks even a registered pipeline of that name)."""
    from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

    REMOVED_TASKS.pop(TASK, None)
    if TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=Text2TextGenerationPipeline, pt_model=AutoModelForSeq2SeqLM
        )
