"""Guest-side IPVS tests: they need ip_vs, so they run only inside the VM that
tests/test_ipvs_vm.py boots (pykubeproxy.sandbox.vm sets PYKUBEPROXY_IN_VM=1 there)."""

import pytest

from pykubeproxy.sandbox.vm import IN_VM_ENV, in_vm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ipvs: needs the ip_vs kernel module; runs inside the VM (tests/test_ipvs_vm.py)"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not in_vm():
        pytest.skip(f"runs inside the VM only ({IN_VM_ENV}=1): tests/test_ipvs_vm.py boots it")
