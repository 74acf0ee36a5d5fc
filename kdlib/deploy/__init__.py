"""Deployment of a trained student: ONNX fp32, int8 (dynamic quantization), and a size/speed/quality table.

    from kdlib.deploy import deploy_model, deployment_table
    record = deploy_model(Path("runs/x/export"), Path("runs/x/deploy"), texts=texts, labels=labels)
    print(deployment_table(record))

One module per job: `onnx_export` (the graph), `quantize` (int8 copies), `measure` (running and timing
them side by side), `pipeline` (a model folder in, a self-contained deployment folder out), `table`.
"""

from kdlib.deploy.measure import OnnxRunner, compare_deployed, max_abs_difference
from kdlib.deploy.onnx_export import export_onnx, output_name
from kdlib.deploy.pipeline import CANDIDATES, deploy_model
from kdlib.deploy.quantize import quantize_int8, torch_dynamic_int8
from kdlib.deploy.table import deployment_table

__all__ = ["CANDIDATES", "OnnxRunner", "compare_deployed", "deploy_model", "deployment_table", "export_onnx",
           "max_abs_difference", "output_name", "quantize_int8", "torch_dynamic_int8"]
