"""`pcee-predict`: classify texts with a bundle and write one JSON line per input."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from .atomic import write_file_atomically
from .backends import BACKEND_NAMES
from .errors import PceeError
from .policies import OperatingPoint, policy_names


def operating_point_from_options(
    policy: str | None, tau: float | None, patience: int | None, layer: int | None, ensemble: bool
) -> OperatingPoint | None:
    if policy is None:
        if any(value is not None for value in (tau, patience, layer)) or ensemble:
            raise click.UsageError("--tau/--patience/--layer/--ensemble need --policy")
        return None
    return OperatingPoint(policy=policy, tau=tau, patience=patience, layer=layer, ensemble=ensemble)


@dataclass
class Inputs:
    """The rows to classify, and the positions of input lines that hold none (blank lines)."""

    texts: list[str]
    pairs: list[str] | None
    line_count: int
    blank_lines: list[int] = field(default_factory=list)  # 1-based

    def rows_in_line_order(self, predictions: list[dict]) -> list[dict]:
        """One output row per input line: a blank line gets an error row, so output line N answers input line N."""
        rows, answers = [], iter(predictions)
        blanks = set(self.blank_lines)
        for number in range(1, self.line_count + 1):
            rows.append(
                {"line": number, "error": "blank line: nothing to classify"}
                if number in blanks
                else next(answers)
            )
        return rows


def read_input_file(path: str) -> Inputs:
    """Plain text (one input per line) or JSON lines with "text" and optional "text_pair"."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise click.BadParameter(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it to UTF-8",
            param_hint="--input",
        ) from None
    except OSError as error:
        raise click.BadParameter(f"{path} cannot be read ({error.strerror})", param_hint="--input") from None
    blank = [number for number, line in enumerate(lines, 1) if not line.strip()]
    filled = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not filled:
        raise click.BadParameter(f"{path} holds no inputs", param_hint="--input")
    if not path.endswith(".jsonl"):
        return Inputs([line for _, line in filled], None, len(lines), blank)
    records = [json_record(path, number, line) for number, line in filled]
    pairs = [record.get("text_pair") for record in records]
    if any(pair is None for pair in pairs) and not all(pair is None for pair in pairs):
        raise click.BadParameter(f'{path}: give "text_pair" on every line or on none', param_hint="--input")
    return Inputs(
        [record["text"] for record in records], None if pairs[0] is None else pairs, len(lines), blank
    )


def json_record(path: str, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        raise click.BadParameter(
            f"{path} line {number} is not JSON ({error})", param_hint="--input"
        ) from None
    if not isinstance(record, dict) or "text" not in record:
        raise click.BadParameter(f'{path} line {number} needs a "text" field', param_hint="--input")
    return record


def write_output(output: str, lines: str) -> None:
    """Atomically: a full disk leaves no half-written (or empty) output file behind."""
    try:
        write_file_atomically(Path(output), lambda handle: handle.write(lines.encode()))
    except OSError as error:
        raise click.ClickException(f"cannot write --output {output}: {error.strerror or error}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "texts", multiple=True, help="A text to classify (repeatable).")
@click.option(
    "--text-pair", "text_pairs", multiple=True, help="Second sentence for a pair task, one per --text."
)
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True, dir_okay=False),
    help="File of inputs: one text per line, or .jsonl with text / text_pair.",
)
@click.option(
    "--policy", type=click.Choice(policy_names()), help="Exit rule; default: the bundle's operating point."
)
@click.option(
    "--tau", type=float, help="Confidence threshold (pcee*: entropy below / probability or score above)."
)
@click.option("--patience", type=int, help="Consecutive confident (pcee) or agreeing (pabee) exits needed.")
@click.option("--layer", type=int, help="Exit layer for --policy budgeted.")
@click.option("--ensemble", is_flag=True, help="Average the probabilities of the confident streak (pcee*).")
@click.option(
    "--point",
    "point_name",
    help="Use an operating point saved in the manifest by name (e.g. from pcee-calibrate).",
)
@click.option(
    "--backend",
    default="auto",
    type=click.Choice(BACKEND_NAMES),
    help="What runs the graphs; auto takes TensorRT engines, then onnxruntime CUDA, then CPU, whichever runs here.",
)
@click.option(
    "--batch-size",
    default=32,
    type=click.IntRange(min=1),
    help="Rows per runtime call; rows are sorted by length into batches of this size.",
)
@click.option("--output", type=click.Path(dir_okay=False), help="Write JSON lines here instead of stdout.")
def main(
    bundle_dir,
    texts,
    text_pairs,
    input_file,
    policy,
    tau,
    patience,
    layer,
    ensemble,
    point_name,
    backend,
    batch_size,
    output,
) -> None:
    """Classify texts with an exported bundle, exiting early per row.

    \b
    Examples:
      pcee-predict runs/demo/sst2-pcee --text "a gripping, funny film"
      pcee-predict runs/demo/sst2-pcee --text "a dull story" --point full
      pcee-predict runs/demo/sst2-pcee --input runs/demo/reviews.txt --policy pcee --tau 0.2 --patience 2
      pcee-predict runs/qnli-pcee --text "Who wrote it?" --text-pair "It was written by Ann."

    Each output line: label, label_index, probabilities, exit_layer, exit_signal (the value the policy
    judged at the exit: for pcee the normalized entropy, lower = more confident), exit_signal_name, truncated.
    Output line N answers input line N: a blank input line gets {"line": N, "error": ...}.
    A summary (layers run, layer speed-up, elapsed time) goes to stderr.
    """
    if bool(texts) == bool(input_file):
        raise click.UsageError("give either --text (repeatable) or --input FILE")
    if text_pairs and len(text_pairs) != len(texts):
        raise click.UsageError(
            f"got {len(texts)} --text but {len(text_pairs)} --text-pair; give one pair per text"
        )
    point = operating_point_from_options(policy, tau, patience, layer, ensemble)
    if point is not None and point_name:
        raise click.UsageError("give either --policy options or --point, not both")
    inputs = (
        read_input_file(input_file)
        if input_file
        else Inputs(list(texts), list(text_pairs) or None, len(texts))
    )
    from .engine import EarlyExitRuntime

    try:
        with EarlyExitRuntime.from_bundle(bundle_dir, backend=backend) as runtime:
            result = runtime.predict(
                inputs.texts, inputs.pairs, operating_point=point or point_name, batch_size=batch_size
            )
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    rows = inputs.rows_in_line_order([row.to_dict() for row in result.predictions])
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    if output:
        write_output(output, lines)
    else:
        sys.stdout.write(lines)
    click.echo(
        json.dumps({"backend": runtime.backend_name, "device": runtime.device, **result.summary()}), err=True
    )
