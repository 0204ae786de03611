"""PageTables' boundary: argument checks, result objects, the batch entry point."""

import pickle

import numpy as np
import pytest

import kvmemu
from kvmemu import AccessFlags

GPA = 0x123456789000
LEAF = 0xABCDE000 | 0x7 | 6 << 3          # EPT R|W|X, WB


def mapped(kv, kind="ept", **config):
    pt = kv.PageTables(kind, **config)
    pt.set_entry(GPA, 1, LEAF if kind == "ept" else 0xABCDE000 | 0x7)
    return pt


# --- constructor ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, exc, match", [
    (("vmx",), {}, ValueError, "kind"),
    ((b"ept",), {}, TypeError, "kind"),
    ((None,), {}, TypeError, "kind"),
    (("ept", 3), {}, ValueError, "levels"),
    (("ept", "4"), {}, TypeError, "levels"),
    (("ept", True), {}, TypeError, "levels"),
    (("ept", 4.0), {}, TypeError, "levels"),
    (("ept",), {"maxphyaddr": 35}, ValueError, "maxphyaddr"),
    (("ept",), {"maxphyaddr": 53}, ValueError, "maxphyaddr"),
    (("npt",), {"ad_bits": 2}, ValueError, "ad_bits"),
    (("npt",), {"host_nx": "yes"}, TypeError, "host_nx"),
    (("npt",), {"mbec": None}, TypeError, "mbec"),
])
def test_constructor_rejects(kv, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kv.PageTables(*args, **kwargs)


def test_constructor_keeps_its_configuration(kv):
    pt = kv.PageTables("npt", 5, maxphyaddr=46, host_nx=False, host_smep=True, huge_1g=False)
    assert (pt.kind, pt.levels, pt.maxphyaddr, pt.host_nx, pt.host_smep, pt.huge_1g) == (
        "npt", 5, 46, False, True, False)
    assert pt.root_hpa == kvmemu.PT_BASE_HPA == 1 << 35
    assert repr(pt) == "PageTables('npt', levels=5, tables=1)"


# --- set_entry / get_entry / walk / translate: no state change on a rejected call ------------

BAD_GPA = [(-1, OverflowError), (1 << 64, OverflowError), (1 << 48, ValueError),
           (1.0, TypeError), ("0x1000", TypeError), (np.array([1], dtype=np.uint64), TypeError)]


@pytest.mark.parametrize("gpa, exc", BAD_GPA)
def test_every_method_checks_gpa(kv, gpa, exc):
    pt = mapped(kv)
    before = pt.tables.copy()
    for call in (lambda: pt.set_entry(gpa, 1, 0), lambda: pt.get_entry(gpa, 1),
                 lambda: pt.walk(gpa), lambda: pt.translate(gpa, write=True)):
        with pytest.raises(exc, match="gpa"):
            call()
    assert (pt.tables == before).all()


def test_5_level_tables_reach_gpa_bit_56(kv):
    pt = kv.PageTables("ept", 5)
    pt.set_entry((1 << 57) - 0x1000, 1, LEAF)
    with pytest.raises(ValueError, match="bit 56"):
        pt.translate(1 << 57)


@pytest.mark.parametrize("level, exc", [(0, ValueError), (5, ValueError), (-1, ValueError),
                                        ("1", TypeError), (1.0, TypeError), (True, TypeError)])
def test_level_is_checked(kv, level, exc):
    pt = mapped(kv)
    before = pt.tables.copy()
    with pytest.raises(exc, match="level"):
        pt.set_entry(GPA, level, 0)
    with pytest.raises(exc, match="level"):
        pt.get_entry(GPA, level)
    assert (pt.tables == before).all()


@pytest.mark.parametrize("value, exc", [(-1, OverflowError), (1 << 64, OverflowError),
                                        (None, TypeError), (1.5, TypeError)])
def test_value_is_checked(kv, value, exc):
    pt = kv.PageTables("ept")
    with pytest.raises(exc, match="value"):
        pt.set_entry(GPA, 1, value)
    assert pt.tables.shape == (1, 512) and not pt.tables.any()


def test_full_u64_values_round_trip(kv):
    pt = kv.PageTables("npt")
    pt.set_entry(GPA, 1, (1 << 64) - 1)
    assert pt.get_entry(GPA, 1) == (1 << 64) - 1


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"stage": "guest"}, ValueError, "stage"),
    ({"stage": 1}, TypeError, "stage"),
    ({"write": 2}, ValueError, "write"),
    ({"fetch": "no"}, TypeError, "fetch"),
    ({"user": None}, TypeError, "user"),
    ({"encrypted": 5}, ValueError, "encrypted"),
    ({"fetch": True, "stage": "walk"}, ValueError, "fetch"),
    ({"fetch": True, "stage": "nogva"}, ValueError, "fetch"),
])
def test_translate_checks_the_access(kv, kwargs, exc, match):
    pt = mapped(kv)
    before = pt.tables.copy()
    with pytest.raises(exc, match=match):
        pt.translate(GPA, **kwargs)
    assert (pt.tables == before).all()


def test_walk_gives_plain_int_pairs(kv):
    pt = mapped(kv)
    walk = pt.walk(GPA)
    assert walk[-1] == (1, LEAF)
    assert all(type(level) is int and type(entry) is int for level, entry in walk)


# --- result objects -------------------------------------------------------------------------

def test_result_objects(kv):
    assert kv.EptViolation is kvmemu.EptViolation is kvmemu.results.EptViolation
    v = kv.EptViolation(0x1000, 0x181)
    assert repr(v) == ("EptViolation(gpa=0x1000, "
                       "exit_qualification=0x181 ACC_READ|GVA_IS_VALID|GVA_TRANSLATED)")
    assert repr(kv.NestedPageFault(0xc0000000, 0x100000015)) == (
        "NestedPageFault(gpa=0xc0000000, exit_info_1=0x100000015 PRESENT|USER|FETCH|GUEST_FINAL)")
    assert repr(kv.EptMisconfig(0x2000)) == "EptMisconfig(gpa=0x2000)"
    assert repr(kv.Translation(0xabc000, 2)) == "Translation(hpa=0xabc000, level=2)"
    assert repr(kv.EptViolation(0, 0)) == "EptViolation(gpa=0x0, exit_qualification=0x0)"
    assert (v.reason, kv.EptMisconfig(0).reason, kv.NestedPageFault(0, 0).reason) == (
        48, 49, 0x400)
    assert v == kv.EptViolation(0x1000, 0x181) and hash(v) == hash(kv.EptViolation(0x1000, 0x181))
    assert v != kv.EptViolation(0x1000, 0x182) and v != kv.NestedPageFault(0x1000, 0x181)
    assert kv.Translation(1, 1) != (1, 1)
    assert pickle.loads(pickle.dumps(v)) == v
    with pytest.raises(AttributeError):
        v.gpa = 0


# --- translate_many --------------------------------------------------------------------------

def test_translate_many_matches_translate(kv):
    pt = mapped(kv)
    pt.set_entry(GPA + 0x1000, 1, 0xF000 | 0x1 | 6 << 3)            # read-only
    gpas = np.array([GPA | 0x10, GPA + 0x1008, GPA + 0x2000, GPA + 0x1008, 0], dtype=np.uint64)
    flags = np.array([AccessFlags.WRITE, 0, 0, AccessFlags.WRITE, AccessFlags.WALK],
                     dtype=np.uint8)
    hpa, level = pt.translate_many(gpas, flags)
    assert hpa.dtype == np.uint64 and level.dtype == np.uint8
    assert hpa.tolist() == [0xABCDE010, 0xF008, 0, 0, 0]
    assert level.tolist() == [1, 1, 0, 0, 0]
    assert pt.get_entry(GPA, 1) & 0x300 == 0x300                       # A and D set
    assert pt.get_entry(GPA + 0x1000, 1) & 0x300 == 0x100              # A only


def test_translate_many_scalar_flags(kv):
    pt = mapped(kv, "npt")
    gpas = np.full(3, GPA | 0x123, dtype=np.uint64)
    hpa, level = pt.translate_many(gpas, int(AccessFlags.WRITE | AccessFlags.USER))
    assert hpa.tolist() == [0xABCDE123] * 3 and level.tolist() == [1] * 3
    assert [a.tolist() for a in pt.translate_many(np.empty(0, dtype=np.uint64))] == [[], []]


@pytest.mark.parametrize("gpas, flags, exc, match", [
    ([GPA], 0, TypeError, "gpas"),
    (np.array([GPA], dtype=np.int64), 0, TypeError, "gpas"),
    (np.zeros((1, 1), dtype=np.uint64), 0, ValueError, "gpas"),
    (np.array([0, 1 << 48], dtype=np.uint64), 0, ValueError, r"gpas\[1\]"),
    (np.array([GPA], dtype=np.uint64), 64, ValueError, "flags"),
    (np.array([GPA], dtype=np.uint64), -1, OverflowError, "flags"),
    (np.array([GPA], dtype=np.uint64), 1.0, TypeError, "flags"),
    (np.array([GPA], dtype=np.uint64), AccessFlags.WALK | AccessFlags.NOGVA, ValueError,
     "WALK and NOGVA"),
    (np.array([GPA], dtype=np.uint64), AccessFlags.WALK | AccessFlags.FETCH, ValueError,
     "fetch"),
    (np.array([GPA], dtype=np.uint64), np.array([0], dtype=np.uint16), TypeError, "flags"),
    (np.array([GPA], dtype=np.uint64), np.array([0, 0], dtype=np.uint8), ValueError, "flags"),
    (np.array([GPA, GPA], dtype=np.uint64), np.array([0, 128], dtype=np.uint8), ValueError,
     r"flags\[1\]"),
])
def test_translate_many_rejects(kv, gpas, flags, exc, match):
    pt = mapped(kv)
    before = pt.tables.copy()
    with pytest.raises(exc, match=match):
        pt.translate_many(gpas, flags)
    assert (pt.tables == before).all()
