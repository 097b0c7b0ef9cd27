"""Fused kernels with PyTorch twins (logprob.py, sampling.py), and the one fallback rule they
share."""
import warnings

_proven, _broken = set(), set()


def first_use_fallback(name, fast, twin):
    """Run fast(); if the fast path (a Triton kernel, a compiled FlexAttention) fails the first time
    it is used (no compiler, an unsupported GPU, a Triton version mismatch), warn once and run its
    PyTorch twin, now and for the rest of the process. A failure after it has once worked (e.g. out
    of memory) is a real error and is raised. Set RLHF_KERNELS=torch to choose the twins up
    front."""
    if name in _broken:
        return twin()
    if name in _proven:
        return fast()
    try:
        result = fast()
    except Exception as error:  # noqa: BLE001 -- any failure of an unproven kernel: fall back
        _broken.add(name)
        warnings.warn(f"{name}: the fast kernel failed on first use "
                      f"({type(error).__name__}: {error}); using its PyTorch twin from now on",
                      RuntimeWarning, stacklevel=2)
        return twin()
    _proven.add(name)
    return result
