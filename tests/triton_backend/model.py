"""A test-only stand-in for Triton's onnxruntime backend, as a Python-based backend (never shipped).

The tritonserver that the nvidia-pytriton wheel bundles has the Python backend but not the onnxruntime
one. Triton loads `backends/onnxruntime/model.py` for a model whose backend is onnxruntime when no
compiled library of that name exists, so the exported repository loads unchanged: this file runs its
`model.onnx` (the config's default_model_filename) with ONNX Runtime on the CPU.
"""

import json
import os

import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        name = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # the test machine has 2 cores, shared with the client
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
                results = self.session.run(self.outputs, feeds)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(r)) for n, r in zip(self.outputs, results)]))
            except Exception as e:  # a bad request fails alone
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
