"""The environment contract between the Helm chart and the job driver.

The chart (helm/fedray/templates/_helpers.tpl) sets these variables in every Ray container; the
driver (`fedray run`, on the head pod) reads them once and fills the job spec's fields that the
spec itself leaves unset. A value written in the job spec always wins over the environment.
tests/test_helm.py renders the chart and fails if it sets a FEDRAY_* variable not named here.
The public address is left out for jobs with several shards (it reaches one shard).
"""

from __future__ import annotations

import os
from typing import Mapping

__all__ = [
    "AGGREGATOR_RESOURCE",
    "GRPC_PORT",
    "PUBLIC_ADDRESS",
    "SPEC_FIELDS",
    "TLS_CA",
    "TLS_CERT",
    "TLS_KEY",
    "TLS_SERVER_NAME",
    "apply_cluster_env",
]

AGGREGATOR_RESOURCE = "FEDRAY_AGGREGATOR_RESOURCE"  # Ray resource of the aggregation pods
GRPC_PORT = "FEDRAY_GRPC_PORT"  # the port every shard listens on (the Service's targetPort)
PUBLIC_ADDRESS = "FEDRAY_PUBLIC_ADDRESS"  # host:port real clients are sent to (the Service)
TLS_CERT = "FEDRAY_TLS_CERT"  # server certificate, on the aggregation pods
TLS_KEY = "FEDRAY_TLS_KEY"  # server key, on the aggregation pods
TLS_CA = "FEDRAY_TLS_CA"  # what workers trust, on every pod
TLS_SERVER_NAME = "FEDRAY_TLS_SERVER_NAME"  # the name in the certificate that workers check

# variable -> (section, field) of the job spec it fills when the spec leaves that field unset
SPEC_FIELDS: dict[str, tuple[str, str]] = {
    AGGREGATOR_RESOURCE: ("resources", "shard_resource"),
    GRPC_PORT: ("service", "port"),
    PUBLIC_ADDRESS: ("service", "public_address"),
    TLS_CERT: ("service", "tls_cert"),
    TLS_KEY: ("service", "tls_key"),
    TLS_CA: ("service", "tls_ca"),
    TLS_SERVER_NAME: ("service", "tls_server_name"),
}
_UNSET = (None, 0, "")


def apply_cluster_env(spec, environ: Mapping[str, str] | None = None):
    """`spec` with the fields it leaves unset filled from the chart's variables; and the
    `(field, value)` pairs that were filled (for the log).

    Raises:
        SpecError: a variable's value is not valid for its field (the message names both).
    """
    from .spec import JobSpec, SpecError

    env = os.environ if environ is None else environ
    d = spec.to_dict()
    filled = []
    for name, (section, key) in SPEC_FIELDS.items():
        raw = env.get(name, "")
        if not raw or d[section].get(key) not in _UNSET:
            continue
        if name == PUBLIC_ADDRESS and d["resources"].get("shards", 1) > 1:
            continue  # one public address reaches one shard; jobs with more give clients node addresses
        if name == GRPC_PORT:
            try:
                value: object = int(raw)
            except ValueError:
                raise SpecError(f"{name}={raw!r}: not a port number (it fills {section}.{key})") from None
        else:
            value = raw
        d[section][key] = value
        filled.append((f"{section}.{key}", value))
    if not filled:
        return spec, []
    try:
        return JobSpec.from_dict(d), filled
    except SpecError as e:
        names = ", ".join(n for n, (s, k) in SPEC_FIELDS.items() if (f"{s}.{k}", d[s][k]) in filled)
        raise SpecError(f"{e} (filled from the environment: {names})") from None
