"""The measuring tools stay usable: benchmarks/switches.py (the in-process A/B of the CUDA
kernels' switches) on a small shape, on every device of the suite. On CUDA this also checks
that the row passes with and without CAPSROUTE_ROW_DIRECT (unset: the staged form) give the
same results; the CPU kernels read no switch, so there the two settings agree exactly.
scripts/host_autograd_cxx.py builds its C++ autograd prototype and gets the functions'
gradients from it, bit for bit, before it times anything. benchmarks/ratios.py says which of
the issues' targets its table meets."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

from conftest import DEVICES

for folder in ("benchmarks", "scripts"):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, folder))
import host_autograd_cxx  # noqa: E402
import ratios  # noqa: E402
import switches  # noqa: E402


@pytest.mark.parametrize("device", DEVICES)
def test_switches_times_each_setting_after_checking_it(device, capsys, monkeypatch):
    monkeypatch.setenv("CAPSROUTE_ROW_DIRECT", "0")  # the tool must leave it as it found it
    argv = ["CAPSROUTE_ROW_DIRECT=1,-", "--device", device, "--batch", "20", "--in-caps", "24",
            "--rounds", "2", "--repeats", "2", "--warmup", "1"]
    if device == "cuda":
        argv += ["--kernels", "--kernel-calls", "2"]
    assert switches.main(argv) == 0
    out = capsys.readouterr().out
    assert os.environ["CAPSROUTE_ROW_DIRECT"] == "0"

    checks = re.findall(r"check: CAPSROUTE_ROW_DIRECT=- against CAPSROUTE_ROW_DIRECT=1: "
                        r"relative error v (\S+), grad_u (\S+), grad_W (\S+)", out)
    assert len(checks) == 1
    errors = [float(x) for x in checks[0]]
    assert max(errors) < (1e-5 if device == "cuda" else 1e-300), out
    rows = [line for line in out.splitlines() if line.startswith("CAPSROUTE_ROW_DIRECT=")]
    assert len(rows) == 2 and rows[1].rstrip().endswith("x"), out
    if device == "cuda":
        assert "row_pass_kernel" in out and "total" in out, out


def test_switches_leaves_out_a_setting_that_fails(capsys, monkeypatch):
    """A setting whose call raises (on a GPU: a launch it refuses) is said and left out; the
    others are still checked and timed."""
    real = switches.results

    def results(*args):
        if os.environ.get("CAPSROUTE_ROW_DIRECT") == "1":
            raise RuntimeError("CUDA error: cluster misconfiguration\nmore")
        return real(*args)

    monkeypatch.setattr(switches, "results", results)
    argv = ["CAPSROUTE_ROW_DIRECT=1,-,0", "--device", "cpu", "--batch", "4", "--in-caps", "6",
            "--rounds", "1", "--repeats", "1", "--warmup", "0"]
    assert switches.main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped: CAPSROUTE_ROW_DIRECT=1: CUDA error: cluster misconfiguration\n" in out, out
    assert "check: CAPSROUTE_ROW_DIRECT=0 against CAPSROUTE_ROW_DIRECT=-:" in out, out
    rows = [line for line in out.splitlines() if line.startswith("CAPSROUTE_ROW_DIRECT=")]
    assert [r.split()[0] for r in rows] == ["CAPSROUTE_ROW_DIRECT=-", "CAPSROUTE_ROW_DIRECT=0"]


def test_switches_refuses_what_is_not_a_switch():
    with pytest.raises(SystemExit):
        switches.parse_args(["ROW_DIRECT=0,1"])
    with pytest.raises(SystemExit):
        switches.parse_args(["CAPSROUTE_ROW_DIRECT"])
    assert switches.main(["CAPSROUTE_ROW_DIRECT=0", "CAPSROUTE_ROW_DIRECT=1",
                          "--device", "cpu"]) == 2


def test_host_autograd_prototype_matches_the_functions(capsys):
    """The prototype's gradients equal the functions' (asserted inside, bit for bit), and both
    forms are timed. On the CPU only: the GPU session runs it on the GPU."""
    host_autograd_cxx.main(["--device", "cpu", "--batch", "1", "2", "--in-caps", "24",
                            "--out-caps", "5", "--calls", "1"])
    out = capsys.readouterr().out
    assert len(re.findall(r"forward\+backward +\d+\.\d us", out)) == 4, out


def test_ratios_checks_the_targets_of_the_rows_it_made():
    """Each target is met, not met, or not measured (a time the run could not take), from the
    rows' own times; targets of rows or baselines the run did not make are left out."""
    fp32 = ratios.Row("B=128 fp32", "cuda",
                      times_ms={"fwd/fused": 0.1, "fwd/eager": 3.0, "fwd/compile": 0.5,
                                "fwd+bwd/fused": None, "fwd+bwd/eager": 3.0, "fwd+bwd/compile": 1.6},
                      peak_mib={"fused": 40.0, "eager": 500.0})
    bf16 = ratios.Row("B=128 bf16", "cuda", times_ms={"fwd/fused": 0.1001, "fwd+bwd/fused": 0.3})
    scale = ratios.Row(ratios.SCALE, "cuda", times_ms={"fwd+bwd/fused": 30.0, "fwd+bwd/compile": 160.0},
                       peak_mib={"fused": 2900.0})
    checks = {what: (measured, met) for what, measured, met in
              ratios.target_checks([fp32, bf16, scale], "cuda", ["eager", "compile"])}
    assert checks == {
        "B=128 fp32 fwd: >= 25x eager": ("30.0x", True),
        "B=128 fp32 fwd: >= 10x compile": ("5.0x", False),
        "B=128 fp32 fwd+bwd: >= 15x eager": ("-", None),
        "B=128 fp32 fwd+bwd: >= 8x compile": ("-", None),
        f"{ratios.SCALE} fwd+bwd: >= 5x compile": ("5.3x", True),
        "B=128 bf16 fwd: fused no slower than fp32": ("0.100 vs 0.100 ms", False),
        "B=128 bf16 fwd+bwd: fused no slower than fp32": ("-", None),
        "B=128 fp32 fwd+bwd: peak extra memory <= 1/10 of eager's": ("40 vs 500 MiB", True),
        f"{ratios.SCALE} fwd+bwd: peak extra memory <= 3 GB": ("2900 MiB", False),
    }
    cpu = ratios.Row("B=32 fp32", "cpu", times_ms={"fwd/fused": 10.0, "fwd/eager": 120.0,
                                                   "fwd+bwd/fused": 40.0, "fwd+bwd/eager": 190.0})
    assert ratios.target_checks([cpu], "cpu", ["eager"]) == [
        ("B=32 fp32 fwd: >= 10x eager", "12.0x", True),
        ("B=32 fp32 fwd+bwd: >= 5x eager", "4.8x", False)]


def test_ratios_times_route_on_given_predictions(tmp_path, capsys):
    """--op route times capsroute.route against reference.route on predictions made once,
    after checking that the two agree; issue 3 sets no target on route, so none is listed."""
    out_json = tmp_path / "route.json"
    assert ratios.main(["--device", "cpu", "--op", "route", "--batch", "3", "--in-caps", "6",
                        "--out-caps", "4", "--no-compile", "--repeats", "1", "--warmup", "0",
                        "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    (row,) = data["rows"]
    assert row["config"] == "route B=3 N_in=6 D_in=8 N_out=4 D_out=16 fp32"
    assert row["rel_err"] < 1e-5
    assert all(row["times_ms"][f"{p}/{n}"] > 0 for p in ("fwd", "fwd+bwd")
               for n in ("fused", "eager")), row
    assert row["saved_mib"]["fused"] < row["saved_mib"]["eager"], row
    assert data["targets"] == [] and "targets (" not in out, out
    assert ratios.SUITES["gpu"][-1] == ratios.Config(B=128, op="route")
