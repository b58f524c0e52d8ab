"""medcomp: prune, finetune and quantize LLaVA for dermatology VQA (arXiv 2507.21976), reproducibly.

One module per concept: ``params``, ``knowledge``, ``data``, ``synthetic``, ``models``, ``training``,
``evaluation``, ``plotting``, ``runs`` and ``runner``. Notebooks in ``notebooks/`` call into them.
"""

__version__ = "0.1.0"
