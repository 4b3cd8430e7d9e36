"""Auto-converge follows QEMU 7.2's throttle rule."""

from qmigx.autoconverge import AutoConverge

KW = dict(threshold_pct=50, initial=20, increment=10, maximum=99)


def test_needs_two_high_periods_then_starts_at_initial():
    ac = AutoConverge()
    assert not ac.update(100, 60, **KW) and ac.percentage == 0
    assert ac.update(100, 60, **KW) and ac.percentage == 20


def test_increments_and_caps():
    ac = AutoConverge()
    for _ in range(2):
        ac.update(100, 90, **KW)
    steps = []
    for _ in range(20):
        ac.update(100, 90, **KW)
        ac.update(100, 90, **KW)
        steps.append(ac.percentage)
    assert steps[:3] == [30, 40, 50] and max(steps) == 99


def test_low_dirty_rate_never_throttles():
    ac = AutoConverge()
    for _ in range(10):
        assert not ac.update(100, 50, **KW)
    assert ac.percentage == 0


def test_tailslow_takes_smaller_steps():
    a, b = AutoConverge(), AutoConverge()
    for ac, tail in ((a, False), (b, True)):
        for _ in range(4):
            ac.update(100, 52, tailslow=tail, **KW)
    assert a.percentage == 30 and b.percentage < 30
