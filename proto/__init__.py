"""fedray.proto: the v1 wire format (`fedray/v1/*.proto`), generated code and its one serde module."""

__all__: list[str] = []
