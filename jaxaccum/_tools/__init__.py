"""Tools around an accumulated step.

- ``planner``: choosing ``N`` from the compiled step's memory.
- ``collectives`` (over ``hlo_parser``): collectives in a compiled program.
- ``noise_scale``: the gradient noise scale, smoothed across steps.
"""
