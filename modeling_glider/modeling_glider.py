"""GliderT5: a T5 whose linears are mixtures of LoRA experts, routed per token by local routers and per query by
GLIDER's global instruction router.

The T5 modules below differ from `transformers.models.t5.modeling_t5` in one way: every linear of a block is a
`GliderLinear`, and the routing inputs of a call (`global_routing_logits`, `routing_candidates`, `routing_record`)
travel as keyword
arguments from the stack down to each linear. T5's stack already forwards extra keyword arguments to its blocks
and attention layers; the feed-forward path and the attention projections are the parts that had to learn them,
and the stack tells a routing record which of its tokens are real (not padding).

Every method re-implemented from T5 says so ("Re-implemented from transformers: ...") and is listed with the hash of
the upstream source it was written against in `REIMPLEMENTED_FROM_T5`; a test fails when the installed transformers'
T5 differs, so an upgrade cannot change this model's behaviour silently.
"""

import copy
import os
import shutil
import threading
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.t5.modeling_t5 import (
    T5Attention,
    T5Block,
    T5DenseActDense,
    T5DenseGatedActDense,
    T5ForConditionalGeneration,
    T5LayerCrossAttention,
    T5LayerFF,
    T5LayerNorm,
    T5LayerSelfAttention,
    T5PreTrainedModel,
    T5Stack,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .offload import OFFLOADED_TENSORS, ExpertCache, ExpertLease, ExpertStore, checked_expert_tensors, weight_files
from .packaging import HUB_KWARGS, code_files
from .pipeline_glider import register_text2text_generation_pipeline
from .routing import GliderGlobalRouter, GliderLinear, RoutingRecord, candidate_experts, route_siblings
from .staging import all_but_weights, replaced_folder, with_default_modes

try:  # a flat folder (save_pretrained, the Hub) holds both files side by side
    from .configuration_glider import GliderConfig
except ImportError:  # the installed packages
    from configuration_glider import GliderConfig

ROUTING_KWARGS = ("global_routing_logits", "routing_candidates", "routing_record", "expert_lease")
# sha256 of `inspect.getsource` of the transformers T5 methods re-implemented here (transformers 5.24-5.25).
REIMPLEMENTED_FROM_T5 = {
    "T5DenseActDense.forward": "12eedb9af398a60a",
    "T5DenseGatedActDense.forward": "3f5c41a204c168ae",
    "T5Attention.forward": "a57bc3ed209bb7a8",
    "T5LayerSelfAttention.__init__": "639785aab24742ba",
    "T5LayerCrossAttention.__init__": "e97d894068df52c4",
    "T5LayerFF.__init__": "b9906be831e8047c",
    "T5LayerFF.forward": "b7f2c285f08b51b0",
    "T5Block.__init__": "b8840d8372c24805",
    "T5Block.forward": "6ace6334def256c3",
    "T5Stack.__init__": "ff626b133fd00ba5",
    "T5ForConditionalGeneration.__init__": "18fadb1e95e99301",
}


def pop_routing_kwargs(kwargs: dict) -> dict:
    return {name: kwargs.pop(name, None) for name in ROUTING_KWARGS}


def clamp_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    # as T5Block: clamp inf values to enable fp16 training
    if hidden_states.dtype == torch.float16:
        clamp_value = torch.where(
            torch.isinf(hidden_states).any(),
            torch.finfo(hidden_states.dtype).max - 1000,
            torch.finfo(hidden_states.dtype).max,
        )
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return hidden_states


# Leaf modules: T5's own constructor, then the routed linears swapped in.


class GliderT5DenseActDense(T5DenseActDense):
    def __init__(self, config: GliderConfig, prefix: str):
        super().__init__(config)
        self.wi = GliderLinear(config, f"{prefix}.wi", config.d_model, config.d_ff)
        self.wo = GliderLinear(config, f"{prefix}.wo", config.d_ff, config.d_model)

    def forward(self, hidden_states, **routing):
        """Re-implemented from transformers: T5DenseActDense.forward, with the routing inputs passed to wi and wo."""
        hidden_states = self.act(self.wi(hidden_states, **routing))
        hidden_states = self.dropout(hidden_states)
        if hidden_states.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8:
            hidden_states = hidden_states.to(self.wo.weight.dtype)  # wo may be kept in fp32
        return self.wo(hidden_states, **routing)


class GliderT5DenseGatedActDense(T5DenseGatedActDense):
    def __init__(self, config: GliderConfig, prefix: str):
        super().__init__(config)
        self.wi_0 = GliderLinear(config, f"{prefix}.wi_0", config.d_model, config.d_ff)
        self.wi_1 = GliderLinear(config, f"{prefix}.wi_1", config.d_model, config.d_ff)
        self.wo = GliderLinear(config, f"{prefix}.wo", config.d_ff, config.d_model)

    def forward(self, hidden_states, **routing):
        """Re-implemented from transformers: T5DenseGatedActDense.forward, with the routing inputs passed on (wi_0 and
        wi_1 read the same states: routed together)."""
        wi_0_routing, wi_1_routing = route_siblings((self.wi_0, self.wi_1), hidden_states, **routing)
        hidden_gelu = self.act(self.wi_0(hidden_states, **routing, sibling_routing=wi_0_routing))
        hidden_linear = self.wi_1(hidden_states, **routing, sibling_routing=wi_1_routing)
        hidden_states = self.dropout(hidden_gelu * hidden_linear)
        if hidden_states.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8:
            hidden_states = hidden_states.to(self.wo.weight.dtype)  # wo may be kept in fp32
        return self.wo(hidden_states, **routing)


class GliderT5Attention(T5Attention):
    def __init__(
        self, config: GliderConfig, prefix: str, has_relative_attention_bias=False, layer_idx=None, is_causal=False
    ):
        super().__init__(config, has_relative_attention_bias, layer_idx, is_causal)
        self.q = GliderLinear(config, f"{prefix}.q", self.d_model, self.inner_dim)
        self.k = GliderLinear(config, f"{prefix}.k", self.d_model, self.inner_dim)
        self.v = GliderLinear(config, f"{prefix}.v", self.d_model, self.inner_dim)
        self.o = GliderLinear(config, f"{prefix}.o", self.inner_dim, self.d_model)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as T5Attention.forward
    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        """Re-implemented from transformers: T5Attention.forward, with the routing inputs passed to q, k, v and o."""
        routing = pop_routing_kwargs(kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.key_value_proj_dim)
        past_seen_tokens = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        past_seen_tokens = past_seen_tokens.clone() if isinstance(past_seen_tokens, torch.Tensor) else past_seen_tokens
        is_cross_attention = key_value_states is not None

        # q, k and v of self-attention read the same states: routed together (`route_siblings`)
        q_routing, k_routing, v_routing = (
            (None, None, None)
            if is_cross_attention
            else route_siblings((self.q, self.k, self.v), hidden_states, **routing)
        )
        query_states = self.q(hidden_states, **routing, sibling_routing=q_routing).view(hidden_shape).transpose(1, 2)

        is_updated = False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            curr_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
        else:
            curr_cache = cache

        current_states = key_value_states if is_cross_attention else hidden_states
        if is_cross_attention and cache is not None and is_updated:
            key_states = curr_cache.layers[self.layer_idx].keys  # cross-attention k, v computed at the first step
            value_states = curr_cache.layers[self.layer_idx].values
        else:
            kv_shape = (*current_states.shape[:-1], -1, self.key_value_proj_dim)
            if is_cross_attention:
                k_routing, v_routing = route_siblings((self.k, self.v), current_states, **routing)
            key_states = self.k(current_states, **routing, sibling_routing=k_routing).view(kv_shape).transpose(1, 2)
            value_states = self.v(current_states, **routing, sibling_routing=v_routing).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key_states, value_states = curr_cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
                if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True

        if position_bias is None:
            key_length = key_states.shape[-2]
            if not self.has_relative_attention_bias:
                position_bias = torch.zeros(
                    (1, self.n_heads, input_shape[1], key_length), device=query_states.device, dtype=query_states.dtype
                )
                if self.gradient_checkpointing and self.training:
                    position_bias.requires_grad = True
            else:
                position_bias = self.compute_bias(
                    input_shape[1], key_length, device=query_states.device, past_seen_tokens=past_seen_tokens
                )

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=self.scaling,
            position_bias=position_bias,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o(attn_output, **routing)
        return attn_output, position_bias, attn_weights


# Containers: built here rather than by T5's constructors, so no weight is allocated twice.


class GliderT5LayerSelfAttention(T5LayerSelfAttention):
    # Re-implemented from transformers: T5LayerSelfAttention.__init__
    def __init__(self, config: GliderConfig, prefix: str, has_relative_attention_bias=False, layer_idx=None):
        nn.Module.__init__(self)
        self.SelfAttention = GliderT5Attention(
            config, f"{prefix}.SelfAttention", has_relative_attention_bias, layer_idx, is_causal=config.is_decoder
        )
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)


class GliderT5LayerCrossAttention(T5LayerCrossAttention):
    # Re-implemented from transformers: T5LayerCrossAttention.__init__
    def __init__(self, config: GliderConfig, prefix: str, layer_idx=None):
        nn.Module.__init__(self)
        self.EncDecAttention = GliderT5Attention(config, f"{prefix}.EncDecAttention", False, layer_idx, is_causal=False)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)


class GliderT5LayerFF(T5LayerFF):
    # Re-implemented from transformers: T5LayerFF.__init__ and T5LayerFF.forward
    def __init__(self, config: GliderConfig, prefix: str):
        nn.Module.__init__(self)
        dense = GliderT5DenseGatedActDense if config.is_gated_act else GliderT5DenseActDense
        self.DenseReluDense = dense(config, f"{prefix}.DenseReluDense")
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states, **routing):
        forwarded_states = self.DenseReluDense(self.layer_norm(hidden_states), **routing)
        return hidden_states + self.dropout(forwarded_states)


class GliderT5Block(T5Block):
    # Re-implemented from transformers: T5Block.__init__ and T5Block.forward
    def __init__(self, config: GliderConfig, prefix: str, has_relative_attention_bias=False, layer_idx=None):
        nn.Module.__init__(self)
        self.is_decoder = config.is_decoder
        self.layer = nn.ModuleList(
            [GliderT5LayerSelfAttention(config, f"{prefix}.layer.0", has_relative_attention_bias, layer_idx)]
        )
        if self.is_decoder:
            self.layer.append(GliderT5LayerCrossAttention(config, f"{prefix}.layer.1", layer_idx))
        self.layer.append(GliderT5LayerFF(config, f"{prefix}.layer.{len(self.layer)}"))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as T5Block.forward
    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_bias=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        encoder_decoder_position_bias=None,
        cache=None,
        **kwargs,
    ):
        """T5Block.forward, with the routing inputs passed to the feed-forward layer too."""
        routing = {name: kwargs.get(name) for name in ROUTING_KWARGS}
        hidden_states, self_attn_position_bias, _ = self.layer[0](
            hidden_states, attention_mask=attention_mask, position_bias=position_bias, cache=cache, **kwargs
        )
        hidden_states = clamp_fp16(hidden_states)

        cross_attn_position_bias = None
        if self.is_decoder and encoder_hidden_states is not None:
            hidden_states, cross_attn_position_bias, _ = self.layer[1](
                hidden_states,
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                position_bias=encoder_decoder_position_bias,
                cache=cache,
                **kwargs,
            )
            hidden_states = clamp_fp16(hidden_states)

        hidden_states = clamp_fp16(self.layer[-1](hidden_states, **routing))
        return hidden_states, self_attn_position_bias, cross_attn_position_bias


class GliderT5PreTrainedModel(T5PreTrainedModel):
    config: GliderConfig
    config_class = GliderConfig
    _no_split_modules = ["GliderT5Block"]
    _keep_in_fp32_modules = ["wo"]  # as T5: in fp16 models
    _keep_in_fp32_modules_strict = ["global_router"]  # in fp16 and bf16 models: routing stays fp32

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GliderLinear):
            # The rebuilt config-derived buffers are the point here: after a meta-device load they are empty.
            init.copy_(module.lora_scaling, torch.tensor(module.expert_scalings, dtype=torch.float32))
            init.copy_(module.expert_index, torch.tensor(module.expert_ids, dtype=torch.long))
            init.copy_(module.expert_slot, module.expert_slots())
            if module.lora_A is not None:
                init.normal_(module.lora_A, std=module.in_features**-0.5)
                init.zeros_(module.lora_B)  # a fresh expert changes nothing
                init.zeros_(module.router_gate)
            for cache in (module.cached_lora_A, module.cached_lora_B, module.cached_router_gate):
                if cache is not None:  # offloaded experts: an empty cache
                    init.zeros_(cache)
        elif isinstance(module, GliderGlobalRouter):
            for tensor in (module.expert_embeddings, module.expert_samples, module.expert_descriptors):
                if tensor is not None:
                    init.zeros_(tensor)


class GliderT5Stack(GliderT5PreTrainedModel, T5Stack):
    # Re-implemented from transformers: T5Stack.__init__ (its forward is T5's own, called through `super`)
    def __init__(self, config: GliderConfig, prefix: str):
        T5PreTrainedModel.__init__(self, config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.is_decoder = config.is_decoder
        self.block = nn.ModuleList(
            [GliderT5Block(config, f"{prefix}.block.{i}", bool(i == 0), layer_idx=i) for i in range(config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.post_init()
        self.gradient_checkpointing = False

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as T5Stack.forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        inputs_embeds=None,
        cache=None,
        **kwargs,
    ):
        """T5Stack.forward, which passes every extra keyword argument (the routing inputs) on to each block; a
        routing record is first told which of this call's tokens are real."""
        record = kwargs.get("routing_record")
        if record is not None and not self.is_decoder:
            record.set_token_masks(encoder=attention_mask)
        elif record is not None:
            real = self.real_tokens(record, input_ids, inputs_embeds, attention_mask, cache)
            record.set_token_masks(decoder=real, cross=encoder_attention_mask)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            **kwargs,
        )

    def real_tokens(self, record, input_ids, inputs_embeds, attention_mask, cache) -> torch.Tensor | None:
        """Decoder inputs that count in routing statistics, `[rows, length]` of this call: the mask's, or else all but
        the pad and end-of-sequence tokens after the start token (what `generate` feeds a row that has ended: the
        ids of that `generate` call, which the record carries)."""
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if attention_mask is not None:
            return attention_mask[:, -length:]
        if input_ids is None:  # embeddings: no token to tell
            return None
        past = cache.get_seq_length() if cache is not None else 0
        position = torch.arange(past, past + length, device=input_ids.device)
        ended = record.ended_token_ids
        if ended is None:  # a forward call: the model's own pad and end-of-sequence ids
            ended = ended_token_ids(self.config.pad_token_id, self.config.eos_token_id)
        return ~torch.isin(input_ids, torch.tensor(ended, device=input_ids.device)) | (position == 0)


def ended_token_ids(pad_token_id: int | None, eos_token_id: int | list[int] | None) -> list[int]:
    eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    return [int(t) for t in (pad_token_id, *eos) if t is not None]


class LibraryLock:
    """Many calls may route at once; changing the expert library waits for them and holds new calls back meanwhile,
    so no call sees a half-changed library. Re-entrant for a thread's nested calls (`generate` calls `forward`)."""

    def __init__(self):
        self.condition = threading.Condition()
        self.readers = 0  # calls routing now
        self.held_back = 0  # calls waiting for a change to end
        self.writing = False
        self.local = threading.local()

    def __reduce__(self):  # copies and pickles of a model get a lock of their own
        return LibraryLock, ()

    def routing(self):
        # A compiled graph cannot wait on a lock: compiled calls route without it (change the library between them).
        return nullcontext() if torch.compiler.is_compiling() else self._routing()

    @contextmanager
    def _routing(self):
        depth = getattr(self.local, "depth", 0)
        if depth == 0:
            with self.condition:
                self.held_back += 1
                self.condition.wait_for(lambda: not self.writing)
                self.held_back -= 1
                self.readers += 1
                self.condition.notify_all()
        self.local.depth = depth + 1
        try:
            yield
        finally:
            self.local.depth = depth
            if depth == 0:
                with self.condition:
                    self.readers -= 1
                    self.condition.notify_all()

    @contextmanager
    def changing(self, what: str):
        if getattr(self.local, "depth", 0):
            raise RuntimeError(f"{what} inside a forward or generate call of the same model is not possible.")
        with self.condition:
            # the calls held back by the last change get in first: neither calls nor changes can starve
            self.condition.wait_for(lambda: not self.writing and self.held_back == 0)
            self.writing = True
            self.condition.wait_for(lambda: self.readers == 0)
        try:
            yield
        finally:
            with self.condition:
                self.writing = False
                self.condition.notify_all()


@dataclass
class GliderSeq2SeqLMOutput(Seq2SeqLMOutput):
    """`Seq2SeqLMOutput` plus, when asked for with `output_routing=True`, the experts every token used."""

    routing: RoutingRecord | None = None


class GliderT5ForConditionalGeneration(GliderT5PreTrainedModel, T5ForConditionalGeneration):
    r"""
    A T5 whose linears route every token among LoRA experts (Phatgoose or Arrow local routers), biased per query by
    GLIDER's global router when `instruction_embeddings` are given. Build one with [`from_experts`]; it saves, loads
    and generates like any Transformers model.
    """

    # Re-implemented from transformers: T5ForConditionalGeneration.__init__, plus the global router
    def __init__(self, config: GliderConfig):
        T5PreTrainedModel.__init__(self, config)
        self.model_dim = config.d_model
        self.shared = nn.Embedding(config.vocab_size, config.d_model)

        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder = False
        encoder_config.use_cache = False
        self.encoder = GliderT5Stack(encoder_config, "encoder")

        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder = True
        decoder_config.num_layers = config.num_decoder_layers
        self.decoder = GliderT5Stack(decoder_config, "decoder")

        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.global_router = GliderGlobalRouter(config) if config.instruction_embedding_dim else None
        # The stacks hold copies of the config (as in T5); routing reads the model's own, so that changing a knob
        # on `model.config` (e.g. `router_top_k`) takes effect everywhere.
        for module in self.modules():
            if isinstance(module, (GliderLinear, GliderGlobalRouter)):
                module.config = config
        config.check_expert_offload()
        config.describe_model()  # its library fields now describe these tensors and stay fixed
        self.library_lock = LibraryLock()
        self.expert_cache = ExpertCache(config.expert_cache_capacity) if config.expert_offload else None
        self.post_init()
        if self.expert_cache is not None:  # the files' expert tensors are read by the cache, not loaded
            self._keys_to_ignore_on_load_unexpected.add(rf"\.({'|'.join(OFFLOADED_TENSORS)})$")

    @classmethod
    def from_experts(
        cls,
        base: T5ForConditionalGeneration | str,
        experts: list[str],
        *,
        top_k: int = 2,
        global_routing_scale: float | None = None,
        dtype: torch.dtype | str | None = None,
        **config_overrides,
    ) -> "GliderT5ForConditionalGeneration":
        """Build a GliderT5 from a base T5 (model, Hub id or path) and expert directories (see `experts.py`).

        Every expert is checked (from its files' headers) before anything is built; then each expert's tensors are read
        once, into the model, so the build needs little more memory than the model. `dtype` (`torch.bfloat16`,
        `"float16"`, ...) stores base and experts in that dtype (default: the base's); routing stays fp32.
        `config_overrides` set other `GliderConfig` fields (e.g. `router_top_p`, `local_router`).
        """
        from .experts import build_glider_model

        if global_routing_scale is not None:
            config_overrides["global_routing_scale"] = global_routing_scale
        return build_glider_model(cls, base, experts, dtype=dtype, router_top_k=top_k, **config_overrides)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing weights that disagree with their config (the error names the
        tensor and the config field) or hold NaN or inf, instead of loading a model that routes wrong."""
        want_info = kwargs.pop("output_loading_info", False)
        allow_base_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        if kwargs.get("expert_offload") is not None and kwargs.get("variant") is not None:
            raise ValueError(
                "expert_offload reads model.safetensors (or its shards); variant= is not supported with it."
            )
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True,
                **kwargs,
            )  # fmt: skip
            if model.expert_cache is not None:
                model.expert_cache.store = open_expert_store(model, pretrained_model_name_or_path, kwargs)
        except SafetensorError as error:  # its message names no file
            raise ValueError(
                f"GliderT5 at {pretrained_model_name_or_path}: a weights file is not readable safetensors (corrupt or "
                f"truncated?): {error}"
            ) from None
        check_loaded_tensors(model, info, str(pretrained_model_name_or_path), allow_base_mismatch)
        return (model, info) if want_info else model

    def refuse_offloaded(self, what: str) -> None:
        if self.config.expert_offload is not None:
            raise ValueError(
                f"{what} needs the experts in memory, and this GliderT5 was loaded with expert_offload="
                f"{self.config.expert_offload!r}: load it without expert_offload for that."
            )

    def leased_experts(self, routing_candidates: torch.Tensor | None, lease=None):
        """With offloaded experts (`offload.py`), lease from the cache the experts this call may use: its queries'
        candidates, or every expert; a context that yields the lease (None when the experts are not offloaded). A
        lease given (by `generate`, to its decoding steps) must be one of this model's running calls."""
        if lease is not None and (
            not isinstance(lease, ExpertLease) or lease.cache is not self.expert_cache or not lease.active
        ):
            raise ValueError(
                "expert_lease must be the lease of a running call of this model (generate passes its own to the "
                "decoding steps); do not pass one."
            )
        if self.expert_cache is None or lease is not None:
            return nullcontext(lease)  # a plain context: compiled decoding steps trace through it
        num_experts = len(self.config.experts)
        if routing_candidates is None:
            experts = list(range(num_experts))
            why = (
                "router_candidates is not set"
                if self.config.router_candidates is None
                else "no query has an instruction embedding (or alpha is 0)"
            )
            why += ": every expert"
        else:
            experts = [e for e in routing_candidates.unique().tolist() if e >= 0]
            why = "its queries' candidates"
            if len(experts) == num_experts > self.config.router_candidates:
                why += "; a query without an instruction embedding (or with alpha 0) may use every expert"
        linears = [m for m in self.modules() if isinstance(m, GliderLinear) and m.num_experts]
        return self.expert_cache.lease(linears, experts, num_experts, self.device, why)

    def add_expert(self, expert: str | os.PathLike) -> None:
        """Add one expert (a directory or a Hub repo id) to the library, in place, without touching the other experts.

        The expert is checked like `from_experts` checks it (shapes against this base, a gate for every linear it adapts
        unless `local_router="arrow"`, an instruction embedding of the library's width iff the library has them). It
        gets the next expert index; the model then saves, loads and routes exactly like one built from scratch with the
        same experts in the same order.
        """
        from .experts import add_expert

        with self.library_lock.changing("add_expert"):
            self.refuse_offloaded("add_expert")
            add_expert(self, expert)

    def remove_expert(self, name: str) -> None:
        """Remove the expert called `name` from the library, in place; the later experts move up one index."""
        from .experts import remove_expert

        with self.library_lock.changing("remove_expert"):
            self.refuse_offloaded("remove_expert")
            remove_expert(self, name)

    def global_routing_logits(
        self, instruction_embeddings: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """`alpha * cos(u, G_e)` for every query row u: `[batch, D]` -> `[batch, num_experts]`."""
        if self.global_router is None:
            raise ValueError(
                "instruction_embeddings were given, but this GliderT5 has no global router: its experts were built "
                "without instruction embeddings (add `instruction_embedding` to each glider_expert.safetensors)."
            )
        logits = self.global_router(instruction_embeddings)
        if batch_size is not None and logits.shape[0] != batch_size:
            raise ValueError(
                f"instruction_embeddings has {logits.shape[0]} rows but the batch has {batch_size} queries; "
                "give one row per query."
            )
        return logits

    def check_global_routing_logits(self, logits: torch.Tensor, batch: int | None) -> None:
        """Precomputed global routing logits must be `[batch, num_experts]` and finite."""
        expected = (batch, len(self.config.experts))
        if logits.dim() != 2 or logits.shape[1] != expected[1] or (batch is not None and logits.shape[0] != batch):
            raise ValueError(f"global_routing_logits must be [rows, experts] = {expected}, got {tuple(logits.shape)}.")
        # checked on the device, without waiting for it (no host synchronisation at every decoding step)
        torch._assert_async(torch.isfinite(logits).all(), "global_routing_logits hold NaN or inf")

    def routing_candidates(
        self, global_routing_logits: torch.Tensor | None, candidates: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Each query's candidate experts with `config.router_candidates` set (see `routing.candidate_experts`), once
        per call; given ones (what `generate` passes to its decoding steps) are checked, not recomputed."""
        m, num_experts = self.config.router_candidates, len(self.config.experts)
        if candidates is None:
            return None if m is None or global_routing_logits is None else candidate_experts(global_routing_logits, m)
        if m is None or global_routing_logits is None:
            raise ValueError(
                "routing_candidates were given, but they need config.router_candidates set and global routing logits "
                f"(router_candidates = {m}, global routing {'absent' if global_routing_logits is None else 'given'})."
            )
        rows = global_routing_logits.shape[0]
        if candidates.dtype != torch.long or tuple(candidates.shape) not in ((rows, m), (rows, num_experts)):
            raise ValueError(
                f"routing_candidates must be a long tensor [rows, router_candidates] = {(rows, m)} or [rows, experts] "
                f"= {(rows, num_experts)}, got {candidates.dtype} {tuple(candidates.shape)}."
            )
        in_range = ((candidates >= -1) & (candidates < num_experts)).all()
        torch._assert_async(in_range, "routing_candidates hold expert ids outside [-1, number of experts)")
        return candidates

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as T5ForConditionalGeneration.forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        encoder_outputs=None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        instruction_embeddings: torch.Tensor | None = None,
        global_routing_logits: torch.Tensor | None = None,
        routing_candidates: torch.LongTensor | None = None,
        output_routing: bool = False,
        routing_record: RoutingRecord | None = None,
        expert_lease=None,
        **kwargs,
    ) -> GliderSeq2SeqLMOutput:
        r"""
        T5ForConditionalGeneration.forward, plus:

        instruction_embeddings (`torch.Tensor` of shape `(batch_size, instruction_embedding_dim)`, *optional*):
            One embedded instruction per query; switches on the global router for that row. Without it, routing is
            local only (Phatgoose); a row of zeros makes that one query local only.
        global_routing_logits (`torch.Tensor` of shape `(batch_size, num_experts)`, *optional*):
            Precomputed `alpha * cos(u, G_e)` (what `generate` passes on); exclusive with `instruction_embeddings`.
        routing_candidates (`torch.LongTensor` of shape `(batch_size, router_candidates or num_experts)`, *optional*):
            With `config.router_candidates` set, each query's candidate experts (-1: an empty slot), as
            `routing.candidate_experts` makes them from the global routing logits; computed here if not given.
        output_routing (`bool`, *optional*):
            Return the experts every token used at every routed linear as `routing` (a `RoutingRecord`).
        routing_record (`RoutingRecord`, *optional*):
            Append this call's routing to an existing record (how `generate` collects every step).
        expert_lease (*optional*):
            With offloaded experts, the lease of the running `generate` call that makes this decoding step (it passes
            it); a call without one leases its experts itself.
        """
        # `super()` read outside the `with` blocks: Python 3.11 leaves its `__class__` load out of the exception table
        # of nested blocks, which Dynamo (torch 2.13) cannot trace, so a decoding step would not compile
        t5_forward = super().forward
        with self.library_lock.routing():  # the library cannot change while this call routes
            encoder_states = encoder_outputs[0] if encoder_outputs is not None else None
            inputs = (input_ids, inputs_embeds, encoder_states, decoder_input_ids, decoder_inputs_embeds, labels)
            batch = next((t.shape[0] for t in inputs if t is not None), None)
            if instruction_embeddings is not None:
                if global_routing_logits is not None:
                    raise ValueError("Pass instruction_embeddings or global_routing_logits, not both.")
                global_routing_logits = self.global_routing_logits(instruction_embeddings, batch)
            elif global_routing_logits is not None:
                self.check_global_routing_logits(global_routing_logits, batch)
            routing_candidates = self.routing_candidates(global_routing_logits, routing_candidates)
            if output_routing and routing_record is None:
                routing_record = RoutingRecord()
            with self.leased_experts(routing_candidates, expert_lease) as expert_lease:
                outputs = t5_forward(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    decoder_input_ids=decoder_input_ids,
                    decoder_attention_mask=decoder_attention_mask,
                    encoder_outputs=encoder_outputs,
                    cache=cache,
                    inputs_embeds=inputs_embeds,
                    decoder_inputs_embeds=decoder_inputs_embeds,
                    labels=labels,
                    use_cache=use_cache,
                    global_routing_logits=global_routing_logits,
                    routing_candidates=routing_candidates,
                    routing_record=routing_record,
                    expert_lease=expert_lease,
                    return_dict=True,
                    **kwargs,
                )
            return GliderSeq2SeqLMOutput(**outputs, routing=routing_record)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        instruction_embeddings: torch.Tensor | None = None,
        output_routing: bool = False,
        **kwargs,
    ):
        """`GenerationMixin.generate`, plus per-query `instruction_embeddings` (`[batch, D]`).

        The global routing logits are computed once per query and travel as a model input, so `generate` expands
        them with the batch for beam search and hands them to the encoder and every decoding step. With
        `output_routing=True` (which needs `return_dict_in_generate=True`) the output carries a `routing` record of
        the whole call.
        """
        if output_routing and not kwargs.get("return_dict_in_generate"):
            raise ValueError("output_routing=True needs return_dict_in_generate=True.")
        record = None
        if output_routing:  # rows that have ended are fed this call's pad (or else end-of-sequence) token
            generation_config = kwargs.get("generation_config") or self.generation_config
            eos = kwargs.get("eos_token_id", generation_config.eos_token_id)
            record = RoutingRecord(ended_token_ids(kwargs.get("pad_token_id", generation_config.pad_token_id), eos))
        with self.library_lock.routing():  # the library cannot change while this call routes
            batch = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            batch = None if batch is None else batch.shape[0]
            if instruction_embeddings is not None:
                kwargs["global_routing_logits"] = self.global_routing_logits(instruction_embeddings, batch)
            elif kwargs.get("global_routing_logits") is not None:
                self.check_global_routing_logits(kwargs["global_routing_logits"], batch)
            # once per call: the decoding steps get them with the global logits (expanded alike for beams)
            candidates = self.routing_candidates(kwargs.get("global_routing_logits"), kwargs.get("routing_candidates"))
            if candidates is not None:
                kwargs["routing_candidates"] = candidates
            with self.leased_experts(candidates, kwargs.pop("expert_lease", None)) as lease:
                if lease is not None:  # the encoder and every decoding step use the experts leased once here
                    kwargs["expert_lease"] = lease
                outputs = super().generate(inputs, routing_record=record, **kwargs)
        if record is not None:
            outputs["routing"] = record
        return outputs

    def save_pretrained(self, save_directory, is_main_process=True, state_dict=None, push_to_hub=False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus this model's code saved flat beside the weights, so that the
        folder (or a Hub repo made from it) loads with `trust_remote_code=True` where the package is not installed.

        All or nothing: the model is written in full into a new folder beside `save_directory`, which then takes its
        place (see `staging.replaced_folder`); files saved there before by others (a tokenizer, say) are kept, weight
        files of an earlier save are not. A kill while writing leaves the old model, whole; a kill after, the new one.
        Only in the instant between the two renames of the swap is the folder missing: the old one is then whole in
        `.<name>.<random>.old` beside it, and the next save there says so. A folder that cannot be renamed (a mount
        point, the working directory) gets its files replaced one by one instead, each by a rename: never a half
        written file. Other ranks of a distributed run (`is_main_process=False`) and `distributed_checkpoint=True`,
        where every rank writes its own files, write in place as in Transformers.

        With `push_to_hub=True` the complete folder is pushed once it is written (see `push_to_hub`); `repo_id`
        defaults to the folder's name.
        """
        self.refuse_offloaded("save_pretrained")
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
        target = Path(save_directory)
        if target.is_file():
            raise NotADirectoryError(f"save_pretrained needs a folder; {target} is a file.")
        if not is_main_process or kwargs.get("distributed_checkpoint"):
            super().save_pretrained(save_directory, is_main_process, state_dict, push_to_hub=False, **kwargs)
            wrote = is_main_process
            if wrote:
                for source in code_files():
                    shutil.copyfile(source, target / source.name)
        else:
            with replaced_folder(target, keep=all_but_weights(kwargs.get("variant"))) as staging:
                super().save_pretrained(staging, is_main_process, state_dict, push_to_hub=False, **kwargs)
                wrote = any(staging.iterdir())  # nothing on the later ranks of a torch.distributed run
                if wrote:
                    for source in code_files():
                        shutil.copyfile(source, staging / source.name)
                    with_default_modes(staging)
        if push_to_hub and wrote:
            repo_id = hub_kwargs.pop("repo_id", target.name)
            _hub().push_folder(save_directory, repo_id, **hub_kwargs)

    def push_to_hub(self, repo_id: str, *, tokenizer=None, max_shard_size: int | str = "50GB", **push_kwargs):
        """Push this model to the Hub as one commit: weights (safetensors), config (with `auto_map` and the custom
        text2text-generation pipeline), this model's code, `tokenizer` if given, and a model card listing the
        experts and the routing settings. `push_kwargs` are those of `modeling_glider.hub.push_folder`: `token`,
        `private`, `revision`, `create_pr`, `commit_message`, `commit_description`, `eval_results` (JSON file or
        dict for the card), `license`, `tags`, `model_card`.

        The repo then loads by its id with the package (`AutoModel.from_pretrained(repo_id)`) and without it
        (`trust_remote_code=True`). Needs the glider-t5 package (for the card template). Returns the `CommitInfo`.
        """
        self.refuse_offloaded("push_to_hub")
        return _hub().push_model(self, repo_id, tokenizer=tokenizer, max_shard_size=max_shard_size, **push_kwargs)


EXPERT_TENSORS = ("lora_A", "lora_B", "router_gate", "expert_embeddings", "expert_samples", "expert_descriptors")
# What each dimension of an expert tensor follows from in the config.
EXPERT_TENSOR_DIMS = {
    "lora_A": ("the experts adapting this linear (experts[*].target_modules)", "the experts' largest rank (r, rank_pattern)", "the linear's input width (d_model, d_ff, d_kv * num_heads)"),
    "lora_B": ("the experts adapting this linear (experts[*].target_modules)", "the linear's output width (d_model, d_ff, d_kv * num_heads)", "the experts' largest rank (r, rank_pattern)"),
    "router_gate": ("the experts adapting this linear (experts[*].target_modules)", "the linear's input width (d_model, d_ff, d_kv * num_heads)"),
    "expert_embeddings": ("the number of experts (experts)", "instruction_embedding_dim"),
    "expert_samples": ("the number of experts (experts)", "the most samples of an expert (experts[*].samples)", "instruction_embedding_dim"),
    "expert_descriptors": ("the number of experts (experts)", "instruction_embedding_dim"),
}  # fmt: skip


def check_loaded_tensors(model: "GliderT5ForConditionalGeneration", info: dict, source: str, allow_base_mismatch: bool):
    """Refuse a loaded model whose weights disagree with its config or hold NaN/inf; each problem names the tensor and
    the config field it disagrees with."""
    problems = []
    for key, saved, built in sorted(info.get("mismatched_keys", [])):  # in a stable order: the first five are shown
        kind = key.rsplit(".", 1)[-1]
        if kind in EXPERT_TENSORS:
            fields = [EXPERT_TENSOR_DIMS[kind][d] for d in range(len(built)) if d >= len(saved) or saved[d] != built[d]]
            problems.append(
                f"{key} holds {tuple(saved)} but config.json implies {tuple(built)}: see {'; '.join(fields)}"
            )
        elif not allow_base_mismatch:
            problems.append(
                f"{key} holds {tuple(saved)} but config.json implies {tuple(built)} (d_model, d_ff, d_kv, num_heads, "
                "vocab_size)"
            )
    for key in sorted(info.get("missing_keys", [])):
        if key.rsplit(".", 1)[-1] in EXPERT_TENSORS:
            problems.append(
                f"config.json's experts need {key}, which the weights do not have (experts, target_modules)"
            )
        else:  # it would keep a random initialisation
            problems.append(f"the weights have no {key} (num_layers, num_decoder_layers, ...)")
    for key in sorted(info.get("unexpected_keys", [])):
        if key.rsplit(".", 1)[-1] in EXPERT_TENSORS:
            field = "instruction_embedding_dim" if key.startswith("global_router.") else "experts' target_modules"
            field = "experts[*].samples" if key.endswith(("expert_samples", "expert_descriptors")) else field
            problems.append(f"the weights hold {key}, which config.json's {field} does not provide for")
        else:
            problems.append(f"the weights hold {key}, which config.json has no place for (num_layers, ...)")
    if not problems:
        experts = model.config.experts
        for path, module in model.named_modules():
            if not isinstance(module, GliderLinear) or module.lora_A is None or module.lora_A.is_meta:
                continue
            for slot, (expert_id, rank) in enumerate(zip(module.expert_ids, module.expert_ranks)):
                if module.lora_A[slot, rank:].any() or module.lora_B[slot, :, rank:].any():
                    problems.append(
                        f"expert {experts[expert_id]['name']!r} at {path} has rank {rank} in config.json (r, "
                        f"rank_pattern), but its weights hold values beyond rank {rank}"
                    )
        router = model.global_router
        if router is not None and router.expert_samples is not None and not router.expert_samples.is_meta:
            for expert, rows in zip(experts, router.expert_samples):
                if rows[expert["samples"] :].any() or not rows[: expert["samples"]].any(dim=-1).all():
                    problems.append(
                        f"expert {expert['name']!r} has {expert['samples']} samples in config.json (experts[*].samples), "
                        "but global_router.expert_samples holds another number of non-zero rows for it"
                    )
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
                problems.append(f"tensor {name} holds NaN or inf")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"GliderT5 at {source} does not load: " + "; ".join(problems[:5]) + more + ".")


def open_expert_store(model, source: str | os.PathLike, load_kwargs: dict) -> ExpertStore:
    """The store of an offloaded model's experts: its safetensors files (the folder's, or those `from_pretrained`
    just downloaded), checked against the shapes its config implies."""
    subfolder = load_kwargs.get("subfolder") or ""
    if os.path.isdir(source):
        folder = Path(source, subfolder)
        files = weight_files(lambda name: str(folder / name) if (folder / name).is_file() else None, str(folder))
    else:
        from transformers.utils import cached_file

        hub = {
            k: load_kwargs[k]
            for k in ("cache_dir", "revision", "token", "local_files_only", "proxies")
            if k in load_kwargs
        }
        files = weight_files(
            lambda name: cached_file(
                source, name, subfolder=subfolder, _raise_exceptions_for_missing_entries=False, **hub
            ),
            str(source),
        )
    shapes = {
        f"{module.module_path}.{kind}": shape
        for module in model.modules()
        if isinstance(module, GliderLinear) and module.num_experts
        for kind, shape in zip(OFFLOADED_TENSORS, module.expert_tensor_shapes())
    }
    store = ExpertStore(files, shapes, in_memory=model.config.expert_offload == "cpu")
    if store.tensors is not None:  # in memory now: checked now, as a model loaded whole is
        for module in model.modules():
            if isinstance(module, GliderLinear):
                for slot, expert in enumerate(module.expert_ids):
                    checked_expert_tensors(store, module, expert, slot)
    return store


def _hub():
    """The package's Hub module. An absolute import inside `try`: a model loaded with `trust_remote_code=True`
    runs without the package, and transformers does not demand what is imported in a `try` block."""
    try:
        from modeling_glider import hub
    except ImportError:
        raise ImportError(
            "Pushing a GliderT5 with its model card needs the glider-t5 package (pip install glider-t5)."
        ) from None
    return hub


register_text2text_generation_pipeline()

__all__ = ["GliderT5ForConditionalGeneration", "GliderSeq2SeqLMOutput", "GliderT5PreTrainedModel"]
