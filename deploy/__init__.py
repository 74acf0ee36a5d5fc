"""The deploy stage: export a model folder to ONNX fp32 and int8 and table size, speed and quality (kdlib.deploy)."""
