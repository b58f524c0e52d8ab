"""medcomp: prune, finetune and quantize LLaVA for dermatology VQA (arXiv 2507.21976), reproducibly.

One module per job, in layers that import only downward (the contract is in ``pyproject.toml``; the
README's "Layout" lists the modules). Notebooks in ``notebooks/`` call ``medcomp.notebook.open_stage``,
then the stage's orchestration in ``medcomp.stages`` and the algorithms below it.
"""

import logging
import warnings

__version__ = "0.1.0"

# Messages the pinned libraries print on every run that say nothing about this run. They would
# fill every report; anything else (including all errors) still shows.
_HARMLESS_WARNINGS = (
    "IProgress not found",  # tqdm in a kernel without ipywidgets: text bars work
    "`is_gradient_checkpointing` is deprecated",  # peft calls the old transformers name
)
_HARMLESS_LOGGERS = (
    "torch.utils._pytree",  # torchao's Enum registrations, deprecated in torch 2.14
    "torch.utils.cpp_extension",  # "No CUDA runtime is found" on a CPU machine
    "bitsandbytes.backends.cpu.ops",  # optional hub kernel; the built-in CPU kernel is used instead
)
for _message in _HARMLESS_WARNINGS:
    warnings.filterwarnings("ignore", message=f".*{_message}")
for _name in _HARMLESS_LOGGERS:
    logging.getLogger(_name).setLevel(logging.ERROR)
