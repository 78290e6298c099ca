"""ExportOptions check themselves when built, torch-free, and pcee-export leaves every check to them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcee.exporter.cli import main as export_cli
from pcee.exporter.errors import ExportError, OpsetError
from pcee.exporter.options import DEFAULT_MIN_AGREEMENT, ExportOptions


@pytest.mark.parametrize(
    "options, says",
    [
        (dict(opset=13), "--opset 13 is not supported; pcee-export writes opsets 14 to 20"),
        (dict(opset="17"), "--opset 17 is not supported"),
        (dict(max_batch_size=0), "--max-batch-size 0 must be a whole number of at least 1"),
        (dict(max_seq_len=-4), "--max-seq-len -4 must be a whole number of at least 1"),
        (dict(task_type="pairs"), "--task-type 'pairs' is not one of single_sentence, sentence_pair"),
        (dict(fp16="yes"), "--fp16 is 'yes'; expected True or False"),
        (dict(quantize="int4"), "--quantize 'int4' is not one of int8"),
        (dict(quantize="int8", tensorrt=True), "does not combine with --fp16 or --tensorrt"),
        (dict(quantize="int8", min_agreement=1.5), "--min-agreement 1.5 must be a number between 0 and 1"),
        (dict(parity_data="rows.tsv"), "add --quantize int8, or drop --parity-data"),
        (
            dict(quantize="int8", parity_data="no/such/rows.tsv"),
            "--parity-data no/such/rows.tsv: no such file",
        ),
    ],
)
def test_bad_options_fail_when_built_naming_the_option_and_value(options, says):
    with pytest.raises(ExportError, match=says.replace("(", r"\(")):
        ExportOptions(**options)


def test_an_unsupported_opset_is_an_opset_error():
    with pytest.raises(OpsetError):
        ExportOptions(opset=21)


def test_defaults_and_derived_settings():
    options = ExportOptions()
    assert options.min_agreement == DEFAULT_MIN_AGREEMENT and options.fuses and options.precision == "fp32"
    assert ExportOptions(fp16=True).parity_tolerance > options.parity_tolerance
    assert ExportOptions(quantize="int8", parity_data=".").parity_data == Path(".")


def test_the_options_module_loads_no_torch():
    code = "import sys, pcee.exporter.options; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "arguments, says",
    [
        (["--max-batch-size", "0"], "--max-batch-size 0 must be a whole number of at least 1"),
        (
            ["--min-agreement", "2", "--quantize", "int8"],
            "--min-agreement 2.0 must be a number between 0 and 1",
        ),
        (["--quantize", "int4"], "--quantize 'int4' is not one of int8"),
    ],
)
def test_the_cli_reports_the_options_own_errors_in_one_line(tmp_path, arguments, says):
    result = CliRunner().invoke(export_cli, [str(tmp_path / "never-read"), *arguments])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {says}") and result.output.count("\n") == 1
