"""Errors that the CLI reports as one line (no traceback) with a non-zero exit."""


class VitPruneError(Exception):
    """A user-facing error: bad input, bad configuration or an unmet precondition."""


def torch_load_error(path: object, exc: BaseException) -> str:
    """One line for a failed ``torch.load(path, weights_only=True)``; torch's multi-line text never reaches the
    user. A pickle that references code (``__reduce__`` calling ``os.system``, ...) is named as such."""
    import re

    text = str(exc)
    blocked = re.search(r"unsupported GLOBAL ([\w.]+) whose module [\w.]+ is blocked", text)
    if blocked or re.search(r"Unsupported global: GLOBAL (builtins|posix|nt|os|subprocess|sys)\.", text):
        return f"refusing to load {path}: it contains pickled code (only tensors are accepted)"
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return (
            f"{path} is not a plain state dict: it pickles {unsafe.group(1)} (only tensors and containers "
            "are loaded; save model.state_dict() instead)"
        )
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        return f"refusing to load {path}: it pickles objects other than tensors (only tensors are accepted)"
    if type(exc).__name__ == "UnpicklingError" or "invalid load key" in text or "zip archive" in text:
        return f"cannot read checkpoint {path}: corrupt or not a torch checkpoint"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"cannot read checkpoint {path}: {first}"
