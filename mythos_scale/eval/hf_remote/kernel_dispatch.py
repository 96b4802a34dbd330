# Appended to the bundled reference ops (rdt_kernels.py of an HF export): the dispatch the model
# modules call, over the reference ops only (the compiled extension is not bundled).


class KernelDispatch:
    """``kernels.<op>(...)`` -> the reference op of that name, whatever the requested mode."""

    def __getattr__(self, name: str):
        op = globals().get(name)
        if not callable(op):
            raise AttributeError(name)
        return op


def select_kernels(mode: str = "reference") -> KernelDispatch:
    return KernelDispatch()
