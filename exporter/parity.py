"""Parity: the exported chain of graphs, run by the runtime's own backends, must reproduce the PyTorch model.

Real sentences are tokenized with the model's own tokenizer at several batch sizes, padded to
each batch's longest sentence and once far past it. Every exit output of every layer graph is
compared with the PyTorch model's, and every mismatch is collected before one ParityError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pcee.modeling.model import MultiExitClassifier
from pcee.runtime import (
    CONFIDENCE_SCORE,
    ENTROPY,
    LOGITS,
    MAX_PROBABILITY,
    Backend,
    EncodedBatch,
    ParityResult,
    layer_graph_name,
    run_every_exit,
)

from .errors import OutputMismatch, ParityError
from .graphs import exit_signals

BATCH_SIZES = (1, 4, 8)
PADDED_BATCH_SIZE = 4
PADDED_LENGTH = 48  # the extra batch is padded to this length (or max_seq_len) to exercise heavy padding

SENTENCES = (
    "A gripping, beautifully shot film.",
    "I would not recommend this restaurant to anyone.",
    "The plot meanders for two hours and then simply stops, leaving every question it raised unanswered.",
    "Great!",
    "What time does the next train to Boston leave?",
    "The committee postponed its decision until the budget figures for the third quarter are available.",
    "She sold her old bicycle and bought a used car with the money.",
    "Terrible customer service; I waited 45 minutes on hold.",
    "Is it possible to learn a new language in six months?",
    "The actors do their best with a script that gives them nothing to work with.",
    "Quarterly revenue rose 12% while operating costs fell slightly.",
    "Nobody expected the quiet librarian to win the chess tournament.",
)
SENTENCE_PAIRS = (
    ("How do I learn to cook?", "What is the best way to start cooking at home?"),
    ("The cat sat on the mat.", "A dog was sleeping outside."),
    (
        "Shares of the company fell 5% after the announcement.",
        "The company's stock dropped after it announced the news.",
    ),
    (
        "Who wrote the novel?",
        "The novel was written in 1851 by Herman Melville, who also wrote short stories.",
    ),
    ("It is raining.", "The streets are wet because it has been raining all morning."),
    ("Can I return an item without a receipt?", "Returns require proof of purchase."),
    ("He finished the marathon.", "He did not run at all."),
    ("The meeting starts at noon.", "Lunch will be served after the meeting."),
)

TokenBatch = dict[str, np.ndarray]  # token input name -> int64 [batch, seq]
ExitOutputs = dict[str, np.ndarray]  # exit output name -> float32 array


def parity_batches(tokenizer, sentence_pairs: bool, max_seq_len: int) -> list[TokenBatch]:
    """Tokenized batches of real sentences (pairs for a pair task), each padded to its longest row.

    The last batch is padded far past its longest row; the exporter also traces the graphs on it.
    """
    texts = SENTENCE_PAIRS if sentence_pairs else [(sentence,) for sentence in SENTENCES]
    batches, start = [], 0
    for size in BATCH_SIZES:
        rows = [texts[(start + offset) % len(texts)] for offset in range(size)]
        batches.append(tokenize(tokenizer, rows, max_seq_len, padding="longest"))
        start += size
    padded_rows = [texts[offset] for offset in range(PADDED_BATCH_SIZE)]
    batches.append(tokenize(tokenizer, padded_rows, min(PADDED_LENGTH, max_seq_len), padding="max_length"))
    return batches


def tokenize(tokenizer, rows: Sequence[tuple[str, ...]], max_length: int, padding: str) -> TokenBatch:
    first = [row[0] for row in rows]
    second = [row[1] for row in rows] if len(rows[0]) > 1 else None
    encoded = tokenizer(
        first,
        second,
        padding=padding,
        truncation=True,
        max_length=max_length,
        return_token_type_ids=True,
        return_tensors="np",
    )
    return {
        name: np.asarray(encoded[name], dtype=np.int64)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }


def torch_exit_outputs(model: MultiExitClassifier, batch: TokenBatch) -> list[ExitOutputs]:
    """Every layer's exit outputs from the PyTorch model's own forward pass (not the export wrappers)."""
    with torch.no_grad():
        output = model(**{name: torch.from_numpy(values) for name, values in batch.items()})
    per_layer = []
    for index in range(model.num_layers):
        logits, entropy, max_probability = exit_signals(output.logits[index])
        outputs = {LOGITS: logits, ENTROPY: entropy, MAX_PROBABILITY: max_probability}
        if output.confidence_scores is not None:
            outputs[CONFIDENCE_SCORE] = output.confidence_scores[index].float()
        per_layer.append({name: tensor.numpy() for name, tensor in outputs.items()})
    return per_layer


def chain_exit_outputs(backend: Backend, batch: TokenBatch) -> list[ExitOutputs]:
    """Every layer's exit outputs from a runtime backend, on the batch exactly as padded."""
    tokens = EncodedBatch(
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        np.zeros(len(batch["input_ids"]), bool),
    )
    exits = run_every_exit(backend, tokens)
    names = {
        LOGITS: "logits",
        ENTROPY: "entropy",
        MAX_PROBABILITY: "max_probability",
        CONFIDENCE_SCORE: "confidence_score",
    }
    return [
        {
            output: getattr(exits, field)[:, index]
            for output, field in names.items()
            if getattr(exits, field) is not None
        }
        for index in range(exits.num_layers)
    ]


def max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64)), initial=0.0))


@dataclass
class ParityTarget:
    """What is checked against PyTorch: a runtime backend over the chain, and the runtime's single-graph backend
    over the whole-model graph if there is one (its last exit is compared, the only one it has)."""

    backend: Backend
    single_graph: Backend | None = None
    prefix: str = ""  # graph names in the report: "" for onnxruntime, "tensorrt/" for engines


def measure_parity(
    targets: list[ParityTarget],
    batches: list[TokenBatch],
    reference: list[list[ExitOutputs]],
    tolerance: float,
) -> ParityResult:
    diffs: dict[str, dict[str, list[float]]] = {}
    for target in targets:
        for batch, expected_layers in zip(batches, reference):
            for index, (expected, actual) in enumerate(
                zip(expected_layers, chain_exit_outputs(target.backend, batch))
            ):
                for name, values in expected.items():
                    diffs.setdefault(target.prefix + layer_graph_name(index), {}).setdefault(name, []).append(
                        max_abs_diff(values, actual[name])
                    )
            if target.single_graph is not None:
                full_diff = max_abs_diff(
                    expected_layers[-1][LOGITS], chain_exit_outputs(target.single_graph, batch)[-1][LOGITS]
                )
                diffs.setdefault("full", {}).setdefault(LOGITS, []).append(full_diff)
    # np.max keeps a NaN, so a graph that produced one fails the check
    worst = {
        graph: {name: float(np.max(values)) for name, values in outputs.items()}
        for graph, outputs in diffs.items()
    }
    return ParityResult(
        tolerance=tolerance,
        batch_sizes=[int(batch["input_ids"].shape[0]) for batch in batches],
        sequence_lengths=[int(batch["input_ids"].shape[1]) for batch in batches],
        max_abs_diff=worst,
        passed=not parity_mismatches(worst, tolerance),
        backends=[target.backend.name for target in targets],
    )


def parity_mismatches(worst: dict[str, dict[str, float]], tolerance: float) -> list[OutputMismatch]:
    return [
        OutputMismatch(graph, output, diff)
        for graph, diffs in worst.items()
        for output, diff in diffs.items()
        if not diff <= tolerance  # NaN counts as a mismatch
    ]


def verify_parity(
    targets: list[ParityTarget],
    batches: list[TokenBatch],
    reference: list[list[ExitOutputs]],
    tolerance: float,
) -> ParityResult:
    """Measure every exit output of every graph; raise one ParityError listing all that exceed the tolerance."""
    result = measure_parity(targets, batches, reference, tolerance)
    mismatches = parity_mismatches(result.max_abs_diff, tolerance)
    if mismatches:
        raise ParityError(mismatches, tolerance)
    return result
