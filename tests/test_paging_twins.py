"""The compiled PageTables and its pure-Python twin agree on every operation.

Each example maps a few GPAs with leaves that translate under some
configuration, then random sequences of set_entry / get_entry / walk / translate / translate_many
go to both; results (or the exceptions and their messages), walks and the
whole table memory must be identical after every step.  This is a two-core
test by nature, so it names both cores instead of taking ``kv``.
"""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvmemu import PT_BASE_HPA, _select

CORES = (_select.load("cython"), _select.load("python"))

# A few GPAs that share upper-level tables (the worked example and its neighbours; the
# last is beyond a 4-level walk), so that later operations meet earlier entries.
BASE_GPAS = (0x123456789000, 0x12345678A000, 0x123416789000, 0x123456589000, 0x0)
GPAS = st.builds(int.__or__, st.sampled_from(BASE_GPAS + (0x1AB123456789000,)),
                 st.sampled_from([0, 0xABC]) | st.integers(0, 0xFFF))
# Entries: an address (often one of the first tables), low control bits, high bits.
ADDRESSES = (st.integers(0, 8).map(lambda k: PT_BASE_HPA + k * 0x1000)
             | st.integers(0, (1 << 52) - 1).map(lambda a: a & ~0xFFF)
             | st.sampled_from([0, 0x40000000, 0x200000]))
# Low bits: valid EPT and NPT leaves and links (R/W/X/XU, WB, PS, P/RW/US/A) or anything.
LOW_BITS = st.sampled_from([0x7, 0x37, 0x35, 0x31, 0x33, 0x34, 0x437, 0x407, 0xB7, 0x1, 0x5,
                            0x25, 0x27, 0xA7, 0x0]) | st.integers(0, 0xFFF)
ENTRIES = (st.builds(lambda a, low, high: a | low | high, ADDRESSES, LOW_BITS,
                     st.sampled_from([0, 0, 1 << 63, 1 << 52, 1 << 47]))
           | st.integers(0, (1 << 64) - 1) | st.integers(-1, 1 << 64))
ACCESS = st.fixed_dictionaries({}, optional={
    "write": st.booleans(), "fetch": st.booleans(), "user": st.booleans(),
    "encrypted": st.booleans(), "stage": st.sampled_from(["final", "walk", "nogva"])})
CONFIG = st.fixed_dictionaries({
    "kind": st.sampled_from(["ept", "npt"]), "levels": st.sampled_from([4, 5])}, optional={
    "ad_bits": st.booleans(), "exec_only": st.booleans(), "mbec": st.booleans(),
    "maxphyaddr": st.sampled_from([36, 46, 52]), "huge_1g": st.booleans(),
    "host_nx": st.booleans(), "host_smep": st.booleans()})
LEVELS = st.integers(1, 4) | st.integers(0, 6)
# Leaves that translate for some configuration: EPT R/W/X/XU with WB, NPT P/RW/US/NX.
LEAVES = st.builds(int.__or__, st.sampled_from([0, 0xABCDE000, 0x40000000]),
                   st.sampled_from([0x37, 0x7, 0x437, 0x35, 0x31, 0x34, 0x27, 0x25, 0x7 | 1 << 63,
                                    0x5, 0xB7]))
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("set_entry"), GPAS, LEVELS, ENTRIES),
    st.tuples(st.just("set_entry"), GPAS, st.sampled_from([1, 1, 2, 3]), LEAVES),
    st.tuples(st.just("get_entry"), GPAS, LEVELS),
    st.tuples(st.just("walk"), GPAS),
    st.tuples(st.just("translate"), GPAS, ACCESS),
    st.tuples(st.just("translate"), GPAS, ACCESS),
    st.tuples(st.just("translate_many"), st.lists(GPAS, max_size=6), st.integers(0, 63)),
), max_size=40)


def outcome(pt, op):
    name, *args = op
    try:
        if name == "translate":
            return pt.translate(args[0], **args[1])
        if name == "translate_many":
            hpa, level = pt.translate_many(np.array(args[0], dtype=np.uint64), args[1])
            return hpa.tolist(), level.tolist()
        return getattr(pt, name)(*args)
    except (TypeError, ValueError, OverflowError) as exc:
        return type(exc), str(exc)


@given(config=CONFIG, leaves=st.lists(LEAVES, min_size=5, max_size=5), operations=OPERATIONS)
def test_random_sequences_agree(config, leaves, operations):
    compiled, twin = (core.PageTables(**config) for core in CORES)
    mapping = [("set_entry", gpa, 1, leaf) for gpa, leaf in zip(BASE_GPAS, leaves)]
    for op in mapping + operations:
        assert outcome(compiled, op) == outcome(twin, op), op
        np.testing.assert_array_equal(compiled.tables, twin.tables)
