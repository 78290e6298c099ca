"""Training and per-exit evaluation of a multi-exit classifier."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import TextDataset
from .metrics import all_metrics
from .model import MultiExitClassifier


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_seq_len: int = 128
    seed: int = 42
    eval_batch_size: int = 64


@dataclass
class EncodedDataset:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


# Each text is cut to max_seq_len * this many characters before tokenizing: tokenizing a 50 MB row
# whole took 11.4 GB. Tokens average 4-6 characters, so the cut only drops text far past the
# max_seq_len tokens that truncation keeps anyway.
CHARACTERS_PER_TOKEN_BOUND = 64


def cut_texts(texts: list[str] | None, max_characters: int) -> list[str] | None:
    return None if texts is None else [text[:max_characters] for text in texts]


def encode(tokenizer, dataset: TextDataset, max_seq_len: int) -> EncodedDataset:
    max_characters = max_seq_len * CHARACTERS_PER_TOKEN_BOUND
    encoded = tokenizer(
        cut_texts(dataset.texts, max_characters),
        cut_texts(dataset.text_pairs, max_characters),
        truncation=True,
        max_length=max_seq_len,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    return EncodedDataset(
        encoded["input_ids"], encoded["token_type_ids"], np.asarray(dataset.labels, dtype=np.int64)
    )


def collate(data: EncodedDataset, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the rows to their own longest sequence (dynamic padding)."""
    longest = max(len(data.input_ids[row]) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for position, row in enumerate(rows):
        length = len(data.input_ids[row])
        ids[position, :length] = torch.tensor(data.input_ids[row])
        types[position, :length] = torch.tensor(data.token_type_ids[row])
        mask[position, :length] = 1
    labels = torch.from_numpy(data.labels[rows])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar lengths, so dynamic padding wastes little compute."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda row: lengths[row])
        batches.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for parameter in model.parameters():
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def planned_batches(data: EncodedDataset, config: TrainingConfig) -> list[list[int]]:
    rng = random.Random(config.seed)
    lengths = [len(ids) for ids in data.input_ids]
    whole_epochs = int(np.ceil(config.epochs))
    batches = [
        batch
        for _ in range(whole_epochs)
        for batch in length_grouped_batches(lengths, config.batch_size, rng)
    ]
    per_epoch = int(np.ceil(len(data) / config.batch_size))
    return batches[: max(1, int(round(per_epoch * config.epochs)))]


def train_model(
    model: MultiExitClassifier,
    train_data: EncodedDataset,
    config: TrainingConfig,
    pad_id: int,
    progress: bool = True,
) -> list[float]:
    """Train in place; returns the loss of every step."""
    seed_everything(config.seed)
    batches = planned_batches(train_data, config)
    optimizer = make_optimizer(model, config)
    scheduler = linear_schedule(optimizer, len(batches), config.warmup_ratio)
    model.train()
    losses = []
    bar = tqdm(batches, desc="training", unit="batch", disable=not progress)
    for rows in bar:
        batch = collate(train_data, rows, pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    model.eval()
    return losses


@torch.no_grad()
def predict_all_exits(
    model: MultiExitClassifier, data: EncodedDataset, pad_id: int, batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """Probabilities of every exit: [N, num_layers, K]."""
    model.eval()
    lengths = [len(ids) for ids in data.input_ids]
    probabilities = np.zeros((len(data), model.num_layers, model.pcee_config.num_labels), dtype=np.float32)
    for rows in tqdm(
        list(sorted_batches(lengths, batch_size)), desc="evaluating", unit="batch", disable=not progress
    ):
        batch = collate(data, rows, pad_id)
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
        probabilities[rows] = torch.softmax(logits, dim=-1).permute(1, 0, 2).numpy()
    return probabilities


def evaluate_exits(probabilities: np.ndarray, labels: np.ndarray, metric_name: str) -> list[dict]:
    rows = []
    for layer in range(probabilities.shape[1]):
        predictions = probabilities[:, layer].argmax(-1)
        scores = all_metrics(metric_name, predictions, labels)
        rows.append({"layer": layer + 1, "metric": scores[metric_name], "accuracy": scores["accuracy"]})
    return rows


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
