"""fedray.workers: what runs inside Ray actors: data, models, local training, upload."""

__all__: list[str] = []
