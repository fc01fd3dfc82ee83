"""`inferno bench` against the real daemon and model, run in-process through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infernod.cli import app as cli
from infernod.cli import bench

RUN_KEYS = {"clients", "aggregate_tokens_per_s", "per_client_tokens_per_s", "ttft_ms", "itl_ms",
            "e2e_ms", "requests", "tokens", "errors"}


def test_bench_json_html_and_baseline(daemon, tmp_path, capsys):
    out, page = tmp_path / "out.json", tmp_path / "out.html"
    args = ["--endpoint", daemon.endpoint, "--timeout", "30", "bench", "--clients", "1,2",
            "--max-tokens", "8", "--requests-per-client", "2"]
    assert cli.main([*args, "--json", str(out), "--html", str(page)]) == 0
    report = json.loads(out.read_text())
    assert {"runs", "model", "machine", "date", "version"} <= set(report)
    assert set(report["machine"]) >= {"cpu", "cores", "ram", "gpu"}
    assert report["machine"]["gpu"] is None and report["machine"]["cores"] >= 1
    assert [r["clients"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert RUN_KEYS <= set(run)
        assert run["errors"] == 0
        assert run["requests"] == 2 * run["clients"]
        assert run["tokens"] == 8 * run["requests"]  # greedy, ignore_eos: fixed work
        assert run["aggregate_tokens_per_s"] > 0 and run["per_client_tokens_per_s"] > 0
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            p = run[key]
            assert 0 < p["p50"] <= p["p95"] <= p["p99"], key
        assert run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
    doc = page.read_text()
    assert "<svg" in doc and "Time to first token" in doc
    assert "<script" not in doc and "http://" not in doc.replace('xmlns="http://www.w3.org', "")
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "tok/s" in printed

    # A baseline that was much faster: the run is flagged and the exit code says so.
    inflated = json.loads(out.read_text())
    for run in inflated["runs"]:
        run["aggregate_tokens_per_s"] *= 100
        run["ttft_ms"]["p50"] /= 100
    base = tmp_path / "base.json"
    base.write_text(json.dumps(inflated))
    code = cli.main([*args, "--clients", "1", "--baseline", str(base), "--json", str(out)])
    assert code == 1
    printed = capsys.readouterr().out
    assert "REGRESSION" in printed and "aggregate_tokens_per_s" in printed
    assert "ttft_ms.p50" in printed
    flagged = json.loads(out.read_text())["baseline"]["regressions"]
    assert {g["metric"] for g in flagged} >= {"aggregate_tokens_per_s", "ttft_ms.p50"}


def test_compare_threshold_and_direction():
    def report(tps: float, ttft: float, itl: float) -> dict:
        return {"runs": [{"clients": 4, "aggregate_tokens_per_s": tps,
                          "ttft_ms": {"p50": ttft}, "itl_ms": {"p50": itl}}]}

    base = report(100.0, 50.0, 10.0)
    assert bench.compare(report(95.0, 54.0, 10.9), base, 10.0) == []  # within 10 %
    assert bench.compare(report(200.0, 10.0, 5.0), base, 10.0) == []  # better is fine
    found = bench.compare(report(80.0, 60.0, 12.0), base, 10.0)
    assert {(g["metric"], g["change_pct"]) for g in found} == {
        ("aggregate_tokens_per_s", -20.0), ("ttft_ms.p50", 20.0), ("itl_ms.p50", 20.0)}
    assert bench.compare(report(80.0, 60.0, 12.0), base, 25.0) == []
    assert bench.compare({"runs": [{"clients": 8, "aggregate_tokens_per_s": 1.0}]}, base,
                         10.0) == []  # no matching level: nothing to compare


def test_percentiles_match_numpy():
    import numpy as np

    rng = np.random.default_rng(5)
    data = list(rng.exponential(20.0, 501))
    got = bench.percentiles(data)
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        assert got[name] == pytest.approx(float(np.percentile(data, q)), abs=1e-3)
    assert bench.percentiles([]) == {"p50": None, "p95": None, "p99": None}


def test_compare_skips_absent_binaries_and_measures_gaps_and_process_trees(tmp_path):
    """bench/compare.py: a side whose binary is missing is skipped with a reason; the stall
    metric is the longest gap after the long prompt was sent; RSS sums a process tree."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import compare

    skipped = compare.missing_binaries(tmp_path)
    assert set(skipped) == {"llama-server", "llama-bench"}
    assert all("--build-llama" in why for why in skipped.values())
    for name in ("llama-server", "llama-bench"):
        (tmp_path / name).write_text("")
    assert compare.missing_binaries(tmp_path) == {}

    assert compare.max_gap([0.0, 0.1, 1.6, 1.7, 1.75]) == pytest.approx(1.5)
    assert compare.max_gap([0.0, 0.1, 1.6, 1.7, 1.75], since=1.65) == pytest.approx(0.1)
    assert compare.max_gap([0.0]) == 0.0

    me = compare.process_rss_bytes(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for _ in range(100):  # bounded: the child's interpreter needs a moment to map itself
            if compare.tree_rss_bytes(os.getpid()) > me + (1 << 20):
                break
            time.sleep(0.05)
        assert compare.tree_rss_bytes(os.getpid()) > me + (1 << 20)
    finally:
        child.kill()
        child.wait(10)


def test_compare_variants_and_percentiles():
    """bench/compare.py --variant NAME:KEY=VALUE,...: typed values, sections (bare keys are
    models.*), env for another checkout, lists kept whole; p90/p99 by rank."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import compare

    name, v = compare.parse_variant(
        'nice0:runner_nice=0,runner_sched=batch,daemon.log_level=debug,'
        'runner_wrapper=["taskset","-c","0"],env.PYTHONPATH=/tmp/old,swa_full=true')
    assert name == "nice0"
    assert v == {"models": {"runner_nice": 0, "runner_sched": "batch",
                            "runner_wrapper": ["taskset", "-c", "0"], "swa_full": True},
                 "daemon": {"log_level": "debug"}, "env": {"PYTHONPATH": "/tmp/old"}}
    with pytest.raises(SystemExit):
        compare.parse_variant("bad:runner_nice")
    xs = [float(i) for i in range(1, 101)]
    assert compare.pct(xs, 0.9) == 90.0 and compare.p99(xs) == 99.0
