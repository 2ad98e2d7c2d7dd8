"""Step 3: the federated round loop (loop), its Flower strategies, the wire format, and what a
client does locally (local).
"""
