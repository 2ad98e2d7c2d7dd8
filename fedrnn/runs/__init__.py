"""Step 5: running and recording a run: its lifecycle (lifecycle) on Flower's Simulation Engine
(ray_engine), what it prints (console, interrupt), what it stops on (failures), what it records
(records: clients.jsonl and metrics.csv; plots; tracking: MLflow) and run comparison (report).
"""
