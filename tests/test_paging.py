"""Second-stage page tables: geometry, EPT and NPT exits, A/D bits, large pages.

Expected values come from docs/reference.md §1 (index example, entry
layouts, the rules) and the expectations of
kvm-unit-tests' x86/vmx_tests.c (ept_access_test_*) and x86/svm_npt.c.
"""

import pytest

GPA = 0x123456789000          # docs/reference.md §1.1: L1 0x189, L2 0xb3, L3 0xd1, L4 0x24, L5 0
DATA_HPA = 0xABCDE000
WB = 6 << 3                   # EPT memory type WB in bits 5:3
R, W, X, XU = 0x1, 0x2, 0x4, 0x400
EPT_A, EPT_D, LARGE = 0x100, 0x200, 0x80
P, RW, US, NPT_A, NPT_D, NX = 0x1, 0x2, 0x4, 0x20, 0x40, 1 << 63
GVA = 0x180                   # GVA_IS_VALID | GVA_TRANSLATED: a final-stage access
OPS = {"read": {}, "write": {"write": True}, "exec": {"fetch": True},
       "exec_user": {"fetch": True, "user": True}}


def ept_page(kv, perms, level=1, gpa=GPA, hpa=DATA_HPA, **config):
    pt = kv.PageTables("ept", **config)
    pt.set_entry(gpa, level, hpa | perms | (WB if perms & (R | W | X | XU) else 0)
                 | (LARGE if level > 1 else 0))
    return pt


def npt_page(kv, bits=P | RW | US, gpa=GPA, hpa=DATA_HPA, **config):
    pt = kv.PageTables("npt", **config)
    pt.set_entry(gpa, 1, hpa | bits)
    return pt


# --- geometry and storage --------------------------------------------------------------

def test_worked_index_example_4_level(kv):
    pt = kv.PageTables("ept")
    pt.set_entry(GPA, 1, DATA_HPA | R | WB)
    root = pt.root_hpa
    tables = pt.tables
    assert tables.shape == (4, 512)
    assert int(tables[0, 0x24]) == (root + 0x1000) | R | W | X | EPT_A
    assert int(tables[1, 0xd1]) == (root + 0x2000) | R | W | X | EPT_A
    assert int(tables[2, 0xb3]) == (root + 0x3000) | R | W | X | EPT_A
    assert int(tables[3, 0x189]) == DATA_HPA | R | WB
    assert [lvl for lvl, _ in pt.walk(GPA)] == [4, 3, 2, 1]


def test_worked_index_example_5_level(kv):
    pt = kv.PageTables("npt", 5)
    pt.set_entry(GPA, 1, DATA_HPA | P)
    assert int(pt.tables[0, 0]) == (pt.root_hpa + 0x1000) | P | RW | US | NPT_A
    assert int(pt.tables[1, 0x24]) != 0 and int(pt.tables[4, 0x189]) == DATA_HPA | P
    assert [lvl for lvl, _ in pt.walk(GPA)] == [5, 4, 3, 2, 1]


def test_level_5_indexes_gpa_bits_56_to_48(kv):
    gpa = (0x1AB << 48) | GPA
    pt = kv.PageTables("ept", 5)
    pt.set_entry(gpa, 1, DATA_HPA | R | W | WB)
    assert int(pt.tables[0, 0x1AB]) != 0 and int(pt.tables[0, 0]) == 0
    assert pt.get_entry(GPA, 1) == 0
    assert pt.translate(gpa | 0xABC) == kv.Translation(DATA_HPA | 0xABC, 1)
    assert pt.translate(GPA) == kv.EptViolation(GPA, 0x181)


@pytest.mark.parametrize("kind, config, nonleaf", [
    ("ept", {}, R | W | X | EPT_A),
    ("ept", {"ad_bits": False}, R | W | X),
    ("ept", {"mbec": True}, R | W | X | XU | EPT_A),
    ("npt", {}, P | RW | US | NPT_A),
    ("npt", {"ad_bits": False}, P | RW | US | NPT_A),
])
def test_created_tables_are_linked_by_entries_granting_everything(kv, kind, config, nonleaf):
    pt = kv.PageTables(kind, **config)
    pt.set_entry(GPA, 1, 0)
    assert pt.get_entry(GPA, 4) == (pt.root_hpa + 0x1000) | nonleaf
    assert pt.get_entry(GPA, 3) == (pt.root_hpa + 0x2000) | nonleaf
    assert pt.get_entry(GPA, 2) == (pt.root_hpa + 0x3000) | nonleaf


def test_get_entry_is_zero_where_no_table(kv):
    pt = kv.PageTables("ept")
    assert [pt.get_entry(GPA, level) for level in (1, 2, 3, 4)] == [0, 0, 0, 0]
    pt.set_entry(GPA, 3, 0x5000 | R | W | X)            # PDPTE pointing at no table
    assert pt.get_entry(GPA, 3) == 0x5000 | R | W | X
    assert pt.get_entry(GPA, 2) == 0 and pt.get_entry(GPA, 1) == 0
    assert pt.walk(GPA) == [(4, pt.get_entry(GPA, 4)), (3, 0x5007), (2, 0)]
    assert pt.translate(GPA) == kv.EptViolation(GPA, 0x181)


def test_set_entry_reuses_existing_tables(kv):
    pt = kv.PageTables("ept")
    pt.set_entry(GPA, 1, 1)
    pt.set_entry(GPA + 0x1000, 1, 2)
    pt.set_entry(GPA + (1 << 30), 1, 3)           # another PDPTE: new PD and PT
    assert pt.tables.shape == (6, 512)
    assert (pt.get_entry(GPA, 1), pt.get_entry(GPA + 0x1000, 1),
            pt.get_entry(GPA + (1 << 30), 1)) == (1, 2, 3)


def test_storage_grows_past_the_initial_capacity(kv):
    pt = kv.PageTables("ept")
    for i in range(40):
        pt.set_entry(i << 30, 1, DATA_HPA | R | WB)
    assert pt.tables.shape == (2 + 2 * 40, 512)
    assert all(pt.translate(i << 30) == kv.Translation(DATA_HPA, 1) for i in range(40))


def test_tables_view_is_read_only(kv):
    pt = kv.PageTables("ept")
    with pytest.raises(ValueError):
        pt.tables[0, 0] = 1


def test_non_leaf_entry_may_point_at_any_table(kv):
    # Two GPAs whose PML4Es share one PDPT: the second entry is written by hand.
    pt = kv.PageTables("ept")
    pt.set_entry(0, 1, DATA_HPA | R | WB)
    pt.set_entry(1 << 39, 4, pt.get_entry(0, 4))
    assert pt.translate((1 << 39) | 0x123) == kv.Translation(DATA_HPA | 0x123, 1)


def test_walk_through_an_address_without_a_table_reads_zeros(kv):
    pt = kv.PageTables("npt")
    for hpa in (0, 0x1000, (1 << 52) - 0x1000, pt.root_hpa + (1 << 30)):
        pt.set_entry(GPA, 4, hpa | P | RW | US)
        assert pt.walk(GPA) == [(4, hpa | P | RW | US), (3, 0)]
        assert pt.translate(GPA) == kv.NestedPageFault(GPA, 0x100000004)


# --- large pages -------------------------------------------------------------------------

@pytest.mark.parametrize("level, leaf_hpa, gpa, hpa", [
    (2, 0x40000000, 0x3FE12345, 0x40012345),                   # 2M: GPA bits 20:0 pass
    (2, 0xFFE00000, 0x123456789ABC, 0xFFF89ABC),
    (3, 0x1C0000000, 0x7ABCDE123, 0x1EBCDE123),
    (3, 0xFC0000000, 0x123456789ABC, 0xFD6789ABC),              # 1G: GPA bits 29:0 pass
])
def test_large_page_hpa_composition(kv, level, leaf_hpa, gpa, hpa):
    ept = ept_page(kv, R | W | X, level, gpa=gpa, hpa=leaf_hpa)
    assert ept.translate(gpa) == kv.Translation(hpa, level)
    npt = kv.PageTables("npt")
    npt.set_entry(gpa, level, leaf_hpa | (1 << 12) | LARGE | P | RW | US)   # bit 12 = PAT
    assert npt.translate(gpa) == kv.Translation(hpa, level)
    assert len(npt.walk(gpa)) == 5 - level


def test_set_entry_refuses_to_go_through_a_present_leaf(kv):
    pt = ept_page(kv, R | W, level=2)
    before = pt.tables.copy()
    with pytest.raises(ValueError, match="level-2 entry .* is a present leaf"):
        pt.set_entry(GPA, 1, 0x1234)
    assert (pt.tables == before).all()


def test_set_entry_refuses_a_present_entry_without_a_table(kv):
    pt = kv.PageTables("npt")
    pt.set_entry(GPA, 3, 0x7000 | P | RW | US)
    before = pt.tables.copy()
    with pytest.raises(ValueError, match="holds no table"):
        pt.set_entry(GPA, 1, 0x1234)
    assert (pt.tables == before).all()


def test_set_entry_replaces_a_not_present_large_entry(kv):
    pt = kv.PageTables("ept")
    pt.set_entry(GPA, 2, LARGE)                  # bit 7 alone: not present
    pt.set_entry(GPA, 1, DATA_HPA | R | WB)
    assert pt.translate(GPA) == kv.Translation(DATA_HPA, 1)


# --- EPT: the access matrix (ept_access_test_*) ------------------------------------------

ALLOWED, MISCONFIG = "allowed", "misconfig"

# (entry permissions, exec_only, mbec) -> expectation per op; a number is the
# qualification without bits 7 and 8 (kvm-unit-tests' ept_access_violation adds them).
EPT_MATRIX = [
    (0, True, False, {"read": 0x1, "write": 0x2, "exec": 0x4, "exec_user": 0x4}),
    (0, True, True, {"read": 0x1, "write": 0x2, "exec": 0x4, "exec_user": 0x4}),
    (R, True, False, {"read": ALLOWED, "write": 0xA, "exec": 0xC, "exec_user": 0xC}),
    (R, True, True, {"read": ALLOWED, "write": 0xA, "exec": 0xC, "exec_user": 0xC}),
    (W, True, False, MISCONFIG),
    (R | W, True, False, {"read": ALLOWED, "write": ALLOWED, "exec": 0x1C, "exec_user": 0x1C}),
    (X, True, False, {"read": 0x21, "write": 0x22, "exec": ALLOWED, "exec_user": ALLOWED}),
    (X, True, True, {"read": 0x21, "write": 0x22, "exec": ALLOWED, "exec_user": 0x24}),
    (X, False, False, MISCONFIG),
    (XU, True, True, {"read": 0x41, "write": 0x42, "exec": 0x44, "exec_user": ALLOWED}),
    (XU, False, True, MISCONFIG),
    (X | XU, True, True, {"read": 0x61, "write": 0x62, "exec": ALLOWED, "exec_user": ALLOWED}),
    (X | XU, False, True, MISCONFIG),
    (R | X, True, False, {"read": ALLOWED, "write": 0x2A, "exec": ALLOWED,
                          "exec_user": ALLOWED}),
    (R | X, True, True, {"read": ALLOWED, "write": 0x2A, "exec": ALLOWED, "exec_user": 0x2C}),
    (R | XU, True, True, {"read": ALLOWED, "write": 0x4A, "exec": 0x4C, "exec_user": ALLOWED}),
    (R | X | XU, True, True, {"read": ALLOWED, "write": 0x6A, "exec": ALLOWED,
                              "exec_user": ALLOWED}),
    (W | X, True, False, MISCONFIG),
    (R | W | X, True, False, {op: ALLOWED for op in OPS}),
    (R | W | X, True, True, {"read": ALLOWED, "write": ALLOWED, "exec": ALLOWED,
                             "exec_user": 0x3C}),
    (R | W | XU, True, True, {"read": ALLOWED, "write": ALLOWED, "exec": 0x5C,
                              "exec_user": ALLOWED}),
    (R | W | X | XU, True, True, {op: ALLOWED for op in OPS}),
]


@pytest.mark.parametrize("perms, exec_only, mbec, expected", EPT_MATRIX)
@pytest.mark.parametrize("op", OPS)
def test_ept_access_matrix(kv, perms, exec_only, mbec, expected, op):
    pt = ept_page(kv, perms, exec_only=exec_only, mbec=mbec)
    result = pt.translate(GPA | 0x10, **OPS[op])
    want = expected if expected == MISCONFIG else expected[op]
    if want == ALLOWED:
        assert result == kv.Translation(DATA_HPA | 0x10, 1)
    elif want == MISCONFIG:
        assert result == kv.EptMisconfig(GPA | 0x10)
    else:
        assert result == kv.EptViolation(GPA | 0x10, want | GVA)


def test_ept_xu_is_ignored_without_mbec(kv):
    pt = ept_page(kv, R | XU)
    assert pt.translate(GPA, fetch=True, user=True) == kv.EptViolation(GPA, 0x18C)
    pt = ept_page(kv, XU)                                    # bit 10 alone: not present
    assert pt.translate(GPA) == kv.EptViolation(GPA, 0x181)


@pytest.mark.parametrize("levels", [4, 5])
@pytest.mark.parametrize("op, qual", [("read", 0x181), ("write", 0x182), ("exec", 0x184),
                                      ("exec_user", 0x184)])
def test_ept_not_present_at_every_level(kv, levels, op, qual):
    for level in range(1, levels + 1):
        pt = ept_page(kv, R | W | X, levels=levels, mbec=True)
        pt.set_entry(GPA, level, 0)
        assert pt.translate(GPA, **OPS[op]) == kv.EptViolation(GPA, qual)
        assert len(pt.walk(GPA)) == levels - level + 1


def test_ept_permissions_are_anded_over_every_level(kv):
    pt = ept_page(kv, R | W | X)
    pt.set_entry(GPA, 3, pt.get_entry(GPA, 3) & ~W)     # PDPTE read/execute only
    assert pt.translate(GPA, write=True) == kv.EptViolation(GPA, 0x2 | 0x28 | GVA)
    pt.set_entry(GPA, 4, pt.get_entry(GPA, 4) & ~X)     # and PML4E read/write only
    assert pt.translate(GPA, fetch=True) == kv.EptViolation(GPA, 0x4 | 0x8 | GVA)


# --- EPT misconfiguration ------------------------------------------------------------------

def ept_levels_with(kv, level, bits, huge=False, present=True, **config):
    """A 4K (or, with ``huge``, a level-``level`` leaf) mapping of GPA with ``bits`` set
    in its level-``level`` entry; ``present=False`` clears that entry's R/W/X first."""
    pt = ept_page(kv, R | W | X, level=level if huge else 1, hpa=0, **config)
    e = pt.get_entry(GPA, level) | bits
    pt.set_entry(GPA, level, e if present else e & ~(R | W | X))
    return pt


RESERVED_CASES = (
    [(level, bit, False) for level in (1, 2, 3, 4) for bit in (46, 47, 51)]   # 51:MAXPHYADDR
    + [(2, bit, False) for bit in (3, 4, 5, 6)]
    + [(2, bit, True) for bit in range(12, 21)]         # 2M alignment
    + [(3, bit, False) for bit in (3, 4, 5, 6)]
    + [(3, bit, True) for bit in range(12, 30)]         # 1G alignment
    + [(4, bit, False) for bit in (3, 4, 5, 6, 7)]
)


@pytest.mark.parametrize("level, bit, huge", RESERVED_CASES)
def test_ept_reserved_bits_misconfigure(kv, level, bit, huge):
    pt = ept_levels_with(kv, level, 1 << bit, huge, maxphyaddr=46)
    assert pt.translate(GPA) == kv.EptMisconfig(GPA)
    assert pt.walk(GPA)[-1][0] == level
    # ept_reserved_bit_at_level: making the entry not present turns the bit into ignored.
    pt = ept_levels_with(kv, level, 1 << bit, huge, present=False, maxphyaddr=46)
    assert pt.translate(GPA) == kv.EptViolation(GPA, 0x181)


@pytest.mark.parametrize("bit", [3, 4, 5, 6, 7])
def test_ept_pml5e_bits_7_to_3_are_reserved(kv, bit):
    pt = ept_page(kv, R | W | X, levels=5)
    pt.set_entry(GPA, 5, pt.get_entry(GPA, 5) | 1 << bit)
    assert pt.translate(GPA) == kv.EptMisconfig(GPA)


@pytest.mark.parametrize("bit", [8, 9, 10, 11] + list(range(52, 64)))
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_ept_ignored_bits(kv, bit, level):
    pt = ept_levels_with(kv, level, 1 << bit, ad_bits=False)
    assert pt.translate(GPA | 0x42) == kv.Translation(0x42, 1)


@pytest.mark.parametrize("memtype, ok", [(0, True), (1, True), (2, False), (3, False),
                                         (4, True), (5, True), (6, True), (7, False)])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_ept_leaf_memory_types(kv, memtype, ok, level):
    pt = kv.PageTables("ept")
    pt.set_entry(GPA, level, R | memtype << 3 | (LARGE if level > 1 else 0))
    offset_in_page = {1: 0, 2: 0x189000, 3: 0x16789000}[level]   # GPA bits 11:0, 20:0, 29:0
    assert pt.translate(GPA) == (kv.Translation(offset_in_page, level) if ok
                                 else kv.EptMisconfig(GPA))


def test_ept_1g_leaf_needs_1g_support(kv):
    pt = ept_page(kv, R | W | X, level=3, hpa=0x40000000, huge_1g=False)
    assert pt.translate(GPA) == kv.EptMisconfig(GPA)
    assert pt.walk(GPA)[-1][0] == 3
    pt = ept_page(kv, R | W | X, level=2, hpa=0x40000000, huge_1g=False)
    assert pt.translate(GPA) == kv.Translation(0x40189000, 2)


def test_ept_misconfiguration_takes_precedence_over_violation(kv):
    pt = ept_page(kv, W)                                   # write-only leaf
    pt.set_entry(GPA, 4, pt.get_entry(GPA, 4) & ~W)        # a PML4E that forbids writes
    assert pt.translate(GPA, write=True) == kv.EptMisconfig(GPA)
    pt.set_entry(GPA, 3, 0)                                # the walk stops above the leaf
    assert pt.translate(GPA, write=True) == kv.EptViolation(GPA, 0x182)


def test_ept_misconfiguration_of_a_non_leaf_entry(kv):
    pt = ept_page(kv, R | W | X)
    pt.set_entry(GPA, 3, pt.get_entry(GPA, 3) & ~R)        # W|X non-leaf entry
    assert pt.translate(GPA) == kv.EptMisconfig(GPA)
    assert [lvl for lvl, _ in pt.walk(GPA)] == [4, 3]


# --- EPT guest paging-structure accesses and "no GVA" ---------------------------------------

@pytest.mark.parametrize("ad_bits, perms, write, expected", [
    # ept_access_test_paddr_not_present_ad_disabled / _ad_enabled
    (False, 0, False, 0x81), (False, 0, True, 0x83), (True, 0, False, 0x83), (True, 0, True, 0x83),
    # ept_access_test_paddr_read_only_ad_disabled / _ad_enabled
    (False, R, False, ALLOWED), (False, R, True, 0x8B),
    (True, R, False, 0x8B), (True, R, True, 0x8B),
    (True, R | W, True, ALLOWED), (True, R | X, False, 0xAB),
])
def test_ept_guest_walk_accesses(kv, ad_bits, perms, write, expected):
    pt = ept_page(kv, perms, ad_bits=ad_bits)
    result = pt.translate(GPA, write=write, stage="walk")
    if expected == ALLOWED:
        assert result == kv.Translation(DATA_HPA, 1)
    else:
        assert result == kv.EptViolation(GPA, expected)


@pytest.mark.parametrize("ad_bits", [False, True])
def test_ept_nogva_access_is_a_plain_read_or_write(kv, ad_bits):
    pt = ept_page(kv, 0, ad_bits=ad_bits)
    assert pt.translate(GPA, stage="nogva") == kv.EptViolation(GPA, 0x1)
    assert pt.translate(GPA, write=True, stage="nogva") == kv.EptViolation(GPA, 0x2)
    pt = ept_page(kv, R, ad_bits=ad_bits)          # a PDPTE load needs no W even with A/D
    assert pt.translate(GPA, stage="nogva") == kv.Translation(DATA_HPA, 1)
    assert pt.translate(GPA, write=True, stage="nogva") == kv.EptViolation(GPA, 0xA)


def test_ept_encrypted_is_ignored(kv):
    pt = ept_page(kv, 0)
    assert pt.translate(GPA, encrypted=True) == kv.EptViolation(GPA, 0x181)


# --- A/D bits --------------------------------------------------------------------------------

def ad_bits_of(pt, mask):
    return [e & mask for _, e in pt.walk(GPA)]


@pytest.mark.parametrize("access, leaf_dirty", [
    ({}, False), ({"write": True}, True), ({"fetch": True}, False),
    ({"stage": "walk"}, True),                  # with EPT A/D every walk access is a write
    ({"stage": "nogva"}, False), ({"stage": "nogva", "write": True}, True),
])
def test_ept_accessed_and_dirty_bits(kv, access, leaf_dirty):
    pt = kv.PageTables("ept")
    pt.set_entry(GPA, 1, DATA_HPA | R | W | X | WB)
    for level in (2, 3, 4):                      # start with A clear everywhere
        pt.set_entry(GPA, level, pt.get_entry(GPA, level) & ~EPT_A)
    assert ad_bits_of(pt, EPT_A | EPT_D) == [0, 0, 0, 0]
    assert isinstance(pt.translate(GPA, **access), kv.Translation)
    # kvm-unit-tests ept_access_paddr: A at every level, D only in the leaf.
    assert ad_bits_of(pt, EPT_A | EPT_D) == [EPT_A] * 3 + [EPT_A | (EPT_D if leaf_dirty else 0)]


def test_ept_without_ad_bits_nothing_is_written(kv):
    pt = ept_page(kv, R | W | X, ad_bits=False)
    before = pt.tables.copy()
    assert pt.translate(GPA, write=True) == kv.Translation(DATA_HPA, 1)
    assert (pt.tables == before).all()


def test_a_failing_access_sets_no_ad_bits(kv):
    pt = ept_page(kv, R)
    before = pt.tables.copy()
    assert isinstance(pt.translate(GPA, write=True), kv.EptViolation)
    assert (pt.tables == before).all()
    pt = npt_page(kv, P | US)
    before = pt.tables.copy()
    assert isinstance(pt.translate(GPA, write=True), kv.NestedPageFault)
    assert (pt.tables == before).all()


@pytest.mark.parametrize("access, leaf_dirty", [
    ({}, False), ({"write": True}, True), ({"fetch": True}, False), ({"stage": "walk"}, True),
])
def test_npt_accessed_and_dirty_bits(kv, access, leaf_dirty):
    pt = npt_page(kv)
    for level in (2, 3, 4):
        pt.set_entry(GPA, level, pt.get_entry(GPA, level) & ~NPT_A)
    assert isinstance(pt.translate(GPA, **access), kv.Translation)
    assert ad_bits_of(pt, NPT_A | NPT_D) == [NPT_A] * 3 + [NPT_A | (NPT_D if leaf_dirty else 0)]


def test_ad_bits_land_on_large_leaves(kv):
    pt = ept_page(kv, R | W, level=2, hpa=0x40000000)
    assert pt.translate(GPA, write=True) == kv.Translation(0x40189000, 2)
    assert pt.get_entry(GPA, 2) & (EPT_A | EPT_D) == EPT_A | EPT_D


# --- NPT (svm_npt.c) -------------------------------------------------------------------------

@pytest.mark.parametrize("bits, access, exit_info_1", [
    (RW | US, {}, 0x100000004),                                    # npt_np
    (P | RW | US | NX, {"fetch": True}, 0x100000015),               # npt_nx
    (P | RW, {}, 0x100000005),                                      # npt_us
    (P | US, {"write": True}, 0x100000007),                         # npt_rw
    (P | US, {"stage": "walk"}, 0x200000007),                       # npt_rw_pfwalk
    (RW | US, {"stage": "walk"}, 0x200000006),
    (RW | US, {"encrypted": True}, 0x500000004),
    (RW | US, {"stage": "nogva"}, 0x4),
    (RW | US, {"stage": "nogva", "write": True}, 0x6),
])
def test_npt_exits(kv, bits, access, exit_info_1):
    pt = npt_page(kv, bits)
    assert pt.translate(GPA, **access) == kv.NestedPageFault(GPA, exit_info_1)


def test_npt_allowed_accesses(kv):
    pt = npt_page(kv, P | RW | US)
    for access in ({}, {"write": True}, {"fetch": True}, {"stage": "walk"}):
        assert pt.translate(GPA | 0x123, **access) == kv.Translation(DATA_HPA | 0x123, 1)
    assert npt_page(kv, P | US | NX).translate(GPA) == kv.Translation(DATA_HPA, 1)


@pytest.mark.parametrize("level", [2, 3, 4])
@pytest.mark.parametrize("clear, set_, access, exit_info_1", [
    (US, 0, {}, 0x100000005),
    (RW, 0, {"write": True}, 0x100000007),
    (0, NX, {"fetch": True}, 0x100000015),
    (P, 0, {}, 0x100000004),
])
def test_npt_permissions_at_every_level(kv, level, clear, set_, access, exit_info_1):
    pt = npt_page(kv)
    pt.set_entry(GPA, level, (pt.get_entry(GPA, level) & ~clear) | set_)
    assert pt.translate(GPA, **access) == kv.NestedPageFault(GPA, exit_info_1)


@pytest.mark.parametrize("host_nx, host_smep, exit_info_1", [
    (False, False, 0x100000004), (True, False, 0x100000014),
    (False, True, 0x100000014), (True, True, 0x100000014),
])
def test_npt_fetch_bit_needs_host_nx_or_smep(kv, host_nx, host_smep, exit_info_1):
    pt = npt_page(kv, RW | US, host_nx=host_nx, host_smep=host_smep)
    assert pt.translate(GPA, fetch=True) == kv.NestedPageFault(GPA, exit_info_1)


def npt_with(kv, level, bits, **config):
    """NPT mapping of GPA with ``bits`` ORed into its level-``level`` entry; with PS
    in ``bits`` that entry becomes a 1G-aligned large leaf."""
    pt = npt_page(kv, **config)
    if bits & LARGE:
        pt.set_entry(GPA, level, 0x40000000 | P | RW | US | bits)
    else:
        pt.set_entry(GPA, level, pt.get_entry(GPA, level) | bits)
    return pt


# svm_npt_rsvd_bits_test: the final fetch gives 0x10000000d, plus 0x10 with host NX or SMEP;
# a bad PML4E (bit 8) hits the guest's page-table walk first: 0x20000000f.
NPT_RSVD_CASES = [
    (1, 1 << 47, {"maxphyaddr": 47}), (1, 1 << 51, {"maxphyaddr": 40}),
    (2, LARGE | 1 << 13, {}), (2, LARGE | 1 << 20, {}),
    (3, LARGE | 1 << 13, {}), (3, LARGE | 1 << 29, {}), (3, LARGE, {"huge_1g": False}),
    (4, 1 << 8, {}), (4, LARGE, {}), (2, 1 << 45, {"maxphyaddr": 45}),
]


@pytest.mark.parametrize("level, bits, config", NPT_RSVD_CASES)
@pytest.mark.parametrize("host_nx, host_smep", [(True, False), (True, True)])
def test_npt_reserved_bits_final_fetch(kv, level, bits, config, host_nx, host_smep):
    pt = npt_with(kv, level, bits, host_nx=host_nx, host_smep=host_smep, **config)
    assert pt.translate(GPA, fetch=True) == kv.NestedPageFault(GPA, 0x10000001D)
    assert pt.walk(GPA)[-1][0] == level


@pytest.mark.parametrize("level, bits, config", NPT_RSVD_CASES)
def test_npt_reserved_bits_guest_walk(kv, level, bits, config):
    pt = npt_with(kv, level, bits, **config)
    assert pt.translate(GPA, stage="walk") == kv.NestedPageFault(GPA, 0x20000000F)


@pytest.mark.parametrize("level", [1, 2, 3, 4])
@pytest.mark.parametrize("host_smep, exit_info_1", [(False, 0x10000000D), (True, 0x10000001D)])
def test_npt_nx_is_reserved_without_host_nx(kv, level, host_smep, exit_info_1):
    pt = npt_with(kv, level, NX, host_nx=False, host_smep=host_smep)
    assert pt.translate(GPA, fetch=True) == kv.NestedPageFault(GPA, exit_info_1)
    assert pt.translate(GPA, stage="walk") == kv.NestedPageFault(GPA, 0x20000000F)


def test_npt_reserved_bits_ignored_in_not_present_entries(kv):
    pt = npt_with(kv, 4, 1 << 8)
    pt.set_entry(GPA, 4, pt.get_entry(GPA, 4) & ~P)
    assert pt.translate(GPA) == kv.NestedPageFault(GPA, 0x100000004)


def test_npt_pml5e_ps_and_bit_8_are_reserved(kv):
    for bit in (LARGE, 1 << 8):
        pt = npt_page(kv, levels=5)
        pt.set_entry(GPA, 5, pt.get_entry(GPA, 5) | bit)
        assert pt.translate(GPA) == kv.NestedPageFault(GPA, 0x10000000D)


def test_npt_pat_bit_of_a_4k_pte_is_not_reserved(kv):
    assert npt_page(kv, P | US | LARGE).translate(GPA) == kv.Translation(DATA_HPA, 1)


@pytest.mark.parametrize("level, bits, hpa", [
    (2, LARGE | 1 << 12, 0x40189000),      # PAT (bit 12) of a 2M leaf is not reserved
    (3, LARGE | 1 << 12, 0x56789000),
])
def test_npt_aligned_large_leaves_translate(kv, level, bits, hpa):
    assert npt_with(kv, level, bits).translate(GPA) == kv.Translation(hpa, level)
