"""Generated protobuf and gRPC modules. DO NOT EDIT; see fedray.proto.generate."""
