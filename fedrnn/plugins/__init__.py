"""Step 4: round plugins, one module per config section: [privacy] (record_dp, client_dp),
[compression], [robust], [attack], [faults], [devices], [distill].
"""
