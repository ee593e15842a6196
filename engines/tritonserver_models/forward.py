"""rq ``rq_forward``: one call of an exported R&Q graph through ONNX Runtime inside Triton's Python backend.

Same input and output tensors as the ``rq_onnx`` model that Triton's onnxruntime backend serves from the
same file (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.*``, ``rq_offsets.*`` ->
``logits``, ``present.*``, ``expert_counts.*``), for Triton builds without that backend (e.g. the
``nvidia-pytriton`` wheel's server) and for clients that drive the decode loop themselves. Non-decoupled:
plain HTTP/gRPC ``infer``. Loads of every call are exported as metrics (``rq_telemetry.py``).

Parameters: ``rq_build_dir`` (relative to the repository root), ``graph`` (manifest graph name),
``providers``, ``intra_op_threads``, ``metrics``, ``lis_window``, ``metrics_flush_every``.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rq_runtime import open_session  # noqa: E402  (copied next to this file)
from rq_telemetry import LoadTelemetry, model_parameter, runtime_settings  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        build, threads, providers = runtime_settings(args, config)
        manifest = json.loads((build / "manifest.json").read_text())
        graph = manifest["graphs"][model_parameter(config, "graph", "decoder")]
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        file = graph.get("ort_file", graph["file"])  # ONNX Runtime's fused route where the export has one
        self.session = open_session(build / file, options, providers)
        self.inputs = [i["name"] for i in graph["inputs"]]
        self.outputs = [o["name"] for o in graph["outputs"]]
        self.moe_layers = [int(l) for l in graph["moe_layers"]]
        layers = [layer for layer in manifest["moe_layers"] if int(layer["index"]) in self.moe_layers]
        self.telemetry = LoadTelemetry.from_config(pb_utils, config, args["model_name"],
                                                   args["model_instance_name"], layers,
                                                   version=args["model_version"], build=build)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                values = self.session.run(self.outputs, feed)
            except Exception as err:  # noqa: BLE001 - ORT shape/value errors go back to the client
                rid = request.request_id()
                prefix = f"[request id: {rid}] " if rid else ""
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{prefix}rq_forward: ONNX Runtime rejected the inputs: {first}")))
                continue
            outputs = dict(zip(self.outputs, values))
            self.telemetry.record({l: outputs[f"expert_counts.{l}"] for l in self.moe_layers},
                                  {l: feed[f"rq_offsets.{l}"] for l in self.moe_layers})
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]))
        self.telemetry.flush()
        return responses

    def finalize(self):
        self.telemetry.flush()
