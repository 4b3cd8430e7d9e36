"""Tests for the control plane (qmigx.control): states, capabilities,
parameters, query-migrate and events, against QEMU 7.2's behaviour.

Expected texts and reply layouts below were observed on a real QEMU 7.2
(see test_control_qemu.py for the live cross-check).
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx.control import (
    CAPABILITIES,
    DEFAULTS,
    DESTINATION,
    SOURCE,
    TRANSITION_TABLE,
    TRANSITIONS,
    Capabilities,
    DirtyRatePeriod,
    InternalProperties,
    MigrationCapability,
    MigrationEvents,
    MigrationStats,
    MigrationStatus,
    Parameters,
    RateWindow,
    StateMachine,
    WriteTracking,
    is_allowed,
    query_migrate,
)
from qmigx.control._qdict import qdict_keys
from qmigx.errors import CapabilityError, MigrationError, ParameterError, StateError

S = MigrationStatus
ALL_STATES = list(MigrationStatus)
SIDES = (SOURCE, DESTINATION)

# ---------------------------------------------------------------------------
# states
# ---------------------------------------------------------------------------

QAPI_STATUS = ["none", "setup", "cancelling", "cancelled", "active", "postcopy-active",
               "postcopy-paused", "postcopy-recover", "completed", "failed", "colo",
               "pre-switchover", "device", "wait-unplug"]


def test_status_names_and_qapi_index():
    assert [s.value for s in MigrationStatus] == QAPI_STATUS
    for i, name in enumerate(QAPI_STATUS):
        assert S(name).index == i
        assert S.from_index(i) is S(name)
    with pytest.raises(StateError):
        S.from_index(14)
    with pytest.raises(StateError):
        S.parse("paused")


# Pairs the spec names explicitly (control.md §1.1/§1.2), as a cross-check of the table.
SPEC_PAIRS = [
    (SOURCE, "none", "setup"), (SOURCE, "completed", "setup"), (SOURCE, "failed", "setup"),
    (SOURCE, "cancelled", "setup"), (SOURCE, "setup", "failed"), (SOURCE, "setup", "active"),
    (SOURCE, "setup", "wait-unplug"), (SOURCE, "wait-unplug", "active"),
    (SOURCE, "active", "pre-switchover"), (SOURCE, "pre-switchover", "device"),
    (SOURCE, "pre-switchover", "postcopy-active"), (SOURCE, "active", "postcopy-active"),
    (SOURCE, "active", "completed"), (SOURCE, "device", "completed"), (SOURCE, "active", "colo"),
    (SOURCE, "colo", "completed"), (SOURCE, "postcopy-active", "completed"),
    (SOURCE, "postcopy-active", "postcopy-paused"), (SOURCE, "postcopy-paused", "postcopy-recover"),
    (SOURCE, "postcopy-recover", "postcopy-active"), (SOURCE, "cancelling", "cancelled"),
    *[(SOURCE, f, "cancelling") for f in ("setup", "active", "postcopy-active", "postcopy-paused",
                                          "postcopy-recover", "pre-switchover", "device", "wait-unplug")],
    *[(SOURCE, f, "failed") for f in ("active", "device", "postcopy-active", "setup", "pre-switchover")],
    (DESTINATION, "none", "active"), (DESTINATION, "active", "completed"),
    (DESTINATION, "active", "failed"), (DESTINATION, "active", "postcopy-active"),
    (DESTINATION, "postcopy-active", "completed"), (DESTINATION, "postcopy-active", "failed"),
    (DESTINATION, "postcopy-active", "postcopy-paused"),
    (DESTINATION, "postcopy-paused", "postcopy-recover"),
    (DESTINATION, "postcopy-recover", "postcopy-active"), (DESTINATION, "active", "colo"),
    (DESTINATION, "colo", "completed"),
]

# Pairs that must never be allowed.
FORBIDDEN_PAIRS = [
    (SOURCE, "none", "active"), (SOURCE, "colo", "cancelling"), (SOURCE, "cancelled", "active"),
    (SOURCE, "completed", "failed"), (SOURCE, "failed", "completed"), (SOURCE, "active", "active"),
    (SOURCE, "cancelling", "failed"), (SOURCE, "wait-unplug", "completed"),
    (DESTINATION, "none", "setup"), (DESTINATION, "completed", "setup"), (DESTINATION, "active", "cancelling"),
    (DESTINATION, "active", "pre-switchover"), (DESTINATION, "postcopy-paused", "failed"),
]


@pytest.mark.parametrize("side,old,new", SPEC_PAIRS)
def test_spec_transitions_are_in_table(side, old, new):
    assert is_allowed(side, old, new)


@pytest.mark.parametrize("side,old,new", FORBIDDEN_PAIRS)
def test_forbidden_transitions_are_not_in_table(side, old, new):
    assert not is_allowed(side, old, new)
    sm = StateMachine(side, old)
    with pytest.raises(StateError) as ei:
        sm.transition(new)
    assert ei.value.field == "status"
    assert sm.state is S(old)


def test_table_index_matches_rows():
    triples = {(r.side, a, b) for r in TRANSITION_TABLE for a in r.sources for b in r.targets}
    derived = {(side, a, b) for (side, a), tos in TRANSITIONS.items() for b in tos}
    assert triples == derived
    assert all(r.trigger for r in TRANSITION_TABLE)


ALLOWED = sorted(((side, a.value, b.value) for (side, a), tos in TRANSITIONS.items() for b in tos))


@pytest.mark.parametrize("side,old,new", ALLOWED)
def test_every_allowed_transition_succeeds(side, old, new):
    sm = StateMachine(side, old)
    seen = []
    sm.add_listener(lambda o, n: seen.append((o, n)))
    assert sm.transition(new) is S(old)
    assert sm.state is S(new)
    assert seen == [(S(old), S(new))]


def test_every_pair_exhaustively():
    for side, old, new in itertools.product(SIDES, ALL_STATES, ALL_STATES):
        sm = StateMachine(side, old)
        calls = []
        sm.add_listener(lambda o, n: calls.append(n))
        if new in TRANSITIONS.get((side, old), ()):
            sm.transition(new)
            assert sm.state is new and calls == [new]
        else:
            with pytest.raises(StateError):
                sm.transition(new)
            assert sm.state is old and calls == []


@settings(max_examples=300, deadline=None)
@given(side=st.sampled_from(SIDES), start=st.sampled_from(ALL_STATES),
       steps=st.lists(st.sampled_from(ALL_STATES), max_size=12))
def test_random_walks(side, start, steps):
    sm = StateMachine(side, start)
    events = []
    sm.add_listener(lambda o, n: events.append((o, n)))
    expected = []
    for to in steps:
        before = sm.state
        if is_allowed(side, before, to):
            sm.transition(to)
            expected.append((before, to))
            assert sm.state is to
        else:
            with pytest.raises(StateError):
                sm.transition(to)
            assert sm.state is before
    assert events == expected


@settings(max_examples=200, deadline=None)
@given(side=st.sampled_from(SIDES), cur=st.sampled_from(ALL_STATES),
       old=st.sampled_from(ALL_STATES), new=st.sampled_from(ALL_STATES))
def test_try_transition_is_compare_and_swap(side, cur, old, new):
    sm = StateMachine(side, cur)
    if not is_allowed(side, old, new):
        with pytest.raises(StateError):
            sm.try_transition(old, new)
        assert sm.state is cur
    elif cur is old:
        assert sm.try_transition(old, new) is True
        assert sm.state is new
    else:
        assert sm.try_transition(old, new) is False
        assert sm.state is cur


def test_cancel_races_completion():
    sm = StateMachine(SOURCE, "active")
    assert sm.try_transition("active", "cancelling")
    # the completion path still believes it is active: its swap must not win
    assert sm.try_transition("active", "completed") is False
    assert sm.state is S.CANCELLING
    assert sm.try_transition(sm.state, "cancelled")


@pytest.mark.parametrize("old", ["none", "completed", "failed", "cancelled"])
def test_reset_for_new_migration(old):
    sm = StateMachine(SOURCE, old)
    seen = []
    sm.add_listener(lambda o, n: seen.append(n))
    assert sm.reset_for_new_migration() is S(old)
    assert sm.state is S.SETUP and seen == [S.SETUP]


@pytest.mark.parametrize("old", ["setup", "active", "cancelling", "postcopy-paused", "device",
                                 "wait-unplug", "pre-switchover"])
def test_reset_refused_while_running(old):
    sm = StateMachine(SOURCE, old)
    with pytest.raises(StateError, match="There's a migration process in progress"):
        sm.reset_for_new_migration()
    assert sm.state is S(old)


def test_reset_refused_in_colo_and_on_destination():
    with pytest.raises(StateError):
        StateMachine(SOURCE, "colo").reset_for_new_migration()
    sm = StateMachine(DESTINATION, "completed")
    with pytest.raises(StateError):
        sm.reset_for_new_migration()
    assert sm.state is S.COMPLETED


def test_predicates_match_qemu():
    running = {"active", "postcopy-active", "postcopy-paused", "postcopy-recover", "setup",
               "pre-switchover", "device", "wait-unplug", "cancelling"}
    setup_or_active = running - {"cancelling"} | {"colo"}
    idle = {"none", "cancelled", "completed", "failed"}
    for s in ALL_STATES:
        sm = StateMachine(SOURCE, s)
        assert sm.is_running() == (s.value in running)
        assert sm.is_setup_or_active() == (s.value in setup_or_active)
        assert sm.is_active() == (s.value in ("active", "postcopy-active"))
        assert sm.is_idle() == (s.value in idle)
        assert sm.in_postcopy() == s.value.startswith("postcopy-")
        assert sm.has_failed() == (s.value in ("failed", "cancelled"))
        assert sm.has_finished() == (s is S.COMPLETED)


def test_bad_side_and_listener_removal():
    with pytest.raises(StateError):
        StateMachine("both")  # type: ignore[arg-type]
    sm = StateMachine()
    calls = []
    fn = lambda o, n: calls.append(n)  # noqa: E731
    sm.add_listener(fn)
    sm.remove_listener(fn)
    sm.transition("setup")
    assert calls == [] and sm.allowed_targets() == TRANSITIONS[(SOURCE, S.SETUP)]


# ---------------------------------------------------------------------------
# capabilities
# ---------------------------------------------------------------------------

QAPI_CAPS = ["xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
             "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
             "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
             "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
             "zero-copy-send", "postcopy-preempt"]


def test_capability_names_order_defaults():
    assert list(CAPABILITIES) == QAPI_CAPS
    assert [c.index for c in MigrationCapability] == list(range(21))
    caps = Capabilities()
    assert all(caps.get(n) is False for n in QAPI_CAPS)
    assert caps.enabled() == frozenset()


def test_query_capabilities_layout():
    caps = Capabilities()
    caps.set_many([("events", True), ("xbzrle", True)])
    out = caps.as_qmp()
    assert [e["capability"] for e in out] == QAPI_CAPS
    assert all(list(e) == ["state", "capability"] for e in out)
    assert {e["capability"] for e in out if e["state"]} == {"events", "xbzrle"}
    assert json.dumps(out[0]) == '{"state": true, "capability": "xbzrle"}'


CAP_CONFLICTS = [
    ([("postcopy-ram", True), ("x-ignore-shared", True)],
     "Postcopy is not compatible with ignore-shared", "postcopy-ram"),
    ([("postcopy-preempt", True)], "Postcopy preempt requires postcopy-ram", "postcopy-preempt"),
    ([("postcopy-preempt", True), ("postcopy-ram", True), ("compress", True)],
     "Postcopy preempt not compatible with compress", "postcopy-preempt"),
    ([("multifd", True), ("compress", True)], "Multifd is not compatible with compress", "multifd"),
    ([("zero-copy-send", True)],
     "Zero copy only available for non-compressed non-TLS multifd migration", "zero-copy-send"),
    ([("zero-copy-send", True), ("multifd", True), ("xbzrle", True)],
     "Zero copy only available for non-compressed non-TLS multifd migration", "zero-copy-send"),
    ([("xyz", True)], "Parameter 'capability' does not accept value 'xyz'", "xyz"),
]


@pytest.mark.parametrize("changes,message,field", CAP_CONFLICTS)
def test_capability_conflicts(changes, message, field):
    caps = Capabilities()
    caps.set_many([("events", True)])
    before = caps.as_dict()
    with pytest.raises(CapabilityError) as ei:
        caps.set_many(changes)
    assert ei.value.message == message
    assert ei.value.field == field
    assert caps.as_dict() == before


def test_background_snapshot_incompatibilities_in_qemu_order():
    order = ["postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
             "return-path", "multifd", "pause-before-switchover", "auto-converge", "release-ram",
             "rdma-pin-all", "compress", "xbzrle", "x-colo", "validate-uuid", "zero-copy-send"]
    for other in order:
        caps = Capabilities()
        with pytest.raises(CapabilityError) as ei:
            caps.set_many([("background-snapshot", True), (other, True)])
        if other == "zero-copy-send":
            # zero-copy-send needs multifd, which is earlier in the list
            assert ei.value.message == "Background-snapshot is not compatible with zero-copy-send"
        else:
            assert ei.value.message == f"Background-snapshot is not compatible with {other}"
    caps = Capabilities()
    with pytest.raises(CapabilityError, match="compatible with dirty-bitmaps"):
        caps.set_many([("background-snapshot", True), ("multifd", True), ("dirty-bitmaps", True)])
    caps.set_many([("background-snapshot", True), ("events", True), ("zero-blocks", True)])
    assert caps.get("background-snapshot")


@pytest.mark.parametrize("wt,message", [
    (WriteTracking.ABSENT, "Background-snapshot is not supported by host kernel"),
    (WriteTracking.AVAILABLE, "Background-snapshot is not compatible with guest memory configuration"),
])
def test_background_snapshot_host_support(wt, message):
    caps = Capabilities(write_tracking=wt)
    with pytest.raises(CapabilityError) as ei:
        caps.set("background-snapshot")
    assert ei.value.message == message


def test_capabilities_refused_while_running_but_names_checked_first():
    caps = Capabilities()
    with pytest.raises(CapabilityError) as ei:
        caps.set_many([("events", True)], running=True)
    assert ei.value.message == "There's a migration process in progress"
    with pytest.raises(CapabilityError) as ei:
        caps.set_many([("bogus", True)], running=True)
    assert ei.value.message == "Parameter 'capability' does not accept value 'bogus'"
    assert not caps.get("events")


def test_capability_qmp_argument_errors():
    caps = Capabilities()
    cases = [
        ([{"capability": "xbzrle"}], "Parameter 'capabilities[0].state' is missing"),
        ([{"capability": "xbzrle", "state": 1}],
         "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
        ([{"capability": "xbzrle", "state": True}, {"capability": 5, "state": True}],
         "Invalid parameter type for 'capabilities[1].capability', expected: string"),
        ([{"state": True}], "Parameter 'capabilities[0].capability' is missing"),
        ([{"capability": "xbzrle", "state": True, "x": 1}], "Parameter 'capabilities[0].x' is unexpected"),
        ("xbzrle", "Invalid parameter type for 'capabilities', expected: array"),
    ]
    for changes, message in cases:
        with pytest.raises(CapabilityError) as ei:
            caps.set_many(changes)
        assert ei.value.message == message
    assert caps.enabled() == frozenset()
    caps.set_many([{"capability": "xbzrle", "state": True}])
    caps.set_many({"events": True, "xbzrle": False})
    assert caps.enabled() == {"events"}


def test_incoming_side_rules():
    caps = Capabilities(postcopy_supported=False)
    with pytest.raises(CapabilityError, match="multifd is not supported by current protocol"):
        caps.set("multifd", incoming=True, multi_channels_allowed=False)
    caps.set("multifd", incoming=True, multi_channels_allowed=True)
    # once multifd is on, any later change on a single-channel URI is refused too
    with pytest.raises(CapabilityError, match="multifd is not supported by current protocol"):
        caps.set("events", incoming=True, multi_channels_allowed=False)
    with pytest.raises(CapabilityError) as ei:
        caps.set("postcopy-ram", incoming=True)
    assert ei.value.message == "Postcopy is not supported"
    caps.set("postcopy-ram")  # an outgoing side needs no userfaultfd
    caps.set("events", incoming=True)  # already on: not re-checked
    assert caps.get("postcopy-ram") and caps.get("events")


def test_zero_copy_send_and_parameters():
    caps = Capabilities()
    params = Parameters(capabilities=caps)
    caps.set_many([("multifd", True), ("zero-copy-send", True)])
    for change, field in (({"multifd-compression": "zlib"}, "multifd-compression"),
                          ({"tls-creds": "tls0"}, "tls-creds")):
        with pytest.raises(ParameterError) as ei:
            params.set(change)
        assert ei.value.message == "Zero copy only available for non-compressed non-TLS multifd migration"
        assert ei.value.field == field
    assert params.get("multifd-compression") == "none" and params.get("tls-creds") == ""
    caps.set("zero-copy-send", False)
    params.set({"tls-creds": "tls0"})
    with pytest.raises(CapabilityError, match="non-TLS"):
        caps.set("zero-copy-send")
    params.set(tls_creds=None)
    caps.set("zero-copy-send")
    assert caps.get("zero-copy-send")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(QAPI_CAPS + ["nope"]), st.booleans()), max_size=6),
       st.lists(st.tuples(st.sampled_from(QAPI_CAPS), st.booleans()), max_size=6))
def test_capability_sets_are_atomic(first, second):
    caps = Capabilities()
    for batch in (first, second):
        before = caps.as_dict()
        try:
            caps.set_many(batch)
        except CapabilityError:
            assert caps.as_dict() == before
        else:
            expect = dict(before)
            expect.update(batch)
            assert caps.as_dict() == expect


# ---------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------

# Verbatim query-migrate-parameters of a fresh QEMU 7.2 (key order included).
QEMU72_DEFAULTS_JSON = (
    '{"cpu-throttle-tailslow": false, "xbzrle-cache-size": 67108864, "cpu-throttle-initial": 20, '
    '"announce-max": 550, "decompress-threads": 2, "compress-threads": 8, "compress-level": 1, '
    '"multifd-channels": 2, "multifd-zstd-level": 1, "announce-initial": 50, '
    '"block-incremental": false, "compress-wait-thread": true, "downtime-limit": 300, '
    '"tls-authz": "", "multifd-compression": "none", "announce-rounds": 5, "announce-step": 100, '
    '"tls-creds": "", "multifd-zlib-level": 1, "max-cpu-throttle": 99, '
    '"max-postcopy-bandwidth": 0, "tls-hostname": "", "throttle-trigger-threshold": 50, '
    '"max-bandwidth": 134217728, "x-checkpoint-delay": 20000, "cpu-throttle-increment": 10}'
)


def test_query_parameters_defaults_verbatim():
    assert json.dumps(Parameters().as_qmp()) == QEMU72_DEFAULTS_JSON


def test_parameter_access():
    p = Parameters()
    assert p.max_bandwidth == 134217728 == p.get("max-bandwidth") == p.get("max_bandwidth")
    assert p.downtime_limit == 300 and p.xbzrle_cache_size == 64 << 20
    assert p.tls_authz is None and p.block_bitmap_mapping is None
    with pytest.raises(AttributeError):
        p.nope  # noqa: B018
    with pytest.raises(ParameterError):
        p.get("nope")
    assert p.set(max_bandwidth=1 << 30, downtime_limit=500) == {"max-bandwidth": 1 << 30, "downtime-limit": 500}
    assert p.max_bandwidth == 1 << 30 and p.as_qmp()["downtime-limit"] == 500
    assert DEFAULTS["max-bandwidth"] == 134217728


# (name, low, high, message) — high/low None: no bound reachable inside the QAPI type.
RANGES = [
    ("compress-level", None, 9, "Parameter 'compress_level' expects a value between 0 and 9"),
    ("compress-threads", 1, None, "Parameter 'compress_threads' expects a value between 1 and 255"),
    ("decompress-threads", 1, None, "Parameter 'decompress_threads' expects a value between 1 and 255"),
    ("throttle-trigger-threshold", 1, 100,
     "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
    ("cpu-throttle-initial", 1, 99, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ("cpu-throttle-increment", 1, 99,
     "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    ("downtime-limit", None, 2000000,
     "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    ("multifd-channels", 1, None, "Parameter 'multifd_channels' expects a value between 1 and 255"),
    ("multifd-zlib-level", None, 9, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
    ("multifd-zstd-level", None, 20, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
    ("max-cpu-throttle", 20, 99,
     "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ("announce-initial", None, 100000, "Parameter 'announce_initial' expects a value between 0 and 100000"),
    ("announce-max", None, 100000, "Parameter 'announce_max' expects a value between 0 and 100000"),
    ("announce-rounds", None, 1000, "Parameter 'announce_rounds' expects a value between 0 and 1000"),
    ("announce-step", 1, 10000, "Parameter 'announce_step' expects a value between 0 and 10000"),
]


@pytest.mark.parametrize("name,low,high,message", RANGES)
def test_parameter_ranges(name, low, high, message):
    p = Parameters()
    for ok in (low if low is not None else 0, high if high is not None else 255):
        p.set({name: ok})
        assert p.get(name) == ok
    for bad in ([low - 1] if low is not None else []) + ([high + 1] if high is not None else []):
        before = p.as_qmp()
        with pytest.raises(ParameterError) as ei:
            p.set({name: bad})
        assert ei.value.message == message
        assert ei.value.field == name
        assert p.as_qmp() == before


def test_parameter_type_errors():
    p = Parameters()
    cases = [
        ({"compress-level": 256}, "Parameter 'compress-level' expects uint8_t"),
        ({"compress-level": -1}, "Parameter 'compress-level' expects uint8_t"),
        ({"compress-level": "a"}, "Parameter 'compress-level' expects uint64"),
        ({"compress-level": 1.5}, "Parameter 'compress-level' expects uint64"),
        ({"compress-level": True}, "Parameter 'compress-level' expects uint64"),
        ({"x-checkpoint-delay": -1}, "Parameter 'x-checkpoint-delay' expects uint32_t"),
        ({"x-checkpoint-delay": 1 << 32}, "Parameter 'x-checkpoint-delay' expects uint32_t"),
        ({"downtime-limit": -1},
         "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
        ({"max-bandwidth": 1 << 64}, "Parameter 'max-bandwidth' expects uint64"),
        ({"multifd-compression": "lz4"}, "Parameter 'multifd-compression' does not accept value 'lz4'"),
        ({"multifd-compression": 1}, "Invalid parameter type for 'multifd-compression', expected: string"),
        ({"tls-creds": 5}, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
        ({"compress-wait-thread": 1}, "Invalid parameter type for 'compress-wait-thread', expected: boolean"),
        ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"bogus": 1, "compress-level": "x"}, "Parameter 'compress-level' expects uint64"),
        ({"block-bitmap-mapping": 5}, "Invalid parameter type for 'block-bitmap-mapping', expected: array"),
        ({"compress-level": 10, "compress-threads": 0},
         "Parameter 'compress_level' expects a value between 0 and 9"),
        ({"compress-threads": 0, "compress-level": 10},
         "Parameter 'compress_level' expects a value between 0 and 9"),
        ({"xbzrle-cache-size": 4095},
         "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
        ({"xbzrle-cache-size": 12288},
         "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
        ({"xbzrle-cache-size": 0},
         "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
    ]
    for request, message in cases:
        with pytest.raises(ParameterError) as ei:
            p.set(request)
        assert ei.value.message == message, request
    assert json.dumps(p.as_qmp()) == QEMU72_DEFAULTS_JSON


def test_parameter_unsigned_wrap_and_sizes():
    p = Parameters()
    p.set({"max-bandwidth": -1})  # QMP takes negative numbers for unsigned types
    assert p.max_bandwidth == (1 << 64) - 1
    p.set(xbzrle_cache_size=4096)
    p.set(xbzrle_cache_size=1 << 40)
    assert p.xbzrle_cache_size == 1 << 40
    big = Parameters(page_size=65536)
    with pytest.raises(ParameterError, match="power of two"):
        big.set(xbzrle_cache_size=4096)


def test_max_cpu_throttle_follows_cpu_throttle_initial():
    p = Parameters()
    p.set({"cpu-throttle-initial": 50})
    with pytest.raises(ParameterError) as ei:
        p.set({"max-cpu-throttle": 49})
    assert ei.value.field == "max-cpu-throttle"
    p.set({"max-cpu-throttle": 50})
    # raising the initial above the max is refused with the max's message
    with pytest.raises(ParameterError) as ei:
        p.set({"cpu-throttle-initial": 51})
    assert "max_cpu_throttle" in ei.value.message
    p.set({"cpu-throttle-initial": 60, "max-cpu-throttle": 70})
    assert (p.cpu_throttle_initial, p.max_cpu_throttle) == (60, 70)


def test_tls_strings():
    p = Parameters()
    p.set({"tls-creds": "tls0", "tls-hostname": "dst", "tls-authz": "authz0"})
    assert p.as_qmp()["tls-authz"] == "authz0"
    p.set({"tls-creds": None, "tls-hostname": None, "tls-authz": None})
    q = p.as_qmp()
    assert (q["tls-creds"], q["tls-hostname"], q["tls-authz"]) == ("", "", "")


def test_block_bitmap_mapping():
    p = Parameters()
    mapping = [{"node-name": "a", "alias": "b",
                "bitmaps": [{"name": "x", "alias": "y", "transform": {"persistent": True}}]}]
    p.set({"block-bitmap-mapping": mapping})
    mapping[0]["alias"] = "changed"  # stored as a copy
    assert p.block_bitmap_mapping[0]["alias"] == "b"
    q = p.as_qmp()
    assert list(q).index("block-bitmap-mapping") == 5
    assert json.dumps(q["block-bitmap-mapping"]) == (
        '[{"bitmaps": [{"name": "x", "transform": {"persistent": true}, "alias": "y"}], '
        '"node-name": "a", "alias": "b"}]')
    prefix = "Invalid mapping given for block-bitmap-mapping: "
    cases = [
        ([{"node-name": "a", "alias": "1b", "bitmaps": []}], prefix + "The node alias '1b' is not well-formed"),
        ([{"node-name": "a", "alias": "", "bitmaps": []}], prefix + "The node alias '' is not well-formed"),
        ([{"node-name": "a", "alias": "b-._9", "bitmaps": []}, {"node-name": "c", "alias": "b-._9", "bitmaps": []}],
         prefix + "The node alias 'b-._9' is used twice"),
        ([{"node-name": "a", "alias": "b", "bitmaps": []}, {"node-name": "a", "alias": "c", "bitmaps": []}],
         prefix + "The node name 'a' is mapped twice"),
        ([{"node-name": "a" * 32, "alias": "b", "bitmaps": []}],
         prefix + f"The node name '{'a' * 32}' is longer than 31 bytes"),
        ([{"node-name": "a", "alias": "b" * 256, "bitmaps": []}],
         prefix + f"The node alias '{'b' * 256}' is longer than 255 bytes"),
        ([{"node-name": "a", "alias": "b", "bitmaps": [{"name": "x" * 1024, "alias": "y"}]}],
         prefix + f"The bitmap name '{'x' * 1024}' is longer than 1023 bytes"),
        ([{"node-name": "a", "alias": "b", "bitmaps": [{"name": "x", "alias": "y" * 256}]}],
         prefix + f"The bitmap alias '{'y' * 256}' is longer than 255 bytes"),
        ([{"node-name": "a", "alias": "b", "bitmaps": [{"name": "x", "alias": "y"}, {"name": "z", "alias": "y"}]}],
         prefix + "The bitmap alias 'b'/'y' is used twice"),
        ([{"node-name": "a", "alias": "b", "bitmaps": [{"name": "x", "alias": "y"}, {"name": "x", "alias": "z"}]}],
         prefix + "The bitmap 'a'/'x' is mapped twice"),
        ([{"node-name": "a", "alias": "b"}], "Parameter 'block-bitmap-mapping[0].bitmaps' is missing"),
        ([{"node-name": 1, "alias": "b", "bitmaps": []}],
         "Invalid parameter type for 'block-bitmap-mapping[0].node-name', expected: string"),
        ([{"node-name": "a", "alias": "b", "bitmaps": [], "x": 1}],
         "Parameter 'block-bitmap-mapping[0].x' is unexpected"),
        ([{"node-name": "a", "alias": "b", "bitmaps": [{"name": "x", "alias": "y", "transform": {"persistent": 1}}]}],
         "Invalid parameter type for 'block-bitmap-mapping[0].bitmaps[0].transform.persistent', expected: boolean"),
        (["a"], "Invalid parameter type for 'block-bitmap-mapping[0]', expected: object"),
    ]
    for bad, message in cases:
        with pytest.raises(ParameterError) as ei:
            p.set({"block-bitmap-mapping": bad})
        assert ei.value.message == message
    assert p.as_qmp() == q
    p.set({"block-bitmap-mapping": []})
    assert p.as_qmp()["block-bitmap-mapping"] == []


def test_parameter_listener_only_on_success():
    p = Parameters()
    seen = []
    p.add_listener(seen.append)
    p.set(max_bandwidth=1000)
    with pytest.raises(ParameterError):
        p.set(max_bandwidth=2000, compress_level=10)
    assert seen == [{"max-bandwidth": 1000}] and p.max_bandwidth == 1000


_INT_VALUES = st.one_of(st.integers(-5, 300), st.integers(-(1 << 64), 1 << 65),
                        st.sampled_from([0, 1, 4095, 4096, 8192, 2000000, 2000001, (1 << 64) - 1]))
_PARAM_VALUE = st.one_of(_INT_VALUES, st.booleans(), st.none(), st.sampled_from(["", "zlib", "none", "x"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(sorted(DEFAULTS) + ["bogus"]), _PARAM_VALUE, max_size=4),
                max_size=4))
def test_parameter_sets_are_all_or_nothing(requests):
    p = Parameters()
    for req in requests:
        before = p.as_dict()
        try:
            applied = p.set(req)
        except ParameterError as e:
            assert p.as_dict() == before
            assert isinstance(e, MigrationError) and e.field
        else:
            now = p.as_dict()
            for k in req:
                assert now[k] == applied[k]
            assert {k: v for k, v in now.items() if k not in req} == {
                k: v for k, v in before.items() if k not in req}
            assert 1 <= now["cpu-throttle-initial"] <= now["max-cpu-throttle"] <= 99


def test_internal_properties():
    ip = InternalProperties()
    assert (ip.clear_bitmap_shift, ip.effective_clear_bitmap_shift) == (18, 18)
    assert InternalProperties(clear_bitmap_shift=2).effective_clear_bitmap_shift == 6
    assert InternalProperties(clear_bitmap_shift=40).effective_clear_bitmap_shift == 31
    assert ip.store_global_state and ip.send_configuration and ip.send_section_footer
    with pytest.raises(ParameterError):
        InternalProperties(clear_bitmap_shift=256)


# ---------------------------------------------------------------------------
# query-migrate
# ---------------------------------------------------------------------------

TIMES_RAM = {"status", "setup-time", "total-time", "expected-downtime", "ram"}
SOURCE_PRESENCE = {
    "none": set(),
    "setup": {"status"},
    "cancelling": TIMES_RAM,
    "cancelled": {"status"},
    "active": TIMES_RAM,
    "postcopy-active": TIMES_RAM,
    "postcopy-paused": TIMES_RAM,
    "postcopy-recover": TIMES_RAM,
    "completed": {"status", "setup-time", "total-time", "downtime", "ram"},
    "failed": {"status", "error-desc"},
    "colo": {"status"},
    "pre-switchover": TIMES_RAM,
    "device": TIMES_RAM,
    "wait-unplug": {"status"},
}


def _stats() -> MigrationStats:
    return MigrationStats(transferred=205755, total=34086912, duplicate=8299, normal=3,
                          dirty_sync_count=3, downtime_bytes=205755, pages_per_second=82830.7,
                          mbps=23.962339622641508, remaining=1234, dirty_pages_rate=77,
                          start_time=1000, setup_time=1, total_time=107, downtime=4,
                          expected_downtime=300, error_desc="Unable to write to command: Broken pipe",
                          compression_pages=76, compressed_size=118278)


@pytest.mark.parametrize("state", QAPI_STATUS)
def test_query_migrate_presence_source(state):
    caps = Capabilities()
    info = query_migrate(StateMachine(SOURCE, state), _stats(), caps, now_ms=1511)
    assert set(info) == SOURCE_PRESENCE[state]
    if "ram" in info:
        assert info["ram"]["normal-bytes"] == 3 * 4096 and info["ram"]["skipped"] == 0
        assert info["ram"]["pages-per-second"] == 82830
    if "total-time" in info and state != "completed":
        assert info["total-time"] == 511 and info["expected-downtime"] == 300
    caps.set_many([("xbzrle", True), ("compress", True)])
    info2 = query_migrate(StateMachine(SOURCE, state), _stats(), caps, now_ms=1511, blocked_reasons=["r1"])
    extra = {"xbzrle-cache", "compression"} if "ram" in info else set()
    assert set(info2) == SOURCE_PRESENCE[state] | extra | {"blocked-reasons"}


def test_query_migrate_completed_matches_qemu_verbatim():
    caps = Capabilities()
    caps.set_many([("xbzrle", True), ("compress", True), ("events", True)])
    stats = _stats()
    info = query_migrate(StateMachine(SOURCE, "completed"), stats, caps)
    observed = (
        '{"compression": {"compression-rate": 0.0, "busy": 0, "compressed-size": 118278, "pages": 76, '
        '"busy-rate": 0.0}, "xbzrle-cache": {"encoding-rate": 0.0, "bytes": 0, "cache-size": 67108864, '
        '"cache-miss-rate": 0.0, "pages": 0, "overflow": 0, "cache-miss": 0}, "status": "completed", '
        '"setup-time": 1, "downtime": 4, "total-time": 107, "ram": {"total": 34086912, '
        '"postcopy-requests": 0, "dirty-sync-count": 3, "multifd-bytes": 0, "pages-per-second": 82830, '
        '"downtime-bytes": 205755, "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, '
        '"mbps": 23.962339622641508, "transferred": 205755, "dirty-sync-missed-zero-copy": 0, '
        '"precopy-bytes": 0, "duplicate": 8299, "dirty-pages-rate": 0, "skipped": 0, '
        '"normal-bytes": 12288, "normal": 3}}')
    assert json.dumps(info) == observed


def test_query_migrate_active_key_order():
    caps = Capabilities()
    caps.set_many([("xbzrle", True)])
    info = query_migrate(StateMachine(SOURCE, "active"), _stats(), caps, now_ms=1511)
    assert list(info) == ["expected-downtime", "xbzrle-cache", "status", "setup-time", "total-time", "ram"]
    assert info["ram"]["remaining"] == 1234 and info["ram"]["dirty-pages-rate"] == 77


def test_query_migrate_optional_members():
    caps = Capabilities()
    stats = _stats()
    stats.cpu_throttle_percentage = 30
    info = query_migrate(StateMachine(SOURCE, "active"), stats, caps, now_ms=2000, xbzrle_cache_size=1 << 20)
    assert info["cpu-throttle-percentage"] == 30 and info["total-time"] == 1000
    stats.error_desc = None
    assert query_migrate(StateMachine(SOURCE, "failed"), stats, caps) == {"status": "failed"}
    caps.set("xbzrle")
    info = query_migrate(StateMachine(SOURCE, "active"), stats, caps, now_ms=2000, xbzrle_cache_size=1 << 20)
    assert info["xbzrle-cache"]["cache-size"] == 1 << 20
    assert query_migrate(StateMachine(SOURCE, "none"), stats, caps, blocked_reasons=["x"]) == {
        "blocked-reasons": ["x"]}


@pytest.mark.parametrize("state", QAPI_STATUS)
def test_query_migrate_destination(state):
    caps = Capabilities()
    caps.set("postcopy-blocktime")
    stats = _stats()
    stats.postcopy_blocktime = 12
    stats.postcopy_vcpu_blocktime = [5, 7]
    sm = StateMachine(DESTINATION, state)
    info = query_migrate(sm, stats, caps)
    if state in ("none", "pre-switchover", "device", "wait-unplug"):
        assert info == {}
    elif state == "completed":
        assert info == {"status": "completed", "postcopy-blocktime": 12, "postcopy-vcpu-blocktime": [5, 7]}
    else:
        assert info == {"status": state}
    addr = [{"type": "inet", "host": "0.0.0.0", "port": "4444"}]
    assert query_migrate(sm, stats, caps, socket_address=addr)["socket-address"] == addr


# ---------------------------------------------------------------------------
# statistics helpers
# ---------------------------------------------------------------------------


def test_stats_reset_and_complete():
    s = _stats()
    s.page_size = 65536
    s.reset(now_ms=10_000, downtime_limit=300)
    assert (s.transferred, s.normal, s.start_time, s.expected_downtime, s.page_size) == (0, 0, 10_000, 300, 65536)
    assert s.error_desc is None
    s.setup_time = 2
    s.downtime_start = 10_200
    s.complete(now_ms=10_263, total_bytes=496859)
    assert (s.total_time, s.downtime) == (263, 63)
    assert s.mbps == pytest.approx(496859 * 8 / 261 / 1000)
    s.downtime = 5  # set by postcopy at switch-over: kept
    s.complete(now_ms=10_300, total_bytes=1)
    assert s.downtime == 5 and s.total_time == 300


def test_rate_window():
    s = MigrationStats()
    w = RateWindow()
    w.start(s, now_ms=1000, total_bytes=0)
    s.normal, s.duplicate = 100, 50
    assert not w.update(s, now_ms=1099, total_bytes=500_000, downtime_limit=300)
    assert s.mbps == 0.0
    s.remaining, s.dirty_pages_rate = 1_000_000, 10
    assert w.update(s, now_ms=1100, total_bytes=500_000, downtime_limit=300)
    assert s.mbps == pytest.approx(40.0)  # 500 kB in 100 ms
    assert s.pages_per_second == pytest.approx(1500.0)
    assert w.threshold_size == 5000 * 300
    assert s.expected_downtime == 200  # 1 MB at 5000 bytes/ms
    # next window: nothing sent, no new estimate
    assert w.update(s, now_ms=1300, total_bytes=500_000, downtime_limit=300)
    assert s.mbps == 0.0 and s.expected_downtime == 200 and w.initial_pages == 150


def test_dirty_rate_period():
    s = MigrationStats(page_size=4096)
    p = DirtyRatePeriod()
    assert p.begin_sync(s, now_ms=5000) == 1
    assert p.end_sync(s, now_ms=5010, dirty_pages=1000, target_pages=0, xbzrle=True) is None
    s.transferred = 8 << 20
    s.xbzrle_pages, s.xbzrle_bytes, s.xbzrle_cache_miss = 300, 300 * 512, 100
    s.compression_pages, s.compressed_size, s.compression_busy = 0, 0, 0
    assert p.begin_sync(s, now_ms=5900) == 2
    assert p.end_sync(s, now_ms=6000, dirty_pages=500, target_pages=400, xbzrle=True) is None  # not > 1 s
    assert p.begin_sync(s, now_ms=6400) == 3
    sample = p.end_sync(s, now_ms=6500, dirty_pages=500, target_pages=500, xbzrle=True, compress=True)
    assert sample == ((8 << 20), 2000 * 4096)
    assert s.dirty_pages_rate == 2000 * 1000 // 1500
    assert s.xbzrle_cache_miss_rate == pytest.approx(100 / 500)
    assert s.xbzrle_encoding_rate == pytest.approx(300 * 4096 / (300 * 512))
    assert s.compression_rate == 0.0 and s.compression_busy_rate == 0.0
    # second period: no new xbzrle pages -> encoding rate 0; compression measured
    s.xbzrle_cache_miss = 150
    s.compression_pages, s.compressed_size, s.compression_busy = 100, 100 * 1024, 10
    sample = p.end_sync(s, now_ms=7600, dirty_pages=0, target_pages=600, xbzrle=True, compress=True)
    assert sample == (0, 0) and s.dirty_pages_rate == 0
    assert s.xbzrle_cache_miss_rate == pytest.approx(50 / 100) and s.xbzrle_encoding_rate == 0.0
    assert s.compression_rate == pytest.approx(4.0) and s.compression_busy_rate == pytest.approx(0.1)


# ---------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------


def test_events_follow_capability_and_state_machine():
    caps = Capabilities()
    t = iter(range(1795674639_138821_000, 1795674639_999999_000, 1_000_000))
    ev = MigrationEvents(caps, clock_ns=lambda: next(t))
    got = []
    ev.subscribe(got.append)
    sm = StateMachine(SOURCE)
    ev.attach(sm)
    sm.reset_for_new_migration()
    assert ev.dirty_pass(1) is None and got == []  # events capability off
    sm.transition("cancelling")
    sm.transition("cancelled")
    caps.set("events")
    sm.reset_for_new_migration()
    ev.dirty_pass(1)
    sm.transition("active")
    sm.transition("completed")
    assert [(e["event"], e["data"]) for e in got] == [
        ("MIGRATION", {"status": "setup"}), ("MIGRATION_PASS", {"pass": 1}),
        ("MIGRATION", {"status": "active"}), ("MIGRATION", {"status": "completed"})]
    assert json.dumps(got[0]) == ('{"timestamp": {"seconds": 1795674639, "microseconds": 138821}, '
                                  '"event": "MIGRATION", "data": {"status": "setup"}}')


def test_incoming_setup_event_is_unconditional():
    caps = Capabilities()
    ev = MigrationEvents(caps, clock_ns=lambda: 1_500_000_000_000_001_000)
    got = []
    ev.subscribe(got.append)
    e = ev.incoming_setup()
    assert got == [e] and e["data"] == {"status": "setup"}
    assert e["timestamp"] == {"seconds": 1_500_000_000, "microseconds": 1}
    ev.unsubscribe(got.append)
    assert ev.status("active") is None and len(got) == 1


def test_qdict_order_helper():
    # same-bucket keys: the later insertion comes first, as in QEMU's QDict
    assert qdict_keys(["a", "b"]) in (["a", "b"], ["b", "a"])
    keys = ["status", "ram", "setup-time"]
    assert sorted(qdict_keys(keys)) == sorted(keys)
