"""glider-mini's base model: a sentencepiece tokenizer and a small T5 v1.1 pretrained from scratch with T5's span
corruption on unlabeled text (no task supervision), with the Transformers `Trainer` on CPU."""

import io
import math
import random
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import (
    DataCollatorForSeq2Seq,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
    Trainer,
    TrainingArguments,
)


def train_tokenizer(texts: list[str], directory: str | Path, vocab_size: int, extra_ids: int) -> T5Tokenizer:
    """A unigram sentencepiece model (T5's kind, T5's special ids) trained on `texts`, saved as a T5 tokenizer.

    `vocab_size` is an upper bound: a small corpus may support fewer pieces. `extra_ids` sentinels are appended for
    span corruption, as in T5.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,  # one thread: the same model on every machine
        minloglevel=2,
    )
    (directory / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(directory, extra_ids=extra_ids)
    tokenizer.save_pretrained(directory)
    return tokenizer


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: random.Random
) -> list[bool]:
    """T5's noise mask: about `noise_density * length` noise tokens in spans of mean length `mean_span_length`,
    alternating with non-noise spans, starting with non-noise."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)

    def segment(total: int) -> list[int]:  # a random composition of `total` into `num_spans` positive parts
        cuts = sorted(rng.sample(range(1, total), num_spans - 1))
        return [b - a for a, b in zip([0, *cuts], [*cuts, total])]

    mask = []
    for keep, noise in zip(segment(length - num_noise), segment(num_noise)):
        mask += [False] * keep + [True] * noise
    return mask


def span_corrupt(
    ids: list[int], sentinels: list[int], eos_id: int, rng: random.Random, noise_density=0.15, mean_span_length=3.0
) -> dict[str, list[int]]:
    """One span-corruption example: each noise span is replaced by a sentinel in the input; the target lists each
    sentinel followed by the span it hides, then EOS."""
    mask = random_spans_noise_mask(len(ids), noise_density, mean_span_length, rng)
    inputs, labels, span = [], [], -1
    for i, (token, noise) in enumerate(zip(ids, mask)):
        if noise and (i == 0 or not mask[i - 1]):
            span += 1
            inputs.append(sentinels[span])
            labels.append(sentinels[span])
        (labels if noise else inputs).append(token)
    return {"input_ids": inputs + [eos_id], "labels": labels + [eos_id]}


def span_corruption_data(texts: list[str], tokenizer: T5Tokenizer, num_examples: int, seed: int) -> list[dict]:
    """`num_examples` corrupted examples, cycling through `texts` in seeded random order with fresh masks."""
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    sentinels = [vocab[f"<extra_id_{i}>"] for i in range(len(vocab)) if f"<extra_id_{i}>" in vocab]
    encoded = [ids[:-1] for ids in tokenizer(texts)["input_ids"]]  # drop EOS; added back after corruption
    encoded = [ids for ids in encoded if len(ids) >= 2]
    data = []
    while len(data) < num_examples:
        for index in rng.sample(range(len(encoded)), len(encoded)):
            data.append(span_corrupt(encoded[index], sentinels, tokenizer.eos_token_id, rng))
            if len(data) == num_examples:
                break
    return data


def t5_config(tokenizer: T5Tokenizer, d_model: int, d_ff: int, num_layers: int, num_heads: int) -> T5Config:
    """A T5 v1.1 layout (gated-GELU feed-forward, no dropout for this tiny corpus) for `tokenizer`."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@torch.no_grad()
def span_corruption_metrics(model: T5ForConditionalGeneration, tokenizer: T5Tokenizer, data: list[dict]) -> dict:
    """Teacher-forced loss and token accuracy of `model` on span-corruption examples."""
    model.eval()
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, padding=True)
    total_loss = correct = tokens = 0.0
    for start in range(0, len(data), 64):
        batch = collator(data[start : start + 64])
        logits = model(**batch).logits
        labels = batch["labels"]
        mask = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
        total_loss += loss.item()
        correct += (logits.argmax(-1)[mask] == labels[mask]).sum().item()
        tokens += mask.sum().item()
    return {
        "loss": total_loss / tokens,
        "token_accuracy": correct / tokens,
        "perplexity": math.exp(total_loss / tokens),
    }


def pretrain(
    tokenizer: T5Tokenizer,
    texts: list[str],
    config: T5Config,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    seed: int,
    output_dir: str | Path,
    logging_steps: int = 50,
) -> tuple[T5ForConditionalGeneration, list[dict]]:
    """Pretrain a fresh T5 on span corruption of `texts`; returns the model and the Trainer's log history."""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    data = span_corruption_data(texts, tokenizer, steps * batch_size, seed)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, padding=True),
    )
    trainer.train()
    return model.eval(), trainer.state.log_history
