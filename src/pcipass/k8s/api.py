"""The kubelet's plugin APIs as data: each message's fields (number, name, type) and each
service's methods, written from the published APIs (k8s.io/kubelet pkg/apis):

    pluginregistration (v1)    Registration: GetInfo, NotifyRegistrationStatus
    dra (v1 and v1beta1)       DRAPlugin: NodePrepareResources, NodeUnprepareResources
    deviceplugin (v1beta1)     Registration: Register (served by the kubelet)
                               DevicePlugin: GetDevicePluginOptions, ListAndWatch (a stream),
                               GetPreferredAllocation, Allocate, PreStartContainer

pcipass.k8s.wire encodes and decodes these; pcipass.k8s.rpc puts them on gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

from pcipass.k8s.wire import BOOL, INT32, INT64, MAP, MESSAGE, STRING, Field, Schema

F = Field

# --- pluginregistration: how a kubelet finds a DRA (or CSI, device) plugin's socket ---
REGISTRATION: Schema = {
    "InfoRequest": (),
    "PluginInfo": (F(1, "type", STRING), F(2, "name", STRING), F(3, "endpoint", STRING),
                   F(4, "supported_versions", STRING, repeated=True)),
    "RegistrationStatus": (F(1, "plugin_registered", BOOL), F(2, "error", STRING)),
    "RegistrationStatusResponse": (),
}
DRA_PLUGIN_TYPE = "DRAPlugin"  # PluginInfo.type of a DRA driver
PLUGINS_REGISTRY = "plugins_registry"  # under the kubelet's directory: the sockets it watches
PLUGINS = "plugins"  # under the kubelet's directory: the plugins' own sockets

# --- dra: the DRA node service; v1 adds an optional share_id to Device ---
_DRA_COMMON: dict[str, tuple[Field, ...]] = {
    "Claim": (F(1, "namespace", STRING), F(2, "uid", STRING), F(3, "name", STRING)),
    "NodePrepareResourcesRequest": (F(1, "claims", MESSAGE, repeated=True, message="Claim"),),
    "NodePrepareResourcesResponse": (F(1, "claims", MAP, message="NodePrepareResourceResponse"),),
    "NodePrepareResourceResponse": (F(1, "devices", MESSAGE, repeated=True, message="Device"),
                                    F(2, "error", STRING)),
    "NodeUnprepareResourcesRequest": (F(1, "claims", MESSAGE, repeated=True, message="Claim"),),
    "NodeUnprepareResourcesResponse": (F(1, "claims", MAP, message="NodeUnprepareResourceResponse"),),
    "NodeUnprepareResourceResponse": (F(1, "error", STRING),),
}
_DRA_DEVICE = (F(1, "request_names", STRING, repeated=True), F(2, "pool_name", STRING),
               F(3, "device_name", STRING), F(4, "cdi_device_ids", STRING, repeated=True))
DRA_V1: Schema = {**_DRA_COMMON, "Device": _DRA_DEVICE + (F(5, "share_id", STRING, optional=True),)}
DRA_V1BETA1: Schema = {**_DRA_COMMON, "Device": _DRA_DEVICE}

# --- deviceplugin v1beta1 ---
DEVICE_PLUGIN: Schema = {
    "Empty": (),
    "DevicePluginOptions": (F(1, "pre_start_required", BOOL), F(2, "get_preferred_allocation_available", BOOL)),
    "RegisterRequest": (F(1, "version", STRING), F(2, "endpoint", STRING), F(3, "resource_name", STRING),
                        F(4, "options", MESSAGE, message="DevicePluginOptions")),
    "ListAndWatchResponse": (F(1, "devices", MESSAGE, repeated=True, message="Device"),),
    "TopologyInfo": (F(1, "nodes", MESSAGE, repeated=True, message="NUMANode"),),
    "NUMANode": (F(1, "ID", INT64),),
    "Device": (F(1, "ID", STRING), F(2, "health", STRING), F(3, "topology", MESSAGE, message="TopologyInfo")),
    "PreStartContainerRequest": (F(1, "devices_ids", STRING, repeated=True),),
    "PreStartContainerResponse": (),
    "PreferredAllocationRequest": (F(1, "container_requests", MESSAGE, repeated=True,
                                     message="ContainerPreferredAllocationRequest"),),
    "ContainerPreferredAllocationRequest": (F(1, "available_deviceIDs", STRING, repeated=True),
                                            F(2, "must_include_deviceIDs", STRING, repeated=True),
                                            F(3, "allocation_size", INT32)),
    "PreferredAllocationResponse": (F(1, "container_responses", MESSAGE, repeated=True,
                                      message="ContainerPreferredAllocationResponse"),),
    "ContainerPreferredAllocationResponse": (F(1, "deviceIDs", STRING, repeated=True),),
    "AllocateRequest": (F(1, "container_requests", MESSAGE, repeated=True, message="ContainerAllocateRequest"),),
    "ContainerAllocateRequest": (F(1, "devices_ids", STRING, repeated=True),),
    "CDIDevice": (F(1, "name", STRING),),
    "AllocateResponse": (F(1, "container_responses", MESSAGE, repeated=True, message="ContainerAllocateResponse"),),
    "ContainerAllocateResponse": (F(1, "envs", MAP), F(2, "mounts", MESSAGE, repeated=True, message="Mount"),
                                  F(3, "devices", MESSAGE, repeated=True, message="DeviceSpec"),
                                  F(4, "annotations", MAP),
                                  F(5, "cdi_devices", MESSAGE, repeated=True, message="CDIDevice")),
    "Mount": (F(1, "container_path", STRING), F(2, "host_path", STRING), F(3, "read_only", BOOL)),
    "DeviceSpec": (F(1, "container_path", STRING), F(2, "host_path", STRING), F(3, "permissions", STRING)),
}
DEVICE_PLUGIN_VERSION = "v1beta1"
DEVICE_PLUGINS = "device-plugins"  # under the kubelet's directory
KUBELET_SOCKET = "kubelet.sock"  # in it: the kubelet's Registration service
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"


@dataclass(frozen=True)
class Method:
    name: str
    request: str
    response: str
    stream: bool = False  # the server streams its responses


@dataclass(frozen=True)
class Service:
    """One gRPC service: its full name (package.Service) and methods, over one schema."""

    name: str
    schema: Schema
    methods: tuple[Method, ...]

    def path(self, method: str) -> str:
        return f"/{self.name}/{method}"

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)


PLUGIN_REGISTRATION = Service("pluginregistration.Registration", REGISTRATION, (
    Method("GetInfo", "InfoRequest", "PluginInfo"),
    Method("NotifyRegistrationStatus", "RegistrationStatus", "RegistrationStatusResponse"),
))
_DRA_METHODS = (Method("NodePrepareResources", "NodePrepareResourcesRequest", "NodePrepareResourcesResponse"),
                Method("NodeUnprepareResources", "NodeUnprepareResourcesRequest", "NodeUnprepareResourcesResponse"))
DRA_SERVICE_V1 = Service("k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin", DRA_V1, _DRA_METHODS)
DRA_SERVICE_V1BETA1 = Service("k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin", DRA_V1BETA1, _DRA_METHODS)
# PluginInfo.supported_versions of a DRA driver: the services it serves, as the kubelet names them.
DRA_VERSIONS = {"v1.DRAPlugin": DRA_SERVICE_V1, "v1beta1.DRAPlugin": DRA_SERVICE_V1BETA1}
DEVICE_PLUGIN_REGISTRATION = Service("v1beta1.Registration", DEVICE_PLUGIN, (
    Method("Register", "RegisterRequest", "Empty"),
))
DEVICE_PLUGIN_SERVICE = Service("v1beta1.DevicePlugin", DEVICE_PLUGIN, (
    Method("GetDevicePluginOptions", "Empty", "DevicePluginOptions"),
    Method("ListAndWatch", "Empty", "ListAndWatchResponse", stream=True),
    Method("GetPreferredAllocation", "PreferredAllocationRequest", "PreferredAllocationResponse"),
    Method("Allocate", "AllocateRequest", "AllocateResponse"),
    Method("PreStartContainer", "PreStartContainerRequest", "PreStartContainerResponse"),
))
