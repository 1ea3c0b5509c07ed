"""SR-IOV VF tokens over the fake kernel: a PF's token set through VFIO_DEVICE_FEATURE, a VF
opened with "BDF vf_token=UUID", and what a missing, wrong or needless token says."""

from __future__ import annotations

import uuid

import pytest
from fakekernel import FakeKernel

from pcipass.errors import PcipassError
from pcipass.vfio import open_device

TOKEN = "5b2a8a9e-1c77-4a3c-9d3e-6a1f0b7e2c44"


def test_set_vf_token_sends_the_uuid_as_the_kernel_parses_it(tmp_path):
    fake = FakeKernel(str(tmp_path))
    dev = open_device(fake.bdf, kernel=fake.kernel)
    dev.set_vf_token(uuid.UUID(TOKEN))
    assert fake.token_set == TOKEN
    dev.set_vf_token(TOKEN.upper())
    assert fake.token_set == TOKEN
    with pytest.raises(PcipassError) as e:
        dev.set_vf_token("not-a-uuid")
    assert e.value.code == "vfio-vf-token-bad"
    dev.close()


def test_set_vf_token_on_a_device_without_sr_iov_says_so(tmp_path):
    fake = FakeKernel(str(tmp_path), fail={"VFIO_DEVICE_FEATURE": 25})  # ENOTTY: no vf_token in vfio-pci
    dev = open_device(fake.bdf, kernel=fake.kernel)
    with pytest.raises(PcipassError) as e:
        dev.set_vf_token(TOKEN)
    assert e.value.code == "vfio-vf-token-not-pf" and "PF" in e.value.hint
    dev.close()


def test_a_vf_of_a_vfio_pci_pf_opens_only_with_its_token(tmp_path):
    fake = FakeKernel(str(tmp_path), pf_token=TOKEN)
    with pytest.raises(PcipassError) as e:
        open_device(fake.bdf, kernel=fake.kernel)
    assert e.value.code == "vfio-vf-token-required"
    assert "0000:00:09.0 is on vfio-pci" in e.value.message and "vf_token=" in e.value.hint
    assert "vf-token=UUID" in e.value.hint
    with pytest.raises(PcipassError) as e:
        open_device(fake.bdf, kernel=fake.kernel, vf_token=uuid.uuid4())
    assert e.value.code == "vfio-vf-token-wrong" and "set_vf_token" in e.value.hint
    dev = open_device(fake.bdf, kernel=fake.kernel, vf_token=TOKEN)
    [sent] = [x for x in fake.log if x.call == "VFIO_GROUP_GET_DEVICE_FD" and x.result != "EACCES"]
    assert sent.fields == {"name": fake.bdf, "vf_token": TOKEN}
    assert dev.config_read(0, 2) != 0xFFFF
    dev.close()


def test_a_token_where_none_is_wanted_is_an_error_that_says_so(tmp_path):
    fake = FakeKernel(str(tmp_path))
    with pytest.raises(PcipassError) as e:
        open_device(fake.bdf, kernel=fake.kernel, vf_token=TOKEN)
    assert e.value.code == "vfio-vf-token-unneeded" and "without vf_token" in e.value.hint


def test_a_token_picks_the_container_where_iommufd_would_be_chosen(tmp_path):
    fake = FakeKernel(str(tmp_path), cdev=True, pf_token=TOKEN)
    dev = open_device(fake.bdf, kernel=fake.kernel, vf_token=TOKEN)
    assert dev.container.kind == "container"
    dev.close()
    with pytest.raises(PcipassError) as e:
        open_device(fake.bdf, kernel=fake.kernel, vf_token=TOKEN, iommu="iommufd")
    assert e.value.code == "vfio-vf-token-iommufd"
