"""Keep library chatter out of the user's terminal; our own progress and metrics stay."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    if os.environ.get("RLHF_DEBUG", "") not in ("", "0"):
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed (imported by accelerate when installed) would warn that it fell back
        # to its CPU accelerator; say so up front instead.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # bitsandbytes (imported by peft when installed) warns at import, through `kernels`, that
    # its optional CPU kernel cannot be fetched offline.
    for name in ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed", "peft",
                 "bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
