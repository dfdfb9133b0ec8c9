"""Errors that the CLI reports as one line (no traceback) with a non-zero exit."""


class VitPruneError(Exception):
    """A user-facing error: bad input, bad configuration or an unmet precondition."""


SAFE_PICKLE_MODULES = ("torch.", "collections.", "_codecs.", "numpy.core.multiarray.", "numpy.dtype")


def pickle_globals(path: object) -> list[str]:
    """The ``module.name`` globals a pickle (a raw pickle file or the ``data.pkl`` of a torch zip) references,
    read with :mod:`pickletools` (nothing is executed); ``[]`` when it is not a readable pickle."""
    import io
    import pickletools
    import zipfile

    try:
        with open(str(path), "rb") as f:
            raw = f.read(64 * 2**20)
        if raw[:2] == b"PK":
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                raw = z.read(name)
        found, strings = [], []
        for op, arg, _ in pickletools.genops(raw):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return found
    except Exception:  # not a pickle, truncated, no data.pkl, ...
        return []


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
        if any(not g.startswith(SAFE_PICKLE_MODULES) for g in pickle_globals(path)):
            return f"refusing to load {path}: it contains pickled code (only tensors are accepted)"
        if not pickle_globals(path):
            return f"cannot read checkpoint {path}: corrupt or not a torch checkpoint"
        return f"refusing to load {path}: it pickles objects other than tensors (only tensors are accepted)"
    if isinstance(exc, PermissionError) and exc.strerror:
        return f"cannot read checkpoint {path}: {exc.strerror}"
    return f"cannot read checkpoint {path}: corrupt or not a torch checkpoint"
