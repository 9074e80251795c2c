"""bench/coverage.py and `python -m bench --ops family` run end to end on one small model."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import __main__ as bench_main  # noqa: E402
from bench import coverage  # noqa: E402

import resnet_fused as rf  # noqa: E402

pytest.importorskip("timm")


def test_coverage_script(tmp_path):
    assert coverage.main(["--models", "timm/skresnet18", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "coverage.json").read_text())
    assert rows[0]["model"] == "timm/skresnet18" and rows[0]["fused_eval"] == rows[0]["bn_layers"] == 36
    assert "| timm/skresnet18 | 36 | 36 (100%) | 36 (100%) |" in (tmp_path / "coverage.md").read_text()


def test_family_rows(tmp_path):
    status = bench_main.main(["--quick", "--ops", "family", "--family-models", "timm/resnet18", "--device", "cpu",
                              "--image-size", "32", "--min-run-time", "0.01", "--out", str(tmp_path)])
    assert status == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    low_memory = {("family.train_step", "fused+low_memory", "ok")} if "cpu" in rf.available_backends() else set()
    assert {(r["op"], r["provider"], r["status"]) for r in rows} == {
        (op, provider, "ok") for op in ("family.inference", "family.train_step") for provider in ("eager", "fused")
    } | low_memory
