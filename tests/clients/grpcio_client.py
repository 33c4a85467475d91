"""A plain grpcio client (default channel options, stubs generated here with
grpcio-tools from the repository's .proto files), driven by
tests/tests/third_party_clients.rs.

    python grpcio_client.py SOCKET ACTION OUTDIR

ACTION is one of
    x509              SpiffeWorkloadAPI/FetchX509SVID with `workload.spiffe.io: true`:
                      the first response's SVIDs, chain and bundle written as DER
    x509-no-header    the same call without the security header
    cp-bundle         keyway.v1.Admin/GetBundle on the control plane's admin socket
    agent-auth        keyway.v1.AgentAdmin/ListAuth on the node agent's admin socket

Prints one JSON object per line: first {"event": "versions", ...}, then what
happened. A call that ends with a gRPC status other than OK prints
{"event": "rpc_error", ...} and exits 3. Every call has a deadline.
"""

import base64
import importlib.resources
import os
import sys

import grpc
from grpc_tools import protoc

from common import emit, emit_versions

DEADLINE_SECONDS = 20.0
PROTO_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto"))
SECURITY_HEADER = ("workload.spiffe.io", "true")


def generate(outdir):
    """Generates the stubs into OUTDIR/stubs and makes them importable.

    workloadapi.proto has no package; it is compiled from its own directory so
    its module (`workloadapi_pb2`) does not land in a `spiffe` package, which
    would clash with py-spiffe's.
    """
    stubs = os.path.join(outdir, "stubs")
    os.makedirs(stubs, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    runs = [
        (os.path.join(PROTO_ROOT, "spiffe"), ["workloadapi.proto"]),
        (PROTO_ROOT, ["keyway/v1/keyway.proto", "keyway/v1/agent.proto"]),
    ]
    for include, files in runs:
        code = protoc.main(
            ["grpc_tools.protoc", "-I" + include, "-I" + well_known,
             "--python_out=" + stubs, "--grpc_python_out=" + stubs]
            + [os.path.join(include, f) for f in files]
        )
        if code != 0:
            raise RuntimeError("protoc failed on {} ({})".format(files, code))
    sys.path.insert(0, stubs)


def write(outdir, name, data):
    path = os.path.join(outdir, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def x509(socket, outdir, header):
    import workloadapi_pb2
    import workloadapi_pb2_grpc

    with grpc.insecure_channel("unix:" + socket) as channel:
        stub = workloadapi_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        metadata = [SECURITY_HEADER] if header else []
        stream = stub.FetchX509SVID(
            workloadapi_pb2.X509SVIDRequest(), metadata=metadata, timeout=DEADLINE_SECONDS
        )
        try:
            first = next(stream)
        finally:
            stream.cancel()
    svids = []
    for i, s in enumerate(first.svids):
        svids.append({
            "spiffe_id": s.spiffe_id,
            "x509_svid_der": write(outdir, "svid-{}.der".format(i), s.x509_svid),
            "bundle_der": write(outdir, "bundle-{}.der".format(i), s.bundle),
            "key_bytes": len(s.x509_svid_key),
        })
    emit("x509_svid_response", svids=svids, federated_bundles=sorted(first.federated_bundles))


def cp_bundle(socket):
    from keyway.v1 import keyway_pb2, keyway_pb2_grpc

    with grpc.insecure_channel("unix:" + socket) as channel:
        b = keyway_pb2_grpc.AdminStub(channel).GetBundle(
            keyway_pb2.GetBundleRequest(), timeout=DEADLINE_SECONDS
        )
    emit(
        "bundle",
        trust_domain=b.trust_domain,
        sequence=b.sequence,
        x509_authorities=[base64.b64encode(c).decode() for c in b.x509_authorities],
        jwks=b.jwks.decode(),
        refresh_hint_seconds=b.refresh_hint_seconds,
    )


def agent_auth(socket):
    from keyway.v1 import agent_pb2, agent_pb2_grpc

    with grpc.insecure_channel("unix:" + socket) as channel:
        r = agent_pb2_grpc.AgentAdminStub(channel).ListAuth(
            agent_pb2.ListAuthRequest(), timeout=DEADLINE_SECONDS
        )
    emit(
        "auth_list",
        datapath=r.datapath,
        entries=[
            {
                "local_identity": e.local_identity,
                "local_spiffe_id": e.local_spiffe_id,
                "remote_identity": e.remote_identity,
                "remote_spiffe_id": e.remote_spiffe_id,
                "remote_node_id": e.remote_node_id,
                "remote_node": e.remote_node,
                "expires_unix": e.expires_unix,
                "authenticated_unix": e.authenticated_unix,
                "via": e.via,
            }
            for e in r.entries
        ],
    )


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    socket, action, outdir = argv[1:]
    emit_versions("grpcio", "grpcio", "grpcio-tools", "protobuf")
    generate(outdir)
    try:
        if action == "x509":
            x509(socket, outdir, header=True)
        elif action == "x509-no-header":
            x509(socket, outdir, header=False)
        elif action == "cp-bundle":
            cp_bundle(socket)
        elif action == "agent-auth":
            agent_auth(socket)
        else:
            print("unknown action {!r}".format(action), file=sys.stderr)
            return 2
    except grpc.RpcError as e:
        emit(
            "rpc_error",
            action=action,
            code=e.code().name,
            details=e.details(),
            debug_error_string=e.debug_error_string(),
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
