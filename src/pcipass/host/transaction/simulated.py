"""The kernel's part on a --sysfs tree: SimulatedKernel plays the kernel's reactions to the
binding writes (the `driver` symlink moves, drivers_probe picks a driver, modprobe makes the
driver's directory), so claim, release and recover run on a synthetic or captured tree as on
a host. Used at run time, not only by tests: `pcipass claim --sysfs ROOT` works on ROOT
through it. `writer_for` picks it for any root but /.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pcipass.host.model.sysfs import parse_bdf
from pcipass.host.transaction.writer import NOIOMMU_PARAM, SysfsWriter
from pcipass.sysfs import PASS_THROUGH_DRIVERS, link_name, read_attr


class SimulatedKernel(SysfsWriter):
    """The kernel's reactions to binding writes, played on a synthetic tree.

    Binding moves the `driver` symlink; drivers_probe picks driver_override, else
    the device's own driver (the one it was last unbound from, remembered in
    ROOT/.pcipass-sim.json, or given as `native`); modprobe creates the driver's
    directory. `fail` makes chosen writes fail like the kernel's EINVAL would.
    `noiommu=False` plays a kernel built without CONFIG_VFIO_NOIOMMU.
    Writes are made in-process: a test sets `fork_blocking_writes` to play a blocked unbind.
    """

    fork_blocking_writes = False

    def __init__(
        self,
        root: str | os.PathLike[str],
        native: dict[str, str] | None = None,
        fail: Callable[[Path, str], bool] | None = None,
        noiommu: bool = True,
    ) -> None:
        super().__init__(root)
        self.noiommu_built = noiommu
        self.state_path = self.root / ".pcipass-sim.json"
        self.native = dict(native or {})
        try:
            self.native.update(json.loads(self.state_path.read_text()).get("native", {}))
        except (OSError, ValueError):
            pass
        self.fail = fail
        self.writes: list[tuple[str, str]] = []

    def _remember(self) -> None:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            data = {}
        data["native"] = self.native
        self.state_path.write_text(json.dumps(data))

    def _group_node(self, bdf: str) -> Path | None:
        group = link_name(str(self.dev_path(bdf) / "iommu_group"))
        if group is None:
            return None
        name = read_attr(str(self.root / "sys/kernel/iommu_groups" / group / "name"))
        return self.root / "dev/vfio" / (f"noiommu-{group}" if name == "vfio-noiommu" else group)

    def _noiommu_group(self, bdf: str, bound: bool) -> None:
        """vfio-pci taking a device that has no IOMMU group, with the no-IOMMU mode on, makes it
        a group of its own named vfio-noiommu (vfio_noiommu_group_alloc); the group goes with
        the device's unbind."""
        groups = self.root / "sys/kernel/iommu_groups"
        link = self.dev_path(bdf).resolve() / "iommu_group"
        if bound and not os.path.lexists(link) and self.noiommu_mode() == "Y":
            taken = {int(g) for g in os.listdir(groups)} if groups.is_dir() else set()
            group = groups / str(min(set(range(len(taken) + 1)) - taken))
            (group / "devices").mkdir(parents=True)
            (group / "name").write_text("vfio-noiommu\n")
            os.symlink(os.path.relpath(self.dev_path(bdf).resolve(), group / "devices"), group / "devices" / bdf)
            os.symlink(os.path.relpath(group, link.parent), link)
        elif not bound and os.path.lexists(link):
            group = link.resolve()
            if read_attr(str(group / "name")) == "vfio-noiommu":
                link.unlink()
                (group / "devices" / bdf).unlink()
                (group / "name").unlink()
                (group / "devices").rmdir()
                group.rmdir()

    def _nodes(self) -> dict[str, list[int]]:
        try:
            return dict(json.loads(self.state_path.read_text()).get("nodes", {}))
        except (OSError, ValueError):
            return {}

    def _remember_nodes(self, nodes: dict[str, list[int]]) -> None:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            data = {"native": self.native}
        data["nodes"] = nodes
        self.state_path.write_text(json.dumps(data))

    def _vfio_bound(self, bdf: str, bound: bool) -> None:
        """vfio-pci makes /dev/vfio/N (root, 0600) with the group's first device and removes
        it with its last."""
        node = self._group_node(bdf)
        if node is None:
            return
        others = [d for d in os.listdir(self.pci / "devices")
                  if d != bdf and self.driver(d) == "vfio-pci" and self._group_node(d) == node]
        nodes = self._nodes()
        if bound and not node.exists():
            node.parent.mkdir(parents=True, exist_ok=True)
            node.write_text("")
            nodes[str(node)] = [0, 0, 0o600]
        elif not bound and not others and node.exists():
            node.unlink()
            nodes.pop(str(node), None)
        self._remember_nodes(nodes)

    def node_state(self, path: Path) -> tuple[int, int, int] | None:
        if not path.exists():
            return None
        uid, gid, mode = self._nodes().get(str(path), [0, 0, 0o600])
        return uid, gid, mode

    def set_node(self, path: Path, uid: int, gid: int, mode: int) -> None:
        self.writes.append((os.path.relpath(path, self.root), f"{uid}:{gid} {mode:o}"))
        nodes = self._nodes()
        nodes[str(path)] = [uid, gid, mode]
        self._remember_nodes(nodes)

    def _link(self, bdf: str, driver: str) -> None:
        drv = self.pci / "drivers" / driver
        os.symlink(os.path.relpath(drv, self.dev_path(bdf).resolve()), self.dev_path(bdf).resolve() / "driver")
        try:
            os.symlink(os.path.relpath(self.dev_path(bdf).resolve(), drv), drv / bdf)
        except FileExistsError:
            pass
        if driver == "vfio-pci":
            self._noiommu_group(bdf, True)
            self._vfio_bound(bdf, True)

    def _unlink(self, bdf: str, driver: str) -> None:
        (self.dev_path(bdf).resolve() / "driver").unlink()
        (self.pci / "drivers" / driver / bdf).unlink(missing_ok=True)
        if driver == "vfio-pci":
            self._vfio_bound(bdf, False)
            self._noiommu_group(bdf, False)

    def _probe(self, bdf: str) -> None:
        if self.driver(bdf) is None:
            for name in sorted(os.listdir(self.pci / "drivers")):
                if self._match(bdf, name):
                    self._link(bdf, name)
                    break

    # --- SR-IOV: sriov_numvfs creates and removes the VFs, as the PF's driver has them made ---

    def _sim_state(self) -> dict[str, object]:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _set_numvfs(self, pf: str, value: str) -> None:
        """As sriov_numvfs_store: ERANGE over sriov_totalvfs; the same count does nothing;
        ENOENT without a PF driver (or vfio-pci without enable_sriov); EBUSY for a count
        over another; otherwise the PF's driver creates or removes the VFs."""
        path = self.dev_path(pf) / "sriov_numvfs"
        if not value.isdigit():
            raise OSError(22, "Invalid argument (simulated)", str(path))
        want = int(value)
        total, now = self.read_int(pf, "sriov_totalvfs"), self.numvfs(pf) or 0
        if want > total:
            raise OSError(34, "Numerical result out of range (simulated)", str(path))
        if want == now:
            return
        driver = self.driver(pf)
        if driver is None or (driver == "vfio-pci"
                              and self.read("sys/module/vfio_pci/parameters/enable_sriov") != "Y"):
            raise OSError(2, "No such file or directory (simulated)", str(path))
        if want and now:
            raise OSError(16, "Device or resource busy (simulated)", str(path))
        if want == 0:
            self._remove_vfs(pf)
        else:
            self._add_vfs(pf, want)

    def read_int(self, bdf: str, name: str, base: int = 10) -> int:
        return int(str(read_attr(str(self.dev_path(bdf) / name)) or "0"), base)

    def _add_vfs(self, pf: str, count: int) -> None:
        from pcipass import pci
        from pcipass.host.fixtures.synthetic import Tree

        pf_path = str(self.dev_path(pf).resolve())
        known = {pf: pf_path}
        parent = os.path.basename(os.path.dirname(pf_path))
        if not parent.startswith("pci"):
            known[parent] = os.path.dirname(pf_path)
        tree = Tree.over(str(self.root), known)
        b = parse_bdf(pf)
        offset, stride = self.read_int(pf, "sriov_offset"), self.read_int(pf, "sriov_stride")
        vendor = self.read_int(pf, "vendor", 16)
        vf_device = self.read_int(pf, "sriov_vf_device", 16)
        pci_class = self.read_int(pf, "class", 16)
        groups = self.root / "sys/kernel/iommu_groups"
        vf_driver = dict(self._sim_state().get("vf_drivers", {})).get(pf)  # type: ignore[call-overload]
        autoprobe = self.sriov_autoprobe_now(pf) != "0"
        for i in range(count):
            rid = (b.bus << 8 | b.device << 3 | b.function) + offset + i * stride
            vf = f"{b.domain:04x}:{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"
            taken = [int(n) for n in os.listdir(groups) if n.isdigit()] if groups.is_dir() else []
            tree.add(vf, vendor, vf_device, pci_class, parent=None if parent.startswith("pci") else parent,
                     group=max(taken, default=-1) + 1, express=pci.PCI_EXP_TYPE_ENDPOINT, flr=True,
                     physfn=pf, reset_method="flr")
            if vf_driver:
                self.native[vf] = vf_driver
            if self.driver(pf) == "vfio-pci":  # vfio_pci_bus_notifier: a vfio-pci PF's VFs go to vfio-pci
                (self.dev_path(vf) / "driver_override").write_text("vfio-pci\n")
        self._remember()
        if autoprobe:
            for name in self._virtfns(pf):
                self._probe(name)

    def _virtfns(self, pf: str) -> list[str]:
        path = self.dev_path(pf)
        names = sorted((n for n in os.listdir(path) if n.startswith("virtfn")), key=lambda n: int(n[6:]))
        return [os.path.basename(os.readlink(path / n)) for n in names]

    def _remove_vfs(self, pf: str) -> None:
        path = self.dev_path(pf)
        for index, vf in reversed(list(enumerate(self._virtfns(pf)))):
            driver = self.driver(vf)
            if driver is not None:
                self._unlink(vf, driver)
            real = self.dev_path(vf).resolve()
            group = link_name(str(real / "iommu_group"))
            if group is not None:
                shutil.rmtree(self.root / "sys/kernel/iommu_groups" / group)
            self.dev_path(vf).unlink()
            shutil.rmtree(real)
            (path / f"virtfn{index}").unlink()
            self.native.pop(vf, None)
        self._remember()
        (path / "sriov_numvfs").write_text("0\n")

    def _match(self, bdf: str, driver: str) -> bool:
        override = self.override(bdf)
        if override is not None:
            return override == driver
        return self.native.get(bdf) == driver

    def write(self, path: Path, value: str) -> None:
        rel = os.path.relpath(path, self.pci)
        self.writes.append((rel, value))
        if self.fail is not None and self.fail(Path(rel), value):
            raise OSError(22, "Invalid argument (simulated)", str(path))
        bdf = value.strip()
        parts = Path(rel).parts
        if parts[-1] == "driver_override":
            path.write_text((value.strip() or "(null)") + "\n")
        elif parts[-1] == "unbind":
            # devices/BDF/driver/unbind or drivers/NAME/unbind
            driver = self.driver(bdf)
            if driver is None:
                raise OSError(19, "No such device (simulated)", str(path))
            if driver not in PASS_THROUGH_DRIVERS:  # never picked by ID
                self.native[bdf] = driver
                self._remember()
            self._unlink(bdf, driver)
        elif parts[-1] == "drivers_probe":
            self._probe(bdf)
        elif parts[-1] == "bind":
            driver = parts[-2]
            if self.driver(bdf) is not None:
                raise OSError(16, "Device or resource busy (simulated)", str(path))
            override = self.override(bdf)
            if override is not None and override != driver:
                raise OSError(19, "No such device (simulated)", str(path))
            self._link(bdf, driver)
        elif parts[-1] == "sriov_numvfs":
            self._set_numvfs(parts[-2], value.strip())
        elif parts[-1] == "sriov_drivers_autoprobe":
            if value.strip() not in ("0", "1"):
                raise OSError(22, "Invalid argument (simulated)", str(path))
            path.write_text(value.strip() + "\n")
        elif parts[-1] in ("new_slot", "remove_slot", "permissive", "quirks"):
            with open(path, "a") as f:
                f.write(bdf + "\n")
        else:
            path.write_text(value)

    def modprobe(self, bdf: str | None, value: str | None) -> None:
        name = {"xen-pciback": "pciback"}.get(value or "", value or "")
        if name == "vfio":
            param = self.root / NOIOMMU_PARAM
            param.parent.parent.mkdir(parents=True, exist_ok=True)
            if self.noiommu_built and not param.exists():
                param.parent.mkdir(exist_ok=True)
                param.write_text("N\n")
            return
        drv = self.pci / "drivers" / name
        if not drv.is_dir():
            drv.mkdir(parents=True)
            for attr in ("bind", "unbind", "new_id", "remove_id"):
                (drv / attr).write_text("")

    def _vfio_module_has_noiommu(self) -> bool | None:
        return self.noiommu_built

    def expect(self, bdf: str, value: str | None, timeout: float = 0.0) -> None:
        super().expect(bdf, value, timeout)


def writer_for(root: str) -> SysfsWriter:
    """The real kernel at /, the simulation under any other --sysfs root."""
    return SysfsWriter("/") if os.path.abspath(root) == "/" else SimulatedKernel(root)
