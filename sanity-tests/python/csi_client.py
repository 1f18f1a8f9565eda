"""Calls Cairn's CSI services on their Unix socket with Python's grpcio,
default channel options: what a tool written in Python (or any client on
gRPC's C core, which sends the socket path as the HTTP/2 authority) sees.

    python csi_client.py unix:///path/to/csi.sock PROTO_DIR

The stubs are generated from PROTO_DIR/csi/csi.proto into a temporary
directory at start-up (grpcio-tools), never committed. Each check prints
`ok NAME` or `FAIL NAME: why`; the last line is `N passed, N failed` and the
exit status is non-zero when any check failed.
"""

import importlib
import importlib.resources
import os
import sys
import tempfile
import uuid

import grpc
from grpc_tools import protoc


def load_stubs(proto_dir, out):
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_dir, "csi", "csi.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on csi.proto")
    sys.path.insert(0, out)
    return (
        importlib.import_module("csi.csi_pb2"),
        importlib.import_module("csi.csi_pb2_grpc"),
    )


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, fn):
        try:
            fn()
        except Exception as e:  # a failed check, reported and counted
            self.failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        else:
            self.passed += 1
            print(f"ok {name}", flush=True)


def expect_code(call, code):
    try:
        call()
    except grpc.RpcError as e:
        if e.code() != code:
            raise AssertionError(f"expected {code}, got {e.code()}: {e.details()}")
        return
    raise AssertionError(f"expected {code}, got OK")


def main():
    endpoint, proto_dir = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as out:
        pb, rpc = load_stubs(proto_dir, out)
        # Default options: no authority override.
        channel = grpc.insecure_channel(endpoint)
        identity = rpc.IdentityStub(channel)
        controller = rpc.ControllerStub(channel)
        node = rpc.NodeStub(channel)
        c = Checks()
        cap = pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=pb.VolumeCapability.AccessMode(
                mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )

        def plugin_info():
            r = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
            assert r.name == "csi.cairn.dev", r.name
            assert r.vendor_version, "no vendor_version"

        def probe():
            r = identity.Probe(pb.ProbeRequest(), timeout=10)
            assert r.ready.value, "not ready"

        def plugin_caps():
            r = identity.GetPluginCapabilities(
                pb.GetPluginCapabilitiesRequest(), timeout=10
            )
            kinds = {x.service.type for x in r.capabilities if x.HasField("service")}
            assert pb.PluginCapability.Service.CONTROLLER_SERVICE in kinds, kinds

        def controller_caps():
            r = controller.ControllerGetCapabilities(
                pb.ControllerGetCapabilitiesRequest(), timeout=10
            )
            types = {x.rpc.type for x in r.capabilities}
            known = set(pb.ControllerServiceCapability.RPC.Type.values())
            assert types <= known, f"unknown to CSI v1.12.0: {types - known}"
            assert pb.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME in types

        name = f"py-{uuid.uuid4().hex[:8]}"
        created = {}

        def create_list_delete():
            req = pb.CreateVolumeRequest(
                name=name,
                capacity_range=pb.CapacityRange(required_bytes=16 << 20),
                volume_capabilities=[cap],
            )
            v = controller.CreateVolume(req, timeout=60).volume
            assert v.capacity_bytes >= 16 << 20, v.capacity_bytes
            again = controller.CreateVolume(req, timeout=60).volume
            assert again.volume_id == v.volume_id, "CreateVolume not idempotent"
            created["id"] = v.volume_id
            listed = controller.ListVolumes(pb.ListVolumesRequest(), timeout=10)
            ids = [e.volume.volume_id for e in listed.entries]
            assert v.volume_id in ids, ids
            controller.DeleteVolume(
                pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=60
            )
            controller.DeleteVolume(
                pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=60
            )

        def create_without_name():
            expect_code(
                lambda: controller.CreateVolume(
                    pb.CreateVolumeRequest(volume_capabilities=[cap]), timeout=10
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            )

        def node_info_and_caps():
            info = node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10)
            assert info.node_id, "no node id"
            r = node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=10)
            types = {x.rpc.type for x in r.capabilities}
            known = set(pb.NodeServiceCapability.RPC.Type.values())
            assert types <= known, f"unknown to CSI v1.12.0: {types - known}"
            assert pb.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME in types

        def node_stats_not_found():
            expect_code(
                lambda: node.NodeGetVolumeStats(
                    pb.NodeGetVolumeStatsRequest(
                        volume_id="fake-vol-id-python", volume_path="some/path"
                    ),
                    timeout=10,
                ),
                grpc.StatusCode.NOT_FOUND,
            )

        c.check("Identity.GetPluginInfo", plugin_info)
        c.check("Identity.Probe", probe)
        c.check("Identity.GetPluginCapabilities", plugin_caps)
        c.check("Controller.ControllerGetCapabilities", controller_caps)
        c.check("Controller.CreateVolume/ListVolumes/DeleteVolume", create_list_delete)
        c.check("Controller.CreateVolume without a name", create_without_name)
        c.check("Node.NodeGetInfo/NodeGetCapabilities", node_info_and_caps)
        c.check("Node.NodeGetVolumeStats of an unknown volume", node_stats_not_found)
        channel.close()
        print(f"{c.passed} passed, {c.failed} failed", flush=True)
        return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
