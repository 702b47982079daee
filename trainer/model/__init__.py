"""The models: preprocessing, the tabular diffusion denoiser, the detectors built on it, and the
export to one ONNX file."""
