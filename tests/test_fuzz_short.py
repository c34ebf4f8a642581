"""scripts/fuzz.py, short: ~1,500 mutated inputs per target against the real programs.

The full run (100,000 per target) is ``python3 scripts/fuzz.py``; this one runs the same
code in-process with fewer inputs, so every test run fuzzes a little.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import Keys

# scripts/ is not a package: mypy (pyproject "files") knows scripts/fuzz.py as "fuzz".
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fuzz

ITERATIONS = 1500


def test_short_fuzz_run_leaves_both_programs_healthy(keys: Keys, tmp_path: Path) -> None:
    options = fuzz.Options(iterations=ITERATIONS, threads=16, keys_dir=keys.dir, workdir=tmp_path)
    report = fuzz.run(options)
    assert report.ok, "\n".join([report.table(), *report.problems])
    assert [row.name for row in report.rows] == [
        "server.py",
        "local.py (auth off)",
        "local.py (auth on)",
    ]
    assert report.rows[0].inputs == ITERATIONS  # the server's handshake front
    assert report.rows[1].inputs + report.rows[2].inputs == ITERATIONS  # the local front
    for row in report.rows:
        assert row.inputs > 0 and row.closed == row.inputs, row
        assert row.max_close <= fuzz.HANDSHAKE_TIMEOUT + fuzz.CLOSE_GRACE
        assert (row.crashes, row.tracebacks) == (0, 0)


def test_inputs_depend_only_on_seed_front_and_index() -> None:
    """Reproducible whatever the thread scheduling; and the mutations really vary."""
    seeds = fuzz.socks_seeds("a", 1080, 1081, None) + fuzz.http_seeds("a", 1080, 1081, None)
    first = [fuzz.make_input(7, "local", index, seeds) for index in range(300)]
    again = [fuzz.make_input(7, "local", index, seeds) for index in reversed(range(300))]
    assert first == again[::-1]
    other = [fuzz.make_input(8, "local", index, seeds) for index in range(300)]
    assert first != other
    mutated = {item.data for item in first} - {seed.data for seed in seeds}
    assert len(mutated) > 250
    steps = " ".join(item.how for item in first)
    for name, _, _ in fuzz.MUTATORS:
        assert name in steps
    assert 0.1 < sum(item.keep_open for item in first) / len(first) < 0.4
