"""Shared fixtures: tiny random T5s, a sentencepiece tokenizer trained here, and expert directories written with
PEFT itself (plus gate files written directly with safetensors, independently of the code under test)."""

import copy
import io
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import sentencepiece as spm
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

from tests.llm_server import ChatServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALL_T5_LINEARS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
EMBED_DIM = 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run thousands of tiny ops: on a shared 2-core machine a second thread mostly waits for the other's core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def server(monkeypatch):
    """An OpenAI-compatible chat server on 127.0.0.1 (see `llm_server.py`)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the LLM server is not the Hub
    chat_server = ChatServer()
    yield chat_server
    chat_server.close()


CORPUS = [
    "reverse the word apple",
    "sort the letters of banana",
    "uppercase the word cherry",
    "is the sentence positive or negative answer yes or no",
    "translate numbers into words one two three four five six seven eight nine ten",
    "the quick brown fox jumps over the lazy dog",
    "question answer true false maybe always never",
]


def tiny_t5_config(vocab_size: int = 64, gated: bool = True, **overrides) -> T5Config:
    fields = dict(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5Config(**{**fields, **overrides})


def make_base(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_t5_config(**config_kwargs)).to(dtype).eval()


def make_expert(
    root: Path,
    base: T5ForConditionalGeneration,
    name: str,
    *,
    r: int = 4,
    lora_alpha: int = 8,
    targets=("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
    seed: int = 0,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    layers: list[int] | None = None,
    zero_B: bool = False,
    embedding: torch.Tensor | None = None,
    gates: bool = True,
    instruction: str = "",
) -> Path:
    """A LoRA expert saved by PEFT (random A and B), with random Phatgoose gates."""
    present = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    lora_config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=[t for t in targets if t in present],
        lora_dropout=0.0,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        layers_to_transform=layers,
        layers_pattern="block" if layers is not None else None,
    )
    model = get_peft_model(copy.deepcopy(base), lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_A" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif "lora_B" in param_name:
                param.copy_(torch.zeros(param.shape) if zero_B else torch.randn(param.shape, generator=generator) * 0.3)
    directory = root / name
    model.save_pretrained(directory)
    tensors = {}
    if gates:
        for key, A in load_file(directory / "adapter_model.safetensors").items():
            if key.endswith(".lora_A.weight"):
                path = key[len("base_model.model.") : -len(".lora_A.weight")]
                tensors[f"gate.{path}"] = torch.randn(A.shape[1], generator=generator)
    if embedding is not None:
        tensors["instruction_embedding"] = embedding.float()
    if tensors:
        save_file(tensors, directory / "glider_expert.safetensors")
    (directory / "glider_expert.json").write_text(json.dumps({"name": name, "instruction": instruction}))
    return directory


def assert_decisive(out, num_beams: int = 1, eos_token_id: int | None = 1) -> None:
    """Check that every choice of the reference generation `out` wins by far more than fp32 rounding.

    Token ids from computations batched, padded, cached or threaded differently may be compared exactly only when
    no choice is a near tie: their logits differ by up to ~1e-5 of the logits' size (measured on these tiny models),
    which can flip a tie on another CPU. `out` is `generate(..., output_scores=True, return_dict_in_generate=True)`. Greedy: each step's best logit
    must lead the next by 1e-4 of the largest logit (rows that ended are skipped). Beam search: at each step the
    num_beams best running candidates (cumulative log-probabilities, end of sequence excluded) and the next one must
    be that far apart, and so must the scores of the returned beams.
    """
    running = None
    for step, scores in enumerate(out.scores):
        scores = scores.float()
        if num_beams == 1:
            ended = (out.sequences[:, -len(out.scores) :][:, :step] == eos_token_id).any(dim=-1)  # generated ids
            top = scores[~ended].topk(2, dim=-1).values
            margins, scale = top[:, 0] - top[:, 1], scores[scores.isfinite()].abs().max()  # -inf: banned tokens
        else:
            batch, vocab = scores.shape[0] // num_beams, scores.shape[-1]
            if running is None:  # as generate() starts: one live beam per query
                running = torch.full((batch, num_beams), -1e9)
                running[:, 0] = 0
            candidates = (scores.view(batch, num_beams, vocab) + running[..., None]).view(batch, -1)
            candidates[:, eos_token_id::vocab] = -1e9  # ending beams leave the running ones
            top = candidates.topk(num_beams + 1, dim=-1).values
            live = top[:, 1:] > -1e8  # candidates grown from the placeholder beams of step 0 are no choice
            margins, scale = (top[:, :-1] - top[:, 1:])[live], top[top > -1e8].abs().max()
            running = top[:, :num_beams]
        tolerance = 1e-4 * max(1.0, float(scale))
        assert margins.numel() == 0 or margins.min() > tolerance, (
            f"step {step}: a near tie ({float(margins.min()):.2e} <= {tolerance:.2e}); exact token comparisons "
            "with this reference would depend on rounding: pick other inputs"
        )
    if num_beams > 1:
        final = out.sequences_scores.view(batch, -1)
        gaps = final[:, :-1] - final[:, 1:]
        assert gaps.numel() == 0 or gaps.min() > 1e-4 * max(1.0, float(final.abs().max())), "returned beams nearly tie"


def train_sentencepiece(directory: Path, texts: list[str], vocab_size: int, model_type: str = "unigram") -> Path:
    """A T5-style sentencepiece model (pad 0, EOS 1, unk 2, no BOS) trained on `texts`, as `directory/spiece.model`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    (directory / "spiece.model").write_bytes(model.getvalue())
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = train_sentencepiece(tmp_path_factory.mktemp("tokenizer"), CORPUS * 20, vocab_size=60)
    T5Tokenizer.from_pretrained(directory, extra_ids=0).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return T5Tokenizer.from_pretrained(tokenizer_dir)
