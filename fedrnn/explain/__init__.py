"""Server-side explanations for any checkpoint: Captum attributions (attribution), how faithful they are
(faithfulness) and the CLI ``python -m fedrnn.explain``. The device-side, torch-free occlusion is
``fedrnn.edge.explain``; both share its words, masking and rendering."""
