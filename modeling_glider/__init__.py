"""GliderT5: one routed T5 from a library of LoRA experts (GLIDER: global and local instruction-driven routing)."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from configuration_glider import GliderConfig

from .experts import Expert, load_expert, save_expert_files
from .modeling_glider import GliderSeq2SeqLMOutput, GliderT5ForConditionalGeneration
from .pipeline_glider import Text2TextGenerationPipeline
from .routing import GliderGlobalRouter, GliderLinear, RoutingRecord, glider_routing_weights

AutoConfig.register("glider_t5", GliderConfig, exist_ok=True)
AutoModel.register(GliderConfig, GliderT5ForConditionalGeneration, exist_ok=True)
AutoModelForSeq2SeqLM.register(GliderConfig, GliderT5ForConditionalGeneration, exist_ok=True)

__all__ = [
    "Expert",
    "GliderConfig",
    "GliderGlobalRouter",
    "GliderLinear",
    "GliderSeq2SeqLMOutput",
    "GliderT5ForConditionalGeneration",
    "RoutingRecord",
    "Text2TextGenerationPipeline",
    "glider_routing_weights",
    "load_expert",
    "save_expert_files",
]
