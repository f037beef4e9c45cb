"""Console output that imports nothing heavy (the profiler and the latency gate run without PyTorch):
progress bars for long stages, sizes in MB, and silencing the noise third-party libraries print."""

from __future__ import annotations

import os
import sys
import warnings


def progress(total: int, desc: str, unit: str, **kwargs):
    """A tqdm bar for a long stage: lively on a terminal, one line every 30 s in a CI log."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, mininterval=2 if sys.stderr.isatty() else 30,
                dynamic_ncols=True, **kwargs)


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


def quiet() -> None:
    """Silence the noise heavy libraries print at import or load time; keep real errors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*legacy.*")
    import logging

    for name in ("transformers", "bitsandbytes", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
