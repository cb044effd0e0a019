"""Scoring a seq2seq model on the suite: exact match for generation tasks, rank classification for multiple choice
(each choice scored by the length-normalised sum of its tokens' cross-entropies given the prompt; lowest wins).
Both metrics are local `evaluate` modules under `benchmarks/metrics/`."""

import functools
from collections.abc import Callable
from pathlib import Path

import evaluate
import torch
import torch.nn.functional as F

from .suite import TASKS, Example

METRICS = Path(__file__).resolve().parents[1] / "metrics"
# Per batch of examples, the extra model inputs that route it (e.g. `instruction_embeddings`); None for none.
RoutingInputs = Callable[[list[Example]], dict] | None


def _routing(routing_inputs: RoutingInputs, batch: list[Example]) -> dict:
    return routing_inputs(batch) if routing_inputs is not None else {}


@torch.no_grad()
def generate_answers(
    model, tokenizer, examples: list[Example], routing_inputs: RoutingInputs = None, batch_size: int = 64
) -> list[str]:
    """Greedy answers, one per example."""
    answers = []
    max_new_tokens = max(len(tokenizer(e.target).input_ids) for e in examples) + 4
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        # T5 reads right-padded inputs; a tokenizer saved with padding_side="left" must not change the scores
        inputs = tokenizer([e.input for e in batch], return_tensors="pt", padding=True, padding_side="right")
        inputs = inputs.to(model.device)
        routing = {name: value.to(model.device) for name, value in _routing(routing_inputs, batch).items()}
        output = model.generate(**inputs, **routing, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        answers += tokenizer.batch_decode(output, skip_special_tokens=True)
    return answers


@torch.no_grad()
def choice_scores(
    model, tokenizer, examples: list[Example], routing_inputs: RoutingInputs = None, batch_size: int = 32
) -> list[list[float]]:
    """Per example, the length-normalised cross-entropy of every choice (the prompt is repeated per choice, and so
    is the example's routing)."""
    scores = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        rows = [(e, choice) for e in batch for choice in e.choices]
        pad = {
            "return_tensors": "pt",
            "padding": True,
            "padding_side": "right",
        }  # whatever the tokenizer was saved with
        inputs = tokenizer([e.input for e, _ in rows], **pad).to(model.device)
        labels = tokenizer([choice for _, choice in rows], **pad).input_ids.to(model.device)
        labels[labels == tokenizer.pad_token_id] = -100
        routing = {
            name: value.to(model.device).repeat_interleave(
                torch.tensor([len(e.choices) for e in batch]).to(model.device), dim=0
            )
            for name, value in _routing(routing_inputs, batch).items()
        }
        logits = model(**inputs, labels=labels, **routing).logits
        token_ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        row_scores = (token_ce.sum(-1) / (labels != -100).sum(-1)).tolist()
        for e in batch:
            scores.append(row_scores[: len(e.choices)])
            row_scores = row_scores[len(e.choices) :]
    return scores


def predict(model, tokenizer, examples: list[Example], routing_inputs: RoutingInputs = None) -> list:
    """Per example (all of one task): the greedy answer (generation) or every choice's score (multiple choice)."""
    if TASKS[examples[0].task].kind == "multiple_choice":
        return choice_scores(model, tokenizer, examples, routing_inputs)
    return generate_answers(model, tokenizer, examples, routing_inputs)


@functools.cache
def _metric(name: str):
    return evaluate.load(str(METRICS / name))


def task_score(examples: list[Example], predictions: list) -> float:
    """The task's metric, in percent: rank-classification accuracy or exact match."""
    if TASKS[examples[0].task].kind == "multiple_choice":
        references = [e.choices.index(e.target) for e in examples]
        return 100 * _metric("rank_classification").compute(predictions=predictions, references=references)["accuracy"]
    references = [e.target for e in examples]
    return 100 * _metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]
