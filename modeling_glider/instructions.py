"""Task instructions for GLIDER's global router, written from a few samples of a task by a pluggable generator.

- `QueryInstructions` ("query" mode, no LLM): a query's own text is its instruction.
- `TransformersInstructionGenerator`: a local Transformers text-generation model (causal or seq2seq).
- `EndpointInstructionGenerator`: any OpenAI-compatible chat endpoint (vLLM, TGI, Ollama, OpenAI) through
  `huggingface_hub.InferenceClient(base_url=...)`, with timeouts and bounded retries.

Every generator returns one instruction per sample set, or None where it could not write one; it never raises for
one bad reply. `embed_query_instructions` turns queries into instruction embeddings and gives a query without an
instruction a row of zeros, which the model reads as "no global term": that query is routed locally only.
"""

import math
import os
import queue
import re
import threading
import time
import warnings
from collections.abc import Sequence

import torch

from .embedding import InstructionEmbedder

EXAMPLE_INSTRUCTION = "Determine whether the two sentences express the same meaning and answer Yes or No."
SYSTEM_PROMPT = (
    "You write task instructions. Given examples of a task, reply with one imperative sentence that tells a model "
    "what to do with the input: name the kind of input, the skill needed and the format of the answer. "
    f'For example: "{EXAMPLE_INSTRUCTION}" Reply with the instruction only.'
)
MAX_INSTRUCTION_CHARS = 500
LEADING_LABEL = re.compile(r"^[\s*#>-]*(?:task\s+)?instruction\**\s*[:\-]\**\s*", re.IGNORECASE)

Sample = str | dict


class InstructionFallbackWarning(UserWarning):
    """An instruction could not be written for a query, which is therefore routed by the local routers only."""


def check_count(owner: str, name: str, value, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{owner}: {name} must be an integer >= {least}, got {value!r}.")


def check_seconds(owner: str, name: str, value, zero: bool = False) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or value < 0 or (value == 0 and not zero):
        raise ValueError(
            f"{owner}: {name} must be a finite number of seconds {'>=' if zero else '>'} 0, got {value!r}."
        )


def format_sample(sample: Sample, max_chars: int = 2000) -> str:
    """`Input: ...` (and `Output: ...`) for a query string or a `{"input", "target"/"output"}` record."""
    if isinstance(sample, str):
        text, target = sample, None
    elif isinstance(sample, dict) and isinstance(sample.get("input"), str):
        text, target = sample["input"], sample.get("target", sample.get("output"))
    else:
        raise ValueError(f"A sample must be a string or a dict with an 'input' string, got {sample!r}.")
    lines = [f"Input: {text[:max_chars]}"]
    if target is not None:
        lines.append(f"Output: {str(target)[:max_chars]}")
    return "\n".join(lines)


def instruction_messages(samples: Sequence[Sample], max_sample_chars: int = 2000) -> list[dict]:
    """The chat prompt: a few samples of one task -> one imperative task instruction. Long samples are cut to
    `max_sample_chars` characters, so a very long query cannot blow up the request."""
    examples = "\n\n".join(format_sample(sample, max_sample_chars) for sample in samples)
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Examples of the task:\n\n{examples}\n\nInstruction for this task:"},
    ]


def clean_instruction(reply) -> str | None:
    """The instruction in an LLM reply (first non-empty line, without labels or quotes), or None for garbage."""
    if not isinstance(reply, str):
        return None
    line = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    line = LEADING_LABEL.sub("", line).strip().strip("\"'`*").strip()
    if len(line) > MAX_INSTRUCTION_CHARS or sum(c.isalpha() for c in line) < 3:
        return None
    return line


def warn_fallback(what: str, reason: str) -> None:
    warnings.warn(
        f"No instruction for {what}: {reason}. A query without one is routed by the local routers only.",
        InstructionFallbackWarning,
        stacklevel=3,
    )


def describe_query(query: str, limit: int = 60) -> str:
    return f"query {query[:limit]!r}{'...' if len(query) > limit else ''}"


class InstructionGenerator:
    """Writes one task instruction per set of samples. Subclasses implement `write`."""

    def write(self, sample_sets: Sequence[Sequence[Sample]]) -> list[str | None]:
        """One instruction per sample set, None where none could be written (after a warning)."""
        raise NotImplementedError

    def __call__(self, queries: Sequence[str]) -> list[str | None]:
        """One instruction per query, each written from the query alone."""
        return self.write([[query] for query in queries])


class QueryInstructions(InstructionGenerator):
    """The "query" mode, no LLM: the query text is its own instruction (the embedder truncates long ones)."""

    def write(self, sample_sets: Sequence[Sequence[Sample]]) -> list[str | None]:
        instructions = []
        for samples in sample_sets:
            text = "\n".join(s if isinstance(s, str) else s["input"] for s in samples).strip()
            instructions.append(text or None)
        return instructions

    def __repr__(self) -> str:
        return "QueryInstructions()"


class TransformersInstructionGenerator(InstructionGenerator):
    """Instructions written by a local Transformers model (causal LM, or seq2seq such as FLAN-T5), greedily.

    Args:
        model: a model, or its Hub id / folder.
        tokenizer: its tokenizer (loaded with the model when `model` is a name).
        max_new_tokens: length limit of an instruction.
        max_time: seconds one batch may take (`generate(max_time=...)`).
        batch_size: prompts per `generate` call.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_new_tokens: int = 48,
        max_time: float = 60.0,
        batch_size: int = 8,
        max_sample_chars: int = 2000,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        owner = "TransformersInstructionGenerator"
        for option, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                              ("max_sample_chars", max_sample_chars)):  # fmt: skip
            check_count(owner, option, value)
        check_seconds(owner, "max_time", max_time)
        if isinstance(model, (str, os.PathLike)):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            is_seq2seq = getattr(AutoConfig.from_pretrained(model), "is_encoder_decoder", False)
            model = (AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM).from_pretrained(model)
        if tokenizer is None:
            raise ValueError("TransformersInstructionGenerator needs the model's tokenizer.")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.max_new_tokens, self.max_time = max_new_tokens, max_time
        self.batch_size = batch_size if tokenizer.pad_token_id is not None else 1  # no padding without a pad token
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_sample_chars = max_sample_chars
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt(self, samples: Sequence[Sample]) -> str:
        messages = instruction_messages(samples, self.max_sample_chars)
        if self.has_chat_template:
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # some templates refuse a system turn: fold it into the user's
                folded = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
                return self.tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(message["content"] for message in messages)

    @torch.no_grad()
    def write(self, sample_sets: Sequence[Sequence[Sample]]) -> list[str | None]:
        instructions = []
        for start in range(0, len(sample_sets), self.batch_size):
            batch = sample_sets[start : start + self.batch_size]
            try:
                inputs = self.tokenizer(
                    [self.prompt(samples) for samples in batch],
                    padding=True,
                    padding_side="left",
                    add_special_tokens=not self.has_chat_template,  # a chat template writes its own
                    return_tensors="pt",
                ).to(self.model.device)
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    max_time=self.max_time,
                    pad_token_id=self.pad_token_id,
                )
                new_tokens = output if self.is_seq2seq else output[:, inputs["input_ids"].shape[1] :]
                replies = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            except Exception as error:  # a failed generation must not crash the caller's batch
                for samples in batch:
                    warn_fallback(describe_samples(samples), f"the local generator failed ({error!r})")
                instructions += [None] * len(batch)
                continue
            for samples, reply in zip(batch, replies):
                instruction = clean_instruction(reply)
                if instruction is None:
                    warn_fallback(describe_samples(samples), f"the local generator wrote no instruction ({reply!r})")
                instructions.append(instruction)
        return instructions

    def __repr__(self) -> str:
        return f"TransformersInstructionGenerator({self.model.config.name_or_path!r})"


class EndpointInstructionGenerator(InstructionGenerator):
    """Instructions written by an OpenAI-compatible chat endpoint, through `huggingface_hub.InferenceClient`.

    Requests run concurrently (`max_workers`). Each gets `timeout` seconds per attempt and up to `max_retries`
    retries, with exponential back-off, on timeouts, connection errors, HTTP 429 and 5xx; other HTTP errors and
    garbage replies are not retried. The whole call returns within its time budget whatever the server does.
    Failed queries come back as None, each with an `InstructionFallbackWarning`.

    Args:
        base_url: the endpoint, e.g. `http://localhost:8000/v1` (vLLM), `http://localhost:11434/v1` (Ollama).
        model: the model name the endpoint serves (OpenAI, vLLM and Ollama need it).
        api_key: bearer token, if the endpoint wants one (none is sent otherwise, not even a Hugging Face token).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 2,
        retry_backoff: float = 0.5,
        max_tokens: int = 64,
        max_workers: int = 8,
        max_sample_chars: int = 2000,
    ):
        from huggingface_hub import InferenceClient

        owner = "EndpointInstructionGenerator"
        for option, value in (("max_tokens", max_tokens), ("max_workers", max_workers),
                              ("max_sample_chars", max_sample_chars)):  # fmt: skip
            check_count(owner, option, value)
        check_count(owner, "max_retries", max_retries, least=0)
        check_seconds(owner, "timeout", timeout)
        check_seconds(owner, "retry_backoff", retry_backoff, zero=True)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"EndpointInstructionGenerator: base_url must be an http(s):// URL, got {base_url!r}.")
        self.base_url, self.model = base_url, model
        # Without a key, huggingface_hub would send the user's Hugging Face token to this (possibly foreign) server.
        self.client = InferenceClient(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout)
        self.timeout, self.max_retries, self.retry_backoff = timeout, max_retries, retry_backoff
        self.max_tokens, self.max_workers, self.max_sample_chars = max_tokens, max_workers, max_sample_chars

    def ask(self, samples: Sequence[Sample]) -> tuple[str | None, str]:
        """(instruction, "") or (None, why not), after at most `1 + max_retries` requests."""
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        messages = instruction_messages(samples, self.max_sample_chars)
        reason = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            try:
                response = self.client.chat_completion(
                    messages, model=self.model, max_tokens=self.max_tokens, temperature=0.0
                )
            except OfflineModeIsEnabled:
                return None, f"HF_HUB_OFFLINE is set, which blocks huggingface_hub's requests, also to {self.base_url}"
            except HfHubHTTPError as error:
                status = error.response.status_code if error.response is not None else None
                reason = f"HTTP {status} from {self.base_url}"
                if status is not None and status != 429 and status < 500:
                    return None, reason
                continue
            except (ValueError, KeyError, TypeError) as error:  # not an OpenAI chat completion
                return None, f"unreadable reply from {self.base_url} ({error!r})"
            except Exception as error:  # timeouts, connection errors: retried
                reason = f"{type(error).__name__} from {self.base_url}"
                continue
            try:
                reply = response.choices[0].message.content
            except (AttributeError, IndexError, KeyError, TypeError):
                reply = None
            instruction = clean_instruction(reply)
            return (instruction, "") if instruction else (None, f"garbage reply from {self.base_url} ({reply!r})")
        return None, f"{reason}, after {self.max_retries + 1} attempts"

    def time_budget(self, count: int) -> float:
        """Seconds a call with `count` sample sets may take: every request's attempts, timeouts and back-offs."""
        attempts = self.max_retries + 1
        per_request = attempts * self.timeout + self.retry_backoff * (2**self.max_retries - 1)
        waves = -(-count // self.max_workers)
        return waves * per_request + 1.0

    def write(self, sample_sets: Sequence[Sequence[Sample]]) -> list[str | None]:
        results: list[tuple[str | None, str] | None] = [None] * len(sample_sets)
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(sample_sets)):
            todo.put(index)

        def worker() -> None:
            while True:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                results[index] = self.ask(sample_sets[index])

        # Daemon threads: a server that trickles bytes forever can delay nothing past the deadline, not even exit.
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(self.max_workers, len(results)))]
        deadline = time.monotonic() + self.time_budget(len(results))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        instructions = []
        for samples, result in zip(sample_sets, list(results)):
            instruction, reason = result or (None, f"no reply from {self.base_url} within the time budget")
            if instruction is None:
                warn_fallback(describe_samples(samples), reason)
            instructions.append(instruction)
        return instructions

    def __repr__(self) -> str:
        return f"EndpointInstructionGenerator({self.base_url!r}, model={self.model!r})"


def describe_samples(samples: Sequence[Sample]) -> str:
    first = samples[0] if samples else ""
    return describe_query(first if isinstance(first, str) else first.get("input", ""))


def load_instruction_generator(spec) -> InstructionGenerator | None:
    """An instruction generator from a spec: an `InstructionGenerator` (as is), None (none: local routing unless an
    instruction is given), `"query"`, an `http(s)://` base URL of an OpenAI-compatible endpoint (optionally
    `URL#model-name`), or a local Transformers model's name or folder."""
    if spec is None or isinstance(spec, InstructionGenerator):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"instruction_generator must be 'query', a URL, a model name or an InstructionGenerator: {spec!r}"
        )
    spec = str(spec)
    if spec == "query":
        return QueryInstructions()
    if spec.startswith(("http://", "https://")):
        base_url, _, model = spec.partition("#")
        return EndpointInstructionGenerator(base_url, model or None, api_key=os.environ.get("GLIDER_LLM_API_KEY"))
    return TransformersInstructionGenerator(spec)


def embed_query_instructions(
    queries: Sequence[str],
    embedder: InstructionEmbedder,
    generator: InstructionGenerator | None = None,
    instructions: Sequence[str | None] | None = None,
) -> tuple[torch.Tensor, list[str | None]]:
    """Instruction embeddings for queries, `[len(queries), D]`, and the instructions they embed.

    A query's instruction is `instructions[i]` when given, else what `generator` writes for it (default: "query"
    mode). A query left without one (the generator failed, or the text is empty) gets a row of zeros, which the model
    reads as "no global term": it is routed by the local routers only, and a warning says so.
    """
    generator = generator or QueryInstructions()
    instructions = list(instructions) if instructions is not None else [None] * len(queries)
    if len(instructions) != len(queries):
        raise ValueError(f"Got {len(instructions)} instructions for {len(queries)} queries.")
    for i, instruction in enumerate(instructions):
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(
                f"The instruction for query #{i} must be a string or None, got {type(instruction).__name__}."
            )
    to_write = [i for i, instruction in enumerate(instructions) if instruction is None]
    if to_write:
        for i, written in zip(to_write, generator([queries[i] for i in to_write])):
            if written is None and isinstance(generator, QueryInstructions):
                warn_fallback(describe_query(queries[i]), "the query is empty")
            instructions[i] = written
    for i, instruction in enumerate(instructions):
        if instruction is not None and not instruction.strip():
            warn_fallback(describe_query(queries[i]), "its instruction is empty")
            instructions[i] = None
    embeddings = torch.zeros(len(queries), embedder.dim)
    present = [i for i, instruction in enumerate(instructions) if instruction is not None]
    if present:
        embeddings[present] = embedder.embed([instructions[i] for i in present])
    return embeddings, instructions
