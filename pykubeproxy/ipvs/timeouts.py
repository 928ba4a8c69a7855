"""IPVS connection timeouts: --ipvs-tcp-timeout, --ipvs-tcpfin-timeout, --ipvs-udp-timeout.

As upstream's IPVS proxier (``ConfigureTimeouts``, pkg/proxy/ipvs/util), set once at start
when any of the three is above 0, with one IPVS_CMD_SET_CONFIG request over generic
netlink (what ``ipvsadm --set`` sends). The kernel keeps its value for a timeout the request
leaves out or gives as 0, so a zero flag means "as is". A failure is logged, not fatal, as
upstream does. pyroute2's IPVS message declares these attributes as raw bytes, so this
module has its own message class with them as 32-bit integers (seconds).
"""

from __future__ import annotations

import logging

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.generic import GenericNetlinkSocket

log = logging.getLogger(__name__)

IPVS_GENL_NAME = "IPVS"
IPVS_GENL_VERSION = 1
IPVS_CMD_SET_CONFIG = 12


class ConfigMessage(genlmsg):  # type: ignore[misc]
    """An IPVS command carrying the timeout attributes (include/uapi/linux/ip_vs.h)."""

    prefix = "IPVS_CMD_ATTR_"
    nla_map = (
        ("IPVS_CMD_ATTR_UNSPEC", "none"),
        ("IPVS_CMD_ATTR_SERVICE", "hex"),
        ("IPVS_CMD_ATTR_DEST", "hex"),
        ("IPVS_CMD_ATTR_DAEMON", "hex"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_UDP", "uint32"),
    )


def set_config_message(tcp: float, tcp_fin: float, udp: float) -> ConfigMessage:
    """The request setting the timeouts above 0, in whole seconds; the others are left out."""
    msg = ConfigMessage()
    msg["cmd"] = IPVS_CMD_SET_CONFIG
    msg["version"] = IPVS_GENL_VERSION
    msg["attrs"] = [
        (f"IPVS_CMD_ATTR_TIMEOUT_{name}", int(seconds))
        for name, seconds in (("TCP", tcp), ("TCP_FIN", tcp_fin), ("UDP", udp))
        if int(seconds) > 0
    ]
    return msg


def set_timeouts(tcp: float, tcp_fin: float, udp: float) -> bool:
    """Set the IPVS timeouts of the calling thread's network namespace; False (logged) when
    the kernel refused or nothing was asked for."""
    msg = set_config_message(tcp, tcp_fin, udp)
    if not msg["attrs"]:
        return False
    try:
        with GenericNetlinkSocket() as sock:
            sock.bind(IPVS_GENL_NAME, ConfigMessage)
            sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)
    except Exception as err:  # upstream logs and goes on
        log.warning("cannot set IPVS timeouts (tcp=%gs tcpfin=%gs udp=%gs): %s",
                    tcp, tcp_fin, udp, err)  # fmt: skip
        return False
    log.info("IPVS timeouts set: tcp=%gs tcpfin=%gs udp=%gs (0: unchanged)", tcp, tcp_fin, udp)
    return True
