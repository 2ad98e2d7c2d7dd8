"""Step 6: what ships to devices: int8 quantization, student distillation, ONNX export and
torch-free prediction.
"""
