// A @grpc/grpc-js client of the SPIFFE Workload API, with the service loaded
// from proto/spiffe/workloadapi.proto by @grpc/proto-loader. Driven by
// tests/tests/third_party_clients.rs.
//
//   node client.js SOCKET x509 OUTDIR
//
// x509: SpiffeWorkloadAPI/FetchX509SVID with `workload.spiffe.io: true`; the
// first response's chain and bundle are written as DER into OUTDIR.
//
// Prints one JSON object per line: first {"event": "versions", ...}, then
// what happened. A call that ends with a gRPC status other than OK prints
// {"event": "rpc_error", ...} and exits 3. The call has a deadline.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEADLINE_MS = 20000;
const PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'proto');

function emit(event, fields) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
}

function versionOf(pkg) {
  const file = path.join(__dirname, 'node_modules', pkg, 'package.json');
  return JSON.parse(fs.readFileSync(file, 'utf8')).version;
}

function codeName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
}

function x509(socket, outdir) {
  const definition = protoLoader.loadSync('spiffe/workloadapi.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    defaults: true,
  });
  const Service = grpc.loadPackageDefinition(definition).SpiffeWorkloadAPI;
  const client = new Service('unix:' + socket, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  metadata.set('workload.spiffe.io', 'true');
  const call = client.FetchX509SVID({}, metadata, { deadline: Date.now() + DEADLINE_MS });
  let done = false;
  call.on('data', (response) => {
    if (done) {
      return;
    }
    done = true;
    const svids = response.svids.map((s, i) => {
      const svid = path.join(outdir, `svid-${i}.der`);
      const bundle = path.join(outdir, `bundle-${i}.der`);
      fs.writeFileSync(svid, s.x509_svid);
      fs.writeFileSync(bundle, s.bundle);
      return {
        spiffe_id: s.spiffe_id,
        x509_svid_der: svid,
        bundle_der: bundle,
        key_bytes: s.x509_svid_key.length,
      };
    });
    emit('x509_svid_response', { svids, federated_bundles: Object.keys(response.federated_bundles).sort() });
    call.cancel();
    client.close();
  });
  call.on('error', (e) => {
    if (done && e.code === grpc.status.CANCELLED) {
      return;
    }
    done = true;
    emit('rpc_error', { action: 'x509', code: codeName(e.code), details: e.details, message: e.message });
    client.close();
    process.exitCode = 3;
  });
}

function main(argv) {
  if (argv.length !== 3) {
    process.stderr.write('usage: node client.js SOCKET x509 OUTDIR\n');
    process.exitCode = 2;
    return;
  }
  const [socket, action, outdir] = argv;
  emit('versions', {
    client: 'grpc-js',
    'grpc-js': versionOf('@grpc/grpc-js'),
    'proto-loader': versionOf('@grpc/proto-loader'),
    node: process.versions.node,
  });
  if (action !== 'x509') {
    process.stderr.write(`unknown action ${JSON.stringify(action)}\n`);
    process.exitCode = 2;
    return;
  }
  x509(socket, outdir);
}

main(process.argv.slice(2));
