"""Step 6: what ships to devices: int8 quantization, student distillation, structured pruning
(``prune``), ONNX export and torch-free prediction (with a chosen execution provider), and the
device-aware student search (``search``, per-class ``budgets``).
"""
