"""Write the job spec's JSON Schema into the Helm chart's values.schema.json (rayJob.jobSpec).

    python scripts/update_helm_schema.py          # rewrite helm/fedray/values.schema.json
    python scripts/update_helm_schema.py --check  # exit 1 if the committed file differs

The job spec's definitions go under the chart schema's `$defs` with the prefix `jobSpec`
(`$defs/jobSpec` is the whole spec), so that every `$ref` resolves from the document root.
tests/test_helm.py fails when the committed file drifts from `fedray.config.JobSpec`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedray.config import job_schema

CHART_SCHEMA = Path(__file__).resolve().parents[1] / "helm" / "fedray" / "values.schema.json"
PREFIX = "jobSpec"


def _rename_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (f"#/$defs/{PREFIX}{v.rsplit('/', 1)[1]}" if k == "$ref" and isinstance(v, str) else _rename_refs(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rename_refs(x) for x in node]
    return node


def merged(chart: dict[str, Any]) -> dict[str, Any]:
    """`chart` with rayJob.jobSpec referring to the job spec's schema, and its $defs replaced."""
    job = job_schema()
    defs = {k: v for k, v in chart.get("$defs", {}).items() if not k.startswith(PREFIX)}
    for name, sub in job.pop("$defs", {}).items():
        defs[f"{PREFIX}{name}"] = _rename_refs(sub)
    job.pop("$schema", None)
    body = _rename_refs(job)
    body["description"] = "the fedray job spec, as given to `fedray run` (generated from fedray.config.JobSpec)"
    defs[PREFIX] = body
    out = {**chart, "$defs": defs}
    out["properties"]["rayJob"]["properties"]["jobSpec"] = {"$ref": f"#/$defs/{PREFIX}"}
    return out


def render(chart: dict[str, Any]) -> str:
    return json.dumps(merged(chart), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    a = p.parse_args(argv)
    text = CHART_SCHEMA.read_text()
    want = render(json.loads(text))
    if a.check:
        if text != want:
            print(f"{CHART_SCHEMA} is out of date: run python scripts/update_helm_schema.py", file=sys.stderr)
            return 1
        return 0
    CHART_SCHEMA.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
