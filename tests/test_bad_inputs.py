"""Every kind of bad input in `tinyonn.testing.bad_inputs` gives its one-line error (or, a bad
data line under `--skip-bad`, is skipped and counted), with no traceback and nothing lost."""

from __future__ import annotations

import pytest

from tinyonn.testing.bad_inputs import CATALOGUE, kinds, make_fixtures, run_entry


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("bad_input_fixtures"))


def test_the_catalogue_covers_at_least_30_kinds_across_every_area():
    assert kinds() == len(CATALOGUE) >= 30
    assert {entry.area for entry in CATALOGUE} >= {"data", "teacher", "config", "flags", "paths", "checkpoints"}


@pytest.mark.parametrize("entry", CATALOGUE, ids=[entry.name for entry in CATALOGUE])
def test_bad_input_gives_one_clear_error(entry, fixtures, tmp_path):
    outcome = run_entry(entry, tmp_path, fixtures)
    assert outcome.ok, f"{entry.name}: {outcome.problems} (argv {' '.join(outcome.argv)})"
    assert outcome.exit_code == entry.exit_code


SKIPPABLE = [entry for entry in CATALOGUE if entry.skip_bad is not None]


@pytest.mark.parametrize("entry", SKIPPABLE, ids=[entry.name for entry in SKIPPABLE])
def test_skip_bad_skips_and_counts_a_bad_line(entry, fixtures, tmp_path):
    outcome = run_entry(entry, tmp_path, fixtures, skip_bad=True)
    assert outcome.ok, f"{entry.name} --skip-bad: {outcome.problems}"
    from tinyonn.store import ScoreStore

    assert ScoreStore.open(tmp_path / "runs" / "r" / "scores.zarr").n_samples == 3  # the three good lines
