"""Graph passes and analyses on instrumented modules (``torch.fx``).

:mod:`lobster_fx.graph.taps`: per-unit taps on Linear / Conv outputs and their gradients.
"""
