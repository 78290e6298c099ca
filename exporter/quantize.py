"""INT8 layer graphs: onnxruntime dynamic quantization of the weights, checked by label agreement with the float model.

An int8 chain cannot match PyTorch to 1e-4, so its parity is measured as it matters to a user: per
exit, how often the predicted label is the float model's, and (with labelled data) how accurate each
exit is. The export fails when the last exit agrees less often than `min_agreement`.

Dynamic quantization picks each activation's scale from the whole batch it sees, so an int8 row's
logits depend slightly on its batch mates: the recorded agreement is that of batches of 32
length-sorted rows, as calibration runs them; at another batch size a few near-tie rows may flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcee.modeling.data import TextDataset, load_data
from pcee.modeling.model import MultiExitClassifier
from pcee.runtime import (
    Backend,
    BundleTokenizer,
    EncodedBatch,
    QuantizationResult,
    length_sorted_chunks,
    record_every_exit,
)

from .errors import ExportError
from .optimize import FLOAT_EXIT_HEADS, QUANTIZED_OPERATORS


class AgreementError(ExportError):
    """The quantized chain's last exit agrees with the float model on too few rows."""


@dataclass
class AgreementRows:
    """The rows agreement is measured on: the parity sentences, and the labelled --parity-data rows if any."""

    batch: EncodedBatch
    labels: np.ndarray | None  # true labels of the trailing labelled rows (indices into the model's labels)
    source: str | None

    def labelled(self, values: np.ndarray) -> np.ndarray:
        return values[len(values) - len(self.labels) :]


def agreement_rows(
    tokenizer_file: Path,
    max_seq_len: int,
    texts: list[tuple[str, ...]],
    data: TextDataset | None,
    labels: list[str],
) -> AgreementRows:
    rows = list(texts) + (
        [] if data is None else list(zip(data.texts, *([data.text_pairs] if data.text_pairs else [])))
    )
    firsts, seconds = [row[0] for row in rows], [row[1] for row in rows] if len(rows[0]) > 1 else None
    batch = BundleTokenizer(tokenizer_file, max_seq_len).encode_texts(firsts, seconds)
    true_labels = None if data is None else label_indices(data, labels)
    return AgreementRows(batch, true_labels, None if data is None else data.source)


def load_parity_data(path: Path, task: str | None) -> TextDataset:
    """A GLUE task directory (its dev split) or GLUE-format file of the model's task."""
    return load_data(path, task)


def label_indices(data: TextDataset, labels: list[str]) -> np.ndarray:
    position = {name: index for index, name in enumerate(labels)}
    unknown = sorted(set(data.label_names) - set(position))
    if unknown:
        raise ExportError(
            f"--parity-data {data.source} has labels {unknown} that the model does not ({labels}); give data of the model's task"
        )
    return np.asarray([position[data.label_names[label]] for label in data.labels], dtype=np.int64)


def torch_exit_labels(model: MultiExitClassifier, batch: EncodedBatch, batch_size: int = 32) -> np.ndarray:
    """[rows, layers] the float PyTorch model's predicted label at every exit."""
    labels = np.zeros((len(batch), model.num_layers), dtype=np.int64)
    with torch.no_grad():
        for rows in length_sorted_chunks(batch, batch_size):
            chunk = batch.select(rows)
            output = model(
                *(
                    torch.from_numpy(array)
                    for array in (chunk.input_ids, chunk.attention_mask, chunk.token_type_ids)
                )
            )
            labels[rows] = output.logits.argmax(-1).T.numpy()
    return labels


def measure_agreement(
    backend: Backend, rows: AgreementRows, float_labels: np.ndarray, min_agreement: float
) -> QuantizationResult:
    """Per exit: how often the quantized chain (run by a runtime backend) predicts the float model's label; accuracy on labelled rows."""
    quantized_labels = record_every_exit(backend, rows.batch).logits.argmax(-1)
    result = QuantizationResult(
        method="dynamic",
        weight_type="int8",
        operators=QUANTIZED_OPERATORS,
        float_exit_heads=FLOAT_EXIT_HEADS,
        min_agreement=min_agreement,
        rows=len(rows.batch),
        agreement=rounded((quantized_labels == float_labels).mean(axis=0)),
        parity_data=rows.source,
    )
    if rows.labels is not None:
        result.accuracy = rounded((rows.labelled(quantized_labels) == rows.labels[:, None]).mean(axis=0))
        result.float_accuracy = rounded((rows.labelled(float_labels) == rows.labels[:, None]).mean(axis=0))
    return result


def rounded(values: np.ndarray) -> list[float]:
    return [round(float(value), 4) for value in values]


def check_agreement(result: QuantizationResult) -> None:
    last = result.agreement[-1]
    if not last >= result.min_agreement:
        raise AgreementError(
            f"the int8 layer graphs agree with the float model on {last:.2%} of {result.rows} rows at the last exit, below "
            f"--min-agreement {result.min_agreement:.2%} (per exit: {', '.join(f'{value:.2%}' for value in result.agreement)}). "
            "The bundle was not written. Export in float (drop --quantize), or lower --min-agreement if that accuracy cost is acceptable."
        )
