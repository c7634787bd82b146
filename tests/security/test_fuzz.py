"""Property tests over hostile model cards and recipes: no code executed, no traceback (issue 19).

A few hundred examples per run; ``benchmarks/fuzz.py`` runs the same probe over thousands.
"""

import pytest
from hypothesis import HealthCheck, given, settings

from .hostile import MARKER, make_bases, mutated_cards, probe


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, make_bases(root)


@pytest.mark.parametrize("under", [None, "recipe"])
def test_hostile_cards_never_run_code_nor_crash(bases, tmp_path_factory, under):
    root, dirs = bases
    work = tmp_path_factory.mktemp("work")
    seen: dict[str, int] = {}

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated_cards(dirs, root, under))
    def check(case):
        name, text = case
        outcome = probe(dirs[name], text, work, root / MARKER)
        seen[outcome.split(":")[0]] = seen.get(outcome.split(":")[0], 0) + 1
        assert outcome in ("loaded", "refused"), (name, text[:300], outcome)

    check()
    assert seen.get("refused", 0) > 30  # the mutations do reach the checks (not all harmless)
