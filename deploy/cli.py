"""`pcee-triton BUNDLE_DIR --repository DIR`: the bundle as a model in a Triton model repository."""

from __future__ import annotations

import json
import sys

import click

from pcee.runtime import BACKEND_NAMES, PceeError

from .repository import KINDS, TritonOptions, TritonRepository, write_triton_repository

EPILOG = """\b
Examples:
  pcee-triton runs/demo/sst2-pcee --repository runs/demo/triton
  pcee-triton runs/demo/sst2-pcee --repository runs/demo/triton --model-name sst2-wide \\
      --operating-point default --max-batch-size 64 --preferred-batch-size 16 --instances 2

\b
What it writes:
  DIR/NAME/config.pbtxt       Python backend, dynamic batching, instance group, default point
  DIR/NAME/1/model.py         the Triton model: imports pcee.runtime, runs each batch as one runtime call
  DIR/NAME/1/bundle/          the bundle's manifest and every file it lists, hashes checked

\b
Requests: inputs "text" (and "text_pair" for pair bundles), TYPE_STRING, shape [rows, 1]; outputs
"label", "probabilities" [rows, labels], "exit_layer". A request picks a saved point with the
request parameter "operating_point". Custom metrics: pcee_rows_total{exit_layer} and
pcee_layers_total{kind="run"|"possible"} on Triton's metrics port.

\b
Serve it on a CPU with the tritonserver binary of the nvidia-pytriton wheel (docs/TRITON.md):
  bash deploy/triton-env.sh
  .triton-venv/bin/tritonserver --model-repository runs/demo/triton
"""


@click.command(
    epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--repository",
    required=True,
    type=click.Path(file_okay=False, path_type=str),
    help="The Triton model repository (created if missing); the model goes in DIR/NAME.",
)
@click.option("--model-name", help="The model's name in Triton.  [default: the bundle's task]")
@click.option(
    "--max-batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most rows one model call runs (the dynamic batcher adds up the requests' rows).",
)
@click.option(
    "--max-queue-delay-us",
    default=2000,
    show_default=True,
    type=click.IntRange(min=0),
    help="How long the dynamic batcher waits for more requests before it runs a batch (microseconds).",
)
@click.option(
    "--preferred-batch-size",
    "preferred_batch_sizes",
    multiple=True,
    type=click.IntRange(min=1),
    help="A batch size the batcher runs as soon as it has it queued (repeat for several).",
)
@click.option(
    "--instances",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Model instances (processes).",
)
@click.option(
    "--kind",
    default="cpu",
    show_default=True,
    type=click.Choice(sorted(KINDS)),
    help="Where the instances run; on gpu the runtime uses TensorRT engines or onnxruntime CUDA.",
)
@click.option(
    "--runtime-backend",
    type=click.Choice(BACKEND_NAMES),
    help="The pcee runtime backend.  [default: onnxruntime-cpu on cpu, auto on gpu]",
)
@click.option(
    "--operating-point",
    help="The saved point served when a request names none.  [default: the manifest's]",
)
@click.option(
    "--intra-op-threads",
    type=click.IntRange(min=1),
    help="onnxruntime threads per graph session.  [default: one per core]",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def main(bundle_dir: str, repository: str, as_json: bool, preferred_batch_sizes: tuple[int, ...], **options):
    """Write a Triton Inference Server model repository entry that serves BUNDLE_DIR with early exit.

    The model runs the pcee runtime inside Triton's Python backend: every request the dynamic
    batcher hands over in one call runs as one early-exit batch, and each request gets its own
    answer or its own error. An earlier pcee-triton entry of the same name is replaced.
    """
    try:
        written = write_triton_repository(
            bundle_dir, repository, TritonOptions(preferred_batch_sizes=preferred_batch_sizes, **options)
        )
    except PceeError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    click.echo(json.dumps(written.to_dict()) if as_json else summary(written))


def summary(written: TritonRepository) -> str:
    return "\n".join(
        [
            f"wrote {written.model_dir} (model {written.model_name!r})",
            f"  inputs {written.inputs}, {written.num_labels} labels, default point {written.operating_point!r}",
            f"  saved points a request may name (parameter operating_point): {written.saved_points}",
            f"serve it: .triton-venv/bin/tritonserver --model-repository {written.repository}",
        ]
    )
