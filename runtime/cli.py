"""`pcee-predict`: classify texts with a bundle and write one JSON line per input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import PceeError
from .policies import POLICY_NAMES, OperatingPoint


def operating_point_from_options(policy: str | None, tau: float | None, patience: int | None, layer: int | None, ensemble: bool) -> OperatingPoint | None:
    if policy is None:
        if any(value is not None for value in (tau, patience, layer)) or ensemble:
            raise click.UsageError("--tau/--patience/--layer/--ensemble need --policy")
        return None
    return OperatingPoint(policy=policy, tau=tau, patience=patience, layer=layer, ensemble=ensemble)


def read_input_file(path: str) -> tuple[list[str], list[str] | None]:
    """Plain text (one input per line) or JSON lines with "text" and optional "text_pair"."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise click.BadParameter(f"{path} holds no inputs", param_hint="--input")
    if not path.endswith(".jsonl"):
        return lines, None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise click.BadParameter(f"{path} line {number} is not JSON ({error})", param_hint="--input") from None
        if not isinstance(record, dict) or "text" not in record:
            raise click.BadParameter(f"{path} line {number} needs a \"text\" field", param_hint="--input")
        records.append(record)
    pairs = [record.get("text_pair") for record in records]
    if any(pair is None for pair in pairs) and not all(pair is None for pair in pairs):
        raise click.BadParameter(f"{path}: give \"text_pair\" on every line or on none", param_hint="--input")
    return [record["text"] for record in records], (None if pairs[0] is None else pairs)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "texts", multiple=True, help="A text to classify (repeatable).")
@click.option("--text-pair", "text_pairs", multiple=True, help="Second sentence for a pair task, one per --text.")
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False), help="File of inputs: one text per line, or .jsonl with text / text_pair.")
@click.option("--policy", type=click.Choice(POLICY_NAMES), help="Exit rule; default: the bundle's operating point.")
@click.option("--tau", type=float, help="Confidence threshold (pcee*: entropy below / probability or score above).")
@click.option("--patience", type=int, help="Consecutive confident (pcee) or agreeing (pabee) exits needed.")
@click.option("--layer", type=int, help="Exit layer for --policy budgeted.")
@click.option("--ensemble", is_flag=True, help="Average the probabilities of the confident streak (pcee*).")
@click.option("--point", "point_name", help="Use an operating point saved in the manifest by name (e.g. from pcee-calibrate).")
@click.option("--backend", default="auto", type=click.Choice(["auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"]))
@click.option("--batch-size", default=32, type=click.IntRange(min=1))
@click.option("--output", type=click.Path(dir_okay=False), help="Write JSON lines here instead of stdout.")
def main(bundle_dir, texts, text_pairs, input_file, policy, tau, patience, layer, ensemble, point_name, backend, batch_size, output) -> None:
    """Classify texts with an exported bundle, exiting early per row.

    \b
    Examples:
      pcee-predict runs/sst2-pcee --text "a gripping, funny film"
      pcee-predict runs/sst2-pcee --input reviews.txt --policy pcee --tau 0.2 --patience 2
      pcee-predict runs/qnli-pcee --text "Who wrote it?" --text-pair "It was written by Ann."

    Each output line: label, label_index, probabilities, exit_layer, confidence, truncated.
    A summary (layers run, layer speed-up, elapsed time) goes to stderr.
    """
    if bool(texts) == bool(input_file):
        raise click.UsageError("give either --text (repeatable) or --input FILE")
    if text_pairs and len(text_pairs) != len(texts):
        raise click.UsageError(f"got {len(texts)} --text but {len(text_pairs)} --text-pair; give one pair per text")
    point = operating_point_from_options(policy, tau, patience, layer, ensemble)
    if point is not None and point_name:
        raise click.UsageError("give either --policy options or --point, not both")
    inputs, pairs = read_input_file(input_file) if input_file else (list(texts), list(text_pairs) or None)
    from .engine import EarlyExitRuntime

    try:
        with EarlyExitRuntime.from_bundle(bundle_dir, backend=backend) as runtime:
            result = runtime.predict(inputs, pairs, operating_point=point or point_name, batch_size=batch_size)
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    lines = "".join(json.dumps(row.to_dict()) + "\n" for row in result.predictions)
    if output:
        Path(output).write_text(lines)
    else:
        sys.stdout.write(lines)
    click.echo(json.dumps({"backend": runtime.backend_name, "device": runtime.device, **result.summary()}), err=True)
