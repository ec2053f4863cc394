"""ONNX export, parity gate, bundles and TensorRT builds (needs the `export` extra)."""
