"""A py-spiffe (`spiffe` on PyPI) workload, driven by tests/tests/third_party_clients.rs.

    python py_spiffe_client.py SOCKET ACTION OUTDIR [ARG...]

ACTION is one of
    x509                 fetch the X509-SVID and the X.509 bundles, write them as PEM
    watch N SECONDS      watch the X.509 context stream until N+1 distinct leaf
                         serials arrived (N rotations), or SECONDS passed
    jwt AUDIENCE         fetch a JWT-SVID for AUDIENCE, validate it with the agent
                         (ValidateJWTSVID) and locally with the JWT bundle

Prints one JSON object per line: first {"event": "versions", ...}, then what
happened. A failed call prints {"event": "error", ...} with the gRPC status it
carried and exits 3. Every blocking call has a deadline.
"""

import base64
import json
import os
import queue
import sys
import time

import grpc
from cryptography.hazmat.primitives import serialization

from spiffe import JwtSvid, WorkloadApiClient

from common import emit, emit_versions

DEADLINE_SECONDS = 20.0


def pem(certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write(outdir, name, data):
    path = os.path.join(outdir, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def leaf_fields(svid):
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": format(svid.leaf.serial_number, "x"),
        "not_after": int(svid.leaf.not_valid_after_utc.timestamp()),
        "chain_len": len(svid.cert_chain),
    }


def x509(client, outdir):
    svid = client.fetch_x509_svid()
    emit("x509_svid", chain_pem=write(outdir, "svid.pem", pem(svid.cert_chain)), **leaf_fields(svid))
    bundles = client.fetch_x509_bundles()
    out = {}
    for b in sorted(bundles.bundles, key=lambda b: str(b.trust_domain)):
        td = str(b.trust_domain)
        certs = sorted(b.x509_authorities, key=lambda c: c.serial_number)
        out[td] = {
            "authorities": len(certs),
            "pem": write(outdir, "bundle-{}.pem".format(td), pem(certs)),
        }
    emit("x509_bundles", bundles=out)


def watch(client, outdir, rotations, seconds):
    updates = queue.Queue()
    handler = client.stream_x509_contexts(
        on_success=lambda ctx: updates.put(("ok", ctx, time.time())),
        on_error=lambda err: updates.put(("error", err, time.time())),
        retry_connect=False,
    )
    deadline = time.monotonic() + seconds
    serials = []
    try:
        while len(serials) < rotations + 1:
            left = deadline - time.monotonic()
            if left <= 0:
                emit("timeout", seconds=seconds, serials=serials)
                return 4
            try:
                kind, value, received = updates.get(timeout=left)
            except queue.Empty:
                continue
            if kind == "error":
                raise value
            svid = value.default_svid
            fields = leaf_fields(svid)
            td = svid.spiffe_id.trust_domain
            bundle = value.x509_bundle_set.get_bundle_for_trust_domain(td)
            n = len(serials)
            emit(
                "x509_context",
                received_unix=received,
                chain_pem=write(outdir, "svid-{}.pem".format(n), pem(svid.cert_chain)),
                bundle_pem=write(outdir, "bundle-{}.pem".format(n), pem(bundle.x509_authorities)),
                **fields,
            )
            if fields["serial"] not in serials:
                serials.append(fields["serial"])
    finally:
        handler.cancel()
    return 0


def claims_of(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def outcome(f):
    try:
        f()
        return "accepted"
    except Exception as e:  # the rejection is the expected outcome
        return "rejected: {}: {}".format(type(e).__name__, e)


def jwt(client, audience):
    svid = client.fetch_jwt_svid({audience})
    claims = claims_of(svid.token)
    by_agent = client.validate_jwt_svid(svid.token, audience)
    bundles = client.fetch_jwt_bundles()
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    locally = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
    other = "not-" + audience
    emit(
        "jwt_svid",
        spiffe_id=str(svid.spiffe_id),
        sub=claims.get("sub"),
        aud=claims.get("aud"),
        exp=claims.get("exp"),
        agent_validated=str(by_agent.spiffe_id),
        locally_validated=str(locally.spiffe_id),
        other_audience_agent=outcome(lambda: client.validate_jwt_svid(svid.token, other)),
        other_audience_local=outcome(lambda: JwtSvid.parse_and_validate(svid.token, bundle, {other})),
        jwt_authorities=len(bundle.jwt_authorities),
    )


def rpc_error_of(e):
    """The gRPC status behind a py-spiffe error, if there is one."""
    while e is not None:
        if isinstance(e, grpc.RpcError) and isinstance(e, grpc.Call):
            return e
        e = e.__cause__ or e.__context__
    return None


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    socket, action, outdir, args = argv[1], argv[2], argv[3], argv[4:]
    emit_versions("py-spiffe", "spiffe", "grpcio", "protobuf", "cryptography")
    try:
        with WorkloadApiClient("unix://" + socket, default_timeout=DEADLINE_SECONDS) as client:
            if action == "x509":
                x509(client, outdir)
            elif action == "watch":
                return watch(client, outdir, int(args[0]), float(args[1]))
            elif action == "jwt":
                jwt(client, args[0])
            else:
                print("unknown action {!r}".format(action), file=sys.stderr)
                return 2
    except Exception as e:
        call = rpc_error_of(e)
        emit(
            "error",
            action=action,
            type=type(e).__name__,
            message=str(e),
            grpc_code=call.code().name if call else None,
            grpc_details=call.details() if call else None,
            grpc_debug_error_string=call.debug_error_string() if call else None,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
