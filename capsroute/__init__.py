"""capsroute: the dynamic routing of capsule networks as one fused, differentiable op.

    import capsroute
    v = capsroute.dynamic_routing(u, weight, iterations=3)   # u [B, N_in, D_in] -> v [B, N_out, D_out]
    v = capsroute.route(u_hat, iterations=3)                 # from predictions [B, N_in, N_out, D_out]

`capsroute.reference` holds the same functions in plain PyTorch (the oracle of the tests);
`capsroute.nn` holds modules.
"""
from . import reference
from .functional import dynamic_routing, route, squash

__version__ = "0.1.0"
__all__ = ["dynamic_routing", "route", "squash", "reference", "nn"]


def __getattr__(name):
    # capsroute.nn is imported on first use so that `import capsroute` stays light.
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'capsroute' has no attribute {name!r}")
