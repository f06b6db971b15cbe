"""The hostile-input corpus (tests/hostile.py) through kdray.images.load_image, each case in its own child under
an address-space limit: every bomb refused with its reason code before it costs memory or CPU, every valid
heavy image decoded within the estimate its budget admitted."""

from __future__ import annotations

import pytest

import hostile
from kdray.images import REASONS

pytestmark = pytest.mark.unit

LIMITS = "serving"  # the tighter budget; bench/hostile.py runs both
#: A refusal happens before any decode: what it may cost is reading the file (pydicom holds it twice) and the
#: bounded steps of inflating a deflated DICOM (16 MiB at a time).
REFUSAL_OVERHEAD_BYTES = 48 * hostile.MiB
REFUSAL_CPU_S = 2.0
DECODE_CPU_S = 10.0


@pytest.fixture(scope="module")
def outcomes() -> dict[str, hostile.Outcome]:
    return {o.case: o for o in hostile.run(limits=LIMITS)}


def test_every_case_has_an_outcome_and_a_known_expectation(outcomes):
    assert set(outcomes) == set(hostile.BY_NAME)
    for case in hostile.CASES:
        assert set(case.expect) == set(hostile.BOTH)
        assert all(reason == hostile.OK or reason in REASONS for reason in case.expect.values()), case.name


@pytest.mark.parametrize("case", hostile.CASES, ids=lambda case: case.name)
def test_case_is_refused_or_decoded_within_its_bounds(case, outcomes):
    outcome = outcomes[case.name]
    expected = case.expect[LIMITS]
    assert (outcome.outcome, outcome.reason) == ("ok" if expected == hostile.OK else "refused", expected), \
        f"{case.name} ({case.attack}): {outcome.outcome} {outcome.reason} {outcome.message}"
    limits = hostile.limits_named(LIMITS)
    if expected == hostile.OK:
        assert 0 < outcome.estimate_bytes <= limits.max_decode_bytes
        assert outcome.peak_rss_bytes <= outcome.estimate_bytes, \
            f"{case.name}: peak {outcome.peak_rss_bytes:,} B over the budget's estimate {outcome.estimate_bytes:,} B"
        assert outcome.cpu_s <= DECODE_CPU_S
    else:
        assert outcome.peak_rss_bytes <= 2 * outcome.file_bytes + REFUSAL_OVERHEAD_BYTES, \
            f"{case.name}: refused, but only after {outcome.peak_rss_bytes:,} B"
        assert outcome.cpu_s <= REFUSAL_CPU_S
        assert "\n" not in outcome.message and "Hostile" not in outcome.message  # one line, no patient name


def test_the_harness_catches_a_bomb_that_is_not_refused():
    """The address-space limit and the peak measurement work: with the budget lifted, a real bomb is decoded and
    costs what the table says, measured here, rather than the test passing vacuously."""
    bomb = hostile.run(["png_gray16_6000"], limits="scoring")[0]
    assert bomb.outcome == "ok" and bomb.peak_rss_bytes > 400 * hostile.MiB
