"""What every notebook does first, in one call: validate params, seed, set threads, open the run, show the banner."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from medcomp import plan
from medcomp.placement import use_gpus
from medcomp.numerics import PINNED_ENV, active_pins, in_mode, pinned_environment
from medcomp.params import Params, load_params
from medcomp.runs import Run, write_manifest

EMBEDDED_NOTE = ("> Embedded world: a 135M-parameter LLaVA assembled offline on synthetic DermNet-layout images. "
                 "Its numbers are an honest small model's results and are **not** the paper's.")


def default_params_name() -> str:
    """The notebooks' default when opened by hand: the paper's setup on a GPU, else the embedded one."""
    import torch

    return "kaggle_t4" if torch.cuda.is_available() else "embedded"


def quiet_libraries() -> None:
    """Silence load/save progress bars and info logging of the Hugging Face libraries through their
    own switches, so reports carry this run's output only; errors still show."""
    import huggingface_hub
    import transformers

    import logging

    logging.getLogger("tokenicer").setLevel(logging.WARNING)  # GPTQModel's tokenizer wrapper logs every load
    # peft's prepare_model_for_kbit_training calls the name transformers 5.23 deprecates: nothing for a reader to do
    warnings.filterwarnings("ignore", message=r"`gradient_checkpointing_enable` is deprecated", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    try:
        import datasets

        datasets.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def start_stage(params_file: str | Path = "auto", run_dir: str | Path | None = None, overrides: dict[str, Any] | None = None) -> tuple[Params, Run]:
    """What every notebook does first: validate params, seed everything, set threads, open the run.

    ``params_file="auto"`` picks ``kaggle_t4`` when a GPU is present and ``embedded`` otherwise, so a
    notebook opened by hand works in both worlds.
    """
    import torch
    from transformers import set_seed

    params = plan.with_batch_sizes(load_params(default_params_name() if params_file == "auto" else params_file, overrides))
    quiet_libraries()
    mode = params.runtime.numerics_mode()
    if not in_mode(mode):  # read when torch loaded: too late to set them here
        wanted = " ".join(f"{k}={v}" for k, v in pinned_environment(mode).items()) or "none of " + ", ".join(PINNED_ENV)
        warnings.warn(f"runtime.numerics is {params.runtime.numerics!r} ({mode} on this CPU) but this kernel started with {active_pins()}: its numbers are not "
                      f"that mode's. Run through `python -m medcomp run`, or start Jupyter with {wanted} in its environment.")
    if mode != "default":
        torch.use_deterministic_algorithms(True, warn_only=True)
    set_seed(params.seed)
    torch.set_num_threads(params.runtime.threads)
    use_gpus(params.model.gpus)  # every CUDA load of this kernel splits its model the way medcomp.plan planned
    run = Run.for_params(params, run_dir)
    if not (run.directory / "manifest.json").exists():
        write_manifest(run.directory, params, {"params_file": str(params_file)})
    return params, run



def open_stage(stage: str, params_file: str | Path = "auto", run_dir: str | Path | None = None,
               world_note: str | None = None) -> tuple[Params, Run]:
    """``start_stage``, then the banner every report opens with: the stage, the run, the world, the model
    and the data, and in the embedded world the note that these are a small model's numbers
    (``world_note`` overrides it)."""
    from IPython.display import Markdown, display

    params, run = start_stage(params_file, run_dir)
    display(Markdown(f"**{stage}** · run `{params.run_name}` · world **{params.world}** · model `{params.model.id}` · data `{params.data.root}`"))
    if params.world == "embedded":
        display(Markdown(world_note or EMBEDDED_NOTE))
    shape = plan.shape_for_params(params)
    if shape is not None:  # the real model's (or a local checkpoint's) config is known: show the T4 plan
        table = plan.plans_table([p for p in plan.stage_plans(params, shape) if p.stage == stage])
        display(Markdown(f"**T4 plan for this stage** (estimated from the model's config before it runs; budget {plan.T4_BUDGET_GIB} GiB):"))
        display(table)
    return params, run
