"""The lab plugin's boots: a test's `lab` marks, nearest first, make its group key by key."""

from __future__ import annotations

import pytest

from pcipass.lab import pytest_plugin as plugin


class Item:
    """What _group reads of a pytest item: its lab marks, nearest (its own, a parameter's) first."""

    def __init__(self, *marks: pytest.Mark) -> None:
        self.marks = marks

    def iter_markers(self, name: str):
        return iter(m for m in self.marks if m.name == name)


def lab(**kwargs) -> pytest.Mark:
    return pytest.mark.lab(**kwargs).mark


def test_a_parameters_kernel_keeps_its_modules_topology_and_arguments():
    module = lab(topology="seed", append=("intel_iommu=off",))
    assert plugin._group(Item(lab(kernel="iommufd"), module)) == ("seed", False, ("intel_iommu=off",), "iommufd")
    assert plugin._group(Item(lab(), module)) == ("seed", False, ("intel_iommu=off",), None)


def test_the_nearest_mark_wins_where_both_say():
    assert plugin._group(Item(lab(topology="drivers"), lab(topology="seed", xen=True))) == \
        ("drivers", True, (), None)
    assert plugin._group(Item()) == ("default", False, (), None)
