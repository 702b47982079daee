"""Detection: the ONNX scoring model, the YAML rules that name causes, and the incident tracker
that correlates evidence per entity. Imports the layers before it."""
