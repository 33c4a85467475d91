# Keyway: the two commands a user needs are `make demo` and `make test`.
# Both install what they need first (scripts/setup.sh, idempotent and fast
# when everything is already there).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
TIER_DIR := target/tiers
# Every test tier `make test` runs. `.ci/run` fails if any of them did not run.
TIERS := lint unit integration datapath kubernetes cluster
# Test files of the privileged tier (root: namespaces, veths, BPF programs).
PRIVILEGED_TESTS := datapath mutual_auth_kernel explain source_spoofing lookup_agreement
# Test files of the Kubernetes tier (a real kube-apiserver on 127.0.0.1).
KUBERNETES_TESTS := $(basename $(notdir $(wildcard tests/tests/k8s_*.rs)))
# The test file of the cluster tier (a real node: kubelet, containerd, the chart's pods).
CLUSTER_TESTS := cluster
# Every other integration test file.
INTEGRATION_TESTS := $(filter-out $(PRIVILEGED_TESTS) $(KUBERNETES_TESTS) $(CLUSTER_TESTS),$(basename $(notdir $(wildcard tests/tests/*.rs))))

.PHONY: bench-scale all setup build test lint unit integration datapath kubernetes cluster-tier bench demo image cluster clean-tiers print-tiers

all: build

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

print-tiers:
	@echo $(TIERS)

clean-tiers:
	@rm -rf $(TIER_DIR) && mkdir -p $(TIER_DIR)

# Tier: formatting and clippy with warnings denied.
# Every library crate's modules, for the cycle check (scripts/module-cycles.py:
# `python3 scripts/module-cycles.py --graph $(MODULE_SRCS)` prints the graph).
MODULE_SRCS := control-plane/src node-agent/src identity/src serve/src proto/src auth-bpf/common/src tests/support

lint: setup
	$(CARGO) fmt --all -- --check
	rustfmt --edition 2024 --check auth-bpf/ebpf/src/main.rs
	python3 scripts/module-cycles.py --self-test
	python3 scripts/module-cycles.py $(MODULE_SRCS)
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@mkdir -p $(TIER_DIR) && touch $(TIER_DIR)/lint

# Tier: unit tests, inline next to the logic (pure, no servers).
unit: setup
	$(CARGO) test --workspace --lib --bins
	@mkdir -p $(TIER_DIR) && touch $(TIER_DIR)/unit

# Tier: in-process integration tests: real gRPC over real sockets, real
# crypto, the real binaries (built first), openssl and the spiffe crate.
integration: setup
	$(CARGO) build --workspace --bins
	$(CARGO) test -p keyway-tests $(addprefix --test ,$(INTEGRATION_TESTS))
	@mkdir -p $(TIER_DIR) && touch $(TIER_DIR)/integration

# Tier: privileged. The real TC programs in the real kernel, in network
# namespaces and veth pairs the tests make, with real TCP/UDP/ICMP. Needs
# root (CI is root); fails, never skips, without it.
datapath: setup
	$(CARGO) build --workspace --bins
	$(CARGO) test -p keyway-tests $(addprefix --test ,$(PRIVILEGED_TESTS))
	@mkdir -p $(TIER_DIR) && touch $(TIER_DIR)/datapath

# Tier: Kubernetes mode against a real kube-apiserver with etcd on 127.0.0.1,
# built once from Debian's source package and cached (scripts/kube-apiserver.sh).
# Fails, never skips, when the apiserver cannot be built or started.
kubernetes: setup
	$(CARGO) build --workspace --bins
	bash scripts/with-kube-apiserver.sh $(CARGO) test -p keyway-tests $(addprefix --test ,$(KUBERNETES_TESTS))
	@mkdir -p $(TIER_DIR) && touch $(TIER_DIR)/kubernetes

# Tier `cluster`: Keyway installed from its chart, with the image `make image` builds
# (from the debug binaries already built), on a real one-node Kubernetes
# (scripts/local-cluster.sh; the node's binaries are built once and cached), and
# checked through kubectl and the pods (tests/tests/cluster.rs). The cluster is taken
# down afterwards, also on failure. (`make cluster` only brings one up.)
cluster-tier: setup
	$(CARGO) build --workspace --bins
	$(CARGO) test -p keyway-tests $(addprefix --test ,$(CLUSTER_TESTS)) --no-run
	KEYWAY_CLUSTER_IMAGE_PROFILE=debug KEYWAY_CLUSTER_NODES=2 bash scripts/with-local-cluster.sh \
	  $(CARGO) test -p keyway-tests $(addprefix --test ,$(CLUSTER_TESTS)) -- --nocapture
	@mkdir -p $(TIER_DIR) && touch $(TIER_DIR)/cluster

test: clean-tiers lint unit integration datapath kubernetes cluster-tier
	@echo "tiers run: $$(ls $(TIER_DIR) | tr '\n' ' ')"

bench: setup bench-scale
	$(CARGO) build --release --bins
	$(CARGO) bench -p keyway-tests --bench issuance --bench agent --bench datapath --bench auth
	@echo "results: bench-results/issuance.md bench-results/agent.md bench-results/datapath.md bench-results/auth.md bench-results/scale.md"

# Kubernetes mode at cluster scale against the real kube-apiserver, this tree
# against the control plane before per-object state (scripts/scale-baseline.sh,
# built first: it passes through target/release). KEYWAY_SCALE=PODS:NODES:IDS,...
# picks the scenarios. One simulated agent per node: many sockets, so a high
# file limit.
bench-scale: setup
	baseline=$$(bash scripts/scale-baseline.sh) && \
	$(CARGO) build --release --bins && \
	ulimit -n $$(ulimit -Hn) && \
	KEYWAY_SCALE_BASELINE=$$baseline KEYWAY_SCALE_BASELINE_REV=$$(basename $$baseline | sed 's/.*-//') \
	  bash scripts/with-kube-apiserver.sh $(CARGO) bench -p keyway-tests --bench scale
	@echo "results: bench-results/scale.md"

demo: build
	@bash scripts/demo.sh

# One OCI image with both binaries (release build), FROM scratch, no Docker daemon:
# target/image/keyway-<version>.oci.tar, named keyway:<version> (see README, "Image").
# KEYWAY_IMAGE_PROFILE=debug packages the debug binaries already built instead.
image: setup
	@bash scripts/image.sh

# A real one-node Kubernetes (etcd, kube-apiserver, controller-manager, scheduler,
# kube-proxy, kubelet, containerd, ptp CNI) with Keyway installed from the chart:
# scripts/local-cluster.sh up|status|down. Prints `export KUBECONFIG=...` last.
cluster: setup
	@bash scripts/local-cluster.sh up
