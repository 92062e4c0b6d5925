"""fedray: Ray-based federated learning orchestration.

Subpackages: `fedray.compression` (codecs), `fedray.proto` (wire format), `fedray.workers`
(what runs inside Ray actors), `fedray.orchestrator` (job driver, aggregation service, CLI).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
