# The pykubeproxy node agent. Build with `make image` (-> pykubeproxy:dev): it first builds a
# wheelhouse of pykubeproxy, its dependencies and pip, at the versions in requirements.lock,
# and that wheelhouse (with the lock) is the whole build context. Python packages come only
# from it: this build uses no package index, only Debian's apt repositories.
#
# BASE_IMAGE: a Debian bookworm image, whose Python 3.11 runs the agent: the wheelhouse holds
# pure and cp311 manylinux wheels, and python-iptables (sdist only on PyPI) compiled by `make
# image` for the builder's Python 3.11 (linux_x86_64; its C part needs only glibc 2.7).
# The default is Docker Hub's bookworm-slim;
# without Docker Hub, `scripts/make-base-image` makes an equivalent (pykubeproxy-base:bookworm)
# with debootstrap: `make image BASE_IMAGE=pykubeproxy-base:bookworm`.
ARG BASE_IMAGE=debian:bookworm-slim

# What the agent runs and calls. iptables: libip4tc/libxtables, which python-iptables loads
# (the agent writes legacy xtables); nftables: `nft list tables` for the start-up report on
# nf_tables-only nodes; iproute2: the node's addresses; conntrack: flow cleanup for UDP/SCTP;
# ipset, ipvsadm: IPVS mode (and removing its leftovers); kmod: python-iptables runs modprobe.
# apt-get upgrade brings an older (e.g. locally made) base up to the mirror's fixes.
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get upgrade -y \
 && apt-get install -y --no-install-recommends \
        conntrack iproute2 ipset iptables ipvsadm kmod nftables python3 \
 && rm -rf /var/lib/apt/lists/* \
 && update-alternatives --set iptables /usr/sbin/iptables-legacy \
 && update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy
# ^ so that `iptables-save` in the container shows the tables the agent writes, as on a
#   kube-proxy node.

# A virtualenv with the agent, installed by the wheelhouse's own pip run from its wheel: the
# image gets neither pip nor Debian's python3-venv, and this stage shares the apt layer above.
FROM runtime AS install
COPY . /wheels
RUN pip_wheel="$(echo /wheels/pip-*.whl)" \
 && python3 -m venv --without-pip /opt/pykubeproxy \
 && /opt/pykubeproxy/bin/python "$pip_wheel/pip" install --no-index --no-cache-dir \
        --find-links /wheels --constraint /wheels/requirements.lock /wheels/pykubeproxy-*.whl \
 && rm -r /opt/pykubeproxy/lib/python3.11/site-packages/kubernetes/aio \
          /opt/pykubeproxy/lib/python3.11/site-packages/pykubeproxy/sandbox
# ^ The agent uses kubernetes' synchronous client; the package also ships an asyncio copy of
#   every API (kubernetes.aio, 68 MB) that nothing imports. pykubeproxy.sandbox (the API
#   double, the netns builder, the VM runner) serves the tests and the demo, and the agent
#   never imports it (tests/unit/test_packaging.py). The image test runs the agent.

FROM runtime
COPY --from=install /opt/pykubeproxy /opt/pykubeproxy
ENV PATH=/opt/pykubeproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Exec form: the agent itself is PID 1 and gets SIGTERM (its handler leaves the rules in place
# and exits 0 at once). No init process: a Pod's `command:` would replace it anyway.
ENTRYPOINT ["pykubeproxy"]
