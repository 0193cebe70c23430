"""`locbe bench` plumbing: the peak-memory probe, result loading and the comparison table."""

from __future__ import annotations

import json
import sys

import pytest

from locbe import bench

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux only)")


@linux_glibc
@pytest.mark.parametrize("mb", [16, 64])
def test_measure_peak_sees_a_known_allocation(mb):
    import numpy as np

    def allocate():
        a = np.ones(mb * 2**20 // 8)  # touched, so resident
        return float(a[-1])

    result, peak = bench.measure_peak(allocate)
    assert result == 1.0
    # the array itself, give or take: memory the interpreter frees during the call (measured 0.2-0.3 MB
    # less than the array) and allocator / interpreter overhead (a few MB at most)
    assert (mb - 1) * 2**20 <= peak < (mb + 8) * 2**20, peak / 2**20


@linux_glibc
def test_measure_peak_ignores_memory_alive_before_the_call():
    import numpy as np

    held = np.ones(64 * 2**20 // 8)
    _, peak = bench.measure_peak(lambda: float(held.sum()))
    assert peak < 8 * 2**20, peak / 2**20


def _write_results(path, means, extra=None):
    data = {"benchmarks": [{"fullname": f"benchmarks/test_x.py::{name}",
                            "stats": {"mean": m, "min": m, "rounds": 1},
                            "extra_info": (extra or {}).get(name, {})} for name, m in means.items()]}
    path.write_text(json.dumps(data))
    return path


def test_table_compares_with_the_previous_run(tmp_path):
    prev = bench.load_results(_write_results(tmp_path / "step-1.json", {"test_a": 2.0, "test_gone": 1.0}))
    cur = bench.load_results(_write_results(tmp_path / "step-2.json", {"test_a": 1.0, "test_new": 3.0},
                                            {"test_a": {"speedup_vs_plain": 1.25, "ignored_key": 7}}))
    assert cur["test_a"]["speedup_vs_plain"] == 1.25
    text = bench.table(cur, prev)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert set(lines) == {"test_a", "test_new"}
    assert "2.00x" in lines["test_a"] and "1.25" in lines["test_a"]
    assert "ignored_key" not in text and "x" not in lines["test_new"].split("|")[-2]


def test_show_prints_the_latest_saved_results(tmp_path, capsys):
    _write_results(tmp_path / "par-20260101T000000Z.json", {"test_old": 9.0})
    _write_results(tmp_path / "par-20260102T000000Z.json", {"test_latest": 4.5})
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--suite", "par", "--show", "--out", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert "test_latest" in out and "compared with par-20260101T000000Z.json" in out
    assert (tmp_path / "par.md").read_text().count("test_latest") == 1
